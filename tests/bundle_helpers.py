"""Bundles written or altered by hand, for the tests of what the loader and the engines refuse.
A test that needs a working bundle takes the exporter's (``small_cnn_bundle`` in
tests/conftest.py, or ``exporters.bundle.export_bundle``); these helpers only make what the
exporter never would. Torch-free, so the phone-side tests can use them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from device_runtime.bundle import MANIFEST, Bundle, sha256_file
from device_runtime.manifest import DevicePlan, FileEntry, Manifest, TensorSpec
from device_runtime.preprocess import InputSpec


def write_manifest(root: Path, data) -> None:
    (root / MANIFEST).write_text(json.dumps(data, indent=2))


def edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    """Changes the manifest of the bundle at ``root`` in place: ``edit`` gets its JSON object."""
    data = json.loads((root / MANIFEST).read_text())
    edit(data)
    write_manifest(root, data)


def set_file(root: Path, role: str, data: bytes | None = None, rel: str | None = None) -> None:
    """Lists ``role``'s file in the manifest with its true size and sha256, after writing
    ``data`` into it when given; ``rel`` is its path for a role the manifest does not list yet.
    The loader then takes the file as if the exporter had written it."""
    files = json.loads((root / MANIFEST).read_text())["files"]
    rel = rel or files[role]["path"]
    if data is not None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    entry = {"path": rel, "sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
    edit_manifest(root, lambda d: d["files"].update({role: entry}))


def edited_copy(
    src: Path, dst: Path, *, files: dict[str, bytes] | None = None, edit: Callable[[dict], None] | None = None
) -> Bundle:
    """A copy of the bundle at ``src`` whose ``files`` (role → new bytes) are replaced, each
    re-hashed in the manifest, and whose manifest ``edit`` then changes; loaded, so it verifies."""
    shutil.copytree(src, dst)
    for role, data in (files or {}).items():
        set_file(dst, role, data)
    if edit is not None:
        edit_manifest(dst, edit)
    return Bundle.load(dst)


def hand_made_bundle(
    root: Path,
    contents: dict[str, tuple[str, bytes]],
    *,
    block_names: tuple[str, ...],
    plan: DevicePlan,
    trainable: tuple[TensorSpec, ...],
    model_id: str = "small_cnn",
) -> Manifest:
    """A bundle of arbitrary bytes that the loader accepts: ``contents`` (role → (path, bytes))
    written under ``root`` and listed in a manifest with their true sizes and hashes. For the
    loader's own tests, which need files they can break one at a time."""
    for rel, data in contents.values():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = Manifest(
        model_id=model_id,
        model_hash="ab" * 32,
        block_names=block_names,
        plan=plan,
        input_spec=InputSpec(),
        label_names=tuple(str(i) for i in range(10)),
        trainable=trainable,
        files={role: FileEntry(rel, sha256_file(root / rel), len(data)) for role, (rel, data) in contents.items()},
        fedkit_version="test",
    )
    write_manifest(root, manifest.to_dict())
    return manifest
