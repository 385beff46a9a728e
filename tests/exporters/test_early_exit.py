"""The early-exit exporter: one ONNX segment per exit up to ``stop``, the index's FLOPs from the
model's own exit statistics, the model's current weights, the same bytes every time, and every
refusal before any file is written."""

import json

import numpy as np
import onnx
import pytest
import torch
from early_exit_helpers import MODEL_ID, torch_logits

from device_runtime.early_exit import INDEX, EarlyExitPredictor
from exporters.early_exit import export_early_exit
from exporters.errors import ExportError
from toolkit.data import LABEL_NAMES
from toolkit.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _output_width(path) -> int:
    return onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim[1].dim_value


def test_one_segment_per_exit_with_the_models_flops(tmp_path):
    # Prepare
    model = load_model(MODEL_ID)
    stats = model.exit_stats()

    # Execute
    index = export_early_exit(model, tmp_path / "ee", label_names=LABEL_NAMES)

    # Assert
    assert index.exits == (1, 2, 5) and index.model_id == MODEL_ID and index.label_names == tuple(LABEL_NAMES)
    assert index.model_hash == model.content_hash()
    assert [s.input_shape for s in index.segments] == [(3, 32, 32), (8, 16, 16), (16, 8, 8)]
    assert [s.flops for s in index.segments] == [s.flops for s in stats]
    # each exit alone: the blocks before it and its own branch; the final one is the plain model
    assert [s.alone_flops for s in index.segments] == [
        sum(b.flops for b in model.stats[: s.position]) + s.branch_flops for s in stats
    ]
    assert index.segments[-1].alone_flops == sum(b.flops for b in model.stats)
    # a segment returns the exit's logits and the activation the next one reads; the last, logits alone
    widths = [_output_width(tmp_path / "ee" / s.file.path) for s in index.segments]
    assert widths == [10 + 8 * 16 * 16, 10 + 16 * 8 * 8, 10]
    assert json.loads((tmp_path / "ee" / INDEX).read_text()) == index.to_dict()


def test_the_same_model_exports_the_same_bytes(tmp_path):
    model = load_model(MODEL_ID)

    export_early_exit(model, tmp_path / "a", label_names=LABEL_NAMES)
    export_early_exit(model, tmp_path / "b", label_names=LABEL_NAMES)

    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(files) == 4
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_the_models_current_weights_are_exported(tmp_path, fashion_test):
    # Prepare: weights that differ from the zoo's, as a global model merged in does
    model = load_model(MODEL_ID)
    with torch.no_grad():
        for name, tensor in model.root.state_dict().items():
            if name.startswith(("exits.", "classifier.", "features.1.")) and tensor.dtype == torch.float32:
                tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))
    images = fashion_test.images[:64]

    # Execute
    export_early_exit(model, tmp_path / "ee", label_names=LABEL_NAMES)

    # Assert
    logits = EarlyExitPredictor(tmp_path / "ee").logits(images)
    np.testing.assert_allclose(logits, torch_logits(model, images), atol=1e-4)
    assert not np.allclose(logits, torch_logits(load_model(MODEL_ID), images), atol=1e-2)


def test_stop_ends_the_folder_at_an_earlier_exit(tmp_path, fashion_test):
    model = load_model(MODEL_ID)
    stats = model.exit_stats()

    index = export_early_exit(model, tmp_path / "ee", label_names=LABEL_NAMES, stop=2)

    assert index.exits == (1, 2)
    assert index.segments[-1].alone_flops == sum(b.flops for b in model.stats[:2]) + stats[1].branch_flops
    assert _output_width(tmp_path / "ee" / index.segments[-1].file.path) == 10  # the branch's logits alone
    images = fashion_test.images[:32]
    np.testing.assert_allclose(
        EarlyExitPredictor(tmp_path / "ee").logits(images), torch_logits(model, images)[:, :2], atol=1e-4
    )


@pytest.mark.parametrize(
    "model_id, kwargs, message",
    [
        ("small_cnn", {}, "small_cnn has no early exits: train and export a model with them"),
        (MODEL_ID, {"stop": 3}, "stop 3 is not an exit of small_cnn.exits:1,2: choose one of 1, 2, 5"),
        (MODEL_ID, {"label_names": ["a", "b"]}, "2 label names given for a model with 10 classes"),
    ],
)
def test_refusals_leave_no_folder(tmp_path, model_id, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_early_exit(load_model(model_id), tmp_path / "ee", **{"label_names": LABEL_NAMES, **kwargs})

    assert list(tmp_path.iterdir()) == []


def test_a_folder_in_use_is_refused(tmp_path):
    (tmp_path / "ee").mkdir()
    (tmp_path / "ee" / "keep.txt").write_text("mine")

    with pytest.raises(ExportError, match="already exists"):
        export_early_exit(load_model(MODEL_ID), tmp_path / "ee", label_names=LABEL_NAMES)

    assert [p.name for p in (tmp_path / "ee").iterdir()] == ["keep.txt"]
