"""The signatures of the update codec's compiled kernels (_kernels.c), which mypy cannot read."""

from collections.abc import Callable

import numpy as np

# The status codes are codec's _OK, _NON_FINITE, _OUT_OF_RANGE and _BAD_INDICES.

def pack(
    prefix: bytes,
    tensors: list[tuple[bytes, int, np.ndarray, int]],  # (name, encoding code, float32 C array, rounding key)
    topk_fraction: float,
    crc32: Callable[[memoryview], int],
    /,
) -> bytes | tuple[int, int]:
    """The container, or (status, index) of the first tensor that cannot be encoded."""

def unpack(
    data: bytes | bytearray | memoryview,
    records: list[tuple[int, int, int, int, int]],  # (encoding code, offset, size, elements, scales)
    out: np.ndarray,  # float32, filled in place
    /,
) -> tuple[int, int]:
    """(status, index of the failing record)."""
