import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device_runtime.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from device_runtime.errors import CheckpointError


def _state():
    return {
        "phase": "training",
        "position": {"epoch": 1, "batch": 7, "loss_sum": 12.5, "done": None},
        "weights": {
            "classifier.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "classifier.bias": np.zeros(3, np.float32),
        },
        "optimizer": {"momentum": [np.ones(2, np.float64), np.full(1, -1, np.int64)]},
        "payload": b"\x00\x01update bytes",
        "metrics": {"eval_accuracy": np.float64(0.75)},
    }


def test_round_trip_keeps_values_and_dtypes(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _state())

    loaded = load_checkpoint(path)

    assert loaded["phase"] == "training"
    assert loaded["position"] == {"epoch": 1, "batch": 7, "loss_sum": 12.5, "done": None}
    for name, w in _state()["weights"].items():
        assert loaded["weights"][name].dtype == w.dtype
        np.testing.assert_array_equal(loaded["weights"][name], w)
    assert [m.dtype for m in loaded["optimizer"]["momentum"]] == [np.float64, np.int64]
    assert loaded["payload"] == b"\x00\x01update bytes"
    assert loaded["metrics"]["eval_accuracy"] == 0.75


def test_the_file_is_plain_npz_and_json_without_pickle(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _state())

    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["__meta__"].tobytes())

    assert meta["format_version"] == FORMAT_VERSION
    assert meta["state"]["weights"]["classifier.bias"] == {"__array__": "weights/classifier.bias"}


def test_missing_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "absent.npz") is None


def test_save_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ckpt.npz"
    (tmp_path / ".ckpt.npz.abc123.tmp").write_bytes(b"half a checkpoint from a killed writer")
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})

    assert load_checkpoint(path) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"step": 1})

    with pytest.raises(ValueError, match="only pickle"):
        save_checkpoint(path, {"step": 2, "bad": np.array([object()], dtype=object)})

    assert load_checkpoint(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1])
def test_truncated_checkpoint_is_refused(tmp_path, keep):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])

    with pytest.raises(CheckpointError, match=r"corrupt or truncated.*delete it"):
        load_checkpoint(path)


def test_flipped_byte_in_an_array_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.zeros(1000, np.float32)})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("w.npy")
    data[info.header_offset + 200] ^= 0xFF  # inside the array's stored bytes
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_other_format_version_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    meta = json.dumps({"format_version": 99, "state": {}}).encode()
    np.savez(path, __meta__=np.frombuffer(meta, np.uint8))

    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)


def test_pickled_content_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    np.savez(path, __meta__=np.array([{"format_version": 1}], dtype=object))

    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_keys_that_would_collide_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="without '/'"):
        save_checkpoint(tmp_path / "c.npz", {"a/b": 1})


names = st.text(alphabet="abcdefgh._", min_size=1, max_size=12).filter(lambda s: not s.startswith("__"))
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(names, st.one_of(arrays, st.dictionaries(names, arrays, max_size=3)), max_size=4))
def test_any_nested_dict_of_arrays_round_trips(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("ckpt") / "c.npz"
    save_checkpoint(path, state)

    loaded = load_checkpoint(path)

    def same(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                same(a[k], b[k])
        else:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)

    same(state, loaded)
