"""The update codec: round trips per encoding, unbiased stochastic rounding, error feedback,
per-layer bits, exact sizes, and a decoder that refuses every malformed input with CodecError."""

from __future__ import annotations

import itertools
import json
import math
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device_runtime.codec import (
    ENCODINGS,
    FORMAT_VERSION,
    MAGIC,
    MAX_ELEMENTS,
    ErrorFeedback,
    Update,
    UpdateHeader,
    decode,
    encode,
    encoded_size,
    layered_encodings,
)
from device_runtime.errors import CodecError

HEADER = UpdateHeader("phone-7", round=3, base_version=2, num_samples=120)
QMAX = {"int8": 127, "int4": 7}
BF16_ROUND_UP = 1 + 2**-7  # scales are stored as bfloat16 rounded up
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite32 = st.floats(-1e4, 1e4, width=32)
tensor = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=finite32)
)
tensor_dicts = st.dictionaries(st.text(min_size=1, max_size=8), tensor, min_size=1, max_size=3)


def reseal(data: bytes) -> bytes:
    """``data`` with its CRC recomputed, so a test reaches the checks behind the checksum."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def container(records: list[tuple[str, int, tuple[int, ...], bytes]], header: bytes | None = None) -> bytes:
    """A container built by hand from the layout in the codec's docstring."""
    header = (
        header if header is not None else json.dumps(asdict(HEADER), sort_keys=True, separators=(",", ":")).encode()
    )
    body = MAGIC + struct.pack("<HI", FORMAT_VERSION, len(header)) + header + struct.pack("<I", len(records))
    for name, code, shape, payload in records:
        raw = name.encode()
        body += struct.pack(f"<H{len(raw)}sBB{len(shape)}II", len(raw), raw, code, len(shape), *shape, len(payload))
        body += payload
    return body + struct.pack("<I", zlib.crc32(body))


def payloads(data: bytes) -> dict[str, bytes]:
    """Each tensor's payload, read by the layout in the codec's docstring."""
    (header_size,) = struct.unpack_from("<I", data, 6)
    pos = 10 + header_size + 4
    out = {}
    while pos < len(data) - 4:
        (name_size,) = struct.unpack_from("<H", data, pos)
        name = data[pos + 2 : pos + 2 + name_size].decode()
        ndim = data[pos + 3 + name_size]
        pos += 4 + name_size + 4 * ndim
        (size,) = struct.unpack_from("<I", data, pos)
        out[name] = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
    return out


def bf16_round_up(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded up to bfloat16, as the docstring says scales are stored."""
    return (((x.view(np.uint32).astype(np.uint64) + 0xFFFF) >> 16) << 16).astype(np.uint32).view(np.float32)


def scaled_half(x: np.ndarray) -> np.ndarray:
    """x through fp16 as the docstring says: a power-of-two scale putting max |x| / s in (2**14, 2**15]."""
    exponent = np.clip(np.frexp(np.float32(np.abs(x).max(initial=0)))[1] - 15, -126, 14)
    scale = np.float32(2.0**exponent)
    return (x / scale).astype(np.float16).astype(np.float32) * scale


def channel_rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0] if x.ndim >= 2 else 1, -1 if x.size else 0)


def assert_decodes_as(encoding: str, x: np.ndarray, y: np.ndarray, fraction: float) -> None:
    assert y.dtype == np.float32 and y.shape == x.shape
    if not x.size:
        return
    half = scaled_half(x)
    if encoding == "fp32":
        np.testing.assert_array_equal(y, x)
    elif encoding == "fp16":
        np.testing.assert_array_equal(y, half)
    elif encoding in QMAX:
        step = np.abs(channel_rows(x)).max(axis=1, initial=0) / QMAX[encoding] * BF16_ROUND_UP + 2e-30
        assert (np.abs(channel_rows(y - x)) <= step[:, None]).all()
    elif encoding == "sign1":
        scale = np.abs(channel_rows(x)).mean(axis=1)
        expected = np.where(channel_rows(x) >= 0, 1.0, -1.0) * scale[:, None]
        np.testing.assert_allclose(channel_rows(y), expected, rtol=2**-7, atol=1e-37)
    else:  # topk: the k largest |x| in fp16, zeros elsewhere
        k = min(x.size, math.ceil(fraction * x.size))
        kept = y != 0
        assert ((y == 0) | (y == half)).all()
        assert np.count_nonzero(y) == min(k, np.count_nonzero(half))
        dropped = ~kept & (half != 0)
        if kept.any() and dropped.any():
            assert np.abs(x[kept]).min() >= np.abs(x[dropped]).max()


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@FAST
@given(tensors=tensor_dicts, seed=st.integers(0, 2**32 - 1), fraction=st.sampled_from([0.01, 0.3, 1.0]))
def test_round_trip_per_encoding(encoding, tensors, seed, fraction):
    shapes = {name: x.shape for name, x in tensors.items()}

    data = encode(HEADER, tensors, encoding, rng=np.random.default_rng(seed), topk_fraction=fraction)
    update = decode(data, expected=shapes)

    assert update.header == HEADER
    assert list(update.tensors) == list(tensors)
    assert update.encodings == dict.fromkeys(tensors, encoding)
    assert len(data) == encoded_size(shapes, encoding, header=HEADER, topk_fraction=fraction)
    for name, x in tensors.items():
        assert_decodes_as(encoding, x, update.tensors[name], fraction)


def test_per_tensor_encodings_and_size_without_header():
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal((6, 5, 3)).astype(np.float32) for name in ENCODINGS}
    encodings = {name: name for name in ENCODINGS}
    shapes = {name: x.shape for name, x in tensors.items()}

    data = encode(HEADER, tensors, encodings, rng=rng)
    update = decode(data)

    assert update.encodings == encodings
    for name, x in tensors.items():
        assert_decodes_as(name, x, update.tensors[name], 0.01)
    header_json = json.dumps(asdict(HEADER), sort_keys=True, separators=(",", ":")).encode()
    assert encoded_size(shapes, encodings) + len(header_json) == len(data)


@pytest.mark.parametrize("encoding", ["int8", "int4", "sign1"])
def test_scaled_encodings_of_many_tensors_match_each_tensor_alone(encoding):
    # The codec encodes the tensors of an encoding together, in runs of about 2**18 elements:
    # sizes odd and not multiples of 8, empty tensors and a run boundary after the big one.
    rng = np.random.default_rng(8)
    shapes = [(5, 7), (3,), (0, 4), (70001,), (), (9, 1, 3, 3), (1100, 257), (2, 0), (13,)]
    tensors = {f"t{i}": (rng.standard_normal(shape) * 3.0**i).astype(np.float32) for i, shape in enumerate(shapes)}
    tensors["t4"] = np.float32(-3.0)  # a scalar at its own scale: q = -qmax exactly

    data = encode(HEADER, tensors, encoding, rng=rng)
    together = decode(data)

    for name, x in tensors.items():
        assert_decodes_as(encoding, np.asarray(x), together.tensors[name], 0.01)
        if encoding in QMAX:  # never the -qmax - 1 that the payload could hold
            amax = np.abs(channel_rows(np.asarray(x))).max(axis=1, initial=0).astype(np.float32)
            scale = bf16_round_up(np.maximum(amax / np.float32(QMAX[encoding]), np.float32(2.0**-100)))
            q = channel_rows(together.tensors[name]) / scale[:, None]
            np.testing.assert_array_equal(q, np.round(q))
            assert (np.abs(q) <= QMAX[encoding]).all()
    if encoding == "sign1":  # the bits exactly as the docstring says, padding bits 0
        for name, payload in payloads(data).items():
            x = np.asarray(tensors[name])
            assert payload[2 * channel_rows(x).shape[0] :] == np.packbits(x.reshape(-1) >= 0).tobytes()


def test_layout_matches_the_docstring_byte_for_byte():
    x = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    small = np.array([3e-6, -1e-5, 0.0], dtype=np.float32)  # max |x| = 1e-5 <= 2**-16: s = 2**-31
    scale = struct.pack("<H", (127 - 31) << 7)  # 2**-31 as bfloat16
    halves = (small * np.float32(2.0**31)).astype("<f2")
    by_hand = container(
        [
            ("layer.weight", 0, (2, 2), x.astype("<f4").tobytes()),
            ("h", 1, (3,), scale + halves.tobytes()),
            ("k", 5, (3,), scale + struct.pack("<I", 1) + halves[1:2].tobytes()),
        ]
    )

    data = encode(
        HEADER,
        {"layer.weight": x, "h": small, "k": small},
        {"layer.weight": "fp32", "h": "fp16", "k": "topk"},
        topk_fraction=0.3,
    )

    assert data == by_hand
    decoded = decode(by_hand).tensors
    np.testing.assert_array_equal(decoded["layer.weight"], x)
    np.testing.assert_array_equal(decoded["h"], halves.astype(np.float32) * np.float32(2.0**-31))
    np.testing.assert_array_equal(decoded["k"], [0, halves[1] * np.float32(2.0**-31), 0])


def test_fp16_matches_numpy_astype_after_its_scale_subnormals_and_ties_too():
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)
    wide = ((bits & 0x807FFFFF) | (rng.integers(60, 142, bits.size).astype(np.uint32) << 23)).view(np.float32)
    ties = ((bits[:5000] & 0x807FE000) | 0x1000 | (rng.integers(100, 142, 5000).astype(np.uint32) << 23)).view(
        np.float32
    )
    tensors = {
        "wide": wide,  # 2**-67 .. 2**15: many halves subnormal or 0 after the scale
        "ties": ties,  # exactly halfway between two halves: to even
        "tiny": np.array([1e-42, -3e-39, 1e-40], np.float32),  # float32 subnormal inputs
        "delta": (rng.standard_normal((64, 3, 3)) * 1e-6).astype(np.float32),  # subnormal halves unscaled
    }

    decoded = decode(encode(HEADER, tensors, "fp16")).tensors

    for name, x in tensors.items():
        np.testing.assert_array_equal(decoded[name], scaled_half(x), err_msg=name)
    assert np.abs(decoded["delta"] - tensors["delta"]).max() <= 2**-11 * np.abs(tensors["delta"]).max()


@pytest.mark.parametrize("fraction", [0.01, 0.05])
def test_topk_of_large_tensors_is_exact(fraction):
    # Large tensors take the k largest among elements over a threshold from every 67th |x|;
    # with the big values only where the sample looks (and k larger than the sample), too few
    # pass it and all elements are searched.
    rng = np.random.default_rng(12)
    spiky = np.ones(64_000, np.float32)
    spiky[::67] = 10.0
    tensors = {
        "normal": rng.standard_normal((300, 128)).astype(np.float32),
        "spiky": spiky,
        "ties": np.full(20_000, 0.5, np.float32),
    }

    update = decode(encode(HEADER, tensors, "topk", topk_fraction=fraction))

    for name, x in tensors.items():
        assert_decodes_as("topk", x, update.tensors[name], fraction)
    k = math.ceil(fraction * tensors["normal"].size)
    expected = np.sort(np.argsort(np.abs(tensors["normal"]).reshape(-1))[-k:])
    np.testing.assert_array_equal(np.flatnonzero(update.tensors["normal"]), expected)


def test_threads_encode_and_decode_alike():
    rng = np.random.default_rng(13)
    tensors = {f"t{i}": rng.standard_normal((50, 40 * i + 1)).astype(np.float32) for i in range(1, 12)}
    encodings = dict(zip(tensors, itertools.cycle(ENCODINGS)))

    def round_trip(seed: int) -> tuple[bytes, list[np.ndarray]]:
        data = encode(HEADER, tensors, encodings, rng=np.random.default_rng(seed))
        return data, list(decode(data).tensors.values())

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(round_trip, [s % 3 for s in range(24)]))

    for seed, (data, decoded) in zip([s % 3 for s in range(24)], together, strict=True):
        alone_data, alone = round_trip(seed)
        assert data == alone_data
        for a, b in zip(decoded, alone, strict=True):
            np.testing.assert_array_equal(a, b)


def test_kinds_and_inputs_other_than_float32():
    header = UpdateHeader("edge", round=0, base_version=0, num_samples=0, kind="activation")
    tensors = {"h": np.arange(6, dtype=np.float64).reshape(2, 3), "n": np.int32(4)}

    update = decode(encode(header, tensors, "fp32"))

    assert update.header.kind == "activation"
    np.testing.assert_array_equal(update.tensors["h"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert update.tensors["n"].shape == () and update.tensors["n"] == 4


@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(encoding):
    x = np.random.default_rng(1).uniform(-1, 1, size=(4, 250)).astype(np.float32)
    rng = np.random.default_rng(2)
    repeats = 400

    decoded = np.stack([decode(encode(HEADER, {"x": x}, encoding, rng=rng)).tensors["x"] for _ in range(repeats)])

    error = decoded.mean(axis=0) - x
    standard_error = decoded.std(axis=0, ddof=1) / math.sqrt(repeats)
    noisy = standard_error > 0
    # never rounded the other way in all repeats: only likely within a few % of a step of the grid
    step = np.abs(x).max(axis=1, keepdims=True) / QMAX[encoding] * BF16_ROUND_UP
    assert (np.abs(error) <= 0.05 * step)[~noisy].all()
    assert np.abs(error[noisy] / standard_error[noisy]).max() < 5.5
    assert abs(error[noisy].sum()) / math.sqrt((standard_error[noisy] ** 2).sum()) < 4


def test_rounding_draws_from_the_given_generator():
    x = {"x": np.linspace(-1, 1, 300, dtype=np.float32)}
    assert encode(HEADER, x, "int4", rng=np.random.default_rng(5)) == encode(
        HEADER, x, "int4", rng=np.random.default_rng(5)
    )
    assert encode(HEADER, x, "int4", rng=np.random.default_rng(5)) != encode(
        HEADER, x, "int4", rng=np.random.default_rng(6)
    )


# --- encoder refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors, kwargs, message",
    [
        ({"w": np.array([1.0, np.nan])}, {}, "NaN or Inf"),
        ({"w": np.array([np.inf])}, {"encoding": "sign1"}, "NaN or Inf"),
        ({"w": np.array([1.1e9])}, {"encoding": "fp16"}, "fp16"),  # past 65504 * 2**14
        ({"w": np.array([1.1e9])}, {"encoding": "topk"}, "fp16"),
        ({"w": np.array([1.0, np.inf])}, {"encoding": "fp16"}, "NaN or Inf"),
        ({"w": np.array([1.0, np.nan])}, {"encoding": "topk"}, "NaN or Inf"),
        ({"w": np.array([3e38])}, {"encoding": "int4"}, "too large"),
        ({"w": np.zeros(3)}, {"encoding": "int3"}, "unknown"),
        ({"w": np.zeros(3)}, {"encoding": {"v": "int8"}}, "missing"),
        ({"w": np.zeros(3)}, {"encoding": {"w": "int8", "v": "int8"}}, "extra"),
        ({"w": np.zeros(3)}, {"topk_fraction": 0.0}, "topk_fraction"),
        ({"w": np.zeros(3)}, {"topk_fraction": 1.5}, "topk_fraction"),
        ({"w": np.array(["a"])}, {}, "dtype"),
        ({"": np.zeros(3)}, {}, "name"),
        ({"w": np.zeros((1,) * 9)}, {}, "dimensions"),
    ],
)
def test_encode_refuses(tensors, kwargs, message):
    with pytest.raises(CodecError, match=message):
        encode(HEADER, tensors, **kwargs)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int4", "sign1", "topk"])
@pytest.mark.parametrize("at", [0, 64, 4095, 4096, 99_999])  # sampled by top-k or not, at chunk edges
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_encode_refuses_non_finite_anywhere_in_a_large_tensor(encoding, at, bad):
    x = np.random.default_rng(9).standard_normal((100, 1000)).astype(np.float32)
    x.reshape(-1)[at] = bad
    with pytest.raises(CodecError, match="'w' holds NaN or Inf"):
        encode(HEADER, {"ok": np.ones(3, np.float32), "w": x}, encoding, topk_fraction=0.01)


def test_kernels_refuse_buffers_that_do_not_fit_the_records():
    # the codec checks every record before it calls the kernels; they check again, so a bug
    # on the Python side is an error, never a read or write out of bounds
    from device_runtime import _kernels

    data = encode(HEADER, {"x": np.ones((4, 4), np.float32)}, "int8")
    offset = len(data) - 4 - (2 * 4 + 16)
    out = np.empty(16, np.float32)
    assert _kernels.unpack(data, [(2, offset, 24, 16, 4)], out) == (0, -1)
    np.testing.assert_allclose(out, 1.0, rtol=2**-7)
    for record, values in [
        ((2, offset, 24, 16, 3), out),
        ((2, len(data) - 8, 24, 16, 4), out),
        ((2, offset, 24, 16, 4), out[:8]),
    ]:
        with pytest.raises(ValueError):
            _kernels.unpack(data, [record], values)
    packed = _kernels.pack(b"", [(b"x", 2, np.ones(2, np.float32), 0)], 0.01, zlib.crc32)
    assert len(packed) == (2 + 1) + (1 + 1 + 4) + 4 + (2 + 2) + 4  # name, code and shape, length, payload, CRC
    for tensor in [
        (b"x", 9, np.ones(2, np.float32), 0),
        (b"x", 2, np.ones(2), 0),
        (b"x", 2, np.ones((1,) * 9, np.float32), 0),
    ]:
        with pytest.raises(ValueError, match="tensor 0"):  # unknown encoding, float64, 9 dimensions
            _kernels.pack(b"", [tensor], 0.01, zlib.crc32)
    with pytest.raises((ValueError, BufferError)):  # not contiguous
        _kernels.pack(b"", [(b"x", 2, np.ones((4, 4), np.float32)[:, 1], 0)], 0.01, zlib.crc32)


@pytest.mark.parametrize(
    "fields",
    [
        {"device_id": ""},
        {"round": -1},
        {"round": True},
        {"num_samples": 1.5},
        {"base_version": "2"},
        {"kind": "weights2"},
    ],
)
def test_header_refuses_bad_fields(fields):
    with pytest.raises(CodecError):
        UpdateHeader(**{**asdict(HEADER), **fields})


# --- decoder refusals -------------------------------------------------------------------


def sample() -> bytes:
    rng = np.random.default_rng(3)
    tensors = {name: rng.standard_normal((3, 5)).astype(np.float32) for name in ENCODINGS}
    return encode(HEADER, tensors, {name: name for name in ENCODINGS}, rng=rng, topk_fraction=0.2)


def one_tensor(encoding: str, x: np.ndarray) -> tuple[bytes, int]:
    """An update of one tensor named "x" (top-k keeps all) and the offset of its payload."""
    data = encode(HEADER, {"x": x}, encoding, rng=np.random.default_rng(0), topk_fraction=1.0)
    header_size = struct.unpack_from("<I", data, 6)[0]
    return data, 10 + header_size + 4 + 2 + 1 + 1 + 1 + 4 * x.ndim + 4


def patched(data: bytes, offset: int, raw: bytes) -> bytes:
    return reseal(data[:offset] + raw + data[offset + len(raw) :])


def test_decode_refuses_wrong_magic_version_and_checksum():
    data = sample()
    with pytest.raises(CodecError, match="not a fedkit update"):
        decode(b"XXXX" + data[4:])
    with pytest.raises(CodecError, match="format version 1, this fedkit reads 2: update the older side"):
        decode(reseal(data[:4] + struct.pack("<H", 1) + data[6:]))
    flipped = bytearray(data)
    flipped[-10] ^= 0x01
    with pytest.raises(CodecError, match="checksum"):
        decode(bytes(flipped))


def test_decode_refuses_every_truncation_and_trailing_bytes():
    data = sample()
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:cut])
    with pytest.raises(CodecError, match="truncated"):
        decode(data[:-20])
    with pytest.raises(CodecError, match="after its last tensor"):
        decode(data + b"\x00")
    with pytest.raises(CodecError, match="after its last tensor"):
        decode(reseal(data[:-4] + b"junk" + data[-4:]))


def test_decode_checks_expected_shapes():
    data = encode(HEADER, {"a": np.zeros((2, 3)), "b": np.zeros(4)}, "int8")
    assert set(decode(data, expected={"a": (2, 3), "b": [4]}).tensors) == {"a", "b"}
    with pytest.raises(CodecError, match="missing \\['c'\\]"):
        decode(data, expected={"a": (2, 3), "b": (4,), "c": (1,)})
    with pytest.raises(CodecError, match="unexpected \\['b'\\]"):
        decode(data, expected={"a": (2, 3)})
    with pytest.raises(CodecError, match="expected \\(3, 2\\)"):
        decode(data, expected={"a": (3, 2), "b": (4,)})


def test_decode_refuses_oversized_input():
    data = sample()
    assert decode(data, max_bytes=len(data)).tensors
    with pytest.raises(CodecError, match="over the limit"):
        decode(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize(
    "encoding, x, raw, at",
    [
        ("fp32", np.array([1.0, 2.0], np.float32), struct.pack("<f", math.nan), 4),
        ("fp32", np.array([1.0, 2.0], np.float32), struct.pack("<f", -math.inf), 0),
        ("fp16", np.array([1.0, 2.0], np.float32), struct.pack("<H", 0x7C00), 4),  # after the scale
        ("fp16", np.array([1.0, 2.0], np.float32), struct.pack("<H", 0xFE00), 2),  # NaN, negative
        ("fp16", np.array([1.0, 2.0], np.float32), struct.pack("<H", 0x3F81), 0),  # scale not a power of two
        ("fp16", np.array([1.0, 2.0], np.float32), struct.pack("<H", (127 + 15) << 7), 0),  # scale 2**15: over 2**14
        ("topk", np.array([3.0, 2.0, 1.0], np.float32), struct.pack("<H", 0x7F80), 0),  # Inf scale
        ("int8", np.array([1.0, 2.0], np.float32), struct.pack("<H", 0x7FC0), 0),  # NaN scale
        ("int4", np.ones((2, 3), np.float32), struct.pack("<H", 0x7F80), 2),  # Inf scale
        ("sign1", np.array([1.0, 2.0], np.float32), struct.pack("<H", 0xBF80), 0),  # -1 scale
        ("int8", np.array([1.0, 2.0], np.float32), struct.pack("<H", 0x7F7F), 0),  # 128 * scale overflows
        ("topk", np.array([3.0, 2.0, 1.0], np.float32), struct.pack("<H", 0x7E00), 14),  # NaN value
    ],
)
def test_decode_refuses_non_finite_values_and_scales(encoding, x, raw, at):
    data, payload = one_tensor(encoding, x)
    assert decode(data).tensors["x"].shape == x.shape
    with pytest.raises(CodecError, match=r"NaN or Inf|scales"):
        decode(patched(data, payload + at, raw))


@pytest.mark.parametrize("indices", [(1, 0, 2), (0, 0, 2), (0, 1, 3)])
def test_decode_refuses_bad_topk_indices(indices):
    data, payload = one_tensor("topk", np.array([3.0, 2.0, 1.0], np.float32))
    assert decode(data).tensors["x"].tolist() == [3.0, 2.0, 1.0]
    with pytest.raises(CodecError, match="top-k indices"):
        decode(patched(data, payload + 2, struct.pack("<3I", *indices)))


@pytest.mark.parametrize(
    "records, message",
    [
        ([("x", 0, (2**20,), b"\0" * 4)], "does not fit its shape"),
        ([("x", 5, (2**32 - 1, 2**32 - 1), b"\0" * 6)], "elements"),
        ([(name, 5, (2**13, 2**12), b"\0" * 8) for name in "xyz"], "in all"),
        ([("x", 5, (3,), b"\0" * 7)], "does not fit its shape"),
        ([("x", 5, (1,), b"\0" * 14)], "does not fit its shape"),  # k = 2 of 1 element
        ([("x", 5, (1,), b"\0" * 6)], "does not fit its shape"),  # no room for the scale
        ([("x", 9, (1,), b"\0" * 4)], "encoding code 9"),
        ([("x", 0, (1,) * 9, b"\0" * 4)], "dimensions"),
        ([("x", 0, (1,), b"\0" * 4)] * 2, "twice"),
    ],
)
def test_decode_refuses_absurd_declarations(records, message):
    with pytest.raises(CodecError, match=message):
        decode(container(records))


@pytest.mark.parametrize(
    "header, message",
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"[1]", "exactly"),
        (b"[" * 100_000, "over the"),
        (b"[" * 60_000, "not valid JSON"),
        (b'{"base_version":0,"device_id":"p","kind":"delta","num_samples":0}', "exactly"),
        (b'{"base_version":0,"device_id":"p","kind":"delta","num_samples":0,"round":1e999}', "round"),
        (b'{"base_version":0,"device_id":"p","kind":"delta","num_samples":0,"round":' + b"9" * 5000 + b"}", "JSON"),
    ],
)
def test_decode_refuses_bad_headers(header, message):
    with pytest.raises(CodecError, match=message):
        decode(container([], header=header))


def test_decode_refuses_lying_counts_before_allocating():
    data = container([("x", 0, (1,), b"\0" * 4)])
    header_end = 10 + struct.unpack_from("<I", data, 6)[0]
    with pytest.raises(CodecError, match="declares 4294967295 tensors"):
        decode(patched(data, header_end, struct.pack("<I", 2**32 - 1)))
    with pytest.raises(CodecError, match="header"):
        decode(patched(data, 6, struct.pack("<I", 2**32 - 1)))
    with pytest.raises(CodecError, match="must be bytes"):
        decode("FKUP")


def assert_decodes_or_refuses(data: bytes) -> None:
    try:
        update = decode(data)
    except CodecError:
        return
    assert isinstance(update, Update)
    assert all(np.isfinite(t).all() for t in update.tensors.values())


SAMPLE = sample()


@settings(max_examples=400, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), max_size=4),
    cut=st.integers(0, 10_000),
    truncate=st.booleans(),
    insert=st.binary(max_size=8),
    drop=st.integers(0, 16),
    seal=st.booleans(),
)
def test_mutated_updates_only_ever_raise_codec_error(flips, cut, truncate, insert, drop, seal):
    data = bytearray(SAMPLE)
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    cut %= len(data) + 1
    mutated = bytes(data[:cut]) if truncate else bytes(data[:cut]) + insert + bytes(data[cut + drop :])
    assert_decodes_or_refuses(reseal(mutated) if seal and len(mutated) >= 4 else mutated)


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=200), seal=st.booleans())
def test_random_bytes_after_a_valid_prefix_only_ever_raise_codec_error(tail, seal):
    data = MAGIC + struct.pack("<H", FORMAT_VERSION) + tail
    assert_decodes_or_refuses(reseal(data) if seal else data)


# --- error feedback ---------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["sign1", "topk", "int4"])
def test_error_feedback_keeps_accumulated_error_from_growing(encoding):
    rng = np.random.default_rng(4)
    drift = rng.standard_normal((8, 64)).astype(np.float32)
    rounds = [drift + 0.5 * rng.standard_normal((8, 64)).astype(np.float32) for _ in range(20)]

    def accumulated_error(feedback: ErrorFeedback | None) -> float:
        sent = np.zeros_like(drift)
        for delta in rounds:
            update = feedback.compensate({"w": delta}) if feedback else {"w": delta}
            decoded = decode(encode(HEADER, update, encoding, rng=rng, topk_fraction=0.1)).tensors
            if feedback:
                feedback.record(update, decoded)
            sent += decoded["w"]
        return float(np.linalg.norm(sent - sum(rounds)))

    assert accumulated_error(ErrorFeedback()) < 0.5 * accumulated_error(None)


def test_error_feedback_state_round_trips_and_is_validated():
    feedback = ErrorFeedback()
    delta = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    compensated = feedback.compensate(delta)
    feedback.record(compensated, decode(encode(HEADER, compensated, "sign1")).tensors)
    state = feedback.state_dict()

    restored = ErrorFeedback()
    restored.load_state_dict(state)
    state["w"][:] = 0  # state_dict hands out copies

    np.testing.assert_array_equal(restored.compensate(delta)["w"], feedback.compensate(delta)["w"])
    assert not np.array_equal(feedback.compensate(delta)["w"], delta["w"])
    with pytest.raises(CodecError, match="fresh ErrorFeedback"):
        feedback.compensate({"w": np.zeros(12, np.float32)})
    with pytest.raises(CodecError, match="lacks 'w'"):
        feedback.record(compensated, {})
    with pytest.raises(CodecError, match="lacks 'w'"):
        feedback.record(compensated, {"w": np.zeros((3, 1), np.float32)})


# --- layered encodings ------------------------------------------------------------------

BITS = {"sign1": 1, "int4": 4, "int8": 8, "fp16": 16, "fp32": 32}


@FAST
@given(
    stds=st.lists(st.floats(0, 10), min_size=1, max_size=8),
    sizes=st.lists(st.integers(0, 300), min_size=8, max_size=8),
    avg_bits=st.floats(1, 40),
)
def test_layered_encodings_respect_the_budget(stds, sizes, avg_bits):
    rng = np.random.default_rng(0)
    tensors = {
        f"t{i}": (std * rng.standard_normal(size)).astype(np.float32)
        for i, (std, size) in enumerate(zip(stds, sizes, strict=False))
    }

    chosen = layered_encodings(tensors, avg_bits)

    assert list(chosen) == list(tensors)
    total = sum(t.size for t in tensors.values())
    assert sum(BITS[chosen[name]] * t.size for name, t in tensors.items()) <= avg_bits * total + 1e-9
    decode(encode(HEADER, tensors, chosen))  # every choice is a valid encoding


def test_layered_encodings_put_bits_where_variance_is():
    rng = np.random.default_rng(0)
    tensors = {
        "quiet": 0.01 * rng.standard_normal(1000),
        "loud": rng.standard_normal(1000),
        "mid": 0.1 * rng.standard_normal(1000),
    }

    chosen = layered_encodings(tensors, 5)

    assert BITS[chosen["loud"]] > BITS[chosen["mid"]] > BITS[chosen["quiet"]]
    assert layered_encodings(tensors, 32) == dict.fromkeys(tensors, "fp32")
    assert layered_encodings(tensors, 1) == dict.fromkeys(tensors, "sign1")
    for bad in (0.5, math.nan, math.inf, "4"):
        with pytest.raises(CodecError, match="avg_bits"):
            layered_encodings(tensors, bad)


def test_max_elements_is_enforced_on_encode():
    with pytest.raises(CodecError, match="more than"):
        encode(HEADER, {"a": np.broadcast_to(np.float32(0), (MAX_ELEMENTS + 1,))}, "sign1")
