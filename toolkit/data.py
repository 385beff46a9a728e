"""Fashion-MNIST from the Debian package's IDX files, the model's input transform, and the
partitioners that split the training set over phones.

Every partitioner returns one sorted array of sample indices per client; together they hold
every sample exactly once, and the same seed gives the same split.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_runtime.folders import is_free, new_folder
from device_runtime.preprocess import InputSpec, prepare
from toolkit.errors import ConfigError, DataError

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "LABEL_NAMES",
    "FashionMNIST",
    "label_histogram",
    "load_fashion_mnist",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "transform",
    "write_shard",
    "write_shards",
]

# Where the Debian package `dataset-fashion-mnist` installs the IDX files.
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "FEDKIT_DATA_DIR"
LABEL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dims.
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_INSTALL_HINT = (
    "install it with `apt-get update && apt-get install -y dataset-fashion-mnist`, "
    f"or set {DATA_DIR_ENV} to a folder holding the four Fashion-MNIST IDX .gz files"
)


@dataclass(frozen=True, eq=False)
class FashionMNIST:
    """One split of Fashion-MNIST."""

    split: str
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int64 (N,), indices into LABEL_NAMES

    def __len__(self) -> int:
        return len(self.labels)


def load_fashion_mnist(split: str, data_dir: Path | str | None = None) -> FashionMNIST:
    """The ``"train"`` (60,000) or ``"test"`` (10,000) split, read from the IDX ``.gz`` files in
    ``data_dir``, else $FEDKIT_DATA_DIR, else the Debian package's folder."""
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}: choose 'train' or 'test'")
    folder = Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    images_file, labels_file = (folder / name for name in _FILES[split])
    images = _read_idx(images_file, _IMAGES_MAGIC, ndim=3)
    labels = _read_idx(labels_file, _LABELS_MAGIC, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(
            f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels: "
            f"the files do not belong together; {_INSTALL_HINT}"
        )
    if labels.size and labels.max() >= len(LABEL_NAMES):
        raise DataError(
            f"{labels_file} has label {labels.max()}, but Fashion-MNIST has {len(LABEL_NAMES)} classes: "
            f"the file is corrupt; {_INSTALL_HINT}"
        )
    return FashionMNIST(split=split, images=images, labels=labels)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array in a gzipped IDX file, its header checked against what we expect."""
    if not path.is_file():
        raise DataError(f"{path} is missing: {_INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}): {_INSTALL_HINT}") from exc
    header_size = 4 * (1 + ndim)
    found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if found is not None and found != magic:
        raise DataError(
            f"{path} has IDX magic number {found}, expected {magic} "
            f"(unsigned bytes in {ndim} dimension{'s' if ndim > 1 else ''}): wrong or corrupt file; {_INSTALL_HINT}"
        )
    if len(raw) < header_size:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its IDX header; {_INSTALL_HINT}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    body = raw[header_size:]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise DataError(
            f"{path} holds {len(body)} data bytes but its header announces {'×'.join(map(str, dims))} = "
            f"{expected}: the file is {'truncated' if len(body) < expected else 'corrupt'}; {_INSTALL_HINT}"
        )
    # frombuffer over bytes is read-only; the copy gives callers an ordinary array
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def transform(images: np.ndarray, spec: InputSpec = InputSpec()) -> np.ndarray:
    """uint8 images (N, 28, 28) → the model's float32 NCHW input: the phone's own code, so the
    host and the phones see identical inputs."""
    return prepare(images, spec)


def write_shard(path: Path | str, images: np.ndarray, labels: np.ndarray) -> Path:
    """Writes a phone's data shard: ``.npz`` with ``images`` (uint8 N×H×W) and ``labels`` (int64 N).
    Written to a temporary file first, so a reader never sees half a shard."""
    path = Path(path)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"a shard holds uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(images):
        raise DataError(
            f"a shard holds one integer label per image: got {labels.dtype} {labels.shape} for {len(images)} images"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object keeps np.savez from renaming it to *.npz
        np.savez(f, images=images, labels=labels.astype(np.int64))
    os.replace(tmp, path)
    return path


# -- partitioners ---------------------------------------------------------------------------


def _check_clients(labels: np.ndarray, n_clients: int) -> None:
    if n_clients < 1:
        raise ConfigError(f"the number of clients must be at least 1, got {n_clients}")
    if np.asarray(labels).ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {np.asarray(labels).shape}")


def partition_iid(labels: np.ndarray, n_clients: int, seed: int) -> list[np.ndarray]:
    """A uniformly random split into ``n_clients`` parts whose sizes differ by at most one."""
    _check_clients(labels, n_clients)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, n_clients)]


def partition_dirichlet(labels: np.ndarray, n_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew (BENCHMARKS.md, B1): for each class in order, shuffle its indices with the
    seeded generator, draw the clients' shares from Dirichlet(alpha, ..., alpha), and split at
    the cumulative shares (rounded down). No minimum client size: a client may get nothing."""
    _check_clients(labels, n_clients)
    if not alpha > 0:
        raise ConfigError(f"the Dirichlet concentration alpha must be positive, got {alpha}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        shares = rng.dirichlet([alpha] * n_clients)
        bounds = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(idx, bounds)):
            chunks[client].append(chunk)
    return [np.sort(np.concatenate(c)) if c else np.empty(0, dtype=np.int64) for c in chunks]


def partition_shards(labels: np.ndarray, n_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al.): sort by label, cut into ``n_clients ×
    shards_per_client`` equal shards (the remainder spread over the first ones), and deal each
    client ``shards_per_client`` of them at random."""
    _check_clients(labels, n_clients)
    n_shards = n_clients * shards_per_client
    if shards_per_client < 1 or n_shards > len(labels):
        raise ConfigError(
            f"cannot cut {len(labels)} samples into {n_clients} clients × {shards_per_client} shards: "
            f"shards per client must be at least 1 and the shards no more than the samples"
        )
    rng = np.random.default_rng(seed)
    shards = np.array_split(np.argsort(labels, kind="stable"), n_shards)
    dealt = rng.permutation(n_shards).reshape(n_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in dealt]


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int = 10) -> np.ndarray:
    """(clients × classes) sample counts: how skewed a split is."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


# -- shards for a fleet -----------------------------------------------------------------------

SHARD_INDEX = "shards.json"  # phone → its shard file, image count and label histogram
MIN_SHARD_IMAGES = 10  # a phone holds out a slice for its local evaluation: fewer is no round


def write_shards(
    out_dir: Path | str,
    phones: list[str],
    partition: str = "dirichlet",
    *,
    alpha: float = 0.5,
    shards_per_phone: int = 2,
    seed: int = 0,
    train_images: int = 60000,
) -> dict[str, dict]:
    """Splits the first ``train_images`` Fashion-MNIST training images over ``phones``
    (``partition``: iid, dirichlet with ``alpha``, or shards with ``shards_per_phone``) and
    writes ``out_dir/<phone>.npz`` (``write_shard``'s format) and ``out_dir/shards.json``;
    returns that index. ``out_dir`` must not exist, or be empty; it appears only whole."""
    out_dir = Path(out_dir)
    if not phones or len(set(phones)) != len(phones):
        raise ConfigError(f"shards need distinct phone names, got {phones}")
    if not is_free(out_dir):
        raise ConfigError(f"{out_dir} already exists: remove it or choose another --out")
    if not 1 <= train_images <= 60000:
        raise ConfigError(f"train_images must be between 1 and 60000, got {train_images}")
    train = load_fashion_mnist("train")
    labels = train.labels[:train_images]
    if partition == "iid":
        parts = partition_iid(labels, len(phones), seed)
    elif partition == "dirichlet":
        parts = partition_dirichlet(labels, len(phones), alpha, seed)
    elif partition == "shards":
        parts = partition_shards(labels, len(phones), shards_per_phone, seed)
    else:
        raise ConfigError(f"partition {partition!r} is unknown: use iid, dirichlet or shards")
    small = [phone for phone, part in zip(phones, parts, strict=True) if len(part) < MIN_SHARD_IMAGES]
    if small:
        raise ConfigError(
            f"{', '.join(small)} get fewer than {MIN_SHARD_IMAGES} images from the split: "
            "raise alpha or the number of images, or use fewer phones"
        )
    index = {}
    with new_folder(out_dir) as staging:
        for phone, part in zip(phones, parts, strict=True):
            write_shard(staging / f"{phone}.npz", train.images[part], labels[part])
            index[phone] = {
                "file": f"{phone}.npz",
                "images": len(part),
                "labels": np.bincount(labels[part], minlength=len(LABEL_NAMES)).tolist(),
            }
        (staging / SHARD_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index
