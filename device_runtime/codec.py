"""The update container: what a phone pushes and what the aggregator decodes (one definition
of the wire format, shared by both ends). numpy, zlib-ng and its own C kernels: no torch.

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
    4  u32   CRC-32 (zlib.crc32's) of every byte before it

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
a subnormal half, with fewer significant bits), |x| up to 65504 * 2**14 fits, and h is exactly
numpy's x / s rounded to float16.

int8/int4 use s = max |x| / qmax (127 or 7; never below 2**-100, so 1/s stays finite), rounded
up to bfloat16, and stochastic rounding, q = floor(x / s + u) with u uniform in [0, 1): the
decoded value is an unbiased estimate of x (to within 2**-16 of a step) and is less than one
step s away from it. u comes from a hash of the element's position keyed by a 32-bit draw per
tensor from the caller's generator, so the same generator state gives the same bytes; how u
is drawn is the encoder's business: the format does not depend on it.

The arithmetic of every payload, and on encoding the assembly of the whole container, is in C
(device_runtime/_kernels.c: one or two passes per tensor, one call per update, the GIL
released); this module checks the arguments, reads the framing and says what is wrong.
The CRC is zlib-ng's crc32: the same CRC-32 as zlib's, 8x faster.

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
import json
import math
import numbers
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt
from zlib_ng.zlib_ng import crc32

from device_runtime import _kernels
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
_CODES = {encoding: code for code, encoding in enumerate(ENCODINGS)}  # the record's encoding byte
KINDS = ("delta", "weights", "activation", "gradient")
# The decoder allocates at most this many float32 elements per update (256 MiB), whatever a
# payload claims; MobileNetV2 whole is 3.5 M. Passing ``expected`` bounds it exactly.
MAX_ELEMENTS = 1 << 26

_MAX_HEADER = 64 * 1024
_MAX_NDIM = 8
_U32_MAX = 2**32 - 1
_FP16_LIMIT = 65504.0 * 2.0**14  # the largest |x| scaled fp16 holds: fp16's max at the largest scale
_OK, _NON_FINITE, _OUT_OF_RANGE, _BAD_INDICES = range(4)  # the kernels' status codes
_BITS = {"sign1": 1, "int4": 4, "int8": 8, "fp16": 16, "fp32": 32}  # nominal bits per element
_LADDER = ("sign1", "int4", "int8", "fp16", "fp32")
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_COUNT = struct.Struct("<I")
_CRC = struct.Struct("<I")
_U16 = struct.Struct("<H")
# A record's shape and payload length, per number of dimensions
_SHAPE_AND_SIZE = [struct.Struct(f"<{ndim + 1}I") for ndim in range(_MAX_NDIM + 1)]
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

    def __post_init__(self) -> None:
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
    jobs, total = [], 0
    keys = rng.integers(0, 2**32, size=len(tensors), dtype=np.uint32).tolist()  # one draw per tensor
    for (name, value), key in zip(tensors.items(), keys, strict=True):
        x = np.asarray(value)
        total += x.size  # before a copy to float32 of a tensor too large to take
        if total > MAX_ELEMENTS:
            raise CodecError(f"update has more than {MAX_ELEMENTS} elements, more than a decoder accepts: split it")
        x = _as_float32(name, x)
        # under MAX_ELEMENTS in all, only an empty tensor can have a side of 2**32
        if x.ndim > _MAX_NDIM or (not x.size and max(x.shape, default=0) > _U32_MAX):
            raise CodecError(
                f"tensor {name!r} has shape {x.shape}: the format holds at most {_MAX_NDIM} dimensions of < 2**32"
            )
        jobs.append((_name_bytes(name), _CODES[encodings[name]], x, key))  # a bad name: refused before any work
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_json)) + header_json + _COUNT.pack(len(jobs))
    data = _kernels.pack(prefix, jobs, topk_fraction, crc32)
    if isinstance(data, tuple):
        status, index = data
        name = list(tensors)[index]
        raise _unencodable(name, encodings[name], status)
    return data


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
        raise CodecError(
            f"update is {size} bytes, too short to be one (at least {_FIXED_SIZE}): it was cut short, send it again"
        )
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
    (count,) = _COUNT.unpack(reader.take(_COUNT.size, "the tensor count"))
    records = [_read_record(reader) for _ in range(_plausible_count(count, reader))]
    if reader.pos != reader.end:
        raise CodecError(f"update has {reader.end - reader.pos} unexpected bytes after its last tensor: refusing it")
    (stored_crc,) = _CRC.unpack_from(view, reader.end)
    if crc32(view[: reader.end]) != stored_crc:
        raise CodecError("update fails its checksum: it was corrupted in transit, send it again")
    header = _parse_header(header_bytes)
    _check_records(records, expected)
    return Update(header, _decode_payloads(records, view), {r.name: r.encoding for r in records})


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
        n, enc = math.prod(shape), encodings[name]
        size += _payload_size(enc, n, _scale_count(enc, shape), _topk_count(n, topk_fraction))
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
    variance = {
        name: float(np.mean(np.square(t, dtype=np.float64))) if sizes[name] else 0.0 for name, t in tensors.items()
    }
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

    def __init__(self) -> None:
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
                raise CodecError(
                    f"error feedback: the decoded update lacks {name!r} as encoded; pass the decode of what was encoded"
                )
            self._residuals[name] = sent - got

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: r.copy() for name, r in self._residuals.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._residuals = {name: _as_float32(name, r).copy() for name, r in state.items()}


# --- encoding ---------------------------------------------------------------------------


def _encodings_for(tensor_names: Iterable[str], encoding: str | Mapping[str, str]) -> dict[str, str]:
    names = list(tensor_names)
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


def _as_float32(name: str, value: npt.ArrayLike) -> np.ndarray:
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


def _scale_count(encoding: str, shape: tuple[int, ...]) -> int:
    """How many scales a tensor's payload starts with: its channels (the slices along its first
    axis, or one for a scalar or 1-D tensor) for int8, int4 and sign1."""
    if encoding == "fp32":
        return 0
    return shape[0] if len(shape) >= 2 and encoding not in ("fp16", "topk") else 1


def _topk_count(n: int, fraction: float) -> int:
    return min(n, math.ceil(fraction * n))


_BODY_BYTES = {
    "fp32": lambda n: 4 * n,
    "fp16": lambda n: 2 * n,
    "int8": lambda n: n,
    "int4": lambda n: (n + 1) // 2,
    "sign1": lambda n: (n + 7) // 8,
}


def _payload_size(encoding: str, n: int, scales: int, k: int) -> int:
    """Bytes of a payload of n elements with this many scales (and k kept by topk)."""
    return 2 + 6 * k if encoding == "topk" else 2 * scales + _BODY_BYTES[encoding](n)


def _unencodable(name: str, encoding: str, status: int) -> CodecError:
    if status == _NON_FINITE:
        return CodecError(
            f"tensor {name!r} holds NaN or Inf: the update is broken, do not send it (lower the learning rate?)"
        )
    if encoding in ("fp16", "topk"):
        return CodecError(
            f"tensor {name!r} has values beyond ±{_FP16_LIMIT:g}, more than scaled fp16 holds: "
            "encode it as fp32 or int8"
        )
    return CodecError(
        f"tensor {name!r} has values too large for {encoding}: its scales would overflow when decoded, "
        "encode it as fp32"
    )


def _raise_gain(variance: float, rung: int) -> float:
    low, high = _BITS[_LADDER[rung]], _BITS[_LADDER[rung + 1]]
    return variance * (4.0**-low - 4.0**-high) / (high - low)


# --- decoding ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Record:
    name: str
    encoding: str
    shape: tuple[int, ...]
    offset: int  # of the payload in the data
    size: int
    n: int  # elements
    scales: int  # how many scales the payload starts with


class _Reader:
    """Reads fields between ``pos`` and ``end``, refusing any that would run past ``end``."""

    def __init__(self, view: memoryview, pos: int, end: int):
        self.view, self.pos, self.end = view, pos, end

    def need(self, size: int, what: str, name: str | None = None) -> int:
        """The position of the next ``size`` bytes, which the reader moves past."""
        if size > self.end - self.pos:
            where = what if name is None else f"{what} {name[:80]!r}"
            raise CodecError(
                f"update is truncated: it ends inside {where} ({size} bytes needed, "
                f"{max(self.end - self.pos, 0)} left): it was cut short, send it again"
            )
        self.pos += size
        return self.pos - size

    def take(self, size: int, what: str) -> memoryview:
        pos = self.need(size, what)
        return self.view[pos : pos + size]


def _plausible_count(count: int, reader: _Reader) -> int:
    # Every record takes at least _RECORD_FIXED + 1 bytes: a larger count is a lie or a cut.
    if count * (_RECORD_FIXED + 1) > reader.end - reader.pos:
        raise CodecError(
            f"update declares {count} tensors but has only {reader.end - reader.pos} bytes for them: "
            "it is truncated or corrupt, send it again"
        )
    return count


def _read_record(reader: _Reader) -> _Record:
    view = reader.view
    (name_size,) = _U16.unpack_from(view, reader.need(2, "a tensor name length"))
    pos = reader.need(name_size + 2, "a tensor name, encoding and dimensions")
    try:
        name = str(view[pos : pos + name_size], "utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError("update has a tensor name that is not UTF-8: it is corrupt, send it again") from exc
    if not name:
        raise CodecError("update has a tensor with an empty name: it is corrupt")
    code, ndim = view[pos + name_size], view[pos + name_size + 1]
    if code >= len(ENCODINGS):
        raise CodecError(f"tensor {name[:80]!r} has encoding code {code}, unknown to this fedkit: update it")
    if ndim > _MAX_NDIM:
        raise CodecError(f"tensor {name[:80]!r} declares {ndim} dimensions, over the format's {_MAX_NDIM}")
    *shape, size = _SHAPE_AND_SIZE[ndim].unpack_from(view, reader.need(4 * ndim + 4, "the shape of", name))
    shape = tuple(shape)
    encoding = ENCODINGS[code]
    n, scales = math.prod(shape), _scale_count(encoding, shape)
    if n > MAX_ELEMENTS:
        raise CodecError(f"tensor {name[:80]!r} declares shape {shape}, over {MAX_ELEMENTS} elements: refusing it")
    if encoding == "topk":
        ok = size >= 2 and (size - 2) % 6 == 0 and (size - 2) // 6 <= n
    else:
        ok = size == _payload_size(encoding, n, scales, 0)
    if not ok:
        raise CodecError(
            f"tensor {name[:80]!r} ({encoding}, shape {shape}) declares a {size}-byte payload that does not fit "
            "its shape: the update is corrupt"
        )
    offset = reader.need(size, "the payload of", name)
    return _Record(name, encoding, shape, offset, size, n, scales)


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
    if sum(r.n for r in records) > MAX_ELEMENTS:
        raise CodecError(f"update declares over {MAX_ELEMENTS} elements in all: refusing it")
    if expected is None:
        return
    want = {name: tuple(int(d) for d in shape) for name, shape in expected.items()}
    missing = sorted(set(want) - set(names))
    extra = sorted(set(names) - set(want))
    if missing or extra:
        raise CodecError(
            f"update does not carry the expected tensors: missing {missing[:10]}, "
            f"unexpected {[n[:80] for n in extra[:10]]}; the device trains a different plan than this round expects"
        )
    for r in records:
        if r.shape != want[r.name]:
            raise CodecError(
                f"tensor {r.name!r} has shape {r.shape}, expected {want[r.name]}: the device trains a different model"
            )


def _decode_payloads(records: list[_Record], view: memoryview) -> dict[str, np.ndarray]:
    """Every tensor, as views of one float32 buffer."""
    values = np.empty(sum(r.n for r in records), np.float32)
    jobs = [(_CODES[r.encoding], r.offset, r.size, r.n, r.scales) for r in records]
    status, index = _kernels.unpack(view, jobs, values)
    if status != _OK:
        r = records[index]
        if status == _OUT_OF_RANGE:
            raise CodecError(
                f"tensor {r.name!r} has {r.encoding} scales that are negative, NaN, Inf or too large to decode"
            )
        if status == _NON_FINITE:
            raise CodecError(f"tensor {r.name!r} decodes to NaN or Inf: the sender is broken, refusing the update")
        raise CodecError(f"tensor {r.name!r} has top-k indices out of order or out of range: the update is corrupt")
    tensors, offset = {}, 0
    for r in records:
        tensors[r.name] = values[offset : offset + r.n].reshape(r.shape)
        offset += r.n
    return tensors
