"""The update container: what a phone pushes and what the aggregator decodes (one definition
of the wire format, shared by both ends). numpy and the standard library only.

Layout, format version 1. Every integer is unsigned little-endian; floats are IEEE
little-endian; no pickle anywhere.

    size     field
    4        magic b"FKUP"
    2  u16   format version (1)
    4  u32   header length H (at most 64 KiB)
    H        header: UTF-8 JSON object, keys sorted, no spaces, exactly these keys:
             {"base_version": int, "device_id": str, "kind": str, "num_samples": int, "round": int}
    4  u32   tensor count T
    T tensor records, in the order the tensors were given:
      2  u16   name length L (1 or more)
      L        name, UTF-8
      1  u8    encoding: its index in ENCODINGS (0 fp32, 1 fp16, 2 int8, 3 int4, 4 sign1, 5 topk)
      1  u8    number of dimensions D (0..8)
      4D u32   shape
      4  u32   payload length P
      P        payload, below
    4  u32   CRC-32 (zlib.crc32) of every byte before it

Payloads, for a tensor of n elements. Its channels are the slices along the first axis when
D >= 2; a scalar or a 1-D tensor is one channel. Each channel has its own scale s:
    fp32   n f32
    fp16   n f16
    int8   C scales, then n i8 q in [-127, 127];                 value = q * s
    int4   C scales, then ceil(n/2) bytes: element 2i in the low nibble, 2i+1 in the high one,
           nibble = q + 8 with q in [-7, 7];                     value = q * s
    sign1  C scales (s = mean |x| of the channel), then ceil(n/8) bytes of np.packbits order
           (first element in the most significant bit);          value = +s for 1, -s for 0
    topk   k u32 flat indices, strictly increasing, then k f16 values (k = P / 6); the other
           elements are 0. k = ceil(topk_fraction * n), the k largest |x|.
A scale is a u16 bfloat16: the high half of a float32's bits, rounded up (so |x| / s never
passes qmax). Half the bytes of f32 scales, which matters for depthwise convs (9 elements per
channel): with f32 scales whole-MobileNetV2 int8 updates were only 3.87x smaller than fp32.

int8/int4 use s = max |x| / qmax (127 or 7; never below 2**-100, so 1/s stays finite), rounded
up to bfloat16, and stochastic rounding, q = floor(x / s + u) with u uniform in [0, 1): the
decoded value is an unbiased estimate of x (to within 2**-9 of a step: u = (b + 0.5) / 256 for
8 random bits b drawn from the caller's generator) and is less than one step s away from it.
How u is drawn is the encoder's business: the format does not depend on it.

``encoded_size`` gives the exact length of ``encode``'s output: everything but the header's
JSON bytes, or all of it when the header is passed too.

Typical use on the phone, with error feedback so what one round's encoding drops is sent in
the next::

    compensated = feedback.compensate(delta)
    data = encode(header, compensated, "int8")
    feedback.record(compensated, decode(data).tensors)
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import numbers
import struct
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from device_runtime.errors import CodecError

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "KINDS",
    "MAGIC",
    "MAX_ELEMENTS",
    "ErrorFeedback",
    "Update",
    "UpdateHeader",
    "decode",
    "encode",
    "encoded_size",
    "layered_encodings",
]

MAGIC = b"FKUP"
FORMAT_VERSION = 1
ENCODINGS = ("fp32", "fp16", "int8", "int4", "sign1", "topk")
KINDS = ("delta", "weights", "activation", "gradient")
# The decoder allocates at most this many float32 elements per update (256 MiB), whatever a
# payload claims; MobileNetV2 whole is 3.5 M. Passing ``expected`` bounds it exactly.
MAX_ELEMENTS = 1 << 26

_MAX_HEADER = 64 * 1024
_MAX_NDIM = 8
_U32_MAX = 2**32 - 1
_FP16_MAX = 65504.0
_MIN_SCALE = np.float32(2.0**-100)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_QMAX = {"int8": 127, "int4": 7}
_BATCH = 1 << 18  # elements: see _batches
_ALIGN = {"int8": 1, "int4": 2, "sign1": 8}  # elements per payload byte of the scaled encodings
# Largest |q| a decoder can meet per scaled encoding (int8 bytes reach -128, int4 nibbles -8):
# scale * bound must stay finite, so no decoded value overflows to inf.
_Q_BOUND = {"int8": 128, "int4": 8, "sign1": 1}
_BITS = {"sign1": 1, "int4": 4, "int8": 8, "fp16": 16, "fp32": 32}  # nominal bits per element
_LADDER = ("sign1", "int4", "int8", "fp16", "fp32")
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_COUNT = struct.Struct("<I")
_CRC = struct.Struct("<I")
_FIXED_SIZE = _PREFIX.size + _COUNT.size + _CRC.size
_RECORD_FIXED = 2 + 1 + 1 + 4  # name length, encoding, ndim, payload length
_HEADER_KEYS = ("base_version", "device_id", "kind", "num_samples", "round")


@dataclass(frozen=True)
class UpdateHeader:
    """Who sent an update, for which round and model version, from how many samples."""

    device_id: str
    round: int
    base_version: int
    num_samples: int
    kind: str = "delta"  # one of KINDS

    def __post_init__(self):
        if not isinstance(self.device_id, str) or not self.device_id:
            raise CodecError(f"update header device_id must be a non-empty string, got {self.device_id!r}")
        for name in ("round", "base_version", "num_samples"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise CodecError(f"update header {name} must be a non-negative integer, got {value!r}")
        if self.kind not in KINDS:
            raise CodecError(f"update header kind {self.kind!r} is unknown: use one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Update:
    """A decoded update: float32 tensors by name (in the sender's order) and the encoding each
    one travelled in. Tensors decoded together may be views of one buffer (never overlapping)."""

    header: UpdateHeader
    tensors: dict[str, np.ndarray]
    encodings: dict[str, str] = field(default_factory=dict)


def encode(
    header: UpdateHeader,
    tensors: Mapping[str, np.ndarray],
    encoding: str | Mapping[str, str] = "int8",
    *,
    rng: np.random.Generator | None = None,
    topk_fraction: float = 0.01,
) -> bytes:
    """The container for ``tensors`` in ``encoding`` (one for all, or one per tensor name).
    ``rng`` drives stochastic rounding (int8, int4). Raises CodecError for non-finite values,
    values an encoding cannot hold, or arguments that do not fit the format."""
    if not isinstance(header, UpdateHeader):
        raise CodecError(f"encode needs an UpdateHeader, got {type(header).__name__}")
    encodings = _encodings_for(tensors.keys(), encoding)
    _check_fraction(topk_fraction)
    rng = np.random.default_rng() if rng is None else rng
    header_json = _header_json(header)
    parts: list = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_json)), header_json, _COUNT.pack(len(tensors))]
    arrays, total = {}, 0
    for name, value in tensors.items():
        total += np.size(value)
        if total > MAX_ELEMENTS:
            raise CodecError(f"update has more than {MAX_ELEMENTS} elements, more than a decoder accepts: split it")
        x = _as_float32(name, value)
        if x.ndim > _MAX_NDIM or any(d > _U32_MAX for d in x.shape):
            raise CodecError(f"tensor {name!r} has shape {x.shape}: the format holds at most {_MAX_NDIM} dimensions of < 2**32")
        _name_bytes(name)  # refuse a bad name before any encoding work
        arrays[name] = x
    payloads = _encode_payloads(arrays, encodings, rng, topk_fraction)
    for name, x in arrays.items():
        payload = payloads[name]
        payload_size = sum(p.nbytes for p in payload)
        if payload_size > _U32_MAX:
            raise CodecError(f"tensor {name!r} encodes to {payload_size} bytes, over the format's 4 GiB per tensor")
        parts.append(_record_head(_name_bytes(name), encodings[name], x.shape, payload_size))
        parts.extend(p.reshape(-1).view(np.uint8) for p in payload)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_CRC.pack(crc))
    return b"".join(parts)


def decode(
    data: bytes | bytearray | memoryview,
    *,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int | None = None,
) -> Update:
    """The update in ``data``, or CodecError saying why it cannot be used. ``expected`` (name
    -> shape) requires exactly those tensors; pass it, and ``max_bytes``, on anything that
    comes from a network. Nothing is allocated from a declared size before it is checked
    against the data's length."""
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise CodecError(f"an update must be bytes, got {type(data).__name__}") from exc
    size = len(view)
    if max_bytes is not None and size > max_bytes:
        raise CodecError(f"update is {size} bytes, over the limit of {max_bytes}: send a smaller encoding")
    if size < _FIXED_SIZE:
        raise CodecError(f"update is {size} bytes, too short to be one (at least {_FIXED_SIZE}): it was cut short, send it again")
    magic, version, header_size = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(f"data starts with {magic!r}, not {MAGIC!r}: it is not a fedkit update")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"update has format version {version}, this fedkit reads {FORMAT_VERSION}: update the older side"
        )
    if header_size > _MAX_HEADER:
        raise CodecError(f"update declares a {header_size}-byte header, over the {_MAX_HEADER} limit: refusing it")
    reader = _Reader(view, _PREFIX.size, size - _CRC.size)
    header_bytes = reader.take(header_size, "the header")
    count = reader.unpack(_COUNT, "the tensor count")[0]
    records = [_read_record(reader) for _ in range(_plausible_count(count, reader))]
    if reader.pos != reader.end:
        raise CodecError(f"update has {reader.end - reader.pos} unexpected bytes after its last tensor: refusing it")
    (stored_crc,) = _CRC.unpack_from(view, reader.end)
    if zlib.crc32(view[: reader.end]) != stored_crc:
        raise CodecError("update fails its checksum: it was corrupted in transit, send it again")
    header = _parse_header(header_bytes)
    _check_records(records, expected)
    tensors = _decode_payloads(records, view)
    return Update(header, {r.name: tensors[r.name] for r in records}, {r.name: r.encoding for r in records})


def encoded_size(
    shapes: Mapping[str, tuple[int, ...]],
    encoding: str | Mapping[str, str],
    *,
    header: UpdateHeader | None = None,
    topk_fraction: float = 0.01,
) -> int:
    """Exact length in bytes of ``encode`` for tensors of these shapes: without the header's
    JSON bytes (which depend on the device id), or exactly when ``header`` is given."""
    encodings = _encodings_for(shapes.keys(), encoding)
    _check_fraction(topk_fraction)
    size = _FIXED_SIZE + (len(_header_json(header)) if header is not None else 0)
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        size += _RECORD_FIXED + len(_name_bytes(name)) + 4 * len(shape)
        size += _payload_size(encodings[name], shape, _topk_count(math.prod(shape), topk_fraction))
    return size


def layered_encodings(tensors: Mapping[str, np.ndarray], avg_bits: float) -> dict[str, str]:
    """An encoding per tensor (sign1, int4, int8, fp16 or fp32: 1, 4, 8, 16, 32 bits per
    element) whose element-weighted mean bits stay within ``avg_bits`` (scales not counted).

    Rule: a b-bit encoding of a tensor of n elements and variance v (mean square: updates are
    centred on 0) leaves a squared error of about n * v * 4**-b. Start every tensor at 1 bit,
    then keep raising, one rung at a time, the tensor whose raise removes the most error per
    bit spent (v * (4**-b - 4**-b') / (b' - b)) among the raises the budget still allows. So
    bits go where variance is high; size counts through the budget, since a raise of a large
    tensor costs more bits.
    """
    if not isinstance(avg_bits, numbers.Real) or not 1 <= avg_bits < math.inf:
        raise CodecError(f"avg_bits must be a number of at least 1 (sign1), got {avg_bits!r}")
    sizes = {name: int(np.size(t)) for name, t in tensors.items()}
    budget = avg_bits * sum(sizes.values()) - sum(sizes.values())  # bits left after 1 bit each
    rung = dict.fromkeys(tensors, 0)
    variance = {name: float(np.mean(np.square(t, dtype=np.float64))) if sizes[name] else 0.0 for name, t in tensors.items()}
    heap = [(-_raise_gain(variance[name], 0), order, name) for order, name in enumerate(tensors) if variance[name] > 0]
    heapq.heapify(heap)
    while heap:
        _, order, name = heapq.heappop(heap)
        cost = sizes[name] * (_BITS[_LADDER[rung[name] + 1]] - _BITS[_LADDER[rung[name]]])
        if cost > budget:
            continue  # higher rungs cost even more bits
        budget -= cost
        rung[name] += 1
        if rung[name] + 1 < len(_LADDER):
            heapq.heappush(heap, (-_raise_gain(variance[name], rung[name]), order, name))
    return {name: _LADDER[r] for name, r in rung.items()}


class ErrorFeedback:
    """Error feedback for a phone: what encoding dropped from one update (the residual
    compensated - decoded) is added to the next, so compression error does not pile up over
    rounds. Its state is checkpointed with the trainer."""

    def __init__(self):
        self._residuals: dict[str, np.ndarray] = {}

    def compensate(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``tensors`` plus the residuals kept for them, as float32 (the input is never modified)."""
        out = {}
        for name, value in tensors.items():
            x = _as_float32(name, value)
            residual = self._residuals.get(name)
            if residual is not None and residual.shape != x.shape:
                raise CodecError(
                    f"error feedback holds a {residual.shape} residual for {name!r}, the update has {x.shape}: "
                    "the trainable tensors changed, start a fresh ErrorFeedback"
                )
            out[name] = x if residual is None else x + residual
        return out

    def record(self, compensated: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]) -> None:
        """Keep what encoding lost: ``compensated`` (what was encoded) minus ``decoded``."""
        for name, value in compensated.items():
            sent = _as_float32(name, value)
            got = _as_float32(name, decoded[name]) if name in decoded else None
            if got is None or got.shape != sent.shape:
                raise CodecError(f"error feedback: the decoded update lacks {name!r} as encoded; pass the decode of what was encoded")
            self._residuals[name] = sent - got

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: r.copy() for name, r in self._residuals.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._residuals = {name: _as_float32(name, r).copy() for name, r in state.items()}


# --- encoding ---------------------------------------------------------------------------


def _encodings_for(names, encoding: str | Mapping[str, str]) -> dict[str, str]:
    names = list(names)
    if isinstance(encoding, str):
        chosen = dict.fromkeys(names, encoding)
    elif isinstance(encoding, Mapping):
        missing = [n for n in names if n not in encoding]
        extra = sorted(set(encoding) - set(names))
        if missing or extra:
            raise CodecError(f"per-tensor encodings must name exactly the tensors: missing {missing}, extra {extra}")
        chosen = {n: encoding[n] for n in names}
    else:
        raise CodecError(f"encoding must be a name or a mapping of tensor name to name, got {type(encoding).__name__}")
    for name, enc in chosen.items():
        if enc not in ENCODINGS:
            raise CodecError(f"encoding {enc!r} (tensor {name!r}) is unknown: use one of {', '.join(ENCODINGS)}")
    return chosen


def _check_fraction(fraction: float) -> None:
    if not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise CodecError(f"topk_fraction must be in (0, 1], got {fraction!r}")


def _as_float32(name: str, value) -> np.ndarray:
    x = np.asarray(value)
    if x.dtype.kind not in "fiu":
        raise CodecError(f"tensor {name!r} has dtype {x.dtype}, not a real number type")
    return np.asarray(x, dtype=np.float32, order="C")  # ascontiguousarray would make scalars 1-D


def _name_bytes(name: str) -> bytes:
    raw = name.encode("utf-8") if isinstance(name, str) else b""
    if not 0 < len(raw) <= 0xFFFF:
        raise CodecError(f"tensor name {name!r} must be a non-empty string of at most 65535 UTF-8 bytes")
    return raw


def _header_json(header: UpdateHeader) -> bytes:
    return json.dumps(asdict(header), sort_keys=True, separators=(",", ":")).encode("ascii")


def _record_head(name: bytes, encoding: str, shape: tuple[int, ...], payload_size: int) -> bytes:
    return struct.pack(
        f"<H{len(name)}sBB{len(shape)}II", len(name), name, ENCODINGS.index(encoding), len(shape), *shape, payload_size
    )


def _channels(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def _topk_count(n: int, fraction: float) -> int:
    return min(n, math.ceil(fraction * n))


def _payload_size(encoding: str, shape: tuple[int, ...], k: int) -> int:
    n = math.prod(shape)
    scales = 2 * _channels(shape)
    return {
        "fp32": 4 * n,
        "fp16": 2 * n,
        "int8": scales + n,
        "int4": scales + (n + 1) // 2,
        "sign1": scales + (n + 7) // 8,
        "topk": 6 * k,
    }[encoding]


def _encode_payloads(
    arrays: dict[str, np.ndarray], encodings: dict[str, str], rng: np.random.Generator, fraction: float
) -> dict[str, list[np.ndarray]]:
    payloads = {}
    for encoding in ENCODINGS:
        group = {name: x for name, x in arrays.items() if encodings[name] == encoding}
        if encoding in _ALIGN:
            names = list(group)
            for run in _batches([group[name].size for name in names]):
                payloads |= _encode_scaled({name: group[name] for name in names[run]}, encoding, rng)
        else:
            payloads |= {name: _encode_unscaled(name, x, encoding, fraction) for name, x in group.items()}
    return payloads


def _encode_unscaled(name: str, x: np.ndarray, encoding: str, fraction: float) -> list[np.ndarray]:
    if x.size:
        lo, hi = x.min(), x.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise _non_finite(name)
        if encoding in ("fp16", "topk") and max(-lo, hi) > _FP16_MAX:
            raise CodecError(f"tensor {name!r} has values beyond fp16's ±{_FP16_MAX:g}: encode it as fp32 or int8")
    if encoding == "fp32":
        return [x.astype("<f4", copy=False)]
    if encoding == "fp16":
        return [x.astype("<f2")]
    return _topk(x.reshape(-1), _topk_count(x.size, fraction))


def _non_finite(name: str) -> CodecError:
    return CodecError(f"tensor {name!r} holds NaN or Inf: the update is broken, do not send it (lower the learning rate?)")


def _batches(sizes: list[int]) -> list[slice]:
    """Runs of consecutive tensors of about _BATCH elements (a bigger tensor is a run of its
    own): big enough that numpy's per-call cost stays small, small enough that temporaries
    are reused by malloc. Measured on whole MobileNetV2: runs of 2**16..2**19 elements are
    equally fast; 2**20 (4 MB temporaries, fresh pages from the kernel every call) or one run
    for all tensors take twice as long."""
    runs, start, elements = [], 0, 0
    for i, n in enumerate(sizes):
        elements += n
        if elements >= _BATCH or i == len(sizes) - 1:
            runs.append(slice(start, i + 1))
            start, elements = i + 1, 0
    return runs


def _encode_scaled(arrays: dict[str, np.ndarray], encoding: str, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """int8, int4 or sign1 payloads of all ``arrays`` at once: a few numpy calls over one
    buffer, where ~20 calls per tensor cost more than the arithmetic for MobileNetV2's 158."""
    names = list(arrays)
    layout = _Layout.of([x.shape for x in arrays.values()], _ALIGN[encoding])
    pieces = []
    for x, pad in zip(arrays.values(), layout.pads):
        pieces += [x.reshape(-1), np.zeros(pad, np.float32)]
    flat = np.concatenate(pieces)
    magnitude = np.abs(flat)
    segments = layout.segments()
    nonempty = segments > 0
    per_channel = np.zeros(segments.size, np.float32)
    reduce = np.add if encoding == "sign1" else np.maximum  # padding zeros change neither
    with np.errstate(over="ignore"):  # a huge sum becomes inf, refused below
        if nonempty.any():
            per_channel[nonempty] = reduce.reduceat(magnitude, (np.cumsum(segments) - segments)[nonempty])
        if encoding == "sign1":
            stored = _scales_to_bf16(per_channel / np.maximum(layout.counts, 1).astype(np.float32))
        else:
            stored = _scales_to_bf16(np.maximum(per_channel / np.float32(_QMAX[encoding]), _MIN_SCALE))
    scales = _bf16_to_scales(stored)
    bad = _bad_tensor(layout, scales, encoding)
    if bad is not None:
        # NaN and Inf reach the scales (max and sum propagate them), as do finite values too large
        if not np.isfinite(arrays[names[bad]]).all():
            raise _non_finite(names[bad])
        raise _bad_scales(names[bad], encoding)
    if encoding == "sign1":
        positive = flat >= 0
        positive[layout.padding()] = False  # np.packbits pads a tensor's last byte with 0 bits
        body = np.packbits(positive)
    else:
        q = _stochastic_round(flat, scales, segments, rng, out=magnitude)
        if encoding == "int8":
            body = q.view(np.uint8)
        else:
            nibbles = (q + 8).view(np.uint8)  # a padding element is q = 0, nibble 8
            body = nibbles[0::2] | (nibbles[1::2] << 4)
    align = _ALIGN[encoding]
    return {
        name: [stored[c : c + count], body[offset // align : (offset + size + pad) // align]]
        for name, c, count, offset, size, pad in zip(
            names, layout.first_channels, layout.channels, layout.offsets, layout.sizes, layout.pads
        )
    }


def _stochastic_round(
    flat: np.ndarray, scales: np.ndarray, segments: np.ndarray, rng: np.random.Generator, *, out: np.ndarray
) -> np.ndarray:
    """floor(x / s + u) as int8, u = (b + 0.5) / 256 for 8 random bits b: u is uniform on a
    grid of 256 midpoints, so the rounding is unbiased to within 2**-9 of a step (16 bits
    would take it to 2**-17 for twice the random bytes, already among the costliest steps)."""
    y = np.multiply(flat, np.repeat(np.float32(256) / scales, segments), out=out)  # 256 x / s, to 2**-16 of a step
    y += rng.bit_generator.random_raw(-(-y.size // 8)).view(np.uint8)[: y.size]  # b, 8 bytes per raw draw
    y += np.float32(0.5)
    y *= np.float32(1 / 256)
    # No clip: |x / s| <= qmax (1 + 2**-22) and 2**-9 <= u <= 1 - 2**-9 keep floor within ±qmax.
    return np.floor(y, out=y).astype(np.int8)


@dataclass(frozen=True)
class _Layout:
    """Where the tensors of one scaled encoding sit in one flat buffer. Each tensor starts at a
    multiple of ``align`` elements (2 for int4, 8 for sign1) so its payload starts on a whole
    byte; the gap after it is padding, counted in its last channel."""

    sizes: list[int]
    pads: list[int]
    offsets: list[int]
    channels: list[int]
    first_channels: list[int]
    counts: np.ndarray  # per channel: its elements, padding not counted

    @classmethod
    def of(cls, shapes: list[tuple[int, ...]], align: int) -> _Layout:
        sizes = [math.prod(shape) for shape in shapes]
        pads = [-n % align for n in sizes]
        channels = [_channels(shape) for shape in shapes]
        offsets = list(itertools.accumulate((n + p for n, p in zip(sizes, pads)), initial=0))[:-1]
        first_channels = list(itertools.accumulate(channels, initial=0))[:-1]
        counts = np.repeat(np.array([n // c if c else 0 for n, c in zip(sizes, channels)], np.int64), channels)
        return cls(sizes, pads, offsets, channels, first_channels, counts)

    def segments(self) -> np.ndarray:
        """Elements per channel in the buffer, padding included (so they sum to its length)."""
        segments = self.counts.copy()
        for first, c, pad in zip(self.first_channels, self.channels, self.pads):
            if pad:  # a padded tensor has elements, so channels
                segments[first + c - 1] += pad
        return segments

    def padding(self) -> list[int]:
        return [i for offset, n, pad in zip(self.offsets, self.sizes, self.pads) for i in range(offset + n, offset + n + pad)]


def _bad_tensor(layout: _Layout, scales: np.ndarray, encoding: str) -> int | None:
    """The index of the first tensor with a negative, NaN or too large scale (one that would
    decode to Inf), or None."""
    bad = ~((scales >= 0) & (scales <= _FLOAT32_MAX / _Q_BOUND[encoding]))  # NaN fails both
    if not bad.any():
        return None
    return int(np.searchsorted(layout.first_channels, np.argmax(bad), side="right")) - 1


def _bad_scales(name: str, encoding: str) -> CodecError:
    return CodecError(f"tensor {name!r} has {encoding} scales that are negative, NaN, Inf or too large to decode")


def _scales_to_bf16(scales: np.ndarray) -> np.ndarray:
    # Scales are >= 0 (or inf/NaN, refused later), so adding 0xFFFF rounds the magnitude up
    # and cannot wrap around.
    return ((scales.astype(np.float32).view(np.uint32) + 0xFFFF) >> 16).astype("<u2")


def _bf16_to_scales(stored: np.ndarray) -> np.ndarray:
    return (stored.astype(np.uint32) << 16).view(np.float32)


def _topk(flat: np.ndarray, k: int) -> list[np.ndarray]:
    if k == flat.size:
        index = np.arange(k, dtype="<u4")
    else:
        index = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :].astype("<u4")
        index.sort()
    return [index, flat[index].astype("<f2")]


def _raise_gain(variance: float, rung: int) -> float:
    low, high = _BITS[_LADDER[rung]], _BITS[_LADDER[rung + 1]]
    return variance * (4.0**-low - 4.0**-high) / (high - low)


# --- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    name: str
    encoding: str
    shape: tuple[int, ...]
    offset: int  # of the payload in the data
    size: int


class _Reader:
    """Reads fields between ``pos`` and ``end``, refusing any that would run past ``end``."""

    def __init__(self, view: memoryview, pos: int, end: int):
        self.view, self.pos, self.end = view, pos, end

    def take(self, size: int, what: str) -> memoryview:
        if size > self.end - self.pos:
            raise CodecError(
                f"update is truncated: it ends inside {what} ({size} bytes needed, "
                f"{max(self.end - self.pos, 0)} left): it was cut short, send it again"
            )
        self.pos += size
        return self.view[self.pos - size : self.pos]

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))


def _plausible_count(count: int, reader: _Reader) -> int:
    # Every record takes at least _RECORD_FIXED + 1 bytes: a larger count is a lie or a cut.
    if count * (_RECORD_FIXED + 1) > reader.end - reader.pos:
        raise CodecError(
            f"update declares {count} tensors but has only {reader.end - reader.pos} bytes for them: "
            "it is truncated or corrupt, send it again"
        )
    return count


_U16 = struct.Struct("<H")
_ENC_NDIM = struct.Struct("<BB")


def _read_record(reader: _Reader) -> _Record:
    (name_size,) = reader.unpack(_U16, "a tensor name length")
    try:
        name = bytes(reader.take(name_size, "a tensor name")).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError("update has a tensor name that is not UTF-8: it is corrupt, send it again") from exc
    if not name:
        raise CodecError("update has a tensor with an empty name: it is corrupt")
    code, ndim = reader.unpack(_ENC_NDIM, f"tensor {name[:80]!r}")
    if code >= len(ENCODINGS):
        raise CodecError(f"tensor {name[:80]!r} has encoding code {code}, unknown to this fedkit: update it")
    if ndim > _MAX_NDIM:
        raise CodecError(f"tensor {name[:80]!r} declares {ndim} dimensions, over the format's {_MAX_NDIM}")
    shape = reader.unpack(struct.Struct(f"<{ndim}I"), f"the shape of {name[:80]!r}")
    (size,) = reader.unpack(_COUNT, f"the payload length of {name[:80]!r}")
    encoding = ENCODINGS[code]
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise CodecError(f"tensor {name[:80]!r} declares shape {shape}, over {MAX_ELEMENTS} elements: refusing it")
    if encoding == "topk":
        ok = size % 6 == 0 and size // 6 <= n
    else:
        ok = size == _payload_size(encoding, shape, 0)
    if not ok:
        raise CodecError(
            f"tensor {name[:80]!r} ({encoding}, shape {shape}) declares a {size}-byte payload that does not fit "
            "its shape: the update is corrupt"
        )
    offset = reader.pos
    reader.take(size, f"the payload of {name[:80]!r}")
    return _Record(name, encoding, shape, offset, size)


def _parse_header(raw: memoryview) -> UpdateHeader:
    try:
        d = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CodecError(f"update header is not valid JSON ({exc}): the update is corrupt") from exc
    if not isinstance(d, dict) or sorted(d) != list(_HEADER_KEYS):
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise CodecError(f"update header must hold exactly {', '.join(_HEADER_KEYS)}; it has {keys}")
    return UpdateHeader(**d)


def _check_records(records: list[_Record], expected: Mapping[str, tuple[int, ...]] | None) -> None:
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise CodecError("update names a tensor twice: it is corrupt or was built wrong")
    if sum(math.prod(r.shape) for r in records) > MAX_ELEMENTS:
        raise CodecError(f"update declares over {MAX_ELEMENTS} elements in all: refusing it")
    if expected is None:
        return
    want = {name: tuple(int(d) for d in shape) for name, shape in expected.items()}
    missing = sorted(set(want) - set(names))
    extra = sorted(set(names) - set(want))
    if missing or extra:
        raise CodecError(
            f"update does not carry the expected tensors: missing {missing[:10]}, unexpected {[n[:80] for n in extra[:10]]}; "
            "the device trains a different plan than this round expects"
        )
    for r in records:
        if r.shape != want[r.name]:
            raise CodecError(f"tensor {r.name!r} has shape {r.shape}, expected {want[r.name]}: the device trains a different model")


def _decode_payloads(records: list[_Record], view: memoryview) -> dict[str, np.ndarray]:
    tensors = {}
    for encoding in ENCODINGS:
        group = [r for r in records if r.encoding == encoding]
        if encoding in _ALIGN:
            for run in _batches([math.prod(r.shape) for r in group]):
                tensors |= _decode_scaled(group[run], view)
        else:
            tensors |= {r.name: _decode_unscaled(r, view) for r in group}
    return tensors


def _decode_unscaled(record: _Record, view: memoryview) -> np.ndarray:
    n = math.prod(record.shape)
    payload = view[record.offset : record.offset + record.size]
    if record.encoding in ("fp32", "fp16"):
        values = _aligned(payload, "<f4" if record.encoding == "fp32" else "<f2").astype(np.float32, copy=False)
        return _finite(record, values).reshape(record.shape)
    k = record.size // 6
    index = np.frombuffer(payload, dtype="<u4", count=k)
    if k and (index[-1] >= n or (k > 1 and not (index[1:] > index[:-1]).all())):
        raise CodecError(f"tensor {record.name!r} has top-k indices out of order or out of range: the update is corrupt")
    out = np.zeros(n, dtype=np.float32)
    out[index] = _finite(record, _aligned(payload[4 * k :], "<f2").astype(np.float32))
    return out.reshape(record.shape)


def _decode_scaled(records: list[_Record], view: memoryview) -> dict[str, np.ndarray]:
    """int8, int4 or sign1 tensors, all at once in one buffer laid out as ``_encode_scaled``
    built it. The tensors returned are views of that one buffer."""
    encoding = records[0].encoding
    layout = _Layout.of([r.shape for r in records], _ALIGN[encoding])
    scales, bodies = [], []
    for r, c in zip(records, layout.channels):
        scales.append(np.frombuffer(view, dtype="<u2", count=c, offset=r.offset))
        bodies.append(np.frombuffer(view, dtype=np.uint8, count=r.size - 2 * c, offset=r.offset + 2 * c))
    scales = _bf16_to_scales(np.concatenate(scales))
    bad = _bad_tensor(layout, scales, encoding)
    if bad is not None:
        raise _bad_scales(records[bad].name, encoding)
    body = np.concatenate(bodies)
    if encoding == "int8":
        q = body.view(np.int8)
    elif encoding == "int4":
        q = np.empty(2 * body.size, dtype=np.int8)
        np.bitwise_and(body, 15, out=q[0::2], casting="unsafe")
        np.right_shift(body, 4, out=q[1::2], casting="unsafe")
        q -= 8
    else:
        q = np.unpackbits(body).view(np.int8)
        q *= 2
        q -= 1
    values = q.astype(np.float32)
    values *= np.repeat(scales, layout.segments())
    return {
        r.name: values[offset : offset + size].reshape(r.shape)
        for r, offset, size in zip(records, layout.offsets, layout.sizes)
    }


def _aligned(payload: memoryview, dtype: str) -> np.ndarray:
    # Payloads sit at any byte offset; numpy casts from unaligned memory ~10x slower than it
    # copies bytes, so copy the bytes to a fresh (aligned) array first.
    return np.frombuffer(payload, dtype=np.uint8).copy().view(dtype)


def _finite(record: _Record, values: np.ndarray) -> np.ndarray:
    if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
        raise CodecError(f"tensor {record.name!r} decodes to NaN or Inf: the sender is broken, refusing the update")
    return values
