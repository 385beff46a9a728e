"""exporters.onnx: a model part → one ONNX file that ONNX Runtime runs as PyTorch does."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from exporters.onnx import MAX_IR_VERSION, export_onnx
from toolkit.errors import ExportError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCHES = (1, 7, 64)


def part_and_inputs(model, start: int, stop: int, batch: int = 64):
    """The part and a batch of the activations it receives inside the whole model."""
    x = torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.part(start, stop), model.part(0, start)(x)


def run_onnx(path, h: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": h.numpy()})[0]


@pytest.mark.parametrize(
    "model_name, start, stop, for_training",
    [
        pytest.param("mobilenet", 0, 18, False, id="mobilenet-frozen-0-18"),
        pytest.param("mobilenet", 18, 21, False, id="mobilenet-trainable-18-21"),
        pytest.param("mobilenet", 18, 21, True, id="mobilenet-trainable-18-21-for-training"),
        pytest.param("small_cnn", 0, 5, False, id="small_cnn-whole"),
        pytest.param("small_cnn", 0, 5, True, id="small_cnn-whole-for-training"),
    ],
)
def test_onnx_equals_pytorch_at_any_batch(request, tmp_path, model_name, start, stop, for_training):
    # Prepare: exported from a batch of 2, run at other batch sizes
    model = request.getfixturevalue(model_name)
    part, h = part_and_inputs(model, start, stop)

    # Execute
    path = export_onnx(part, h[:2], tmp_path / "part.onnx", for_training=for_training)

    # Assert
    assert path == tmp_path / "part.onnx"
    for batch in BATCHES:
        with torch.no_grad():
            expected = part(h[:batch]).numpy()
        np.testing.assert_allclose(run_onnx(path, h[:batch]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("for_training", [False, True], ids=["inference", "for-training"])
def test_the_file_passes_the_full_checker_with_our_names(tmp_path, mobilenet, for_training):
    part, h = part_and_inputs(mobilenet, 17, 21, batch=2)

    model = onnx.load(str(export_onnx(part, h, tmp_path / "part.onnx", for_training=for_training)))

    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= MAX_IR_VERSION
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    initializers = {i.name for i in model.graph.initializer}
    assert {name for name, _ in part.named_parameters()} <= initializers  # whole-model names, none folded away
    has_batchnorm = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert has_batchnorm != for_training


@pytest.mark.parametrize("for_training", [False, True], ids=["inference", "for-training"])
@pytest.mark.parametrize("model_name, start, stop", [("mobilenet", 17, 21), ("small_cnn", 0, 5)])
def test_exporting_twice_gives_the_same_bytes(request, tmp_path, model_name, start, stop, for_training):
    model = request.getfixturevalue(model_name)
    part, h = part_and_inputs(model, start, stop, batch=2)

    first = export_onnx(part, h, tmp_path / "a.onnx", for_training=for_training).read_bytes()
    second = export_onnx(part, h, tmp_path / "b.onnx", for_training=for_training).read_bytes()

    assert first == second


def test_export_leaves_every_module_in_its_mode(tmp_path, small_cnn):
    # parts share modules with the whole model: exporting must not flip the caller's modes
    part, h = part_and_inputs(small_cnn, 0, 5, batch=4)
    part.train()
    small_cnn.root.features[1].eval()
    before = {name: m.training for name, m in part.named_modules()}

    try:
        path = export_onnx(part, h, tmp_path / "part.onnx")
        after = {name: m.training for name, m in part.named_modules()}
    finally:
        small_cnn.root.eval()

    assert after == before
    with torch.no_grad():
        expected = part(h).numpy()  # eval mode again: the export used it too
    np.testing.assert_allclose(run_onnx(path, h), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_forward_is_restored_after_export(tmp_path, small_cnn):
    part, h = part_and_inputs(small_cnn, 0, 1, batch=2)

    export_onnx(part, h, tmp_path / "part.onnx", for_training=True)

    assert all("forward" not in vars(m) for m in part.modules())


def test_tensors_of_equal_value_keep_their_own_initializers(tmp_path):
    # fresh BatchNorms: bias == running_mean == 0 and weight == running_var == 1, in both layers
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    tensors = {name for name in module.state_dict() if not name.endswith("num_batches_tracked")}

    for for_training in (False, True):
        model = onnx.load(
            str(export_onnx(module, torch.zeros(2, 3, 8, 8), tmp_path / "m.onnx", for_training=for_training))
        )

        assert {init.name for init in model.graph.initializer} == tensors
        assert not any(node.op_type == "Identity" for node in model.graph.node)


def test_a_part_that_cannot_run_on_the_example_is_refused(tmp_path, small_cnn):
    part, _ = part_and_inputs(small_cnn, 0, 5, batch=2)

    with pytest.raises(ExportError, match="could not export SubModel"):
        export_onnx(part, torch.zeros(2, 5, 32, 32), tmp_path / "part.onnx")
    assert not (tmp_path / "part.onnx").exists()


def test_a_batchnorm_without_running_statistics_is_refused_for_training(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))

    with pytest.raises(ExportError, match="no affine weight or no running statistics"):
        export_onnx(module, torch.zeros(2, 3, 8, 8), tmp_path / "part.onnx", for_training=True)
