"""B5 — on-device engines: forward and train-step latency, peak memory and bundle size.

Two MobileNetV2 bundles with the whole model on the phone (cut 21): the head alone trains
(``--train-blocks 1``), or the last three blocks and the head (``--train-blocks 4``: the
inverted residuals features.16 and .17, the 1×1 conv features.18, the classifier). For each,
at batch 1 and 32, the median latency of

- forward: the frozen part then the trainable part, in inference;
- train step: the frozen part, the trainable part's loss and gradients, one SGD step
  (lr 0.01, momentum 0.9) and the new weights set,

on ONNX Runtime, ExecuTorch (the head only: it refuses to train convolutions) and eager
PyTorch, the reference, as ratios to eager measured in the same run, engines taking turns
within each repeat. Peak RSS (VmHWM) is measured in a fresh child process per engine doing
batch-32 train steps; the ort child blocks every torch and executorch import, so its figure
is what a torch-free phone process needs.

Usage: .venv/bin/python benchmarks/engines.py [--repeats N]
(``--child ENGINE BUNDLE`` is the child process's entry point.)
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.benchmarking import write_result  # torch-free: fine in the child too

SEED = 0
BATCHES = (1, 32)
WARMUP = 3
CHILD_STEPS = 20  # batch-32 train steps in each peak-RSS child
LR = 0.01
CONFIGS = {"head_only": 1, "last_3_blocks": 4}  # name → --train-blocks, cut at the end


class _BlockTorch(importlib.abc.MetaPathFinder):
    """Makes any torch or executorch import fail: proves the child runs without them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "executorch"):
            raise ImportError(f"{name} is blocked in the torch-free benchmark child")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per engine, batch and operation")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "BUNDLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    figures = run(args.repeats)
    write_result("engines", config=configuration(args.repeats), figures=figures)


# -- the parent: export, time, spawn the children -----------------------------------------------


def run(repeats: int) -> dict:
    import torch

    from device_runtime.bundle import Bundle
    from device_runtime.manifest import DevicePlan
    from exporters.bundle import export_bundle
    from toolkit.data import LABEL_NAMES
    from toolkit.errors import ExportError
    from toolkit.models import load_model

    torch.manual_seed(SEED)
    model = load_model("mobilenet_v2")
    cut = len(model.block_names)
    result: dict = {"bundles": {}, "latency": {}, "peak_rss": {}, "executorch_refused": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, train_blocks in CONFIGS.items():
            plan = DevicePlan(cut=cut, train_from=model.train_from(cut, train_blocks))
            out = Path(tmp) / name
            try:
                export_bundle(model, plan, out, ("ort", "executorch"), label_names=LABEL_NAMES)
            except ExportError as exc:
                result["executorch_refused"][name] = str(exc)
                export_bundle(model, plan, out, ("ort",), label_names=LABEL_NAMES)
            bundle = Bundle.load(out)
            result["bundles"][name] = describe(bundle)
            result["latency"][name] = time_engines(bundle, repeats)
            result["peak_rss"][name] = {engine: peak_rss(engine, out) for engine in ("eager", *bundle.manifest.engines)}
    return result


def describe(bundle) -> dict:
    m = bundle.manifest
    return {
        "cut": m.plan.cut,
        "train_from": m.plan.train_from,
        "trained_blocks": list(m.block_names[m.plan.train_from : m.plan.cut]),
        "trainable_parameters": int(sum(np.prod(t.shape) for t in m.trainable)),
        "file_bytes": {role: f.size for role, f in sorted(m.files.items())},
        "total_bytes": sum(f.size for f in m.files.values()),
    }


def time_engines(bundle, repeats: int) -> dict:
    from device_runtime.engines import open_engine

    engines = {"eager": EagerEngine(bundle), **{e: open_engine(bundle, e) for e in bundle.manifest.engines}}
    rng = np.random.default_rng(SEED)
    figures = {}
    for batch in BATCHES:
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        labels = rng.integers(0, 10, size=batch)
        # the same weights give the same logits on every engine (checked before any step trains)
        logits = {name: engine.forward(engine.features(x)) for name, engine in engines.items()}
        ops = {}
        for op in ("forward", "train_step"):
            steps = {name: make_op(op, engine, x, labels) for name, engine in engines.items()}
            times = interleaved(steps, repeats)
            eager = statistics.median(times["eager"])
            ops[op] = {
                name: {"median_s": statistics.median(t), "ratio_to_eager": statistics.median(t) / eager}
                for name, t in times.items()
            }
        for name, out in logits.items():
            ops["forward"][name]["max_abs_diff_vs_eager"] = float(np.abs(out - logits["eager"]).max())
        figures[f"batch_{batch}"] = ops
    return figures


def make_op(op: str, engine, x: np.ndarray, labels: np.ndarray):
    from device_runtime.optim import SGD

    if op == "forward":
        return lambda: engine.forward(engine.features(x))
    sgd = SGD(lr=LR, momentum=0.9)

    def train_step():
        _loss, grads = engine.gradients(engine.features(x), labels)
        engine.set_weights(sgd.step(engine.get_weights(), grads))

    return train_step


def interleaved(steps: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each step; the engines take turns, so a noisy neighbour slows them alike."""
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


class EagerEngine:
    """Eager PyTorch doing what the phone engines do, on the same parts of the same model: the
    reference. BatchNorm in eval mode (running statistics), as on the phone."""

    def __init__(self, bundle):
        import torch

        from toolkit.models import load_model

        plan = bundle.manifest.plan
        # One thread: on this shared 2-core machine OpenMP's spinning workers make 2 threads ~10x slower.
        torch.set_num_threads(1)
        torch.manual_seed(SEED)
        model = load_model(bundle.manifest.model_id)  # a fresh copy: its steps change no one else's weights
        self.torch = torch
        self.frozen = model.part(0, plan.train_from).eval()
        self.trainable = model.part(plan.train_from, plan.cut).eval()
        self.frozen.requires_grad_(False)

    def features(self, x: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.frozen(self.torch.from_numpy(x)).numpy()

    def forward(self, h: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.trainable(self.torch.from_numpy(h)).numpy()

    def gradients(self, h: np.ndarray, labels: np.ndarray):
        self.trainable.zero_grad()
        loss = self.torch.nn.functional.cross_entropy(
            self.trainable(self.torch.from_numpy(h)), self.torch.from_numpy(labels)
        )
        loss.backward()
        return loss.item(), {n: p.grad.numpy().copy() for n, p in self.trainable.named_parameters()}

    def get_weights(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.trainable.named_parameters()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        with self.torch.no_grad():
            for n, p in self.trainable.named_parameters():
                p.copy_(self.torch.from_numpy(weights[n]))


def peak_rss(engine: str, bundle_dir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", engine, str(bundle_dir)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def configuration(repeats: int) -> dict:
    from importlib.metadata import version

    import torch

    return {
        "seed": SEED,
        "model": "mobilenet_v2",
        "input": [3, 32, 32],
        "batches": list(BATCHES),
        "repeats": repeats,
        "warmup": WARMUP,
        "statistic": "median seconds per call; ratio = engine median / eager median, same run",
        "train_step": f"frozen forward + trainable loss and gradients + numpy SGD(lr={LR}, momentum=0.9) + set weights",
        "child_steps": CHILD_STEPS,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "onnx": version("onnx"),
            "onnxruntime-training-cpu": version("onnxruntime-training-cpu"),
            "executorch": version("executorch"),
            "fedkit": version("fedkit"),
        },
        "torch_threads": 1,  # see EagerEngine
        "peak_rss": "VmHWM of a fresh child process per engine after the batch-32 train steps",
    }


# -- the child: one engine, batch-32 train steps, its own peak RSS ------------------------------


def child(engine: str, bundle_dir: str) -> None:
    """Prints one JSON line: this process's peak RSS after CHILD_STEPS train steps."""
    blocked = engine == "ort"
    if blocked:
        sys.meta_path.insert(0, _BlockTorch())
    from device_runtime.bundle import Bundle
    from device_runtime.engines import open_engine
    from device_runtime.optim import SGD

    bundle = Bundle.load(bundle_dir)
    runner = EagerEngine(bundle) if engine == "eager" else open_engine(bundle, engine)
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, size=32)
    sgd = SGD(lr=LR, momentum=0.9)
    for _ in range(CHILD_STEPS):
        _, grads = runner.gradients(runner.features(x), labels)
        runner.set_weights(sgd.step(runner.get_weights(), grads))
    print(
        json.dumps(
            {
                "peak_rss_mib": round(_peak_rss_kib() / 1024, 1),
                "torch_blocked": blocked,
                "torch_imported": "torch" in sys.modules,
                "steps": CHILD_STEPS,
                "batch": 32,
            }
        )
    )


def _peak_rss_kib() -> int:
    # VmHWM: this process image's own high-water mark. Not getrusage's ru_maxrss: Linux carries
    # that over from the parent across fork and exec, so every child of this torch-laden
    # benchmark would report the parent's peak (measured: all children showed the same 573 MiB).
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


if __name__ == "__main__":
    main()
