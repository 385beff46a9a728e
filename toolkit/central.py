"""Frozen-backbone features with an on-disk cache, and the centralised reference: the head
trained on all 60,000 Fashion-MNIST training images at once.

The features of a frozen backbone never change, so they are computed once per (backbone
weights, stop block, input transform, images) and read back from
``$FEDKIT_CACHE_DIR/features/`` (default ``~/.cache/fedkit``) afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track

from device_runtime.preprocess import InputSpec
from toolkit.data import load_fashion_mnist, transform
from toolkit.errors import ConfigError, DataError
from toolkit.models import SplittableModel, load_model

__all__ = ["CACHE_DIR_ENV", "CentralResult", "cache_dir", "feature_cache_path", "features", "train_central"]

CACHE_DIR_ENV = "FEDKIT_CACHE_DIR"
_progress_console = Console(stderr=True)  # stdout stays clean for results and JSON lines


def cache_dir() -> Path:
    """$FEDKIT_CACHE_DIR, else ~/.cache/fedkit."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "fedkit")


def _part_hash(model: SplittableModel, stop_block: int) -> str:
    # Only the frozen part shapes the features: a retrained head must not void the cache. The
    # model id goes in too: an exit model's rows hold its taps, so its exits change them.
    h = hashlib.sha256(model.model_id.encode())
    for name, tensor in sorted(model.frozen_part(stop_block).state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def feature_cache_path(
    model: SplittableModel, images: np.ndarray, stop_block: int, spec: InputSpec = InputSpec()
) -> Path:
    """Where ``features(model, images, stop_block, spec)`` is cached."""
    h = hashlib.sha256()
    h.update(_part_hash(model, stop_block).encode())
    h.update(f"stop={stop_block}".encode())
    h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    h.update(f"{images.dtype}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).data)  # its bytes (numpy types no buffer protocol before Python 3.12)
    return cache_dir() / "features" / f"{model.model_id}-{stop_block}-{h.hexdigest()[:32]}.npy"


def features(
    model: SplittableModel,
    images: np.ndarray,
    stop_block: int,
    spec: InputSpec = InputSpec(),
    *,
    batch_size: int = 256,
    use_cache: bool = True,
) -> np.ndarray:
    """float32 outputs of ``model.frozen_part(stop_block)`` for uint8 ``images`` (N, H, W), in
    eval mode: blocks [0, stop_block)'s activations, or an exit model's flat rows (its taps, then
    the activation). Read from the cache when they were computed before (``use_cache=False``
    neither reads nor writes it)."""
    if len(images) == 0:
        raise DataError("no images to compute features of: pass at least one image")
    path = feature_cache_path(model, images, stop_block, spec)
    if use_cache and path.is_file():
        try:
            cached = np.load(path)
            # One image through the part: an entry of another layout (written by an older
            # fedkit whose frozen part returned something else) is recomputed, not trusted.
            if cached.shape == (len(images), *_compute(model, images[:1], stop_block, spec, 1).shape[1:]):
                return cached
        except (OSError, ValueError):
            pass  # an unreadable cache file is recomputed and replaced below
    out = _compute(model, images, stop_block, spec, batch_size)
    if use_cache:
        _save_atomically(path, out)
    return out


def _compute(model: SplittableModel, images: np.ndarray, stop_block: int, spec: InputSpec, batch_size: int):
    part = model.frozen_part(stop_block)
    modes = [(m, m.training) for m in part.modules()]
    part.eval()
    out = None
    try:
        with torch.inference_mode():
            starts = range(0, len(images), batch_size)
            label = f"{model.model_id} features to block {stop_block}"
            for start in track(starts, description=label, console=_progress_console, transient=True):
                x = torch.from_numpy(transform(images[start : start + batch_size], spec))
                y = part(x).numpy()
                if out is None:
                    out = np.empty((len(images), *y.shape[1:]), dtype=np.float32)
                out[start : start + len(y)] = y
    finally:
        for m, training in modes:  # the parts share modules with the whole model: restore them
            m.training = training
    return out


def _save_atomically(path: Path, array: np.ndarray) -> None:
    # a crash mid-write leaves a stray temp file, never a truncated cache entry
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.save(f, array)
    os.replace(f.name, path)


# -- the centralised reference ----------------------------------------------------------------


@dataclass(frozen=True)
class CentralResult:
    """One centralised training run of the head on frozen backbone features."""

    config: dict  # the settings and the versions
    test_accuracy: tuple[float, ...]  # after each epoch, on the test images
    train_loss: tuple[float, ...]  # mean cross-entropy of each epoch
    extracted_images: int  # train + test images put through the backbone
    extraction_seconds: float  # computing their features, or reading them from the cache
    cache_hit: bool
    train_seconds: float  # the epochs, evaluation included

    @property
    def final_accuracy(self) -> float:
        return self.test_accuracy[-1]

    def figures(self) -> dict:
        """The figures of its benchmark record (``toolkit.benchmarking``)."""
        figures = {k: v for k, v in asdict(self).items() if k != "config"}
        figures["test_accuracy"] = list(self.test_accuracy)
        figures["train_loss"] = list(self.train_loss)
        figures["final_accuracy"] = self.final_accuracy
        figures["extraction_images_per_second"] = self.extracted_images / self.extraction_seconds
        return figures


def train_central(
    model_name: str = "mobilenet_v2",
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    use_cache: bool = True,
    data_dir: Path | str | None = None,
) -> CentralResult:
    """Trains a fresh head (created right after ``torch.manual_seed(seed)``) with SGD on the
    frozen backbone's features of the Fashion-MNIST training images (the first ``max_train``,
    default all), evaluating on the test images (the first ``max_test``) after every epoch."""
    for name, value in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("max_train", max_train),
        ("max_test", max_test),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if not lr > 0:
        raise ConfigError(f"the learning rate must be positive, got {lr}")
    train = load_fashion_mnist("train", data_dir)
    test = load_fashion_mnist("test", data_dir)
    train_images, train_labels = train.images[:max_train], train.labels[:max_train]
    test_images, test_labels = test.images[:max_test], test.labels[:max_test]

    model = load_model(model_name, seed=seed)
    stop = len(model.block_names) - 1  # everything but the head is frozen

    cache_hit = use_cache and all(
        feature_cache_path(model, images, stop).is_file() for images in (train_images, test_images)
    )
    start = time.perf_counter()
    x_train = torch.from_numpy(features(model, train_images, stop, use_cache=use_cache))
    x_test = torch.from_numpy(features(model, test_images, stop, use_cache=use_cache))
    extraction_seconds = time.perf_counter() - start
    y_train = torch.from_numpy(train_labels)
    y_test = torch.from_numpy(test_labels)

    head = model.part(stop, len(model.block_names))
    head.train()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    shuffle = torch.Generator().manual_seed(seed)
    accuracies, losses = [], []
    threads = torch.get_num_threads()
    # A head step is a few microseconds of arithmetic: extra threads only add synchronisation,
    # which on a busy machine made each step ~30× slower.
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        for _ in track(range(epochs), description="training the head", console=_progress_console, transient=True):
            order = torch.randperm(len(x_train), generator=shuffle)
            total = 0.0
            for i in range(0, len(order), batch_size):
                batch = order[i : i + batch_size]
                loss = F.cross_entropy(head(x_train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            losses.append(total / len(order))
            with torch.no_grad():
                accuracies.append((head(x_test).argmax(1) == y_test).double().mean().item())
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.perf_counter() - start

    config = {
        "model": model_name,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "seed": seed,
        "train_images": len(train_images),
        "test_images": len(test_images),
        "input": InputSpec().to_dict(),
        "use_cache": use_cache,
        # the versions; the machine is the record's (toolkit.benchmarking)
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return CentralResult(
        config=config,
        test_accuracy=tuple(accuracies),
        train_loss=tuple(losses),
        extracted_images=len(train_images) + len(test_images),
        extraction_seconds=extraction_seconds,
        cache_hit=cache_hit,
        train_seconds=train_seconds,
    )
