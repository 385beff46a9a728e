"""Reads a bundle and verifies it before anything runs: schema version, every file's size and
sha256, and that its initial weights decode to the manifest's trainable tensors. A bundle that
fails is refused with the file and the reason named."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from device_runtime.codec import decode
from device_runtime.errors import BundleError, CodecError
from device_runtime.manifest import Manifest

MANIFEST = "manifest.json"
WEIGHTS = "weights"  # the role of the initial trainable weights, a codec "weights" container


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder. ``bundle_hash`` (sha256 of manifest.json, which holds every
    file's hash) identifies it, e.g. to key caches on the phone."""

    root: Path
    manifest: Manifest
    bundle_hash: str

    @classmethod
    def load(cls, root: str | Path) -> Bundle:
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{manifest_path}: no manifest.json, this folder is not a fedkit bundle")
        raw = manifest_path.read_bytes()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc}); re-export the bundle") from exc
        try:
            manifest = Manifest.from_dict(data)
        except BundleError as exc:
            raise BundleError(f"{manifest_path}: {exc}") from exc
        for role, entry in manifest.files.items():
            _verify_file(root, role, entry.path, entry.size, entry.sha256)
        if WEIGHTS in manifest.files:
            _verify_weights(root / manifest.files[WEIGHTS].path, manifest)
        return cls(root=root, manifest=manifest, bundle_hash=hashlib.sha256(raw).hexdigest())

    def path(self, role: str) -> Path:
        """The file that plays ``role`` (e.g. ``"ort.training_model"``)."""
        entry = self.manifest.files.get(role)
        if entry is None:
            raise BundleError(
                f"bundle {self.root} has no {role!r} file (it has: {', '.join(sorted(self.manifest.files))}); "
                "re-export it for this engine"
            )
        return self.root / entry.path

    def has(self, role: str) -> bool:
        return role in self.manifest.files


def _verify_weights(path: Path, manifest: Manifest) -> None:
    # Its hash only says the file is the one exported: an older fedkit may have written it in a
    # codec format this one no longer reads.
    try:
        decode(path.read_bytes(), expected={t.name: t.shape for t in manifest.trainable})
    except CodecError as exc:
        raise BundleError(
            f"{path} (weights) does not fit this fedkit ({exc}); re-export the bundle with this version"
        ) from exc


def _verify_file(root: Path, role: str, rel: str, size: int, sha256: str) -> None:
    # The dataclass does not check JSON types; a wrong type must not pass as a "bad hash".
    if not isinstance(rel, str) or not isinstance(size, int) or isinstance(size, bool) or not isinstance(sha256, str):
        raise BundleError(
            f"{root / MANIFEST}: the entry for {role!r} needs a string path, an integer size and a string sha256, "
            f"got path={rel!r}, size={size!r}, sha256={sha256!r}; re-export the bundle"
        )
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{root / MANIFEST} names {rel!r} for {role!r}, outside the bundle folder: refusing it")
    if not path.is_file():
        raise BundleError(f"{root / rel} ({role}) is missing from the bundle; re-export or re-deploy it")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise BundleError(
            f"{root / rel} ({role}) is {actual_size} bytes, the manifest says {size}: "
            "the file is truncated or altered; re-deploy the bundle"
        )
    if sha256_file(path) != sha256:
        raise BundleError(
            f"{root / rel} ({role}) does not match its sha256 in the manifest: the file is altered; "
            "re-deploy the bundle"
        )
