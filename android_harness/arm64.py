"""The emulated arm64 phone: a Debian arm64 userland run under qemu user mode, the stand-in for
an Android phone's CPU (no Android emulator installs here; a real phone runs the same userland
through Termux + proot-distro, which gives glibc, so the same manylinux wheels install there).

Three steps, each cached, each usable on its own:

- ``ensure_rootfs(cache_dir)`` builds (``debootstrap --arch=arm64 --variant=minbase``, as root,
  from the mirror of this machine's own apt sources) or reuses a Debian bookworm arm64 root
  filesystem with Python 3.11 and gcc. It is built in a temporary sibling folder and renamed
  into place only when complete, with a marker naming the recipe it was built by, so an
  interrupted or out-of-date build is never reused.
- ``ensure_runtime(rootfs)`` installs the phone runtime into it, under ``/opt/fedkit``: the
  aarch64 cp311 manylinux wheels of the phone's lock (``android_harness.install``: the aarch64
  lines of ``phone-requirements.txt``, downloaded on this host with ``pip download --platform``,
  no arm64 code run to get them) and fedkit's own
  ``device_runtime``, whose C kernels are compiled inside the phone by the rootfs's own gcc
  with the repo's ``setup.py`` (on arm64 its portable path: the AVX2 clones exist on x86-64
  only). The install is keyed by a hash of the sources and the wheel list, so a rerun with
  nothing changed costs nothing.
- ``run_in_phone(rootfs, argv)`` / ``start_in_phone`` run a command inside the phone with the
  runtime importable: a private mount namespace (``unshare --mount``) mounts ``/proc`` and
  ``/sys`` into the rootfs (ONNX Runtime's cpuinfo needs them) and ``chroot``s into it; the
  mounts vanish with the process, however it ends (SIGKILL included), and phones started at
  the same time never share or race on a mount.

``ensure_phone()`` does all three and returns an ``Arm64Phone``. The rootfs takes minutes to
build, so it is cached in a stable folder, ``default_cache_dir()``: ``$FEDKIT_ARM64_ROOTFS_DIR``
or ``~/.cache/fedkit/arm64`` -- deliberately not ``$FEDKIT_CACHE_DIR``, which tests set per
session.

The host must be Linux, run this as root, and run arm64 binaries through binfmt_misc (on an
arm64 host they run natively): ``host_problem()`` says what is missing and the commands that
fix it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from android_harness.install import pinned, pip, source_root
from device_runtime.errors import DeployError

# What the rootfs is built from. Bump RECIPE_VERSION whenever the build changes: a rootfs with
# another recipe is rebuilt, not reused.
RECIPE_VERSION = 1
SUITE = "bookworm"  # Python 3.11, the cp311 wheels below
ARCH = "arm64"
DEB_PACKAGES = ("python3", "python3-venv", "python3-pip", "python3-dev", "gcc", "libc6-dev")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ROOTFS_NAME = f"rootfs-{SUITE}-{ARCH}"
MARKER = ".fedkit-rootfs.json"  # inside a rootfs: the recipe it was built by

# The phone runtime: the phone's lock (android_harness.install) as pip evaluates it on an arm64
# phone, whose platform.machine() is aarch64.
MACHINE = "aarch64"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
WHEEL_PYTHON = "3.11"
# pytest and hypothesis, to run device_runtime's own tests on the phone; installed in a folder of
# their own, so they never count in (or leak into) the phone runtime.
TEST_WHEELS = (
    "pytest==9.2.0",
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
    "packaging==26.4",
    "pygments",
    "hypothesis>=6.100",
    "sortedcontainers==2.4.0",
)

PHONE_ROOT = PurePosixPath("/opt/fedkit")  # everything fedkit installs in the phone
CURRENT = PHONE_ROOT / "current"  # symlink to the runtime ensure_runtime installed last
# The CPU qemu emulates: a phone's big core (Snapdragon 855/865, Kirin 980, Dimensity 1000),
# ARMv8.2 with dot product and fp16, no SVE -- not qemu's default "max", whose ISA (SVE, SME,
# a made-up CPU id) no phone has and which changes with qemu's version. QEMU_CPU in a run's env
# picks another.
PHONE_CPU = "cortex-a76"
PHONE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BINFMT = Path("/proc/sys/fs/binfmt_misc")

_HOST_SETUP = (
    "apt-get update && apt-get install -y qemu-user-static debootstrap binfmt-support; "
    "if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then "
    "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; fi; "
    "update-binfmts --enable qemu-aarch64"
)


class EmulationError(DeployError):
    """The emulated arm64 phone cannot be built, installed or run on this host."""


# ---------------------------------------------------------------- the host


def default_cache_dir() -> Path:
    """Where the arm64 rootfs is cached: ``$FEDKIT_ARM64_ROOTFS_DIR``, else
    ``~/.cache/fedkit/arm64``. Not ``$FEDKIT_CACHE_DIR``: tests point that at a fresh folder per
    session, and a rootfs takes minutes to build."""
    configured = os.environ.get("FEDKIT_ARM64_ROOTFS_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fedkit" / "arm64"


def host_setup_commands() -> str:
    """The commands, as root, that give a Debian host everything the emulated phone needs."""
    return _HOST_SETUP


def runs_arm64_natively() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def binfmt_interpreter() -> tuple[Path, str] | None:
    """qemu-aarch64's registration in binfmt_misc: (interpreter, flags), or None when arm64
    binaries cannot run here through it (not registered, disabled, or binfmt_misc unmounted)."""
    entry = BINFMT / "qemu-aarch64"
    try:
        lines = entry.read_text().splitlines()
    except OSError:
        return None
    if not lines or lines[0].strip() != "enabled":
        return None
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    interpreter = fields.get("interpreter", "").strip()
    return (Path(interpreter), fields.get("flags:", fields.get("flags", "")).strip()) if interpreter else None


def host_problem(*, need_debootstrap: bool = True) -> str | None:
    """Why this host cannot run (or build, with ``need_debootstrap``) the emulated arm64 phone,
    with the commands that fix it; None when it can."""
    if sys.platform != "linux":
        return f"the emulated arm64 phone needs Linux (chroot, binfmt_misc), this is {sys.platform}"
    if os.geteuid() != 0:
        return "the emulated arm64 phone needs root (debootstrap, mount and chroot): run as root (CI runs as root)"
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH: apt-get install -y util-linux coreutils mount"
    if need_debootstrap and shutil.which("debootstrap") is None:
        return f"debootstrap is not installed, which builds the arm64 rootfs; as root: {_HOST_SETUP}"
    if runs_arm64_natively():
        return None
    if not (BINFMT / "register").exists():
        return "binfmt_misc is not mounted, so this host cannot run arm64 binaries; as root: " + _HOST_SETUP
    if binfmt_interpreter() is None:
        return (
            "qemu-aarch64 is not registered (or is disabled) in binfmt_misc, so this host cannot "
            f"run arm64 binaries; as root: {_HOST_SETUP}"
        )
    return None


def _require_host(*, need_debootstrap: bool) -> None:
    problem = host_problem(need_debootstrap=need_debootstrap)
    if problem is not None:
        raise EmulationError(problem)


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror of this machine's own apt sources (``$FEDKIT_DEBIAN_MIRROR`` wins):
    the first ``URIs:`` of a deb822 ``*.sources`` stanza, or the first ``deb`` line of
    ``sources.list``, that serves a plain suite (not -security / -updates / -backports).
    ``DEFAULT_MIRROR`` if there is none."""
    configured = os.environ.get("FEDKIT_DEBIAN_MIRROR")
    if configured:
        return configured
    found: list[tuple[str, list[str]]] = []  # (uri, suites)
    for path in sorted(sources_dir.glob("sources.list.d/*.sources")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    found.append((uri, fields.get("suites", "").split()))
    lists = [sources_dir / "sources.list", *sorted(sources_dir.glob("sources.list.d/*.list"))]
    for path in lists:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], [words[2]]))
    for uri, suites in found:
        if uri.startswith(("http://", "https://")) and any("-" not in s and "/" not in s for s in suites):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


# ---------------------------------------------------------------- cached folders


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One builder at a time per folder (other processes wait)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _mounts_under(path: Path) -> list[str]:
    root = os.path.realpath(path)
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                mounts.append(point)
    return mounts


def _remove_tree(path: Path) -> None:
    """Deletes ``path``, first unmounting anything a killed build left mounted under it (a
    debootstrap interrupted in its second stage leaves /proc and /sys mounted there)."""
    if not path.exists() and not path.is_symlink():
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    if _mounts_under(path):
        raise EmulationError(
            f"{path} still has mounts under it ({', '.join(_mounts_under(path))}): unmount them, then retry"
        )
    shutil.rmtree(path)


def _read_marker(folder: Path, name: str) -> dict | None:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


# ---------------------------------------------------------------- the rootfs


def rootfs_recipe() -> dict:
    """What a rootfs is built from; a cached one is reused only if its marker says exactly this."""
    return {
        "recipe": RECIPE_VERSION,
        "suite": SUITE,
        "arch": ARCH,
        "variant": "minbase",
        "packages": list(DEB_PACKAGES),
    }


def cached_rootfs(cache_dir: Path | None = None) -> Path | None:
    """The complete rootfs of the current recipe under ``cache_dir``, or None."""
    rootfs = (default_cache_dir() if cache_dir is None else Path(cache_dir)) / ROOTFS_NAME
    marker = _read_marker(rootfs, MARKER)
    return rootfs if marker is not None and marker.get("recipe") == rootfs_recipe() else None


def ensure_rootfs(cache_dir: Path | None = None, *, mirror: str | None = None, log=None) -> Path:
    """The cached Debian arm64 rootfs under ``cache_dir`` (default ``default_cache_dir()``),
    built first if there is none of the current recipe. Building takes minutes (debootstrap's
    second stage runs under qemu); it runs as root, into a temporary sibling folder that is
    renamed into place only once complete. ``log`` (a callable taking a line) hears progress.
    Raises EmulationError when the host cannot build or run it, or debootstrap fails."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    found = cached_rootfs(cache_dir)
    if found is not None:
        return found
    _require_host(need_debootstrap=True)
    with _locked(cache_dir):
        found = cached_rootfs(cache_dir)  # another process built it while this one waited
        if found is not None:
            return found
        for stale in cache_dir.glob(f".{ROOTFS_NAME}.partial-*"):  # interrupted builds: never reused
            _remove_tree(stale)
        mirror = mirror or apt_mirror()
        partial = Path(tempfile.mkdtemp(prefix=f".{ROOTFS_NAME}.partial-", dir=cache_dir))
        partial.chmod(0o755)  # the phone's /
        logfile = cache_dir / "debootstrap.log"
        command = [
            "debootstrap",
            f"--arch={ARCH}",
            "--variant=minbase",
            f"--include={','.join(DEB_PACKAGES)}",
            SUITE,
            str(partial),
            mirror,
        ]
        if log:
            log(f"building the arm64 rootfs (minutes): {' '.join(command)}; log in {logfile}")
        started = time.monotonic()
        try:
            with open(logfile, "w") as out:
                done = subprocess.run(
                    command, check=False, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            if done.returncode != 0:
                raise EmulationError(
                    f"debootstrap failed (exit {done.returncode}) building the arm64 rootfs from {mirror}; "
                    f"the end of {logfile}:\n{_tail(logfile)}"
                )
            _ensure_interpreter(partial)
            version = _run_chroot(partial, ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
            if version.returncode != 0 or version.stdout.strip() != WHEEL_PYTHON:
                raise EmulationError(
                    f"the built arm64 rootfs's python3 is not Python {WHEEL_PYTHON} "
                    f"(got {version.stdout.strip() or version.stderr.strip()!r}): the phone's wheels are cp311"
                )
            seconds = time.monotonic() - started
            marker = {
                "recipe": rootfs_recipe(),
                "mirror": mirror,
                "build_seconds": round(seconds, 1),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (partial / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            final = cache_dir / ROOTFS_NAME
            if final.exists() or final.is_symlink():  # of another recipe, or never completed
                _remove_tree(final)
            os.rename(partial, final)
        except BaseException:
            with contextlib.suppress(Exception):
                _remove_tree(partial)
            raise
        if log:
            log(f"arm64 rootfs built in {seconds:.0f} s: {final}")
        return final


def _ensure_interpreter(rootfs: Path) -> None:
    """Without binfmt's F (fix-binary) flag the kernel opens qemu's interpreter inside the
    chroot, so it must be there too."""
    found = binfmt_interpreter()
    if runs_arm64_natively() or found is None or "F" in found[1]:
        return
    interpreter = found[0]
    inside = rootfs / interpreter.relative_to("/")
    if not inside.exists():
        inside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(interpreter.resolve(), inside)


# ---------------------------------------------------------------- running in the phone


def phone_env(pythonpath: Sequence[str | PurePosixPath] = (), env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a phone process starts with: nothing of the host's, the runtime on
    ``PYTHONPATH``, then ``env`` on top."""
    base = {
        "PATH": PHONE_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if not runs_arm64_natively():
        base["QEMU_CPU"] = PHONE_CPU  # read by the binfmt wrapper of qemu-user-static
    if pythonpath:
        base["PYTHONPATH"] = ":".join(str(p) for p in pythonpath)
    base.update(env or {})
    return base


def _chroot_argv(rootfs: Path, argv: Sequence[str], cwd: str = "/", cpuinfo: Path | None = None) -> list[str]:
    """A private mount namespace with /proc and /sys mounted into the rootfs (and /dev bound when
    the rootfs has no device nodes), ``cpuinfo`` bound over its /proc/cpuinfo, then chroot:
    every mount ends with the process."""
    root = os.path.realpath(rootfs)
    script = (
        'set -e; r="$1"; c="$2"; shift 2; '
        'mount -t proc proc "$r/proc"; '
        'if [ -n "$c" ]; then mount --bind "$c" "$r/proc/cpuinfo"; fi; '
        'mount -t sysfs -o ro sysfs "$r/sys"; '
        'if [ ! -c "$r/dev/null" ]; then mount --rbind /dev "$r/dev"; fi; '
        'exec chroot "$r" /usr/bin/env -C "$0" "$@"'
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        script,
        cwd,
        root,
        str(cpuinfo or ""),
        *argv,
    ]


# /proc/cpuinfo for the emulated CPU. qemu 7.2's user mode (Debian bookworm's) passes the host's
# x86 /proc/cpuinfo through; with /sys mounted, ONNX Runtime's cpuinfo then finds processors but
# no ARM identity in them and crashes the import (SIGSEGV), and without /sys it prints "failed to
# parse both lists of possible and present processors". So the phone gets the file a Linux arm64
# kernel would write for qemu's CPU: its MIDR and hwcaps, read once inside the phone by a tiny C
# program (built by the phone's gcc), one entry per host processor (what qemu reports as online).
_HWCAP = (  # AT_HWCAP bits, in order (Linux's arch/arm64/kernel/cpuinfo.c)
    "fp",
    "asimd",
    "evtstrm",
    "aes",
    "pmull",
    "sha1",
    "sha2",
    "crc32",
    "atomics",
    "fphp",
    "asimdhp",
    "cpuid",
    "asimdrdm",
    "jscvt",
    "fcma",
    "lrcpc",
    "dcpop",
    "sha3",
    "sm3",
    "sm4",
    "asimddp",
    "sha512",
    "sve",
    "asimdfhm",
    "dit",
    "uscat",
    "ilrcpc",
    "flagm",
    "ssbs",
    "sb",
    "paca",
    "pacg",
)
_HWCAP2 = (  # AT_HWCAP2 bits, in order
    "dcpodp",
    "sve2",
    "sveaes",
    "svepmull",
    "svebitperm",
    "svesha3",
    "svesm4",
    "flagm2",
    "frint",
    "svei8mm",
    "svef32mm",
    "svef64mm",
    "svebf16",
    "i8mm",
    "bf16",
    "dgh",
    "rng",
    "bti",
    "mte",
    "ecv",
    "afp",
    "rpres",
    "mte3",
    "sme",
    "smei16i64",
    "smef64f64",
    "smei8i32",
    "smef16f32",
    "smeb16f32",
    "smef32f32",
    "smefa64",
    "wfxt",
)
_CPUID_C = r"""
#include <stdio.h>
#include <sys/auxv.h>
int main(void) {
    unsigned long midr;
    __asm__ volatile("mrs %0, midr_el1" : "=r"(midr)); /* trapped and answered by qemu, as by Linux */
    printf("%lu %lu %lu\n", midr, getauxval(AT_HWCAP), getauxval(AT_HWCAP2));
    return 0;
}
"""


def _host_processors() -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "processor" and value.strip().isdigit():
                found.append(int(value))
    return found or list(range(os.cpu_count() or 1))


def _arm64_cpuinfo(midr: int, hwcap: int, hwcap2: int, processors: Sequence[int]) -> str:
    features = [n for i, n in enumerate(_HWCAP) if hwcap >> i & 1] + [
        n for i, n in enumerate(_HWCAP2) if hwcap2 >> i & 1
    ]
    entry = (
        "BogoMIPS\t: 100.00\n"
        f"Features\t: {' '.join(features)}\n"
        f"CPU implementer\t: 0x{midr >> 24 & 0xFF:02x}\n"
        "CPU architecture: 8\n"
        f"CPU variant\t: 0x{midr >> 20 & 0xF:x}\n"
        f"CPU part\t: 0x{midr >> 4 & 0xFFF:03x}\n"
        f"CPU revision\t: {midr & 0xF}\n\n"
    )
    return "".join(f"processor\t: {i}\n{entry}" for i in processors)


def phone_cpuinfo(rootfs: Path, cpu: str = PHONE_CPU) -> Path | None:
    """The host file bound over the phone's /proc/cpuinfo (``/opt/fedkit/cpuinfo-<cpu>`` in the
    rootfs) when qemu emulates ``cpu``, made on first use; None on an arm64 host, whose own
    /proc/cpuinfo is right."""
    if runs_arm64_natively():
        return None
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cpu):
        raise EmulationError(f"QEMU_CPU={cpu!r} is not a CPU model name (qemu-aarch64-static -cpu help lists them)")
    folder = Path(rootfs) / PHONE_ROOT.relative_to("/")
    identity = folder / f"cpuid-{cpu}.txt"
    if not identity.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpuid.c").write_text(_CPUID_C)
        done = subprocess.run(
            [
                "chroot",
                os.path.realpath(rootfs),
                "/bin/sh",
                "-c",
                f"gcc -O1 -o {PHONE_ROOT}/cpuid {PHONE_ROOT}/cpuid.c && {PHONE_ROOT}/cpuid",
            ],
            env=phone_env(env={"QEMU_CPU": cpu}),
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        fields = done.stdout.split()
        if done.returncode != 0 or len(fields) != 3 or not all(f.isdigit() for f in fields):
            output = (done.stdout + done.stderr).strip()[-2000:]
            raise EmulationError(f"cannot read the emulated CPU's identity in {rootfs}:\n{output}")
        _write_atomic(identity, done.stdout)
    midr, hwcap, hwcap2 = (int(f) for f in identity.read_text().split())
    text = _arm64_cpuinfo(midr, hwcap, hwcap2, _host_processors())
    fake = folder / f"cpuinfo-{cpu}"
    if not fake.exists() or fake.read_text() != text:
        _write_atomic(fake, text)
    return fake


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_chroot(
    rootfs: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    pythonpath: Sequence[str | PurePosixPath] = (),
    timeout: float | None = 600,
    cwd: str = "/",
) -> subprocess.CompletedProcess:
    environ = phone_env(pythonpath, env)
    return subprocess.run(
        _chroot_argv(rootfs, argv, cwd, phone_cpuinfo(rootfs, environ.get("QEMU_CPU", PHONE_CPU))),
        env=environ,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _runtime_path(rootfs: Path, pythonpath: Sequence[str | PurePosixPath] | None) -> list[str]:
    if pythonpath is not None:
        return [str(p) for p in pythonpath]
    site = Path(rootfs) / CURRENT.relative_to("/") / "site"
    if not site.is_dir():
        raise EmulationError(f"no phone runtime is installed in {rootfs}: call ensure_runtime(rootfs) first")
    return [str(CURRENT / "site")]


def run_in_phone(
    rootfs: Path,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float | None = 600,
    *,
    cwd: str = "/",
    pythonpath: Sequence[str | PurePosixPath] | None = None,
) -> subprocess.CompletedProcess:
    """Runs ``argv`` inside the arm64 phone and waits: its output captured as text, its exit
    status not checked. The runtime ensure_runtime installed last is importable (or the phone
    folders in ``pythonpath``); ``env`` adds to a clean environment; ``cwd`` is a phone path.
    ``timeout`` kills it (subprocess.TimeoutExpired)."""
    _require_host(need_debootstrap=False)
    return _run_chroot(
        Path(rootfs), argv, env=env, pythonpath=_runtime_path(rootfs, pythonpath), timeout=timeout, cwd=cwd
    )


def start_in_phone(
    rootfs: Path,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    cwd: str = "/",
    pythonpath: Sequence[str | PurePosixPath] | None = None,
    **popen: Any,
) -> subprocess.Popen:
    """Starts ``argv`` inside the arm64 phone and returns at once (a long-running phone loop).
    The Popen's pid is the phone process itself (the wrappers exec into it), so
    ``kill()``/SIGKILL reach it directly, and its mounts go with it. ``popen`` goes to Popen
    (stdout, stderr, ...)."""
    _require_host(need_debootstrap=False)
    popen.setdefault("stdin", subprocess.DEVNULL)
    environ = phone_env(_runtime_path(rootfs, pythonpath), env)
    return subprocess.Popen(
        _chroot_argv(Path(rootfs), argv, cwd, phone_cpuinfo(Path(rootfs), environ.get("QEMU_CPU", PHONE_CPU))),
        env=environ,
        **popen,
    )


def host_path(rootfs: Path, phone_path: str | PurePosixPath) -> Path:
    """The host's path of a file in the phone (for copying bundles, shards and results)."""
    phone_path = PurePosixPath(phone_path)
    if not phone_path.is_absolute() or ".." in phone_path.parts:
        raise EmulationError(f"a phone path must be absolute and plain, got {str(phone_path)!r}")
    return Path(rootfs) / phone_path.relative_to("/")


# ---------------------------------------------------------------- the phone runtime


@dataclass(frozen=True)
class PhoneRuntime:
    """An installed phone runtime: ``site`` (a phone path) holds the wheels and device_runtime."""

    rootfs: Path
    key: str
    site: PurePosixPath
    size_bytes: int  # of site, every file's apparent size
    install_seconds: float | None  # None: reused from an earlier install

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6


def _runtime_sources(root: Path) -> list[Path]:
    """setup.py and device_runtime's Python and C sources (no build products), relative."""
    package = root / "device_runtime"
    if not (root / "setup.py").is_file() or not package.is_dir():
        raise EmulationError(
            f"{root} is not a fedkit source checkout (setup.py and device_runtime/ are needed to build "
            "the C kernels inside the phone)"
        )
    files = [Path("setup.py")]
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".c", ".h") and "__pycache__" not in path.parts:
            files.append(path.relative_to(root))
    return files


def _digest(parts: Sequence[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def runtime_key(root: Path | None = None, wheels: Sequence[str] | None = None) -> str:
    """The install's cache key: the recipe, the wheel list (default: the lock's aarch64 lines)
    and every source file's content."""
    root = source_root() if root is None else Path(root)
    wheels = pinned(MACHINE, root) if wheels is None else wheels
    parts: list[str | bytes] = [f"runtime {RECIPE_VERSION} {WHEEL_PLATFORM} {WHEEL_PYTHON}", *wheels]
    for rel in _runtime_sources(root):
        parts += [rel.as_posix(), (root / rel).read_bytes()]
    return _digest(parts)


def tree_size(path: Path) -> int:
    """Every regular file's apparent size under ``path``, in bytes (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def download_wheels(specs: Sequence[str], cache_dir: Path) -> list[Path]:
    """The aarch64 cp311 wheels of ``specs`` (no dependencies), downloaded once into
    ``cache_dir/wheels/<hash of specs>`` with this host's pip; no arm64 code runs."""
    folder = Path(cache_dir) / "wheels" / _digest([WHEEL_PLATFORM, WHEEL_PYTHON, *specs])
    done = folder / ".complete"
    if not done.exists():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".wheels.partial-", dir=Path(cache_dir)))
        try:
            pip(
                "download",
                ["--platform", WHEEL_PLATFORM, "--python-version", WHEEL_PYTHON, "-d", str(partial), *specs],
                f"pip could not download the aarch64 wheels {' '.join(specs)}",
                EmulationError,
            )
            (partial / ".complete").write_text("\n".join(specs) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.rename(partial, folder)
        finally:
            if partial.exists():
                shutil.rmtree(partial)
    return sorted(folder.glob("*.whl"))


def _install_wheels(wheels: Sequence[Path], site: Path) -> None:
    """Unpacks the wheels into ``site`` (a host path inside the rootfs) with this host's pip. The
    .pyc files are compiled here when this host's Python is the phone's (same bytecode), else
    left to the phone."""
    args = ["--no-index", "--platform", WHEEL_PLATFORM, "--python-version", WHEEL_PYTHON, "--target", str(site)]
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != WHEEL_PYTHON:
        args.append("--no-compile")
    pip("install", [*args, *map(str, wheels)], f"pip could not install the aarch64 wheels into {site}", EmulationError)


def _check_in_phone(
    rootfs: Path,
    argv: Sequence[str],
    what: str,
    *,
    pythonpath: Sequence[str | PurePosixPath] = (),
    cwd: str = "/",
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    done = _run_chroot(rootfs, argv, pythonpath=pythonpath, cwd=cwd, timeout=timeout)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        raise EmulationError(f"{what} failed in the arm64 phone (exit {done.returncode}):\n{output}")
    return done


def ensure_runtime(
    rootfs: Path,
    *,
    cache_dir: Path | None = None,
    root: Path | None = None,
    log=None,
) -> PhoneRuntime:
    """The phone runtime installed in ``rootfs`` at ``/opt/fedkit/runtime-<key>/site``, installed
    first if there is none for this key (``runtime_key``: the sources and the wheel list):
    the lock's aarch64 wheels unpacked, then device_runtime copied from ``root`` (this
    checkout) and its C kernels built inside the phone with the rootfs's gcc and ``setup.py``,
    then ``import device_runtime.codec`` checked there. ``/opt/fedkit/current`` points at it.
    Wheels are downloaded into ``cache_dir`` (default: beside the rootfs)."""
    rootfs = Path(rootfs)
    _require_host(need_debootstrap=False)
    root = source_root() if root is None else Path(root)
    cache_dir = rootfs.parent if cache_dir is None else Path(cache_dir)
    specs = pinned(MACHINE, root)
    key = runtime_key(root, specs)
    phone_dir = PHONE_ROOT / f"runtime-{key}"
    host_dir = host_path(rootfs, phone_dir)
    host_root = host_path(rootfs, PHONE_ROOT)
    with _locked(host_root):
        if _read_marker(host_dir, ".complete.json") is None:
            started = time.monotonic()
            wheels = download_wheels(specs, cache_dir)
            for stale in host_root.glob(".runtime-*.partial-*"):
                _remove_tree(stale)
            partial = Path(tempfile.mkdtemp(prefix=f".runtime-{key}.partial-", dir=host_root))
            partial.chmod(0o755)
            phone_partial = PHONE_ROOT / partial.name
            try:
                if log:
                    log(f"installing the phone runtime {key} into {rootfs}")
                _install_wheels(wheels, partial / "site")
                src = partial / "src"
                for rel in _runtime_sources(root):
                    (src / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(root / rel, src / rel)
                # the kernels, compiled by the phone's own gcc with setup.py's flags
                _check_in_phone(
                    rootfs,
                    ["python3", "setup.py", "-q", "build_ext", "--inplace"],
                    "building device_runtime's C kernels",
                    cwd=str(phone_partial / "src"),
                )
                shutil.copytree(
                    src / "device_runtime",
                    partial / "site" / "device_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
                _check_in_phone(
                    rootfs,
                    ["python3", "-m", "compileall", "-q", str(phone_partial / "site" / "device_runtime")],
                    "compiling device_runtime",
                )
                shutil.rmtree(src)  # its build/ folder and a second copy: not part of the install
                _check_in_phone(
                    rootfs,
                    ["python3", "-c", "import numpy, onnxruntime, httpx, zlib_ng, device_runtime.codec"],
                    "importing the phone runtime",
                    pythonpath=[phone_partial / "site"],
                )
                seconds = time.monotonic() - started
                (partial / ".complete.json").write_text(
                    json.dumps(
                        {
                            "key": key,
                            "wheels": [w.name for w in wheels],
                            "install_seconds": round(seconds, 1),
                            "size_bytes": tree_size(partial / "site"),
                        },
                        indent=1,
                    )
                    + "\n"
                )
                os.rename(partial, host_dir)
            except BaseException:
                with contextlib.suppress(Exception):
                    _remove_tree(partial)
                raise
            install_seconds: float | None = seconds
            if log:
                log(f"phone runtime installed in {seconds:.0f} s")
        else:
            install_seconds = None
        _point_current(host_root, host_dir.name)
        _prune(host_root, "runtime-", keep={host_dir.name})
        marker = _read_marker(host_dir, ".complete.json") or {}
    size = marker.get("size_bytes")
    return PhoneRuntime(
        rootfs,
        key,
        phone_dir / "site",
        size if isinstance(size, int) else tree_size(host_dir / "site"),
        install_seconds,
    )


def ensure_test_tools(rootfs: Path, *, cache_dir: Path | None = None) -> PurePosixPath:
    """pytest and hypothesis in the phone, in a folder of their own (``/opt/fedkit/testtools-<key>/site``,
    a phone path): put it on ``pythonpath`` after the runtime to run device_runtime's tests there."""
    rootfs = Path(rootfs)
    cache_dir = rootfs.parent if cache_dir is None else Path(cache_dir)
    key = _digest([f"tools {RECIPE_VERSION}", *TEST_WHEELS])
    phone_dir = PHONE_ROOT / f"testtools-{key}"
    host_dir = host_path(rootfs, phone_dir)
    host_root = host_path(rootfs, PHONE_ROOT)
    with _locked(host_root):
        if _read_marker(host_dir, ".complete.json") is None:
            wheels = download_wheels(TEST_WHEELS, cache_dir)
            partial = Path(tempfile.mkdtemp(prefix=f".testtools-{key}.partial-", dir=host_root))
            partial.chmod(0o755)
            try:
                _install_wheels(wheels, partial / "site")
                (partial / ".complete.json").write_text(
                    json.dumps({"key": key, "wheels": [w.name for w in wheels]}) + "\n"
                )
                if host_dir.exists():
                    _remove_tree(host_dir)
                os.rename(partial, host_dir)
            except BaseException:
                with contextlib.suppress(Exception):
                    _remove_tree(partial)
                raise
        _prune(host_root, "testtools-", keep={host_dir.name})
    return phone_dir / "site"


def _point_current(host_root: Path, name: str) -> None:
    link = host_root / "current"
    if link.is_symlink() and os.readlink(link) == name:
        return
    tmp = host_root / f".current-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(name)
    os.replace(tmp, link)  # atomic: a phone starting now sees the old runtime or the new one


def _prune(host_root: Path, prefix: str, keep: set[str], spare: int = 2) -> None:
    """Keeps the ``spare`` most recent other installs (another checkout may use them)."""
    others = sorted(
        (p for p in host_root.glob(f"{prefix}*") if p.name not in keep and p.is_dir()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in others[spare:]:
        with contextlib.suppress(Exception):
            _remove_tree(old)


# ---------------------------------------------------------------- all of it


@dataclass(frozen=True)
class Arm64Phone:
    """An emulated arm64 phone ready to run device_runtime: its rootfs and installed runtime."""

    rootfs: Path
    runtime: PhoneRuntime
    test_tools: PurePosixPath | None = None

    @property
    def pythonpath(self) -> list[PurePosixPath]:
        return [self.runtime.site] + ([self.test_tools] if self.test_tools else [])

    def run(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float | None = 600, *, cwd: str = "/"
    ) -> subprocess.CompletedProcess:
        return run_in_phone(self.rootfs, argv, env, timeout, cwd=cwd, pythonpath=self.pythonpath)

    def start(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, *, cwd: str = "/", **popen: object
    ) -> subprocess.Popen:
        return start_in_phone(self.rootfs, argv, env, cwd=cwd, pythonpath=self.pythonpath, **popen)

    def python(
        self, code: str, env: Mapping[str, str] | None = None, timeout: float | None = 600, *, cwd: str = "/"
    ) -> subprocess.CompletedProcess:
        """``python3 -c code`` in the phone."""
        return self.run(["python3", "-c", code], env, timeout, cwd=cwd)

    def host_path(self, phone_path: str | PurePosixPath) -> Path:
        return host_path(self.rootfs, phone_path)


def ensure_phone(cache_dir: Path | None = None, *, with_test_tools: bool = False, log=None) -> Arm64Phone:
    """An emulated arm64 phone: the cached rootfs (built if needed) with the current phone
    runtime (installed if needed), and pytest/hypothesis beside it with ``with_test_tools``."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    rootfs = ensure_rootfs(cache_dir, log=log)
    runtime = ensure_runtime(rootfs, cache_dir=cache_dir, log=log)
    tools = ensure_test_tools(rootfs, cache_dir=cache_dir) if with_test_tools else None
    return Arm64Phone(rootfs, runtime, tools)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m android_harness.arm64 [CACHE_DIR]``: builds or reuses the phone (e.g. to warm
    CI's cache before the tests) and prints one JSON line of its figures."""
    args = list(sys.argv[1:] if argv is None else argv)
    cache_dir = Path(args[0]) if args else None
    try:
        phone = ensure_phone(cache_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
        started = time.monotonic()
        done = phone.python("import device_runtime.codec")
        import_seconds = time.monotonic() - started
        machine = phone.python("import platform; print(platform.machine())").stdout.strip()
    except DeployError as exc:  # EmulationError, or an unreadable lock
        print(f"error: {exc}", file=sys.stderr)
        return 1
    marker = _read_marker(phone.rootfs, MARKER) or {}
    print(
        json.dumps(
            {
                "rootfs": str(phone.rootfs),
                "machine": machine,
                "cpu": PHONE_CPU,
                "rootfs_build_seconds": marker.get("build_seconds"),
                "runtime_key": phone.runtime.key,
                "runtime_site_mb": round(phone.runtime.size_mb, 1),
                "runtime_install_seconds": None
                if phone.runtime.install_seconds is None
                else round(phone.runtime.install_seconds, 1),
                "import_codec_seconds": round(import_seconds, 2) if done.returncode == 0 else None,
            }
        )
    )
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
