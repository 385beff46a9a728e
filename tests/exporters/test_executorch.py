"""ExecuTorch export: programs that match eager PyTorch, train like it, come out byte-identical
each time, and parts ExecuTorch 1.5 would train wrongly refused before anything is written."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporters.executorch import check_trainable_on_executorch, export_executorch_inference, export_executorch_training
from toolkit.errors import ExportError


def _load(path, training: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import _load_for_executorch_for_training

        return (_load_for_executorch_for_training if training else _load_for_executorch)(str(path))


@pytest.fixture(scope="module")
def frozen_pte(small_cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("et") / "frozen.pte"
    return export_executorch_inference(small_cnn.part(0, 4), torch.zeros(1, 3, 32, 32), path)


# -- inference -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_inference_program_matches_eager(small_cnn, frozen_pte, batch):
    # Prepare
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    # Execute
    out = _load(frozen_pte).forward((x,))[0]
    # Assert
    with torch.no_grad():
        expected = small_cnn.part(0, 4)(x)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_inference_program_takes_at_most_max_batch(frozen_pte):
    program = _load(frozen_pte)
    assert program.method_meta("forward").input_tensor_meta(0).sizes() == (64, 3, 32, 32)
    with pytest.raises(RuntimeError):
        program.forward((torch.zeros(65, 3, 32, 32),))


def test_inference_export_is_deterministic(small_cnn, frozen_pte, tmp_path):
    again = export_executorch_inference(small_cnn.part(0, 4), torch.ones(5, 3, 32, 32), tmp_path / "again.pte")
    assert again.read_bytes() == frozen_pte.read_bytes()


def test_inference_export_failure_is_an_export_error(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # control flow on values: torch.export cannot capture it

    with pytest.raises(ExportError, match="use --engine ort"):
        export_executorch_inference(DataDependent(), torch.ones(2, 3), tmp_path / "bad.pte")


# -- training ------------------------------------------------------------------------------------
def _train_eager(module, xs, ys, lr=0.01, momentum=0.9):
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _train_executorch(program, xs, ys, lr=0.01, momentum=0.9):
    # torch.optim.SGD's rule in numpy, written into the program's own parameter tensors
    buffers, losses = {}, []
    for x, y in zip(xs, ys, strict=True):
        loss = program.forward_backward("forward", (x, y))[0]
        params = program.named_parameters()
        for name, grad in program.named_gradients().items():
            g = grad.numpy()
            buffers[name] = g.copy() if name not in buffers else momentum * buffers[name] + g
            params[name].copy_(torch.from_numpy(params[name].numpy() - lr * buffers[name]))
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_mobilenet_head_trains_like_eager(mobilenet, tmp_path):
    # Prepare: the real head on 1280-d features, ten SGD steps at batch 32
    head = mobilenet.part(20, 21)
    eager = copy.deepcopy(head)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 1280, generator=gen) for _ in range(10)]
    ys = [torch.randint(0, 10, (32,), generator=gen) for _ in range(10)]
    path = export_executorch_training(head, xs[0], tmp_path / "train.pte")
    program = _load(path, training=True)
    # Execute
    expected = _train_eager(eager.eval(), xs, ys)
    actual = _train_executorch(program, xs, ys)
    # Assert: same losses, same final weights, under the whole model's names
    np.testing.assert_allclose(actual, expected, rtol=1e-4)
    assert sorted(program.named_parameters()) == ["classifier.bias", "classifier.weight"]
    for name, p in eager.named_parameters():
        np.testing.assert_allclose(program.named_parameters()[name].numpy(), p.detach().numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def mlp_pte(tmp_path_factory):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10))
    return mlp, export_executorch_training(mlp, torch.zeros(4, 32), tmp_path_factory.mktemp("et") / "mlp.pte")


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_mlp_head_gradients_match_eager(mlp_pte, batch):
    # Prepare
    mlp, path = mlp_pte
    gen = torch.Generator().manual_seed(batch)
    x, y = torch.randn(batch, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    # Execute
    program = _load(path, training=True)
    loss, logits = program.forward_backward("forward", (x, y))
    # Assert (eval mode: dropout is off in the program)
    mlp.zero_grad()
    expected_logits = mlp.eval()(x)
    expected_loss = F.cross_entropy(expected_logits, y)
    expected_loss.backward()
    np.testing.assert_allclose(float(loss), expected_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(logits.numpy(), expected_logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    grads = program.named_gradients()
    assert sorted(grads) == sorted(n for n, _ in mlp.named_parameters())
    for name, p in mlp.named_parameters():
        np.testing.assert_allclose(grads[name].numpy(), p.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_training_export_is_deterministic(mlp_pte, tmp_path):
    mlp, first = mlp_pte
    second = export_executorch_training(mlp, torch.ones(9, 32), tmp_path / "again.pte")
    assert second.read_bytes() == first.read_bytes()


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mobilenet_blocks_with_conv_and_batchnorm_are_refused(mobilenet, tmp_path):
    path = tmp_path / "train.pte"
    with pytest.raises(ExportError) as info:
        export_executorch_training(mobilenet.part(17, 21), torch.zeros(1, 320, 1, 1), path)
    message = str(info.value)
    assert "features.17.conv.0.0 (Conv2d)" in message
    assert "features.17.conv.0.1 (BatchNorm2d)" in message
    assert "--engine ort" in message
    assert not path.exists()


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (nn.Conv2d(3, 4, 3), "Conv2d"),
        (nn.BatchNorm1d(4), "BatchNorm1d"),
        (nn.MaxPool2d(2), "max-pool backward gives wrong gradients"),
        (nn.AdaptiveAvgPool2d(1), "avg-pool backward is missing"),
    ],
)
def test_every_untrainable_layer_is_named(layer, reason):
    with pytest.raises(ExportError, match=reason):
        check_trainable_on_executorch(nn.Sequential(nn.Identity(), layer))


def test_small_cnn_conv_part_is_refused(small_cnn):
    with pytest.raises(ExportError, match=r"features\.2\.0 \(Conv2d\).*features\.2\.1 \(BatchNorm2d\)"):
        check_trainable_on_executorch(small_cnn.part(2, 5))


@pytest.mark.slow
def test_long_refusals_are_shortened(mobilenet):
    with pytest.raises(ExportError, match=r"and \d+ more"):
        check_trainable_on_executorch(mobilenet.part(15, 21))


def test_linear_heads_pass_the_check(small_cnn):
    check_trainable_on_executorch(small_cnn.part(4, 5))
    check_trainable_on_executorch(nn.Sequential(nn.Linear(4, 4), nn.ReLU6(), nn.Dropout(), nn.Linear(4, 2)))


def test_frozen_parameters_are_refused(tmp_path):
    head = nn.Linear(4, 2)
    head.bias.requires_grad_(False)
    with pytest.raises(ExportError, match="bias have requires_grad=False"):
        export_executorch_training(head, torch.zeros(2, 4), tmp_path / "t.pte")
