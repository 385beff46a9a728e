"""The centralised reference for B1: MobileNetV2's head trained on all 60,000 Fashion-MNIST
training images (30 epochs, batch 32, SGD lr 0.01, momentum 0.9, seed 0), test accuracy after
every epoch, and the time to extract the frozen backbone's features of all 70,000 images.

The features are always recomputed here (the cache is bypassed) so the extraction time is a
real measurement; it is also given as a ratio to a 1024×1024 float32 matmul timed in the same
run, since the machine is shared. Prints one JSON line and writes it to
benchmarks/results/central.json.
"""

from __future__ import annotations

import time

import torch

from toolkit.benchmarking import write_result
from toolkit.central import train_central


def matmul_seconds(repeats: int = 20) -> float:
    """Median time of one 1024×1024 float32 matmul in torch: the baseline."""
    a = torch.randn(1024, 1024)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, a)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    # One thread: on a shared 2-core machine a second thread makes every op wait for a busy
    # core (measured: 0.2 s against up to 8 s for a batch of 256 through the backbone).
    torch.set_num_threads(1)
    baseline_before = matmul_seconds()
    result = train_central("mobilenet_v2", epochs=30, batch_size=32, lr=0.01, momentum=0.9, seed=0, use_cache=False)
    baseline = (baseline_before + matmul_seconds()) / 2
    figures = result.figures()
    figures["matmul_1024_seconds"] = baseline
    figures["extraction_vs_matmul"] = result.extraction_seconds / baseline
    figures["train_vs_matmul"] = result.train_seconds / baseline
    write_result("central", config=result.config, figures=figures)


if __name__ == "__main__":
    main()
