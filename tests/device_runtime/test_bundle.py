"""The bundle loader verifies everything before anything runs: every broken bundle is refused
with a BundleError that names the file. These bundles are written by hand (torch-free, through
tests/bundle_helpers.py), of bytes that can be broken one file at a time; the round trip
through the real exporter is in tests/exporters/test_bundle.py."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import edit_manifest, hand_made_bundle, set_file, write_manifest

from device_runtime.bundle import MANIFEST, Bundle
from device_runtime.codec import UpdateHeader, encode
from device_runtime.errors import BundleError
from device_runtime.manifest import SCHEMA_VERSION, DevicePlan, Manifest, TensorSpec

BLOCKS = ("features.0", "features.1", "features.2", "pool", "classifier")
CONTENTS = {
    "frozen.onnx": ("frozen.onnx", b"frozen part " * 100),
    "trainable.onnx": ("trainable.onnx", b"trainable part " * 50),
    "ort.checkpoint": ("ort/checkpoint", b"\x00\x01checkpoint" * 30),
    "weights": (
        "weights.bin",
        encode(
            UpdateHeader("exporter", 0, 0, 0, kind="weights"),
            {"classifier.weight": np.zeros((10, 32), np.float32), "classifier.bias": np.zeros(10, np.float32)},
            "fp32",
        ),
    ),
}


def write_bundle(root: Path) -> Manifest:
    trainable = (TensorSpec("classifier.weight", (10, 32)), TensorSpec("classifier.bias", (10,)))
    return hand_made_bundle(
        root, CONTENTS, block_names=BLOCKS, plan=DevicePlan(cut=5, train_from=4), trainable=trainable
    )


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    write_bundle(root)
    return root


def refused(root: Path) -> str:
    with pytest.raises(BundleError) as info:
        Bundle.load(root)
    return str(info.value)


# -- a good bundle -----------------------------------------------------------------------------


def test_load_gives_the_manifest_and_the_files_by_role(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    written = write_bundle(root)

    bundle = Bundle.load(root)

    assert bundle.manifest == written
    assert bundle.path("ort.checkpoint") == root / "ort" / "checkpoint"
    assert bundle.path("ort.checkpoint").read_bytes() == CONTENTS["ort.checkpoint"][1]
    assert bundle.has("weights") and not bundle.has("executorch.train")
    assert bundle.manifest.engines == (
        "ort",
        "numpy",
    )  # numpy: it trains one linear layer, which needs no files of its own
    assert not bundle.manifest.is_splitfed
    assert bundle.bundle_hash == hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()


def test_a_role_the_bundle_lacks_names_the_roles_it_has(bundle_dir):
    with pytest.raises(BundleError, match=r"no 'executorch.train' file \(it has: frozen.onnx, ort.checkpoint"):
        Bundle.load(bundle_dir).path("executorch.train")


def test_bundle_hash_changes_with_any_file_hash(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        write_bundle(root)
    set_file(b, "frozen.onnx", CONTENTS["frozen.onnx"][1].upper())  # same size, other bytes

    assert Bundle.load(a).bundle_hash != Bundle.load(b).bundle_hash


def test_the_loader_runs_without_torch(bundle_dir):
    # The phone has no torch: load a bundle in a child process where importing torch fails.
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'executorch'):\n"
        "            raise ImportError('torch is not allowed on the phone')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from device_runtime.bundle import Bundle\n"
        f"print(Bundle.load({str(bundle_dir)!r}).manifest.model_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "small_cnn"


# -- files that do not match the manifest ------------------------------------------------------


def test_a_missing_file_is_named(bundle_dir):
    (bundle_dir / "ort" / "checkpoint").unlink()
    message = refused(bundle_dir)
    assert "ort/checkpoint (ort.checkpoint) is missing" in message


def test_a_truncated_file_is_named_with_both_sizes(bundle_dir):
    path = bundle_dir / "trainable.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    message = refused(bundle_dir)
    size = len(CONTENTS["trainable.onnx"][1])
    assert "trainable.onnx (trainable.onnx)" in message
    assert f"is {size - 10} bytes, the manifest says {size}" in message


def test_an_altered_file_of_the_same_size_is_named(bundle_dir):
    path = bundle_dir / "frozen.onnx"
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))
    message = refused(bundle_dir)
    assert "frozen.onnx (frozen.onnx) does not match its sha256" in message


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"classifier.weight": np.zeros((10, 32), np.float32)}, "missing ['classifier.bias']"),
        (
            {"classifier.weight": np.zeros((10, 31), np.float32), "classifier.bias": np.zeros(10, np.float32)},
            "has shape (10, 31)",
        ),
    ],
)
def test_initial_weights_that_do_not_fit_the_manifest_are_refused(bundle_dir, weights, message):
    set_file(bundle_dir, "weights", encode(UpdateHeader("exporter", 0, 0, 0, kind="weights"), weights, "fp32"))
    assert message in refused(bundle_dir) and "re-export" in refused(bundle_dir)


def test_initial_weights_of_an_older_codec_format_say_to_re_export(bundle_dir):
    # as an older fedkit wrote them: a valid file of its day, hashed in its manifest
    data = bytearray((bundle_dir / "weights.bin").read_bytes())
    data[4:6] = (1).to_bytes(2, "little")
    set_file(bundle_dir, "weights", bytes(data))
    message = refused(bundle_dir)
    assert "weights.bin (weights) does not fit this fedkit" in message and "format version 1" in message
    assert "re-export the bundle" in message


def test_a_file_replaced_by_a_folder_is_missing(bundle_dir):
    (bundle_dir / "weights.bin").unlink()
    (bundle_dir / "weights.bin").mkdir()
    assert "weights.bin (weights) is missing" in refused(bundle_dir)


# -- bad manifests -------------------------------------------------------------------------------


def test_a_folder_without_manifest_is_not_a_bundle(tmp_path):
    assert "no manifest.json, this folder is not a fedkit bundle" in refused(tmp_path)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00", b""])
def test_a_manifest_that_is_not_json_is_named(bundle_dir, raw):
    (bundle_dir / MANIFEST).write_bytes(raw)
    message = refused(bundle_dir)
    assert f"{bundle_dir / MANIFEST}: not valid JSON" in message


@pytest.mark.parametrize("data", [[1, 2], "manifest", None, 3])
def test_a_manifest_that_is_not_an_object_is_named(bundle_dir, data):
    write_manifest(bundle_dir, data)
    message = refused(bundle_dir)
    assert message.startswith(f"{bundle_dir / MANIFEST}: ")
    assert "JSON object" in message


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", None])
def test_an_unknown_schema_version_is_refused(bundle_dir, version):
    edit_manifest(bundle_dir, lambda d: d.update(schema_version=version))
    message = refused(bundle_dir)
    assert message.startswith(f"{bundle_dir / MANIFEST}: ")
    assert f"schema version {version!r}, this runtime reads {SCHEMA_VERSION}" in message


def test_a_manifest_without_schema_version_is_refused(bundle_dir):
    edit_manifest(bundle_dir, lambda d: d.pop("schema_version"))
    assert "schema version None" in refused(bundle_dir)


@pytest.mark.parametrize("rel", ["../outside.bin", "/etc/hostname", "ort/../../outside.bin", "."])
def test_a_path_outside_the_bundle_is_refused_before_it_is_read(bundle_dir, rel):
    (bundle_dir.parent / "outside.bin").write_bytes(CONTENTS["weights"][1])
    edit_manifest(bundle_dir, lambda d: d["files"]["weights"].update(path=rel))
    assert f"names {rel!r} for 'weights', outside the bundle folder" in refused(bundle_dir)


def test_a_symlink_leading_out_of_the_bundle_is_refused(bundle_dir):
    outside = bundle_dir.parent / "outside.bin"
    outside.write_bytes(CONTENTS["weights"][1])
    (bundle_dir / "weights.bin").unlink()
    (bundle_dir / "weights.bin").symlink_to(outside)
    assert "'weights.bin' for 'weights', outside the bundle folder" in refused(bundle_dir)


def _drop(key):
    return lambda d: d.pop(key)


def _set(path, value):
    def edit(d):
        *parents, leaf = path
        for p in parents:
            d = d[p]
        d[leaf] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_drop("model_id"), "KeyError: 'model_id'"),
        (_drop("files"), "KeyError: 'files'"),
        (_set(["files"], ["frozen.onnx"]), "malformed"),
        (_set(["files", "weights"], "weights.bin"), "file entry must be a JSON object"),
        (_set(["files", "weights"], {"path": "weights.bin"}), "file entry is malformed"),
        (_set(["files", "weights", "size"], "140"), "the entry for 'weights' needs"),
        (_set(["files", "weights", "size"], True), "the entry for 'weights' needs"),
        (_set(["files", "weights", "path"], 7), "the entry for 'weights' needs"),
        (_set(["files", "weights", "sha256"], None), "the entry for 'weights' needs"),
        (_set(["plan"], 5), "plan must be a JSON object"),
        (_set(["plan", "engine"], "coreml"), "plan engine 'coreml' is unknown"),
        (_set(["plan", "train_from"], 9), "train_from=9 outside 0..cut=5"),
        (_set(["plan", "cut"], "5"), "malformed"),
        (_set(["plan", "colour"], "red"), "plan is malformed"),
        (_set(["trainable", 0, "shape"], 10), "malformed"),
        (_set(["trainable", 0], ["classifier.weight"]), "trainable tensor must be a JSON object"),
        (_set(["input_spec", "mean"], None), "malformed"),
    ],
)
def test_a_malformed_manifest_field_is_a_bundle_error_naming_the_manifest(bundle_dir, edit, expected):
    edit_manifest(bundle_dir, edit)
    message = refused(bundle_dir)
    assert str(bundle_dir / MANIFEST) in message
    assert expected in message
