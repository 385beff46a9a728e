"""The search end to end on a tiny config (a few images and batches): what it records, what it
saves, and a search stopped mid-step that continues to exactly the uninterrupted run's result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toolkit.errors import ConfigError
from toolkit.models import load_model
from toolkit.nas.config import parse_nas
from toolkit.nas.result import SearchResult
from toolkit.nas.search import STATE_FILE, SearchProgress, ServerValidator, load_slices, run_search
from toolkit.nas.space import Supernet

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"train_images": 64, "val_images": 24, "test_images": 20, "adapter_images": 16},
    "supernet": {"warmup_batches": 2, "batch_size": 8, "batches_per_network": 1, "eval_images": 16},
    "controller": {"steps": 3, "samples_per_step": 2},
    "final": {"top_k": 3},
}


class Stop(Exception):
    """Stands in for a kill: raised from the progress callback."""


@pytest.fixture(scope="module")
def config():
    return parse_nas(TINY)


@pytest.fixture(scope="module")
def whole(config, tmp_path_factory, one_torch_thread) -> SearchResult:
    """The uninterrupted search."""
    return run_search(config, tmp_path_factory.mktemp("whole") / "search")


def test_every_sampled_network_is_recorded_and_the_best_reward_is_chosen(whole, config):
    assert len(whole.history) == config.controller.steps * config.controller.samples_per_step
    assert [(r.step, r.sample) for r in whole.history] == [(s, i) for s in (1, 2, 3) for i in (0, 1)]
    assert [s.step for s in whole.steps] == [1, 2, 3]
    assert all(s.baseline is not None and s.entropy is not None for s in whole.steps)
    for r in whole.history:
        assert r.reward == pytest.approx(r.accuracy * (r.params / whole.baseline_params) ** -0.07)
    # the finalists: the top distinct networks by search reward; the chosen one has the best final reward
    distinct = {r.arch_id for r in whole.history}
    assert len(whole.finalists) == min(3, len(distinct))
    assert whole.chosen.arch_id == whole.finalists[0].arch_id
    assert whole.chosen.reward == max(f.reward for f in whole.finalists)
    assert whole.baseline_network is not None and whole.baseline_network.arch_id == "m2." * 8 + "m2"
    assert whole.times.setup_s > 0 and whole.times.search_s > 0 and whole.times.final_s > 0


def test_the_chosen_network_is_saved_and_loads_by_name_with_the_final_shared_weights(whole, config):
    network = load_model("nas:tiny")
    data = load_slices(config)

    # its accuracy on the validation slice is the one the search measured on the supernet's path
    with torch.no_grad():
        predicted = network.forward(data.val_x).argmax(1)
    assert (predicted == data.val_y).float().mean().item() == pytest.approx(whole.chosen.val_accuracy)
    # and it is the supernet of the saved state, on the chosen path
    supernet = Supernet(config.families, seed=config.seed, pretrained=False)
    state = torch.load(f"{whole.out_dir}/{STATE_FILE}", weights_only=False)
    supernet.load_state_dict(state["supernet"])
    assert (
        ServerValidator(data.test_x, data.test_y).accuracy(supernet, whole.chosen.choice) == whole.chosen.test_accuracy
    )
    assert network.block_names == whole.chosen.blocks
    assert sum(p.numel() for p in network.root.parameters()) == whole.chosen.params
    # search.json is the result, and the report is written
    assert SearchResult.load(whole.out_dir) == whole
    folder = Path(whole.chosen.saved_to)
    saved = json.loads((folder / "architecture.json").read_text())
    assert folder.name == "tiny" and saved["extra"]["reward"] == whole.chosen.reward
    assert Path(whole.report).is_file()


def test_a_search_stopped_mid_step_continues_to_the_uninterrupted_result(whole, config, tmp_path):
    out = tmp_path / "search"
    seen = []

    def stop_in_step_2(p: SearchProgress) -> None:
        seen.append(p)
        # the second report with one step done: step 2's first network has trained and been measured
        if p.phase == "search" and sum(1 for q in seen if q.phase == "search" and q.done == 1) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_search(config, out, progress=stop_in_step_2)
    assert (out / STATE_FILE).exists() and not (out / "search.json").exists()

    resumed = run_search(config, out)

    assert [(r.choice, r.accuracy, r.reward) for r in resumed.history] == [
        (r.choice, r.accuracy, r.reward) for r in whole.history
    ]
    assert resumed.steps == whole.steps
    assert resumed.finalists == whole.finalists
    assert resumed.chosen.test_accuracy == whole.chosen.test_accuracy


def test_a_folder_of_another_search_or_of_anything_else_is_refused(whole, config, tmp_path):
    other = parse_nas({**TINY, "seed": 4, "controller": {"steps": 5, "samples_per_step": 2}})
    with pytest.raises(ConfigError, match=r"another config \(differing: controller.steps, seed\)"):
        run_search(other, whole.out_dir)

    (tmp_path / "mine.txt").write_text("someone's file\n")
    with pytest.raises(ConfigError, match="not a search folder"):
        run_search(config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
