"""Early-exit models: the model id's exit positions, the frozen (taps) and trainable (exit) parts
against the whole exit model, per-exit costs, and the seeded branches."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from toolkit.errors import ModelError
from toolkit.models import ExitModel, load_model
from toolkit.models.exits import BRANCH_WIDTH, split_spec

SMALL = "small_cnn+exits:1,2"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)  # small_cnn's backbone is drawn from torch's global generator
    return load_model(SMALL)


def images(model, n=4, seed=1):
    return torch.randn(n, *model.input_shape, generator=torch.Generator().manual_seed(seed))


# -- model ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("mobilenet_v2+exits:7,11,14", ("mobilenet_v2", (7, 11, 14))),
        ("small_cnn+exits:2", ("small_cnn", (2,))),
        ("mobilenet_v2+exits", ("mobilenet_v2", ())),  # the default positions
        ("small_cnn", ("small_cnn", None)),  # no exits
    ],
)
def test_a_model_id_names_its_exit_positions(model_id, expected):
    assert split_spec(model_id) == expected


@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        ("small_cnn+exits;1", r"write small_cnn\+exits, or small_cnn\+exits:P,Q"),
        ("small_cnn+exits:1,x", "exit positions must be integers"),
    ],
)
def test_a_malformed_model_id_says_how_to_write_one(model_id, message):
    with pytest.raises(ModelError, match=message):
        load_model(model_id)


@pytest.mark.parametrize("positions", ["2,1", "1,1", "0", "4", "1,9"])
def test_exit_positions_outside_the_backbone_or_out_of_order_are_refused(positions):
    with pytest.raises(ModelError, match=r"give increasing positions between 1 and 3 \(position p is after block p-1"):
        load_model(f"small_cnn+exits:{positions}")


def test_the_loaded_model_names_its_positions_and_the_final_exit(small):
    assert isinstance(small, ExitModel)
    assert small.model_id == SMALL and small.branch_positions == (1, 2)
    assert small.exits == (1, 2, 5)  # the classifier is the final exit, at n = 5 blocks


def test_mobilenet_v2_exits_by_default_after_the_stages_between_30_and_90_percent_of_its_flops():
    model = load_model("mobilenet_v2+exits")

    assert model.exits == (7, 11, 14, 17, 21)
    assert model.model_id == "mobilenet_v2+exits:7,11,14,17"
    # a spatial map gets the 1x1 convolution, the 1x1 activation after block 16 only pooling and a linear layer
    assert isinstance(model.branch_module(7)[0], torch.nn.Conv2d) and model.branch_module(7)[0].out_channels == 128
    assert [type(m).__name__ for m in model.branch_module(17)] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]


# -- parts -----------------------------------------------------------------------------------


def test_held_exits_are_those_up_to_the_cut_and_a_cut_must_be_an_exit(small):
    assert [small.held_exits(cut) for cut in small.exits] == [(1,), (1, 2), (1, 2, 5)]
    with pytest.raises(ModelError, match=r"has exits at 1, 2, 5: a phone's cut must be one of them"):
        small.held_exits(3)


def test_the_whole_exit_part_gives_every_branch_and_the_model_its_own_logits(small):
    x = images(small)
    with torch.no_grad():
        logits = small.exit_part(0, 5)(x)
        expected = [small.branch_module(p)(small.part(0, p)(x)) for p in (1, 2)] + [small.forward(x)]

    assert logits.shape == (4, 3, 10)
    for i, want in enumerate(expected):
        torch.testing.assert_close(logits[:, i], want, rtol=1e-5, atol=1e-6, msg=f"exit {i}")


@pytest.mark.parametrize("stop", [1, 2, 5])
def test_a_frozen_part_then_an_exit_part_equal_the_whole_exit_part_at_every_start(small, stop):
    x = images(small)
    held = len(small.held_exits(stop))
    with torch.no_grad():
        whole = small.exit_part(0, 5)(x)[:, :held]
        for start in range(stop + 1):
            rows = small.frozen_part(start)(x)
            got = small.trainable_part(start, stop)(rows)
            torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6, msg=f"start {start}, stop {stop}")


def test_a_frozen_part_is_one_flat_row_of_its_taps_then_its_activation(small):
    x = images(small)
    with torch.no_grad():
        rows = small.frozen_part(3)(x)
        taps = [small.part(0, p)(x).flatten(1) for p in (1, 2, 3)]

    torch.testing.assert_close(rows, torch.cat(taps, dim=1))


def test_an_exit_part_holds_the_branches_it_runs_under_the_whole_models_names(small):
    names = {name for name, _ in small.trainable_part(2, 2).named_parameters()}

    assert names == {f"exits.{p}.{layer}.{kind}" for p in (1, 2) for layer in (0, 4) for kind in ("weight", "bias")}
    assert names <= {name for name, _ in small.root.named_parameters()}


def test_an_exit_part_must_stop_at_an_exit_at_or_after_its_start(small):
    with pytest.raises(ModelError, match="must be one of them"):
        small.exit_part(0, 3)
    with pytest.raises(ModelError, match="from block 3 to an exit at or after it"):
        small.exit_part(3, 2)


# -- costs and seeds -------------------------------------------------------------------------


def test_exit_stats_add_up_the_blocks_and_branches_before_each_exit(small):
    stats = small.exit_stats()
    shapes = {p: small.shape_at(p) for p in (1, 2)}
    # a 1x1 convolution to BRANCH_WIDTH channels over the map, then the linear layer: 2 FLOPs per multiply-add
    branch_flops = {p: 2 * c * BRANCH_WIDTH * h * w + 2 * BRANCH_WIDTH * 10 for p, (c, h, w) in shapes.items()}
    branch_params = {p: c * BRANCH_WIDTH + BRANCH_WIDTH + BRANCH_WIDTH * 10 + 10 for p, (c, _, _) in shapes.items()}
    blocks = small.stats

    assert [s.position for s in stats] == [1, 2, 5] and [s.block for s in stats] == [
        "features.0",
        "features.1",
        "classifier",
    ]
    assert [s.branch_flops for s in stats] == [branch_flops[1], branch_flops[2], 0]
    assert [s.branch_params for s in stats] == [branch_params[1], branch_params[2], 0]
    assert stats[0].flops == blocks[0].flops + branch_flops[1]
    assert stats[1].flops == blocks[0].flops + blocks[1].flops + branch_flops[1] + branch_flops[2]
    assert stats[2].flops == sum(b.flops for b in blocks) + branch_flops[1] + branch_flops[2]
    assert stats[2].params == sum(p.numel() for p in small.root.parameters())  # every block and branch
    assert all(a.flops < b.flops and a.params < b.params for a, b in pairwise(stats))


def test_branches_are_seeded_by_position_whatever_the_other_exits():
    def branch_2(model_id, seed=0):
        torch.manual_seed(0)
        state = load_model(model_id, seed=seed).branch_module(2).state_dict()
        return {k: v.clone() for k, v in state.items()}

    first, again, alone, other_seed = (
        branch_2(SMALL),
        branch_2(SMALL),
        branch_2("small_cnn+exits:2"),
        branch_2(SMALL, seed=1),
    )

    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
        torch.testing.assert_close(alone[name], first[name], rtol=0, atol=0)
    assert any(not torch.equal(other_seed[name], first[name]) for name in first)
