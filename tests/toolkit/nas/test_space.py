from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from toolkit.data import transform
from toolkit.errors import ModelError
from toolkit.models import load_model
from toolkit.nas.space import Supernet, baseline_params

MIXED = (0, 0, 1, 1, 0, 1, 0, 1, 0)


@pytest.fixture(scope="module")
def supernet(one_torch_thread):
    return Supernet()


@pytest.fixture(scope="module")
def three(one_torch_thread):
    return Supernet(("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1"))


@pytest.fixture(scope="module")
def images(fashion_train):
    return torch.from_numpy(transform(fashion_train.images[:96]))


def test_the_space_holds_n_to_the_l_networks(supernet, three):
    assert supernet.num_pools == 9
    assert supernet.pool_names == ["stem", *(f"stage{i}" for i in range(1, 8)), "head"]
    assert supernet.size() == 2**9
    assert three.size() == 3**9 == 19_683
    assert three.arch_id((2, 1, 0, 0, 1, 2, 2, 1, 0)) == "l1.l0.m2.m2.l0.l1.l1.l0.m2"
    # distinct choices are distinct networks
    ids = {three.arch_id(c) for c in itertools.product(range(3), repeat=4) for c in [(*c, 0, 0, 0, 0, 0)]}
    assert len(ids) == 81


@pytest.mark.parametrize("family", [0, 1, 2])
def test_a_one_family_network_is_that_familys_zoo_model(supernet, three, family):
    supernet = supernet if family < 2 else three
    name = supernet.families[family]
    zoo = load_model(name)  # same seed: same fresh head
    network = supernet.network((family,) * 9)
    assert len(network.block_names) == len(zoo.block_names)  # no adapters
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h_zoo, h_net = x, x
        for (_, ours), (_, theirs) in zip(network.blocks, zoo.blocks, strict=True):
            h_zoo, h_net = theirs(h_zoo), ours(h_net)
            torch.testing.assert_close(h_net, h_zoo, rtol=0, atol=0)
        torch.testing.assert_close(supernet(x, (family,) * 9), zoo.forward(x), rtol=0, atol=0)
    assert supernet.params((family,) * 9) == sum(p.numel() for p in zoo.root.parameters())


def test_adapters_sit_exactly_where_families_change(supernet):
    assert sum(1 for _ in supernet.adapters.modules() if isinstance(_, nn.Conv2d)) == 8 * 2
    rng = random.Random(0)
    for choice in [MIXED, (0,) * 9, (1, 0) * 4 + (1,)] + [tuple(rng.randrange(2) for _ in range(9)) for _ in range(20)]:
        names = supernet.block_names(choice)
        adapters = [n for n in names if n.startswith("adapters.")]
        changes = [i for i in range(8) if choice[i] != choice[i + 1]]
        short = ["m2", "l0"]
        assert adapters == [f"adapters.{i}.{short[choice[i]]}_{short[choice[i + 1]]}" for i in changes]
        for i in changes:  # right after pool i's last block
            assert names[supernet.layer_ends(choice)[i]] == adapters[changes.index(i)]
        described = [line for line in supernet.describe(choice) if "adapter" in line]
        assert len(described) == len(changes)


def test_least_squares_adapters_match_the_next_familys_own_activations(supernet, images):
    fit, held_out = images[:64], images[64:]
    acts = supernet.pool_outputs(held_out)

    def mismatch(adapter: nn.Conv2d, i: int, a: int, b: int) -> float:
        """Mean squared error against b's own activation, relative to that activation's variance."""
        with torch.no_grad():
            got, want = adapter(acts[a][i]), acts[b][i]
        return float(((got - want) ** 2).mean() / want.var(dim=(0, 2, 3)).mean())

    pairs = [(i, a, 1 - a) for i in range(8) for a in range(2)]
    torch.manual_seed(0)
    random_init = {p: mismatch(nn.Conv2d(acts[p[1]][p[0]].shape[1], acts[p[2]][p[0]].shape[1], 1), *p) for p in pairs}
    supernet.init_adapters(fit)
    fitted = {p: mismatch(supernet.adapter(*p), *p) for p in pairs}
    for p in pairs:
        assert fitted[p] < 0.5 * random_init[p], (p, fitted[p], random_init[p])
    # on images it was not fitted to, every adapter explains much of b's activation (measured:
    # 0.26 to 0.65 of its variance left, 0.43 on average; random 1.3 to 560)
    assert max(fitted.values()) < 0.75, fitted
    assert sum(fitted.values()) / len(fitted) < 0.5, fitted


def test_path_parameters_are_exactly_what_the_forward_uses(supernet, images):
    supernet.train()
    supernet.zero_grad(set_to_none=True)
    supernet(images[:4], MIXED).logsumexp(1).sum().backward()
    with_grad = {id(p) for p in supernet.parameters() if p.grad is not None}
    path = supernet.path_parameters(MIXED)
    assert {id(p) for p in path} == with_grad
    assert len(path) == len({id(p) for p in path})  # none twice
    assert all(p.grad.abs().sum() > 0 for p in path)
    supernet.zero_grad(set_to_none=True)
    supernet.eval()


def test_batchnorm_stays_in_eval_mode_when_the_supernet_trains(supernet, images):
    supernet.train()
    assert supernet.classifier.training
    assert not any(m.training for m in supernet.modules() if isinstance(m, nn.BatchNorm2d))
    before = supernet.m2.stage3[0].conv[0][1].running_mean.clone()
    with torch.no_grad():
        a, b = supernet(images[:8], MIXED), supernet(images[:8], MIXED)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(supernet.m2.stage3[0].conv[0][1].running_mean, before, rtol=0, atol=0)
    supernet.eval()


def test_the_standalone_network_is_the_supernets_path(supernet, images):
    for choice in [MIXED, (1, 0, 1, 0, 1, 0, 1, 0, 1)]:
        network = supernet.network(choice)
        assert network.block_names == supernet.block_names(choice)
        # the same parameter names, so weights copy by key
        ours = dict(network.root.named_parameters())
        assert set(ours) == {
            n for n, _ in supernet.named_parameters() if any(n.startswith(b + ".") for b in network.block_names)
        }
        assert supernet.params(choice) == sum(p.numel() for p in network.root.parameters())
        assert supernet.params(choice) == sum(p.numel() for p in supernet.path_parameters(choice))
        assert supernet.flops(choice) == sum(s.flops for s in network.stats)
        with torch.no_grad():
            torch.testing.assert_close(network.forward(images[:8]), supernet(images[:8], choice), rtol=1e-6, atol=1e-6)
        # a copy: training the network leaves the supernet as it was
        with torch.no_grad():
            next(iter(network.root.parameters())).add_(1.0)
            torch.testing.assert_close(network.forward(images[:2]) - network.forward(images[:2]), torch.zeros(2, 10))
        assert not torch.equal(next(iter(network.root.parameters())), supernet.path_parameters(choice)[0])


def test_too_few_proxy_images_are_refused(supernet, images):
    with pytest.raises(ModelError, match="at least 4 proxy images, got 3"):
        supernet.init_adapters(images[:3])


def test_sizes_and_names(supernet):
    assert baseline_params(10) == 2_236_682  # MobileNetV2's 2,223,872 + a 1280×10 classifier
    assert supernet.params((0,) * 9) == baseline_params(10)
    assert supernet.arch_id(MIXED) == "m2.m2.l0.l0.m2.l0.m2.l0.m2"
    assert supernet.parse_arch_id("m2.m2.l0.l0.m2.l0.m2.l0.m2") == MIXED
    lines = supernet.describe(MIXED)
    assert lines[0].startswith("stem") and "mobilenet_v2" in lines[0]
    assert any("stage3" in line and "MBConv k5" in line and "24→40" in line for line in lines)
    with pytest.raises(ModelError, match=r"give 9 family indices, each 0\.\.1"):
        supernet.params((0, 1, 2, 0, 0, 0, 0, 0, 0))
    with pytest.raises(ModelError, match="give 9 family indices"):
        supernet.arch_id((0, 1))
    with pytest.raises(ModelError, match="write 9 of m2, l0 joined by dots"):
        supernet.parse_arch_id("m2.l1.m2")
    with pytest.raises(ModelError, match="two or more distinct ones"):
        Supernet(("mobilenet_v2", "resnet50"))
