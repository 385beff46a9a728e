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
same: phone-requirements.txt's x86-64 wheels, --no-deps, and device_runtime), with the round's
loss on that x86-64 install run alone, with the ort engine (which fails if it lacks anything the
phone imports). Prints one JSON line and writes it to benchmarks/results/arm64.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from toolkit.benchmarking import write_result

IMAGES = 200
ROUND = [
    "--round",
    "1",
    "--lr",
    "0.01",
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--encoding",
    "fp32",
    "--seed",
    "0",
    "--device-id",
    "phone-1",
    "--holdout",
    "0",
]


def train(argv_prefix: list[str], bundle: str, shard: str, work: str, out: str, run) -> tuple[float, dict]:
    started = time.perf_counter()
    done = run(
        [
            *argv_prefix,
            "-m",
            "device_runtime",
            "train",
            "--bundle",
            bundle,
            "--shard",
            shard,
            "--workdir",
            work,
            "--out",
            out,
            *ROUND,
        ]
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the round failed: {done.stderr.strip()[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def x86_install(folder: Path, bundle: str, shard: str) -> tuple[float, dict]:
    """The x86-64 phone install unpacked into ``folder``: its size in MB, and the stats of the
    round run on it by an interpreter that sees nothing else (``bundle``: an ort bundle)."""
    from android_harness.arm64 import tree_size
    from android_harness.install import install_here, isolated_python

    install_here(folder / "site")
    argv, env = isolated_python(folder / "site")
    _, stats = train(
        argv,
        bundle,
        shard,
        str(folder / "work"),
        str(folder / "update.bin"),
        lambda argv: subprocess.run(
            argv, env=env, cwd=folder, check=False, capture_output=True, text=True, timeout=600
        ),
    )
    return tree_size(folder / "site") / 1e6, stats


def main() -> None:
    from android_harness.arm64 import PHONE_CPU, ensure_phone
    from android_harness.install import INSTALL_TARGET_MB
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
    ort_bundle = cached_bundle(model, replace(plan, engine="ort"), plan.train_from)  # what an x86-64 phone trains
    train_set = load_fashion_mnist("train")
    part = partition_dirichlet(train_set.labels, 20, 0.5, seed=0)[0][:IMAGES]  # B1's phone-1

    with tempfile.TemporaryDirectory(prefix="fedkit-b10-") as tmp:
        tmp = Path(tmp)
        shard = write_shard(tmp / "shard.npz", train_set.images[part], train_set.labels[part])
        native_s, native = train(
            [sys.executable],
            str(bundle),
            str(shard),
            str(tmp / "work"),
            str(tmp / "update.bin"),
            lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=600),
        )
        inside = PurePosixPath("/opt/fedkit/bench") / tmp.name
        host_dir = phone.host_path(inside)
        host_dir.mkdir(parents=True)
        try:
            shutil.copytree(bundle, host_dir / "bundle")
            shutil.copyfile(shard, host_dir / "shard.npz")
            emulated_s, emulated = train(
                ["python3"],
                str(inside / "bundle"),
                str(inside / "shard.npz"),
                str(inside / "work"),
                str(inside / "update.bin"),
                lambda argv: phone.run(argv, timeout=3600),
            )
            on_x86, on_arm = decode((tmp / "update.bin").read_bytes()), decode((host_dir / "update.bin").read_bytes())
        finally:
            shutil.rmtree(host_dir, ignore_errors=True)
        x86_mb, on_install = x86_install(tmp / "x86-install", str(ort_bundle), str(shard))

    scale = max(float(np.abs(t).max()) for t in on_x86.tensors.values())
    diff = max(float(np.abs(on_arm.tensors[k] - t).max()) for k, t in on_x86.tensors.items())
    import onnxruntime

    write_result(
        "arm64",
        config={
            "model": "mobilenet_v2 head (ImageNet weights, fresh Linear(1280, 10))",
            "engine": "numpy",
            "images": IMAGES,
            "shard": "B1 phone-1, Dirichlet(0.5) over 20 phones, seed 0, first images",
            "round": ROUND,
            "phone": {
                "cpu": PHONE_CPU,
                "emulation": "qemu user mode (qemu-aarch64-static via binfmt_misc), Debian bookworm arm64",
                "runtime_key": phone.runtime.key,
            },
            "host_onnxruntime": onnxruntime.__version__,
        },
        figures={
            "native_s": round(native_s, 2),
            "emulated_s": round(emulated_s, 2),
            "emulated_over_native": round(emulated_s / native_s, 1),
            "trainer_seconds": {
                "native": {"features": native["feature_seconds"], "train": native["train_seconds"]},
                "emulated": {"features": emulated["feature_seconds"], "train": emulated["train_seconds"]},
            },
            "peak_rss_mb": {"native": native["peak_rss_mb"], "emulated": emulated["peak_rss_mb"]},
            "update_max_abs_diff_over_scale": diff / scale,
            "same_samples": on_arm.header.num_samples == on_x86.header.num_samples,
            "install_mb": {
                "arm64": round(phone.runtime.size_mb, 1),
                "x86_64": round(x86_mb, 1),
                "target": INSTALL_TARGET_MB,
            },
            "x86_64_install_ort_train_loss": on_install["train_loss"],
        },
    )


if __name__ == "__main__":
    main()
