"""The bundle writer: what it writes, that the phone's loader accepts it and trains on it, that
the same inputs give the same bytes, and that every refusal leaves nothing behind.
Also `fedkit export`, the command over it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from device_runtime.bundle import MANIFEST, Bundle
from device_runtime.codec import decode
from device_runtime.engines import open_engine
from device_runtime.local_round import open_fed_part, through_fed
from device_runtime.manifest import DevicePlan
from device_runtime.optim import SGD
from exporters.bundle import export_bundle
from toolkit import __version__
from toolkit.cli import app
from toolkit.data import LABEL_NAMES
from toolkit.errors import ExportError, ModelError
from toolkit.models import load_model

ORT_ROLES = {"ort.training_model", "ort.eval_model", "ort.checkpoint"}


@pytest.fixture
def model():
    torch.manual_seed(0)  # the same small_cnn as the session's bundles (see conftest)
    return load_model("small_cnn")


def plan_for(model, cut=None, train_blocks=1, **kwargs) -> DevicePlan:
    cut = len(model.block_names) if cut is None else cut
    return DevicePlan(cut=cut, train_from=model.train_from(cut, train_blocks), **kwargs)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- what a bundle holds ---------------------------------------------------------------------------


def test_head_only_bundle_for_both_engines_holds_every_role_and_a_complete_manifest(small_cnn_bundle, model):
    root = small_cnn_bundle(engines=("ort", "executorch"))
    bundle = Bundle.load(root)
    manifest = bundle.manifest
    head = model.part(4, 5)

    assert (
        set(manifest.files)
        == {"frozen.onnx", "trainable.onnx", "weights", "executorch.frozen", "executorch.train"} | ORT_ROLES
    )
    assert manifest.engines == ("ort", "executorch", "numpy")  # numpy trains a linear head from these files
    assert manifest.model_id == "small_cnn" and manifest.model_hash == model.content_hash()
    assert manifest.plan == DevicePlan(cut=5, train_from=4)
    assert manifest.label_names == LABEL_NAMES
    assert (manifest.input_spec.channels, manifest.input_spec.height, manifest.input_spec.width) == model.input_shape
    assert [(t.name, t.shape, t.dtype) for t in manifest.trainable] == [
        (name, tuple(p.shape), "float32") for name, p in head.named_parameters()
    ]
    assert manifest.fedkit_version == __version__
    raw = json.loads((root / MANIFEST).read_text())
    assert raw["schema_version"] == 1
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(
        [MANIFEST] + [f.path for f in manifest.files.values()]
    )


def test_initial_weights_are_the_trainable_parameters_in_fp32(small_cnn_bundle, model):
    bundle = Bundle.load(small_cnn_bundle())
    expected = {t.name: t.shape for t in bundle.manifest.trainable}

    update = decode(bundle.path("weights").read_bytes(), expected=expected)

    assert update.header.kind == "weights" and update.header.base_version == 0 and update.header.round == 0
    assert set(update.encodings.values()) == {"fp32"}
    params = dict(model.root.named_parameters())
    for name, value in update.tensors.items():
        np.testing.assert_array_equal(value, params[name].detach().numpy())


def test_round_trip_export_load_one_step_changes_the_weights(small_cnn_bundle, model):
    bundle = Bundle.load(small_cnn_bundle())
    engine = open_engine(bundle)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, size=8)

    h = engine.features(x)
    np.testing.assert_allclose(
        engine.forward(h), model.forward(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5
    )
    before = engine.get_weights()
    loss, grads = engine.gradients(h, labels)
    engine.set_weights(SGD(lr=0.1).step(before, grads))
    after = engine.get_weights()

    assert np.isfinite(loss) and loss > 0
    assert all(not np.array_equal(before[name], after[name]) for name in before)


def test_splitfed_bundle_trains_the_blocks_before_the_cut(tmp_path, model):
    manifest = export_bundle(model, plan_for(model, cut=3, train_blocks=1), tmp_path / "b", label_names=LABEL_NAMES)

    assert manifest.is_splitfed
    assert set(manifest.files) == {"frozen.onnx", "trainable.onnx", "weights"} | ORT_ROLES
    assert [t.name for t in manifest.trainable] == [name for name, _ in model.part(2, 3).named_parameters()]
    engine = open_engine(Bundle.load(tmp_path / "b"))
    h = engine.features(np.zeros((2, 3, 32, 32), np.float32))
    grads = engine.backward_from(h, np.ones_like(engine.forward(h)))
    assert set(grads) == {t.name for t in manifest.trainable}


def test_nothing_frozen_means_no_frozen_file(tmp_path, model):
    plan = plan_for(model, train_blocks=4, encoding="layered:4")
    manifest = export_bundle(model, plan, tmp_path / "b", label_names=LABEL_NAMES)

    assert manifest.plan == plan and plan.train_from == 0
    assert "frozen.onnx" not in manifest.files
    assert [t.name for t in manifest.trainable] == [name for name, _ in model.root.named_parameters()]


@pytest.mark.parametrize("engine", ["ort", "executorch"])
def test_frozen_blocks_others_train_are_a_fed_part_that_runs_with_the_global_values(tmp_path, model, engine):
    # Prepare: a head-only bundle of a run whose deepest phone trains from block 1
    export_bundle(model, plan_for(model, engine=engine), tmp_path / "b", (engine,), label_names=LABEL_NAMES, fed_from=1)
    bundle = Bundle.load(tmp_path / "b")
    phone, fed_part = open_engine(bundle), open_fed_part(bundle)
    train_from = model.train_from(len(model.block_names), 1)
    x = torch.randn(5, *model.input_shape, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    global_model = {
        n: (p + 0.1 * torch.randn(p.shape, generator=g)).detach().numpy() for n, p in model.root.named_parameters()
    }

    # Execute
    frozen = phone.features(x.numpy())
    exported = through_fed(fed_part, frozen)
    fed = fed_part.feed(global_model)
    refreshed = through_fed(fed_part, frozen)

    # Verify: block 0 is frozen.onnx; blocks 1.. take the global values (BatchNorm statistics stay exported)
    assert {"frozen.onnx", "fed.onnx"} <= set(bundle.manifest.files)
    assert sorted(fed) == sorted(n for n, _ in model.part(1, train_from).named_parameters())
    with torch.no_grad():
        np.testing.assert_allclose(frozen, model.part(0, 1).eval()(x).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(exported, model.part(0, train_from).eval()(x).numpy(), rtol=1e-4, atol=1e-5)
        params = {n: torch.from_numpy(v) for n, v in fed.items()}
        expected = torch.func.functional_call(model.part(0, train_from).eval(), params, (x,))
    np.testing.assert_allclose(refreshed, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(refreshed - exported).max() > 1e-2


def test_fed_from_past_the_trainable_blocks_makes_no_fed_part(tmp_path, model):
    export_bundle(model, plan_for(model), tmp_path / "b", label_names=LABEL_NAMES, fed_from=len(model.block_names) - 1)
    bundle = Bundle.load(tmp_path / "b")
    assert "fed.onnx" not in bundle.manifest.files and open_fed_part(bundle) is None


def test_progress_reports_every_step_in_order_then_done(tmp_path, model):
    calls = []
    export_bundle(model, plan_for(model), tmp_path / "b", label_names=LABEL_NAMES, progress=lambda *a: calls.append(a))

    names = [name for name, _, _ in calls]
    assert names == [
        "frozen part → ONNX",
        "trainable part → ONNX",
        "ONNX Runtime training artifacts",
        "initial weights",
        "manifest",
        "done",
    ]
    assert [done for _, done, _ in calls] == list(range(len(calls)))
    assert {total for _, _, total in calls} == {len(calls) - 1}


# -- early exits -----------------------------------------------------------------------------------

EXITS = "small_cnn+exits:1,2"


@pytest.fixture
def exit_model():
    torch.manual_seed(0)
    return load_model(EXITS)


def exit_plan(model, cut, train_blocks=1, **kwargs) -> DevicePlan:
    """The plan of a phone stopping at exit ``cut``: it holds every exit up to it, each weighing 1 unless given."""
    exits = model.held_exits(cut)
    kwargs.setdefault("exit_weights", (1.0,) * len(exits))
    return DevicePlan(cut=cut, train_from=model.train_from(cut, train_blocks), exits=exits, **kwargs)


def test_an_exit_bundle_trains_every_held_branch_and_its_frozen_rows_carry_the_taps(tmp_path, exit_model):
    # Prepare: the final exit, the classifier training; the branches at 1 and 2 read taps
    plan = exit_plan(exit_model, 5, exit_weights=(0.5, 1.0, 2.0))

    # Execute
    manifest = export_bundle(exit_model, plan, tmp_path / "b", label_names=LABEL_NAMES, fed_from=1)

    # Assert
    bundle = Bundle.load(tmp_path / "b")
    assert bundle.manifest == manifest and manifest.plan == plan and manifest.has_exits
    assert manifest.model_id == EXITS and manifest.model_hash == exit_model.content_hash()
    assert set(manifest.files) == {"frozen.onnx", "trainable.onnx", "weights"} | ORT_ROLES  # fed_from ignored
    assert manifest.engines == ("ort",) and not manifest.is_splitfed
    trainable = [t.name for t in manifest.trainable]
    assert trainable == [name for name, _ in exit_model.trainable_part(4, 5).named_parameters()]
    assert {name.split(".")[1] for name in trainable if name.startswith("exits.")} == {"1", "2"}
    assert "classifier.weight" in trainable and not any(name.startswith("features.") for name in trainable)
    engine = open_engine(bundle)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    taps = 8 * 16 * 16 + 16 * 8 * 8  # the activations after blocks 0 and 1
    assert engine.features(x).shape == (3, taps + 32)  # and the pooled activation the classifier reads
    assert engine.forward(engine.features(x)).shape == (3, 3, 10)  # (batch, exits, classes)


def test_an_early_exit_phone_trains_its_branches_and_blocks_from_train_from(tmp_path, exit_model):
    # the exit at 2 with every block before it training: nothing frozen, two branches
    plan = exit_plan(exit_model, 2, train_blocks=2)
    manifest = export_bundle(exit_model, plan, tmp_path / "b", label_names=LABEL_NAMES)

    assert plan.train_from == 0 and "frozen.onnx" not in manifest.files
    assert {t.name for t in manifest.trainable} == {
        name
        for name, _ in exit_model.root.named_parameters()
        if name.split(".")[:2] in (["features", "0"], ["features", "1"], ["exits", "1"], ["exits", "2"])
    }


def test_a_phone_training_no_block_trains_its_branches_and_exports_the_same_bytes_twice(tmp_path, exit_model):
    a = export_bundle(exit_model, exit_plan(exit_model, 2, train_blocks=0), tmp_path / "a", label_names=LABEL_NAMES)
    b = export_bundle(exit_model, exit_plan(exit_model, 2, train_blocks=0), tmp_path / "b", label_names=LABEL_NAMES)

    assert a.plan.train_from == 2 and {t.name.rsplit(".", 2)[0] for t in a.trainable} == {"exits.1", "exits.2"}
    assert a == b and (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()


@pytest.mark.parametrize(
    ("plan", "engines", "message"),
    [
        (
            DevicePlan(cut=5, train_from=4),
            ("ort",),
            r"small_cnn\+exits:1,2 has exits: plan the phone with exits=\[1, 2, 5\]",
        ),
        (
            DevicePlan(cut=3, train_from=3, exits=(1, 2, 3), exit_weights=(1, 1, 1)),
            ("ort",),
            "a phone's cut must be one of them, not 3",
        ),
        (
            DevicePlan(cut=5, train_from=4, exits=(2, 5), exit_weights=(1, 1)),
            ("ort",),
            r"holds the exits at \[1, 2, 5\], but the plan names \[2, 5\]",
        ),
        (
            DevicePlan(cut=5, train_from=4, engine="executorch", exits=(1, 2, 5), exit_weights=(1, 1, 1)),
            ("executorch",),
            "ort engine only, not executorch: executorch cannot take the multi-exit loss",
        ),
        (
            DevicePlan(cut=5, train_from=4, exits=(1, 2, 5), exit_weights=(1, 1, 1)),
            ("ort", "numpy"),
            "ort engine only, not numpy: .*numpy trains one linear layer; use --engine ort",
        ),
    ],
)
def test_an_exit_request_that_does_not_fit_the_model_is_refused(tmp_path, exit_model, plan, engines, message):
    with pytest.raises(ExportError, match=message):
        export_bundle(exit_model, plan, tmp_path / "b", engines, label_names=LABEL_NAMES)
    assert leftovers(tmp_path) == []


def test_a_plan_with_exits_for_a_model_without_them_is_refused(tmp_path, model):
    plan = DevicePlan(cut=5, train_from=4, exits=(2, 5), exit_weights=(1, 1))

    with pytest.raises(ExportError, match=r"small_cnn has none: load the model with exits \(small_cnn\+exits"):
        export_bundle(model, plan, tmp_path / "b", label_names=LABEL_NAMES)
    assert leftovers(tmp_path) == []


# -- the same inputs, the same bytes ------------------------------------------------------------

_EXPORT_AGAIN = """
import sys, torch
from device_runtime.manifest import DevicePlan
from exporters.bundle import export_bundle
from toolkit.data import LABEL_NAMES
from toolkit.models import load_model
torch.manual_seed(0)
model = load_model("small_cnn")
export_bundle(model, DevicePlan(cut=5, train_from=4), sys.argv[1], ("ort", "executorch"), label_names=LABEL_NAMES)
"""


def test_exporting_twice_gives_identical_manifests_in_another_process(small_cnn_bundle, tmp_path):
    # Another process: a counter or a seed kept in a process cannot make two exports agree.
    first = small_cnn_bundle(engines=("ort", "executorch"))
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-c", _EXPORT_AGAIN, str(again)], check=True, capture_output=True)

    assert (again / MANIFEST).read_bytes() == (first / MANIFEST).read_bytes()
    assert Bundle.load(again).bundle_hash == Bundle.load(first).bundle_hash


def test_exporting_twice_in_one_process_gives_identical_manifests(tmp_path, model):
    a = export_bundle(model, plan_for(model, cut=3), tmp_path / "a", label_names=LABEL_NAMES)
    b = export_bundle(model, plan_for(model, cut=3), tmp_path / "b", label_names=LABEL_NAMES)

    assert a == b
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()


def test_other_weights_give_another_model_hash_and_weights_file(tmp_path, model):
    a = export_bundle(model, plan_for(model), tmp_path / "a", label_names=LABEL_NAMES)
    with torch.no_grad():
        model.root.classifier.bias.add_(1.0)
    b = export_bundle(model, plan_for(model), tmp_path / "b", label_names=LABEL_NAMES)

    assert a.model_hash != b.model_hash
    assert a.files["weights"].sha256 != b.files["weights"].sha256
    assert a.files["frozen.onnx"] == b.files["frozen.onnx"]  # the frozen part did not change


# -- refusals leave nothing behind ----------------------------------------------------------------


def test_executorch_refuses_a_trainable_conv_naming_it_and_suggesting_ort(tmp_path, model):
    with pytest.raises(ExportError, match=r"features\.2\.0 \(Conv2d\).*--engine ort"):
        export_bundle(
            model,
            plan_for(model, train_blocks=2, engine="executorch"),
            tmp_path / "b",
            ("executorch",),
            label_names=LABEL_NAMES,
        )
    assert leftovers(tmp_path) == []


def test_executorch_refuses_splitfed(tmp_path, model):
    with pytest.raises(ExportError, match=r"SplitFed.*--engine ort"):
        export_bundle(
            model, plan_for(model, cut=4, engine="executorch"), tmp_path / "b", ("executorch",), label_names=LABEL_NAMES
        )
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("plan", "engines", "labels", "message"),
    [
        (DevicePlan(cut=5, train_from=4, engine="executorch"), ("ort",), LABEL_NAMES, "plan runs engine 'executorch'"),
        (DevicePlan(cut=5, train_from=4), ("ort", "tflite"), LABEL_NAMES, "not a choice of ort, executorch"),
        (DevicePlan(cut=5, train_from=4), (), LABEL_NAMES, "not a choice"),
        (DevicePlan(cut=5, train_from=4), ("ort",), ("a", "b"), "2 label names given for a model with 10 classes"),
        (DevicePlan(cut=5, train_from=4, encoding="int3"), ("ort",), LABEL_NAMES, "update encoding 'int3' is unknown"),
        (DevicePlan(cut=5, train_from=4, encoding="layered:x"), ("ort",), LABEL_NAMES, "layered:BITS"),
        (DevicePlan(cut=5, train_from=4, encoding="layered:0.5"), ("ort",), LABEL_NAMES, "BITS >= 1"),
        (DevicePlan(cut=5, train_from=4, batch_size=0), ("ort",), LABEL_NAMES, "batch size is 0"),
        (
            DevicePlan(cut=4, train_from=3),
            ("ort",),
            LABEL_NAMES,
            r"blocks \[3, 4\) of small_cnn on the phone, which hold no parameters",
        ),
        (DevicePlan(cut=5, train_from=5), ("ort",), LABEL_NAMES, "nothing would train there"),
    ],
)
def test_a_request_that_cannot_be_exported_is_refused_before_anything_is_written(
    tmp_path, model, plan, engines, labels, message
):
    with pytest.raises(ExportError, match=message):
        export_bundle(model, plan, tmp_path / "b", engines, label_names=labels)
    assert leftovers(tmp_path) == []


def test_a_cut_outside_the_model_is_a_model_error(tmp_path, model):
    with pytest.raises(ModelError, match="cut 9 is not allowed"):
        export_bundle(model, DevicePlan(cut=9, train_from=4), tmp_path / "b", label_names=LABEL_NAMES)


def test_an_existing_folder_with_files_is_never_overwritten(tmp_path, model):
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    with pytest.raises(ExportError, match="already exists"):
        export_bundle(model, plan_for(model), out, label_names=LABEL_NAMES)
    assert leftovers(out) == ["notes.txt"]


def test_an_empty_existing_folder_receives_the_bundle(tmp_path, model):
    (tmp_path / "b").mkdir()
    manifest = export_bundle(model, plan_for(model), tmp_path / "b", label_names=LABEL_NAMES)
    assert Bundle.load(tmp_path / "b").manifest == manifest  # verified, and the one just exported


def test_an_export_interrupted_midway_leaves_no_half_written_bundle(tmp_path, model):
    def interrupt(step, done, total):
        if step == "ONNX Runtime training artifacts":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_bundle(model, plan_for(model), tmp_path / "b", label_names=LABEL_NAMES, progress=interrupt)
    assert leftovers(tmp_path) == []


# -- fedkit export --------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_export_writes_a_bundle_and_summarises_it(tmp_path):
    out = tmp_path / "phone"
    result = runner.invoke(
        app, ["export", "--model", "small_cnn", "--cut", "3", "--out", str(out), "--encoding", "int4"]
    )

    assert result.exit_code == 0, result.output
    manifest = Bundle.load(out).manifest
    assert manifest.plan == DevicePlan(cut=3, train_from=2, encoding="int4")
    for role, entry in manifest.files.items():
        assert role in result.stdout and entry.path in result.stdout
    assert (
        "trainable parameters" in result.stdout
        and f"{sum(np.prod(t.shape) for t in manifest.trainable):,}" in result.stdout
    )
    assert "2.0 KB per sample" in result.stdout  # features.2 gives 32 × 4 × 4 fp32 values


def test_cli_executorch_refusal_is_one_line_and_exit_1(tmp_path):
    out = tmp_path / "phone"
    result = runner.invoke(
        app, ["export", "--model", "small_cnn", "--train-blocks", "2", "--engine", "executorch", "--out", str(out)]
    )

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ExecuTorch 1.5 cannot train this part: features.2.0 (Conv2d)")
    assert "--engine ort" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cut", "9"], "cut 9 is not allowed for small_cnn"),
        (["--train-blocks", "7"], "--train-blocks must be between 0 and 4"),
        (["--model", "resnet"], "unknown model 'resnet'"),
    ],
)
def test_cli_bad_options_are_one_line_and_exit_1(tmp_path, args, message):
    result = runner.invoke(app, ["export", "--model", "small_cnn", *args, "--out", str(tmp_path / "phone")])

    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
