"""The trainer's local checkpoint: one ``.npz`` file, written atomically, read without pickle.

A checkpoint is a nested dict whose leaves are numpy arrays, bytes or JSON values (the
trainer's weights, optimizer momentum, error-feedback residuals, round and batch position).
Arrays and bytes go into the ``.npz`` under their ``/``-joined path; everything else goes into
a small JSON document stored in the same file (member ``__meta__``), so a checkpoint is ONE
file and one ``os.replace`` publishes it: there is no moment where two files disagree.

Writing: a temporary file in the same folder, fsync, ``os.replace``, fsync of the folder. A
kill at any point leaves either the old checkpoint or the new one, never a torn file; a
checkpoint that still fails to read (damaged storage, altered by hand) raises
CheckpointError, and the trainer refuses to resume from it.

What both trainers keep in it is ``device_runtime.local_round.RoundRecord``; its layout is that of
``FORMAT_VERSION``: a runtime that changes it bumps the version, and a file of another version is
refused, saying to delete it.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.errors import CheckpointError

FORMAT_VERSION = 1
_META = "__meta__"


def save_checkpoint(path: str | Path, state: dict[str, Any], *, durable: bool = True) -> None:
    """Writes ``state`` to ``path`` atomically (the old file stays until the new one is complete).
    ``durable=False`` skips the fsyncs: still atomic against a killed process (the kernel keeps
    the written pages), but a power cut may bring back the previous checkpoint."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    meta = {"format_version": FORMAT_VERSION, "state": _split(state, "", arrays)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left behind by a kill mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)  # _split keeps object arrays out: nothing to pickle
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is no checkpoint there."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            # reading every member checks every CRC, so damage anywhere is found here
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(arrays.pop(_META).tobytes())
        version = meta["format_version"]
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} is checkpoint format {version!r}, this runtime reads {FORMAT_VERSION}: "
                "delete it to start the round over"
            )
        state = _join(meta["state"], arrays)
        if not isinstance(state, dict):  # save_checkpoint writes a dict: this file was altered
            raise ValueError(f"the saved state is a {type(state).__name__}, not a dict")
        return state
    except CheckpointError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); the trainer will not resume from it: "
            "delete it to start the round over (its error-feedback residuals are lost)"
        ) from exc


def _split(value: Any, key: str, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON, with its arrays and bytes moved into ``arrays`` and referenced by key."""
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or "/" in k or k.startswith("__"):
                raise ValueError(f"checkpoint keys must be strings without '/' or a leading '__', got {k!r}")
        return {k: _split(v, f"{key}/{k}" if key else k, arrays) for k, v in value.items()}
    if isinstance(value, bytes):
        arrays[key] = np.frombuffer(value, dtype=np.uint8)
        return {"__bytes__": key}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise ValueError(f"checkpoint array {key!r} holds Python objects, which only pickle could store")
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{key}/{i}", arrays) for i, v in enumerate(value)]
    return value


def _join(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            return arrays[value["__array__"]]
        if "__bytes__" in value:
            return arrays[value["__bytes__"]].tobytes()
        return {k: _join(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, arrays) for v in value]
    return value


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; without it a power cut may bring the old file back
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
