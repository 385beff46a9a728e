"""``python -m device_runtime train ...``: one local round on a phone, without the toolkit.

Loads and verifies the bundle, trains the shard from the bundle's initial weights (or
``--base``, an encoded weights payload), writes the encoded update to ``--out`` and prints one
JSON line of stats, peak RSS included. Run it again with the same arguments after a kill: it
resumes from the checkpoint in ``--workdir`` and ends with the same update. Standard library
and device_runtime only, so it runs where torch is not installed.

``python -m device_runtime predict --early-exit DIR --images FILE.npz --threshold T``:
early-exit inference on the phone (``device_runtime.early_exit``) over the ``images`` of an
``.npz`` (a shard's format); prints one JSON line: each image's class and the exit it left at,
the mean MFLOPs per image, and the accuracy when the file has ``labels``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.codec import decode
from device_runtime.early_exit import CRITERIA, EarlyExitPredictor
from device_runtime.engines import open_engine
from device_runtime.errors import DataError, FedkitError
from device_runtime.local_round import Task
from device_runtime.manifest import ENGINES
from device_runtime.trainer import LocalTrainer


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        stats = train(args) if args.command == "train" else predict(args)
    except FedkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


def train(args: argparse.Namespace) -> dict[str, Any]:
    bundle = Bundle.load(args.bundle)
    plan = bundle.manifest.plan
    trainer = LocalTrainer(
        bundle,
        args.shard,
        args.workdir,
        open_engine(bundle, args.engine),
        device_id=args.device_id,
        holdout_fraction=args.holdout,
        checkpoint_every=args.checkpoint_every,
    )
    task = Task(
        round=args.round,
        base_version=args.base_version,
        lr=args.lr,
        local_epochs=args.epochs or plan.local_epochs,
        batch_size=args.batch_size or plan.batch_size,
        encoding=args.encoding or plan.encoding,
        seed=args.seed,
    )
    base_file = Path(args.base) if args.base else bundle.path("weights")
    expected = {t.name: t.shape for t in bundle.manifest.trainable}
    base = decode(base_file.read_bytes(), expected=expected).tensors
    result = trainer.run_round(task, base)
    encoded = trainer.encode_update(task, result)
    if args.out:
        Path(args.out).write_bytes(encoded.payload)
    return {
        "round": result.round,
        "engine": trainer.engine.name,
        "model_id": bundle.manifest.model_id,
        "num_samples": result.num_samples,
        "steps": result.steps,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "eval_accuracy": result.eval_accuracy,
        "feature_seconds": result.feature_seconds,
        "train_seconds": result.train_seconds,
        "resumed": result.resumed,
        "update_bytes": len(encoded.payload),
        "idempotency_key": encoded.idempotency_key,
        "peak_rss_mb": peak_rss_mb(),
    }


def predict(args: argparse.Namespace) -> dict[str, Any]:
    predictor = EarlyExitPredictor(args.early_exit)
    try:
        with np.load(args.images) as data:
            images = data["images"]
            labels = data.get("labels")
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{args.images} is not an .npz with an 'images' array ({exc})") from exc
    try:
        p = predictor.predict(images, args.threshold, args.criterion)
    except ValueError as exc:
        raise DataError(f"{args.images}: {exc}") from exc
    return {
        "model_id": predictor.index.model_id,
        "threshold": args.threshold,
        "criterion": args.criterion,
        "labels": p.labels.tolist(),
        "exits": [p.exits[i] for i in p.exit_index],
        "mean_mflops": round(p.mean_mflops, 4),
        "accuracy": None if labels is None else float((p.labels == labels).mean()),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB.

    ``VmHWM`` from /proc (Linux, Android) rather than ``ru_maxrss``: the kernel carries
    ``ru_maxrss`` over an exec, so a process started by a big parent (a pytest or benchmark
    process holding torch) reports the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m device_runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run one local round and write the encoded update")
    p.add_argument("--bundle", required=True, help="bundle folder (verified before use)")
    p.add_argument("--shard", required=True, help="the phone's data shard, .npz with images and labels")
    p.add_argument("--workdir", required=True, help="folder for the feature cache and the checkpoint")
    p.add_argument("--out", help="file to write the encoded update to")
    p.add_argument("--base", help="encoded base weights (default: the bundle's initial weights)")
    p.add_argument("--engine", choices=ENGINES, help="default: the plan's engine")
    p.add_argument("--device-id", default="phone", help="names the device in the update; seeds its shuffling")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--base-version", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--epochs", type=int, help="local epochs (default: the plan's)")
    p.add_argument("--batch-size", type=int, help="default: the plan's")
    p.add_argument("--encoding", help="update encoding (default: the plan's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of the shard held out for local evaluation")
    p.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    q = sub.add_parser("predict", help="early-exit inference on images, stopping at the first confident exit")
    q.add_argument("--early-exit", required=True, help="early-exit folder (fedkit export-global --early-exit)")
    q.add_argument("--images", required=True, help=".npz with uint8 images (N, H, W) and optionally labels")
    q.add_argument("--threshold", type=float, required=True, help="confidence an image needs to leave at an exit")
    q.add_argument("--criterion", choices=CRITERIA, default="max_softmax")
    return parser


if __name__ == "__main__":
    sys.exit(main())
