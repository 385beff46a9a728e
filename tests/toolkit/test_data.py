from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from device_runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from toolkit.data import (
    LABEL_NAMES,
    label_histogram,
    load_fashion_mnist,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    transform,
    write_shard,
)
from toolkit.errors import ConfigError, DataError

# -- the real files ---------------------------------------------------------------------------


def test_train_split_is_fashion_mnist(fashion_train):
    assert fashion_train.images.shape == (60_000, 28, 28)
    assert fashion_train.images.dtype == np.uint8
    assert fashion_train.labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(fashion_train.labels), [6000] * 10)
    assert len(fashion_train) == 60_000
    assert len(LABEL_NAMES) == 10


def test_test_split_is_fashion_mnist(fashion_test):
    assert fashion_test.images.shape == (10_000, 28, 28)
    np.testing.assert_array_equal(np.bincount(fashion_test.labels), [1000] * 10)
    # the images are real pictures, not zeros: about half the pixels are background
    assert 0.3 < (fashion_test.images > 0).mean() < 0.7


def test_unknown_split_is_refused():
    with pytest.raises(DataError, match="'validation'"):
        load_fashion_mnist("validation")


# -- crafted files ----------------------------------------------------------------------------


def _idx(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_split(folder, images: np.ndarray, labels: np.ndarray, split: str = "t10k") -> None:
    (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(2051, images)))
    (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(2049, labels)))


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([0, 3, 9, 1, 1])


def test_crafted_files_load_exactly(tmp_path, tiny):
    images, labels = tiny
    _write_split(tmp_path, images, labels)
    ds = load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    ds.images[0, 0, 0] = 7  # an ordinary, writable array


def test_data_dir_comes_from_the_environment(tmp_path, tiny, monkeypatch):
    _write_split(tmp_path, *tiny)
    monkeypatch.setenv("FEDKIT_DATA_DIR", str(tmp_path))
    assert len(load_fashion_mnist("test")) == 5


def test_missing_file_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKIT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_fashion_mnist("train")
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in message
    assert "FEDKIT_DATA_DIR" in message


def test_not_gzip_is_refused(tmp_path, tiny):
    _write_split(tmp_path, *tiny)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(_idx(2051, tiny[0]))  # not compressed
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is not a readable gzip file"):
        load_fashion_mnist("test", tmp_path)


def test_cut_gzip_stream_is_refused(tmp_path, tiny):
    _write_split(tmp_path, *tiny)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="not a readable gzip file"):
        load_fashion_mnist("test", tmp_path)


def test_corrupt_deflate_data_is_refused(tmp_path, tiny):
    _write_split(tmp_path, *tiny)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a readable gzip file"):
        load_fashion_mnist("test", tmp_path)


def test_wrong_magic_is_refused(tmp_path, tiny):
    images, labels = tiny
    _write_split(tmp_path, images, labels)
    # a label file where the image file belongs
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(2049, labels)))
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        load_fashion_mnist("test", tmp_path)


def test_truncated_data_is_refused(tmp_path, tiny):
    images, labels = tiny
    _write_split(tmp_path, images, labels)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(2051, images)[:-10]))
    with pytest.raises(DataError, match="announces 5×28×28 = 3920: the file is truncated"):
        load_fashion_mnist("test", tmp_path)


def test_truncated_header_is_refused(tmp_path, tiny):
    _write_split(tmp_path, *tiny)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08"))
    with pytest.raises(DataError, match="shorter than its IDX header"):
        load_fashion_mnist("test", tmp_path)


def test_count_mismatch_is_refused(tmp_path, tiny):
    images, labels = tiny
    _write_split(tmp_path, images, labels[:4])
    with pytest.raises(DataError, match=r"holds 5 images but .* holds 4 labels"):
        load_fashion_mnist("test", tmp_path)


def test_label_out_of_range_is_refused(tmp_path, tiny):
    images, _ = tiny
    _write_split(tmp_path, images, np.array([0, 1, 2, 3, 10]))
    with pytest.raises(DataError, match="label 10"):
        load_fashion_mnist("test", tmp_path)


# -- transform --------------------------------------------------------------------------------


def test_transform_equals_torch_bilinear_and_imagenet_normalisation(fashion_test):
    images = fashion_test.images[:64]
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = ((x - mean) / std).numpy()

    got = transform(images)

    assert got.dtype == np.float32 and got.shape == (64, 3, 32, 32)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_transform_follows_the_input_spec():
    spec = InputSpec(height=40, width=24, channels=1, mean=(0.5,), std=(0.25,))
    got = transform(np.full((2, 28, 28), 255, dtype=np.uint8), spec)
    assert got.shape == (2, 1, 40, 24)
    np.testing.assert_allclose(got, 2.0)  # (1 - 0.5) / 0.25


# -- shards -----------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path, tiny):
    images, labels = tiny
    path = write_shard(tmp_path / "phones" / "phone-3.npz", images, labels.astype(np.int32))
    with np.load(path) as shard:
        assert sorted(shard.files) == ["images", "labels"]
        np.testing.assert_array_equal(shard["images"], images)
        assert shard["images"].dtype == np.uint8
        np.testing.assert_array_equal(shard["labels"], labels)
        assert shard["labels"].dtype == np.int64
    assert [p.name for p in path.parent.iterdir()] == ["phone-3.npz"]  # no temporary file left


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((2, 28, 28), np.float32), np.zeros(2, np.int64), "uint8 images"),
        (np.zeros((2, 784), np.uint8), np.zeros(2, np.int64), "uint8 images"),
        (np.zeros((2, 28, 28), np.uint8), np.zeros(3, np.int64), "one integer label per image"),
        (np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.float32), "one integer label per image"),
    ],
)
def test_bad_shard_is_refused(tmp_path, images, labels, match):
    with pytest.raises(DataError, match=match):
        write_shard(tmp_path / "s.npz", images, labels)
    assert not (tmp_path / "s.npz").exists()


# -- partitioners -----------------------------------------------------------------------------

label_arrays = arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 9))
seeds = st.integers(0, 2**32 - 1)


def _assert_partition(labels: np.ndarray, parts: list[np.ndarray], n_clients: int) -> None:
    assert len(parts) == n_clients
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    hist = label_histogram(labels, parts)
    assert hist.shape == (n_clients, 10)
    np.testing.assert_array_equal(hist.sum(axis=1), [len(p) for p in parts])
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(labels, minlength=10))


@settings(max_examples=40, deadline=None)
@given(labels=label_arrays, n_clients=st.integers(1, 20), seed=seeds)
def test_iid_partition(labels, n_clients, seed):
    parts = partition_iid(labels, n_clients, seed)
    _assert_partition(labels, parts, n_clients)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(labels, n_clients, seed), strict=True))


@settings(max_examples=40, deadline=None)
@given(
    labels=label_arrays,
    n_clients=st.integers(1, 20),
    alpha=st.floats(0.05, 100.0),
    seed=seeds,
)
def test_dirichlet_partition(labels, n_clients, alpha, seed):
    parts = partition_dirichlet(labels, n_clients, alpha, seed)
    _assert_partition(labels, parts, n_clients)
    again = partition_dirichlet(labels, n_clients, alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=40, deadline=None)
@given(
    labels=arrays(np.int64, st.integers(1, 300), elements=st.integers(0, 9)),
    n_clients=st.integers(1, 10),
    shards_per_client=st.integers(1, 4),
    seed=seeds,
)
def test_shards_partition(labels, n_clients, shards_per_client, seed):
    if n_clients * shards_per_client > len(labels):
        with pytest.raises(ConfigError, match="shards"):
            partition_shards(labels, n_clients, shards_per_client, seed)
        return
    parts = partition_shards(labels, n_clients, shards_per_client, seed)
    _assert_partition(labels, parts, n_clients)
    again = partition_shards(labels, n_clients, shards_per_client, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_follows_the_b1_recipe(fashion_train):
    """BENCHMARKS.md B1, spelled out: the split must be reproducible by anyone from the text."""
    labels = fashion_train.labels
    parts = partition_dirichlet(labels, 20, 0.5, seed=0)

    rng = np.random.default_rng(0)
    owner = np.full(len(labels), -1)
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        proportions = rng.dirichlet([0.5] * 20)
        cuts = (np.cumsum(proportions) * len(idx)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            owner[chunk] = client
    for client, part in enumerate(parts):
        np.testing.assert_array_equal(part, np.flatnonzero(owner == client))
    # label skew: most phones nearly lack some class (an IID split gives each class ~300)
    hist = label_histogram(labels, parts)
    assert (hist.min(axis=1) < 30).mean() > 0.5


def test_dirichlet_depends_on_the_seed(fashion_train):
    a = partition_dirichlet(fashion_train.labels, 20, 0.5, seed=0)
    b = partition_dirichlet(fashion_train.labels, 20, 0.5, seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_shards_give_each_client_few_classes(fashion_train):
    parts = partition_shards(fashion_train.labels, 100, 2, seed=0)
    assert all(len(p) == 600 for p in parts)
    assert max(len(np.unique(fashion_train.labels[p])) for p in parts) <= 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda y: partition_iid(y, 0, 0), "at least 1"),
        (lambda y: partition_dirichlet(y, 5, 0.0, 0), "alpha must be positive"),
        (lambda y: partition_dirichlet(y, -1, 0.5, 0), "at least 1"),
        (lambda y: partition_shards(y, 4, 0, 0), "shards per client"),
        (lambda y: partition_iid(y.reshape(2, -1), 2, 0), "one-dimensional"),
    ],
)
def test_bad_partition_settings_are_refused(call, match):
    with pytest.raises(ConfigError, match=match):
        call(np.arange(20) % 10)
