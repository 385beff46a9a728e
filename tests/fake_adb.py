"""A named stand-in for a physical phone over adb, for the tests of what fedkit does over adb
(`fedkit deploy --target adb:SERIAL`, `fedkit profile --adb SERIAL`): a fake `adb` executable
first on PATH (the ``fake_adb`` fixture in conftest.py puts it there).

It logs its argv, answers for one attached serial (FAKE_ADB_SERIAL; set it to "" and no phone is
attached: every command fails as adb's does), copies `push`es into a folder standing for the
phone's storage and runs `shell` commands with sh, their phone paths (under PHONE_TMP) moved
into that folder, with this host's Python as the phone's python3. That python3 does not run
the sync loop: asked for `-m device_runtime.phone_loop`, it writes where and how it was started
to STORAGE/started and exits.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

PHONE_TMP = "/data/local/tmp"  # the folder adb may write to on a phone: all fedkit pushes go under it

FAKE_ADB = """#!{python}
import json, os, shutil, subprocess, sys
storage, phone_tmp = os.environ["FAKE_PHONE_STORAGE"], {phone_tmp!r}
with open(os.environ["FAKE_ADB_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:2] != ["-s", os.environ["FAKE_ADB_SERIAL"]]:
    sys.exit("error: device '%s' not found" % args[1])  # what adb says, exit code 1
command, rest = args[2], args[3:]
if command == "get-state":
    print("device")
elif command == "push":
    src, dst = rest[0], storage + rest[1]
    if os.path.isdir(src):  # adb push DIR DEST/ puts it at DEST/DIR (DIR/. DEST: its contents at DEST)
        shutil.copytree(src, os.path.join(dst, os.path.basename(src)))
    else:
        dst = os.path.join(dst, os.path.basename(src)) if dst.endswith("/") else dst
        shutil.copyfile(src, dst)
        if os.path.basename(dst) == os.environ.get("FAKE_ADB_DAMAGE"):  # a bad USB link
            with open(dst, "r+b") as f:
                f.seek(-1, 2)
                last = f.read(1)
                f.seek(-1, 2)
                f.write(bytes([last[0] ^ 1]))
    print("%s: 1 file pushed." % src)
elif command == "shell":
    # adb joins its arguments into one command line for the phone's sh, and passes its exit status on
    line = " ".join(rest).replace(phone_tmp, storage + phone_tmp)
    sys.exit(subprocess.run(["sh", "-c", line]).returncode)
else:
    sys.exit("fake adb: %s is not a command this stand-in answers" % command)
"""


def fake_adb_on_path(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Callable[[], list[list[str]]], Path]:
    """The fake phone (serial "fake-phone") on PATH as `adb`, its files in ``folder``; returns
    (a function giving its argv log, its storage)."""
    bin_dir, storage, log = folder / "bin", folder / "phone-storage", folder / "adb.log"
    bin_dir.mkdir()
    storage.mkdir()
    (bin_dir / "adb").write_text(FAKE_ADB.format(python=sys.executable, phone_tmp=PHONE_TMP))
    (bin_dir / "python3").write_text(  # the phone's python3
        "#!/bin/sh\n"
        'if [ "$1 $2" = "-m device_runtime.phone_loop" ]; then\n'
        '  echo "$PWD $PYTHONPATH $3" > "$FAKE_PHONE_STORAGE/started"; exit 0\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    for tool in ("adb", "python3"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PHONE_STORAGE", str(storage))
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_SERIAL", "fake-phone")

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls, storage
