"""Folders that appear whole or not at all: a bundle, a phone folder, a fleet's export, its
shards, a run config. Everything is written into a staging folder beside the target, which one
rename publishes; a failure removes the staging folder, so a reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def is_free(folder: Path) -> bool:
    """True when ``folder`` does not exist or is an empty folder: somewhere a new one may go."""
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


@contextlib.contextmanager
def new_folder(folder: str | Path) -> Iterator[Path]:
    """Yields a staging folder beside ``folder`` (which must be free: ``is_free``, checked by
    the caller with its own message); when the block ends, the staging folder becomes
    ``folder``; when it raises, the staging folder is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it private; these folders are meant to be read and copied
        if folder.is_dir():
            folder.rmdir()  # empty (is_free): a rename cannot replace a folder
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
