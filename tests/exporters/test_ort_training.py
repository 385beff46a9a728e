"""exporters.ort_training: the files ONNX Runtime trains a part with. That the engine trains
with them exactly as PyTorch does is tested in tests/device_runtime/test_engine_ort.py."""

import onnx
import pytest
import torch

from exporters.onnx import MAX_IR_VERSION
from exporters.ort_training import FILES, GRAD_OUTPUT_NAME, TARGETS_NAME, export_ort_training
from toolkit.errors import ExportError
from toolkit.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_exits():
    return load_model("small_cnn+exits:1,2")


def part_and_example(model, start: int, stop: int):
    x = torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.trainable_part(start, stop), model.frozen_part(start)(x)


def mode_part(mode: str, small_cnn, small_exits):
    """The part each mode trains: small_cnn's last blocks, a split part, an exit part of blocks 1..4 and 3 branches."""
    if mode == "exits":
        return part_and_example(small_exits, 1, 5)
    return part_and_example(small_cnn, 1, 3 if mode == "splitfed" else 5)


def input_names(path) -> list[str]:
    return [i.name for i in onnx.load(str(path)).graph.input]


@pytest.mark.parametrize(
    "mode, user_inputs",
    [
        ("classify", ["input", "labels"]),
        ("splitfed", ["input", GRAD_OUTPUT_NAME]),
        ("exits", ["input", TARGETS_NAME]),
    ],
)
def test_writes_the_three_roles(tmp_path, small_cnn, small_exits, mode, user_inputs):
    # Prepare: blocks 1..2 of small_cnn (conv + BatchNorm) train, and the branches of an exit part
    part, h = mode_part(mode, small_cnn, small_exits)
    params = [name for name, _ in part.named_parameters()]

    # Execute
    paths = export_ort_training(part, h, tmp_path / "out", mode=mode)

    # Assert
    assert paths == {role: tmp_path / "out" / name for role, name in FILES.items()}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    training = onnx.load(str(paths["ort.training_model"]))
    evaluation = onnx.load(str(paths["ort.eval_model"]))
    assert training.ir_version <= MAX_IR_VERSION and evaluation.ir_version <= MAX_IR_VERSION
    assert input_names(paths["ort.training_model"])[:2] == user_inputs
    # the eval model is the forward alone: features in, the part's output out
    assert input_names(paths["ort.eval_model"])[0] == "input"
    assert set(params) <= set(input_names(paths["ort.eval_model"]))
    assert [o.name for o in evaluation.graph.output] == ["output"]
    # every parameter gets a gradient; BatchNorm stays an affine of its running statistics
    grads = {o.name for o in training.graph.output}
    assert {f"{name}_grad.accumulation.out" for name in params} <= grads
    assert not any("BatchNorm" in n.op_type for n in training.graph.node)


def test_splitfed_grad_output_is_shaped_like_the_output(tmp_path, small_cnn):
    part, h = part_and_example(small_cnn, 1, 3)

    training = onnx.load(str(export_ort_training(part, h, tmp_path, mode="splitfed")["ort.training_model"]))

    grad_output = next(i for i in training.graph.input if i.name == GRAD_OUTPUT_NAME)
    dims = [d.dim_param or d.dim_value for d in grad_output.type.tensor_type.shape.dim]
    assert dims == ["batch", *part(h).shape[1:]]


def test_exits_targets_are_float_and_shaped_like_the_stacked_logits(tmp_path, small_exits):
    part, h = part_and_example(small_exits, 1, 5)

    training = onnx.load(str(export_ort_training(part, h, tmp_path, mode="exits")["ort.training_model"]))

    targets = next(i for i in training.graph.input if i.name == TARGETS_NAME)
    dims = [d.dim_param or d.dim_value for d in targets.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 10]  # (batch, exits, classes)
    assert targets.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert "LogSoftmax" in {n.op_type for n in training.graph.node}


@pytest.mark.parametrize("mode", ["classify", "splitfed", "exits"])
def test_exporting_twice_gives_the_same_bytes(tmp_path, small_cnn, small_exits, mode):
    part, h = mode_part(mode, small_cnn, small_exits)

    first = export_ort_training(part, h, tmp_path / "a", mode=mode)
    second = export_ort_training(part, h, tmp_path / "b", mode=mode)

    for role in FILES:
        assert first[role].read_bytes() == second[role].read_bytes(), role


def test_an_unknown_mode_is_refused(tmp_path, small_cnn):
    part, h = part_and_example(small_cnn, 4, 5)

    with pytest.raises(ExportError, match="unknown ORT training mode 'regress'"):
        export_ort_training(part, h, tmp_path, mode="regress")


def test_a_part_without_parameters_is_refused(tmp_path, small_cnn):
    part, h = part_and_example(small_cnn, 3, 4)  # the pooling block

    with pytest.raises(ExportError, match="no parameters to train"):
        export_ort_training(part, h, tmp_path, mode="splitfed")
    assert not any(tmp_path.iterdir())


def test_a_parameter_outside_the_forward_pass_is_refused(tmp_path):
    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(4, 3)
            self.unused = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ExportError, match=r"lost parameters \['unused\.bias', 'unused\.weight'\]"):
        export_ort_training(Unused(), torch.zeros(2, 4), tmp_path)
