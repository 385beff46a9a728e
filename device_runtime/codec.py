"""The update container: what a phone pushes and what the aggregator decodes (one definition
of the wire format, shared by both ends). numpy and the standard library only.

Layout, format version 2 (version 1 had no fp16 or top-k scale). Every integer is unsigned
little-endian; floats are IEEE little-endian; no pickle anywhere.

    size     field
    4        magic b"FKUP"
    2  u16   format version (2)
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
D >= 2; a scalar or a 1-D tensor is one channel. int8, int4 and sign1 have a scale s per
channel; fp16 and topk one per tensor:
    fp32   n f32
    fp16   1 scale, then n f16 h;                                value = h * s
    int8   C scales, then n i8 q in [-127, 127];                 value = q * s
    int4   C scales, then ceil(n/2) bytes: element 2i in the low nibble, 2i+1 in the high one,
           nibble = q + 8 with q in [-7, 7];                     value = q * s
    sign1  C scales (s = mean |x| of the channel), then ceil(n/8) bytes of np.packbits order
           (first element in the most significant bit);          value = +s for 1, -s for 0
    topk   1 scale, then k u32 flat indices, strictly increasing, then k f16 h (k = (P - 2) / 6);
           value = h * s, the other elements are 0. k = ceil(topk_fraction * n), the k largest |x|.
A scale is a u16 bfloat16: the high half of a float32's bits, rounded up (so |x| / s never
passes qmax). Half the bytes of f32 scales, which matters for depthwise convs (9 elements per
channel): with f32 scales whole-MobileNetV2 int8 updates were only 3.87x smaller than fp32.
The fp16 and topk scale is a power of two 2**e, e in [-126, 14], the one that puts max |x| / s
in (2**14, 2**15]: an update's small values stay normal halves (unscaled, a delta of 1e-5 is
a subnormal half, with fewer significant bits and 100x slower to convert), |x| up to
65504 * 2**14 fits, and h is exactly numpy's x / s rounded to float16.

int8/int4 use s = max |x| / qmax (127 or 7; never below 2**-100, so 1/s stays finite), rounded
up to bfloat16, and stochastic rounding, q = floor(x / s + u) with u uniform in [0, 1): the
decoded value is an unbiased estimate of x (to within 2**-8 of a step: u = (b + 0.5) / 128 for
7 random bits b drawn from the caller's generator) and is less than one step s away from it.
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
import threading
import zlib
from collections.abc import Mapping
from contextlib import contextmanager
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
FORMAT_VERSION = 2
ENCODINGS = ("fp32", "fp16", "int8", "int4", "sign1", "topk")
KINDS = ("delta", "weights", "activation", "gradient")
# The decoder allocates at most this many float32 elements per update (256 MiB), whatever a
# payload claims; MobileNetV2 whole is 3.5 M. Passing ``expected`` bounds it exactly.
MAX_ELEMENTS = 1 << 26

_MAX_HEADER = 64 * 1024
_MAX_NDIM = 8
_U32_MAX = 2**32 - 1
_FP16_MAX = 65504.0
_FP16_LIMIT = _FP16_MAX * 2.0**14  # the largest |x| scaled fp16 holds: fp16's max at the largest scale
_HALF_REBIAS = np.float32(2.0**-112)  # float32 exponent bias 127 less float16's 15
_SPLIT = np.float32(2**13 + 1)  # Veltkamp's constant for 24 - 13 = 11 significant bits
_TOPK_SAMPLED = 1 << 14  # elements: top-k of a tensor this large by a threshold from a sample
_TOPK_STRIDE = 64  # the sample: every 64th |x|
_MIN_SCALE = np.float32(2.0**-100)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_QMAX = {"int8": 127, "int4": 7}
_BATCH = 1 << 18  # elements: see _batches
_ALIGN = {"int8": 1, "int4": 2, "sign1": 8}  # elements per payload byte of the scaled encodings
# Largest |q| a decoder can meet per scaled encoding (int8 bytes reach -128, int4 nibbles -8):
# scale * bound must stay finite, so no decoded value overflows to inf.
_Q_BOUND = {"int8": 128, "int4": 8, "sign1": 1, "fp16": _FP16_MAX}
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


def _scale_count(encoding: str, shape: tuple[int, ...]) -> int:
    """How many scales a tensor's payload starts with."""
    if encoding == "fp32":
        return 0
    return 1 if encoding in ("fp16", "topk") else _channels(shape)


def _topk_count(n: int, fraction: float) -> int:
    return min(n, math.ceil(fraction * n))


def _payload_size(encoding: str, shape: tuple[int, ...], k: int) -> int:
    n = math.prod(shape)
    body = {"fp32": 4 * n, "fp16": 2 * n, "int8": n, "int4": (n + 1) // 2, "sign1": (n + 7) // 8, "topk": 6 * k}[encoding]
    return 2 * _scale_count(encoding, shape) + body


class _Scratch:
    """Work buffers for temporaries, reused from run to run and from call to call: fresh
    memory costs more in page faults than the arithmetic on it (measured on whole
    MobileNetV2: np.abs of every run into fresh buffers 1.6 ms, into reused ones 0.25 ms).
    Nothing returned ever points into them."""

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}

    def __call__(self, key: str, dtype, size: int) -> np.ndarray:
        nbytes = size * np.dtype(dtype).itemsize
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < nbytes:
            buffer = self._buffers[key] = np.empty(max(nbytes, 64), np.uint8)
        return buffer[:nbytes].view(dtype)


_SHARED = _Scratch()  # a few MB, kept: the largest run's temporaries
_SHARED_LOCK = threading.Lock()


@contextmanager
def _scratch():
    """The shared work buffers, or fresh ones while another thread holds them."""
    if not _SHARED_LOCK.acquire(blocking=False):
        yield _Scratch()
        return
    try:
        yield _SHARED
    finally:
        _SHARED_LOCK.release()


def _encode_payloads(
    arrays: dict[str, np.ndarray], encodings: dict[str, str], rng: np.random.Generator, fraction: float
) -> dict[str, list[np.ndarray]]:
    payloads = {}
    with _scratch() as scratch:
        for encoding in ENCODINGS:
            group = {name: x for name, x in arrays.items() if encodings[name] == encoding}
            if encoding == "topk":
                payloads |= _encode_topk(group, fraction, scratch) if group else {}
                continue
            names = list(group)
            for run in _batches([group[name].size for name in names]):
                payloads |= _encode_run({name: group[name] for name in names[run]}, encoding, rng, scratch)
    return payloads


def _non_finite(name: str) -> CodecError:
    return CodecError(f"tensor {name!r} holds NaN or Inf: the update is broken, do not send it (lower the learning rate?)")


def _beyond_fp16(name: str) -> CodecError:
    return CodecError(f"tensor {name!r} has values beyond ±{_FP16_LIMIT:g}, more than scaled fp16 holds: encode it as fp32 or int8")


def _batches(sizes: list[int]) -> list[slice]:
    """Runs of consecutive tensors of about _BATCH elements (a bigger tensor is a run of its
    own): big enough that numpy's per-call cost stays small across MobileNetV2's 158 tensors,
    small enough that a run's work buffers stay in the last-level cache."""
    runs, start, elements = [], 0, 0
    for i, n in enumerate(sizes):
        elements += n
        if elements >= _BATCH or i == len(sizes) - 1:
            runs.append(slice(start, i + 1))
            start, elements = i + 1, 0
    return runs


def _encode_run(
    arrays: dict[str, np.ndarray], encoding: str, rng: np.random.Generator, scratch: _Scratch
) -> dict[str, list[np.ndarray]]:
    """The payloads of a run of tensors of one encoding, all at once: a few numpy calls over one
    buffer, where ~20 calls per tensor cost more than the arithmetic for MobileNetV2's 158."""
    names = list(arrays)
    layout = _Layout.of([x.shape for x in arrays.values()], encoding)
    flat = _flat(list(arrays.values()), layout, scratch)
    if encoding == "fp32":
        if flat.size and not (np.isfinite(flat.min()) and np.isfinite(flat.max())):
            raise _non_finite(names[_first_non_finite(arrays.values())])
        return {name: [x.astype("<f4", copy=False)] for name, x in arrays.items()}
    segments = layout.segments()
    magnitude = np.abs(flat, out=scratch("magnitude", np.float32, flat.size))
    stored, scales = _scales_of(magnitude, layout, segments, encoding)
    bad = _bad_tensor(layout, scales, encoding)
    if bad is not None:
        # NaN and Inf reach the scales (max and sum propagate them), as do finite values too large
        if not np.isfinite(arrays[names[bad]]).all():
            raise _non_finite(names[bad])
        raise _beyond_fp16(names[bad]) if encoding == "fp16" else _bad_scales(names[bad], encoding)
    work = magnitude  # not needed any more
    if encoding == "sign1":
        positive = np.greater_equal(flat, 0, out=scratch("positive", np.bool_, flat.size))
        positive[layout.padding()] = False  # np.packbits pads a tensor's last byte with 0 bits
        body = np.packbits(positive)
    elif encoding == "fp16":
        body = _halves(flat, _times(flat, _HALF_REBIAS * (1 / scales), segments, work), segments, 1 / scales, scratch)
    else:
        body = _stochastic_round(flat, scales, segments, encoding, rng, work, scratch)
    align = _ALIGN.get(encoding, 1)
    return {
        name: [stored[c : c + count], body[offset // align : (offset + size + pad) // align]]
        for name, c, count, offset, size, pad in zip(
            names, layout.first_channels, layout.channels, layout.offsets, layout.sizes, layout.pads
        )
    }


def _flat(xs: list[np.ndarray], layout: _Layout, scratch: _Scratch) -> np.ndarray:
    """The run's tensors one after the other with their padding, copied only if there are several."""
    if len(xs) == 1 and not layout.pads[0]:
        return xs[0].reshape(-1)
    pieces = []
    for x, pad in zip(xs, layout.pads):
        pieces += [x.reshape(-1), np.zeros(pad, np.float32)]
    return np.concatenate(pieces, out=scratch("flat", np.float32, layout.total))


def _first_non_finite(xs) -> int:
    return next(i for i, x in enumerate(xs) if not np.isfinite(x).all())


def _scales_of(magnitude: np.ndarray, layout: _Layout, segments: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's scale as stored (bfloat16 bits) and as float32."""
    nonempty = segments > 0
    per_channel = np.zeros(segments.size, np.float32)
    reduce = np.add if encoding == "sign1" else np.maximum  # padding zeros change neither
    with np.errstate(over="ignore", invalid="ignore"):  # a huge sum becomes inf, refused by the caller
        if nonempty.any():
            per_channel[nonempty] = reduce.reduceat(magnitude, (np.cumsum(segments) - segments)[nonempty])
        if encoding == "sign1":
            stored = _scales_to_bf16(per_channel / np.maximum(layout.counts, 1).astype(np.float32))
        elif encoding == "fp16":
            stored = _half_scales(per_channel)
        else:
            stored = _scales_to_bf16(np.maximum(per_channel / np.float32(_QMAX[encoding]), _MIN_SCALE))
    return stored, _bf16_to_scales(stored)


def _half_scales(amax: np.ndarray) -> np.ndarray:
    """The fp16 scale for a max |x| as bfloat16 bits: the power of two 2**e that puts max |x| / s
    in (2**14, 2**15], e clipped to [-126, 14]; NaN or a max past _FP16_LIMIT becomes Inf,
    refused by the caller."""
    exponent = np.clip(np.frexp(amax)[1].astype(np.int64) - 15, -126, 14)
    stored = ((exponent + 127) << 7).astype("<u2")
    stored[~(amax <= _FP16_LIMIT)] = 0x7F80
    return stored


def _times(flat: np.ndarray, factors: np.ndarray, segments: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``flat`` times each channel's factor, into ``out``: broadcast when the channels are equal
    (one tensor, no padding), spread with np.repeat otherwise."""
    if flat.size and (segments == segments[0]).all():
        np.multiply(flat.reshape(segments.size, -1), factors[:, None], out=out.reshape(segments.size, -1))
    else:
        np.multiply(flat, np.repeat(factors, segments), out=out)
    return out


def _stochastic_round(
    flat: np.ndarray,
    scales: np.ndarray,
    segments: np.ndarray,
    encoding: str,
    rng: np.random.Generator,
    work: np.ndarray,
    scratch: _Scratch,
) -> np.ndarray:
    """int8 bytes (or int4 bytes of two nibbles) of floor(x / s + u), u = (b + 0.5) / 128 for 7
    random bits b: floor(x / s + u) = round(x / s + o / 256) for the odd o = 2b - 127, and adding
    1.5 * 2**31 to 256 x / s + o rounds it to a multiple of 256, whose low mantissa byte is q
    (q + 8 for int4, from a magic number 8 * 256 larger). u on a grid of 128 midpoints keeps the
    rounding unbiased to within 2**-8 of a step; an 8th bit would cost a pass for the + 0.5."""
    n = flat.size
    z = _times(flat, np.float32(256) / scales, segments, work)
    dither = rng.bit_generator.random_raw(-(-n // 8))  # 8 random bytes per raw draw
    dither |= np.uint64(0x0101010101010101)  # odd bytes, o in [-127, 127]
    np.add(z, dither.view(np.int8)[:n], out=z)
    # No clip: |x / s| <= qmax (1 + 2**-22) and |o| <= 127 keep the rounding within ±qmax.
    z += np.float32(1.5 * 2**31 + (8 * 256 if encoding == "int4" else 0))
    q = np.empty(n, np.uint8)
    np.copyto(q, z.view(np.int32), casting="unsafe")  # the low byte
    if encoding == "int8":
        return q
    pairs = q.view("<u2")  # a padded run has an even number of elements
    packed = np.right_shift(pairs, 4, out=scratch("pairs", "<u2", pairs.size))
    packed |= pairs  # low byte: element 2i in the low nibble, 2i+1 in the high one
    body = np.empty(pairs.size, np.uint8)
    np.copyto(body, packed, casting="unsafe")
    return body


def _halves(flat: np.ndarray, y: np.ndarray, segments: np.ndarray, inverse: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """float16 bits of x / s (numpy's astype(np.float16), round to nearest even, without its
    software conversion: 190 ns per subnormal element, 3 ns per normal one), from
    y = x / s * 2**-112, whose float32 bits are those of the half shifted left by 13 when x / s
    is a normal half. Veltkamp's split, c - (c - y) with c = y * 8193, rounds y to 11
    significant bits, to nearest even; then a shift by 13 and the sign moved from bit 18 to
    bit 15. Values in the half's subnormal range (or 0) are converted by numpy, one by one."""
    c = np.multiply(y, _SPLIT, out=scratch("split", np.float32, y.size))
    np.subtract(c, y, out=y)
    np.subtract(c, y, out=c)
    bits = c.view(np.int32)
    np.right_shift(bits, 13, out=bits)  # a negative value is now -2**18 + its magnitude
    sign = np.right_shift(bits, 3, out=y.view(np.int32))
    np.bitwise_and(sign, 0x8000, out=sign)
    bits |= sign
    halves = np.empty(y.size, "<u2")
    np.copyto(halves, bits, casting="unsafe")
    exponent = np.bitwise_and(halves, 0x7C00, out=scratch("exponent", "<u2", y.size))
    if exponent.size and exponent.min() == 0:
        small = np.flatnonzero(exponent == 0)
        halves[small] = (flat[small] * np.repeat(inverse, segments)[small]).astype("<f2").view("<u2")
    return halves


def _from_halves(halves: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` (float32) = the halves (int16 bits) times 2**-112, exactly, subnormals too: a
    half's bits shifted left by 13 are a float32's bits; the shift of a negative half's sign
    extension set 3 exponent bits, cleared by the mask."""
    bits = values.view(np.int32)
    np.copyto(bits, halves.view(np.int16))
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, np.int32(-0x70000001), out=bits)  # 0x8FFFFFFF
    return values


@dataclass(frozen=True)
class _Layout:
    """Where the tensors of one run of an encoding sit in one flat buffer. Each tensor starts at
    a multiple of ``align`` elements (2 for int4, 8 for sign1) so its payload starts on a whole
    byte; the gap after it is padding, counted in its last channel (a tensor's share of scales:
    one for fp16, its channels for the others)."""

    sizes: list[int]
    pads: list[int]
    offsets: list[int]
    channels: list[int]
    first_channels: list[int]
    counts: np.ndarray  # per channel: its elements, padding not counted
    total: int

    @classmethod
    def of(cls, shapes: list[tuple[int, ...]], encoding: str) -> _Layout:
        align = _ALIGN.get(encoding, 1)
        sizes = [math.prod(shape) for shape in shapes]
        pads = [-n % align for n in sizes]
        channels = [_scale_count(encoding, shape) for shape in shapes]
        offsets = list(itertools.accumulate((n + p for n, p in zip(sizes, pads)), initial=0))
        first_channels = list(itertools.accumulate(channels, initial=0))[:-1]
        counts = np.repeat(np.array([n // c if c else 0 for n, c in zip(sizes, channels)], np.int64), channels)
        return cls(sizes, pads, offsets[:-1], channels, first_channels, counts, offsets[-1])

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


def _encode_topk(arrays: dict[str, np.ndarray], fraction: float, scratch: _Scratch) -> dict[str, list[np.ndarray]]:
    """Each tensor's k largest |x|: small tensors of one size together, one np.argpartition on
    their stack; a large one by a threshold from a sample (_topk_large). Their values, all at
    once, in fp16 at one power-of-two scale per tensor."""
    names = list(arrays)
    index: dict[str, np.ndarray] = {}
    top = {}  # max |x| per tensor: NaN or Inf shows there
    by_size: dict[int, list[str]] = {}
    for name, x in arrays.items():
        if x.size >= _TOPK_SAMPLED:
            index[name], top[name] = _topk_large(x.reshape(-1), _topk_count(x.size, fraction), scratch)
        else:
            by_size.setdefault(x.size, []).append(name)
    for n, group in by_size.items():
        k = _topk_count(n, fraction)
        magnitude = np.abs(np.stack([arrays[name].reshape(-1) for name in group]))
        chosen = np.argpartition(magnitude, n - k, axis=1)[:, n - k :] if k < n else np.tile(np.arange(n), (len(group), 1))
        chosen = np.sort(chosen, axis=1).astype("<u4")
        peaks = magnitude.max(axis=1, initial=0)
        for name, row, peak in zip(group, chosen, peaks):
            index[name], top[name] = row, peak
    for name in names:
        if not np.isfinite(top[name]):
            raise _non_finite(name)
        if not top[name] <= _FP16_LIMIT:
            raise _beyond_fp16(name)
    counts = np.array([index[name].size for name in names], np.int64)
    values = np.concatenate([arrays[name].reshape(-1)[index[name]] for name in names] or [np.zeros(0, np.float32)])
    stored = _half_scales(np.array([top[name] for name in names], np.float32))
    inverse = 1 / _bf16_to_scales(stored)
    y = np.multiply(values, np.repeat(_HALF_REBIAS * inverse, counts), out=scratch("topk y", np.float32, values.size))
    halves = _halves(values, y, counts, inverse, scratch)
    starts = itertools.accumulate(counts, initial=0)
    return {name: [stored[i : i + 1], index[name], halves[start : start + index[name].size]] for i, (name, start) in enumerate(zip(names, starts))}


def _topk_large(flat: np.ndarray, k: int, scratch: _Scratch) -> tuple[np.ndarray, np.float32]:
    """The k largest |x| of a large tensor (sorted indices) and max |x|. Every element at or
    above a threshold t is a candidate; t from every 64th element is set so that about twice k
    pass, so that at least k pass is all but certain. Then they hold the k largest exactly,
    found among the candidates alone; if fewer pass, among all."""
    n = flat.size
    magnitude = np.abs(flat, out=scratch("topk magnitude", np.float32, n))
    peak = magnitude.max()
    if k == n or not np.isfinite(peak):
        return np.arange(n, dtype="<u4"), peak
    sample = magnitude[::_TOPK_STRIDE]
    above = min(sample.size, 2 * -(-k // _TOPK_STRIDE) + 16)
    threshold = np.partition(sample, sample.size - above)[sample.size - above]
    candidates = np.flatnonzero(magnitude >= threshold)
    if candidates.size < k:
        candidates = np.arange(n)
    chosen = candidates[np.argpartition(magnitude[candidates], candidates.size - k)[candidates.size - k :]]
    chosen.sort()
    return chosen.astype("<u4"), peak


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
        ok = size >= 2 and (size - 2) % 6 == 0 and (size - 2) // 6 <= n
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
    with _scratch() as scratch:
        for encoding in ENCODINGS:
            group = [r for r in records if r.encoding == encoding]
            if encoding == "topk":
                tensors |= _decode_topk(group, view) if group else {}
                continue
            for run in _batches([math.prod(r.shape) for r in group]):
                tensors |= _decode_run(group[run], view, scratch)
    return tensors


def _decode_run(records: list[_Record], view: memoryview, scratch: _Scratch) -> dict[str, np.ndarray]:
    """A run of tensors of one encoding, all at once in one buffer laid out as ``_encode_run``
    built it. The tensors returned are views of that one buffer."""
    encoding = records[0].encoding
    layout = _Layout.of([r.shape for r in records], encoding)
    scales, bodies = [], []
    for r, c in zip(records, layout.channels):
        scales.append(np.frombuffer(view, dtype="<u2", count=c, offset=r.offset))
        bodies.append(np.frombuffer(view, dtype=np.uint8, count=r.size - 2 * c, offset=r.offset + 2 * c))
    values = np.empty(layout.total, np.float32)
    # One aligned copy of the bodies (numpy casts from unaligned memory ~10x slower than it
    # copies); fp32's is the decoded tensors already.
    body = values.view(np.uint8) if encoding == "fp32" else scratch("body", np.uint8, sum(b.size for b in bodies))
    np.concatenate(bodies, out=body)
    stored = np.concatenate(scales)
    if encoding == "fp32":
        bad = None
    elif encoding == "fp16":
        bad = _bad_half_scale(stored)
    else:
        bad = _bad_tensor(layout, _bf16_to_scales(stored), encoding)
    if bad is not None:
        raise _bad_scales(records[bad].name, encoding)
    segments = layout.segments()
    if encoding == "fp32":
        if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
            raise _decodes_non_finite(records[_first_non_finite(_split(values, layout))].name)
        return dict(zip((r.name for r in records), _split(values, layout, [r.shape for r in records])))
    if encoding == "fp16":
        halves = body.view("<u2")
        exponent = np.bitwise_and(halves, 0x7C00, out=scratch("exponent", "<u2", halves.size))
        if exponent.size and exponent.max() == 0x7C00:
            raise _decodes_non_finite(records[_first_non_finite(_split(halves.view("<f2"), layout))].name)
        factors = _bf16_to_scales(stored) * np.float32(2.0**112)  # 2**(112 + e) <= 2**126
        _times(_from_halves(halves, values), factors, segments, values)
    else:
        if encoding == "int8":
            q = body.view(np.int8)
        elif encoding == "int4":
            q = _nibbles(body, scratch)
        else:
            q = _signs(body)
        np.copyto(values, q)
        _times(values, _bf16_to_scales(stored), segments, values)
    return dict(zip((r.name for r in records), _split(values, layout, [r.shape for r in records])))


def _split(values: np.ndarray, layout: _Layout, shapes: list[tuple[int, ...]] | None = None) -> list[np.ndarray]:
    pieces = [values[offset : offset + size] for offset, size in zip(layout.offsets, layout.sizes)]
    return pieces if shapes is None else [p.reshape(shape) for p, shape in zip(pieces, shapes)]


def _nibbles(body: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """int4 bytes to q as int8, two per byte: widened to 16 bits, byte | byte << 4 has the low
    nibble in its low byte and the high one in its high byte."""
    pairs = scratch("pairs", "<u2", body.size)
    np.copyto(pairs, body)
    shifted = np.left_shift(pairs, 4, out=scratch("shifted", "<u2", body.size))
    pairs |= shifted
    pairs &= 0x0F0F
    q = pairs.view(np.int8)
    q -= 8
    return q


def _signs(body: np.ndarray) -> np.ndarray:
    """sign1 bits to ±1 as int8: bytes of 0/1 times 0xFE, inverted (8 bytes per 64-bit word;
    no byte carries into the next)."""
    bits = np.unpackbits(body)
    words = bits.view(np.uint64)
    words *= np.uint64(0xFE)
    np.invert(words, out=words)
    return bits.view(np.int8)


def _bad_half_scale(stored: np.ndarray) -> int | None:
    """The index of the first fp16 scale that is not a power of two 2**e, e in [-126, 14]."""
    exponent = stored.astype(np.int64) >> 7
    bad = ((stored & 0x807F) != 0) | (exponent < 1) | (exponent > 127 + 14)
    return int(np.argmax(bad)) if bad.any() else None


def _decode_topk(records: list[_Record], view: memoryview) -> dict[str, np.ndarray]:
    """All top-k tensors at once, into one buffer of zeros."""
    sizes = [math.prod(r.shape) for r in records]
    counts = np.array([(r.size - 2) // 6 for r in records], np.int64)
    raw = np.concatenate([np.frombuffer(view, np.uint8, count=r.size, offset=r.offset) for r in records])
    starts = np.cumsum([r.size for r in records]) - [r.size for r in records]
    stored = np.stack([raw[s : s + 2] for s in starts]).view("<u2").reshape(-1)
    bad = _bad_half_scale(stored)
    if bad is not None:
        raise _bad_scales(records[bad].name, "topk")
    index = np.concatenate([raw[s + 2 : s + 2 + 4 * k].view("<u4") for s, k in zip(starts, counts)]).astype(np.int64)
    halves = np.concatenate([raw[s + 2 + 4 * k : s + 2 + 6 * k].view("<u2") for s, k in zip(starts, counts)])
    offsets = np.cumsum(sizes) - sizes
    for r, n, k, last in zip(records, sizes, counts, np.cumsum(counts) - 1):
        if k and index[last] >= n:
            raise _bad_indices(r.name)
    index += np.repeat(offsets, counts)
    if index.size > 1 and not (index[1:] > index[:-1]).all():
        first = int(np.searchsorted(np.cumsum(counts), np.argmin(index[1:] > index[:-1]) + 1, side="right"))
        raise _bad_indices(records[first].name)  # the first tensor whose indices go down
    if halves.size and np.bitwise_and(halves, 0x7C00).max() == 0x7C00:
        raise _decodes_non_finite(records[int(np.searchsorted(np.cumsum(counts), np.flatnonzero((halves & 0x7C00) == 0x7C00)[0], side="right"))].name)
    values = _from_halves(halves, np.empty(halves.size, np.float32))
    values *= np.repeat(_bf16_to_scales(stored) * np.float32(2.0**112), counts)
    out = np.zeros(sum(sizes), np.float32)
    out[index] = values
    return {r.name: out[o : o + n].reshape(r.shape) for r, o, n in zip(records, offsets, sizes)}


def _bad_indices(name: str) -> CodecError:
    return CodecError(f"tensor {name!r} has top-k indices out of order or out of range: the update is corrupt")


def _decodes_non_finite(name: str) -> CodecError:
    return CodecError(f"tensor {name!r} decodes to NaN or Inf: the sender is broken, refusing the update")
