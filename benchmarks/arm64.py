"""B10 — the arm64 phone: one local round of a B1 phone's shard (small) on the emulated arm64 phone
(qemu user mode, android_harness.arm64) and natively on this x86-64 host, in the same run.

The round: MobileNetV2's transfer-learned head (ImageNet weights, a fresh Linear(1280, 10)) on
the numpy engine (the engine an arm64 phone trains with: its ONNX Runtime has no training
API), the first IMAGES images of B1's phone-1 (Dirichlet(0.5) over 20 phones, seed 0), one
epoch, batch 32, lr 0.01, fp32 update, seed 0. Figures: each side's wall time and its ratio
(emulation says nothing about a real phone's speed: the ratio is qemu's cost on this host), the
trainer's own feature and training seconds, peak RSS of each side's process, the largest
difference between the two decoded updates relative to the update's scale, and the phone
install's size on arm64 (its site-packages: the wheels and device_runtime) and on x86-64 (the
base install's wheels with their declared dependencies, unpacked). Prints one JSON line and
writes it to benchmarks/results/arm64.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

import numpy as np

from toolkit.benchmarking import write_result

IMAGES = 200
ROUND = ["--round", "1", "--lr", "0.01", "--epochs", "1", "--batch-size", "32", "--encoding", "fp32", "--seed", "0",
         "--device-id", "phone-1", "--holdout", "0"]
# The x86-64 phone install: the base dependencies of pyproject.toml on x86-64, with what they declare.
X86_PHONE = ("numpy", "onnxruntime-training-cpu==1.19.2", "httpx", "zlib-ng")


def train(argv_prefix: list[str], bundle: str, shard: str, work: str, out: str, run) -> tuple[float, dict]:
    started = time.perf_counter()
    done = run([*argv_prefix, "-m", "device_runtime", "train", "--bundle", bundle, "--shard", shard, "--workdir", work,
                "--out", out, *ROUND])
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the round failed: {done.stderr.strip()[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def x86_install_mb(folder: Path) -> float:
    """The x86-64 phone install unpacked, wheels only (pip install --target)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary=:all:",
                    "--target", str(folder), *X86_PHONE], check=True, capture_output=True)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    from android_harness.arm64 import PHONE_CPU, ensure_phone
    from device_runtime.codec import decode
    from device_runtime.manifest import DevicePlan
    from toolkit.data import load_fashion_mnist, partition_dirichlet, write_shard
    from toolkit.models import load_model
    from toolkit.planning.export import cached_bundle

    phone = ensure_phone(log=lambda line: print(line, file=sys.stderr))
    model = load_model("mobilenet_v2")
    n = len(model.block_names)
    plan = DevicePlan(cut=n, train_from=model.train_from(n, 1), engine="numpy", encoding="fp32", batch_size=32)
    bundle = cached_bundle(model, plan, plan.train_from)
    train_set = load_fashion_mnist("train")
    part = partition_dirichlet(train_set.labels, 20, 0.5, seed=0)[0][:IMAGES]  # B1's phone-1

    with tempfile.TemporaryDirectory(prefix="fedkit-b10-") as tmp:
        tmp = Path(tmp)
        shard = write_shard(tmp / "shard.npz", train_set.images[part], train_set.labels[part])
        native_s, native = train([sys.executable], str(bundle), str(shard), str(tmp / "work"), str(tmp / "update.bin"),
                                 lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=600))
        inside = PurePosixPath("/opt/fedkit/bench") / tmp.name
        host_dir = phone.host_path(inside)
        host_dir.mkdir(parents=True)
        try:
            shutil.copytree(bundle, host_dir / "bundle")
            shutil.copyfile(shard, host_dir / "shard.npz")
            emulated_s, emulated = train(["python3"], str(inside / "bundle"), str(inside / "shard.npz"), str(inside / "work"),
                                         str(inside / "update.bin"), lambda argv: phone.run(argv, timeout=3600))
            on_x86, on_arm = decode((tmp / "update.bin").read_bytes()), decode((host_dir / "update.bin").read_bytes())
        finally:
            shutil.rmtree(host_dir, ignore_errors=True)
        x86_mb = x86_install_mb(tmp / "x86-site")

    scale = max(float(np.abs(t).max()) for t in on_x86.tensors.values())
    diff = max(float(np.abs(on_arm.tensors[k] - t).max()) for k, t in on_x86.tensors.items())
    import onnxruntime

    write_result(
        "arm64",
        config={
            "model": "mobilenet_v2 head (ImageNet weights, fresh Linear(1280, 10))", "engine": "numpy", "images": IMAGES,
            "shard": "B1 phone-1, Dirichlet(0.5) over 20 phones, seed 0, first images", "round": ROUND,
            "phone": {"cpu": PHONE_CPU, "emulation": "qemu user mode (qemu-aarch64-static via binfmt_misc), Debian bookworm arm64",
                      "runtime_key": phone.runtime.key},
            "host_onnxruntime": onnxruntime.__version__,
        },
        figures={
            "native_s": round(native_s, 2),
            "emulated_s": round(emulated_s, 2),
            "emulated_over_native": round(emulated_s / native_s, 1),
            "trainer_seconds": {"native": {"features": native["feature_seconds"], "train": native["train_seconds"]},
                                "emulated": {"features": emulated["feature_seconds"], "train": emulated["train_seconds"]}},
            "peak_rss_mb": {"native": native["peak_rss_mb"], "emulated": emulated["peak_rss_mb"]},
            "update_max_abs_diff_over_scale": diff / scale,
            "same_samples": on_arm.header.num_samples == on_x86.header.num_samples,
            "install_mb": {"arm64": round(phone.runtime.size_mb, 1), "x86_64": round(x86_mb, 1), "target": 150},
        },
    )


if __name__ == "__main__":
    main()
