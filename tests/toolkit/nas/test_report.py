"""The search report from a search.json: its plots and tables, and the Pareto front against brute force."""

from __future__ import annotations

import itertools
import random

from toolkit.nas.report import build_report, pareto_front
from toolkit.nas.result import (
    RESULT_FILE,
    ChosenNetwork,
    Finalist,
    NetworkRecord,
    SearchResult,
    StepRecord,
    Times,
)

P = 2_236_682
IDS = [
    "m2.m2.m2.m2.m2.m2.m2.m2.m2",
    "l0.l0.l0.l0.l0.l0.l0.l0.l0",
    "m2.l0.m2.l0.m2.l0.m2.l0.m2",
    "l0.m2.l0.l0.m2.l0.m2.l0.m2",
]


def _record(step: int, sample: int, arch_id: str, params: int, accuracy: float) -> NetworkRecord:
    choice = tuple(0 if part == "m2" else 1 for part in arch_id.split("."))
    return NetworkRecord(
        step=step,
        sample=sample,
        choice=choice,
        arch_id=arch_id,
        params=params,
        flops=12_000_000,
        accuracy=accuracy,
        reward=accuracy * (params / P) ** -0.07,
        train_loss=1.0,
    )


def _result(tmp_path) -> SearchResult:
    rng = random.Random(0)
    history = [
        _record(s, i, arch := rng.choice(IDS), 2_000_000 + 400_000 * IDS.index(arch), rng.uniform(0.2, 0.8))
        for s in range(1, 6)
        for i in range(3)
    ]
    best = max(history, key=lambda r: r.reward)
    finalist = Finalist(
        arch_id=best.arch_id,
        choice=best.choice,
        params=best.params,
        mflops=12.0,
        search_reward=best.reward,
        accuracy=0.8,
        reward=0.8 * (best.params / P) ** -0.07,
    )
    return SearchResult(
        name="t",
        strategy="controller",
        reward_source="server",
        families=("mobilenet_v2", "efficientnet_lite0"),
        seed=0,
        reward_formula="R = Acc · (p / P)^(−β/100)",
        beta=7,
        baseline_params=P,
        chosen=ChosenNetwork(
            arch_id=best.arch_id,
            choice=best.choice,
            description=[
                "stem    efficientnet_lite0 conv 3×3 3→32 stride 2",
                "  adapter 1×1 conv 32→32 (efficientnet_lite0 → mobilenet_v2)",
                "stage1  mobilenet_v2       1× MBConv k3 e1 32→16",
                "classifier 1280→10",
            ],
            blocks=["l0.stem", "adapters.0.l0_m2", "m2.stage1.0", "pool", "classifier"],
            params=best.params,
            mflops=12.0,
            val_accuracy=0.8,
            test_accuracy=0.79,
            reward=finalist.reward,
            model_id="nas:t",
            saved_to="models/t",
        ),
        finalists=[finalist],
        baseline_network=None,
        baseline_test_accuracy=None,
        warmup_losses=[2.3, 2.1],
        history=history,
        steps=[
            StepRecord(step=s, mean_reward=0.5, max_reward=0.6, baseline=0.5, entropy=6.0, loss=0.01)
            for s in range(1, 6)
        ],
        times=Times(setup_s=1, warmup_s=2, search_s=3, final_s=4),
        out_dir=str(tmp_path),
        report=str(tmp_path / "report" / "index.html"),
    )


def test_the_pareto_front_is_what_nothing_else_beats():
    rng = random.Random(1)
    records = [
        _record(1, i, f"n{i}", rng.choice([1, 2, 3, 4, 5]) * 1_000_000, round(rng.uniform(0, 1), 2)) for i in range(60)
    ]

    front = pareto_front(records)

    def dominated(r: NetworkRecord) -> bool:
        return any(
            (o.params <= r.params and o.accuracy > r.accuracy) or (o.params < r.params and o.accuracy >= r.accuracy)
            for o in records
        )

    assert {r.arch_id for r in front} == {r.arch_id for r in records if not dominated(r)} - _ties(records, front)
    assert [r.params for r in front] == sorted(r.params for r in front)
    assert all(a.accuracy < b.accuracy for a, b in itertools.pairwise(front))


def _ties(records: list[NetworkRecord], front: list[NetworkRecord]) -> set[str]:
    """Networks equal to a front member on both counts: the front keeps one of each."""
    kept = {(r.params, r.accuracy) for r in front}
    return {r.arch_id for r in records if (r.params, r.accuracy) in kept and r not in front}


def test_the_report_has_its_plots_and_tables(tmp_path):
    result = _result(tmp_path)
    (tmp_path / RESULT_FILE).write_text(result.model_dump_json())

    page = build_report(tmp_path)  # from search.json alone

    html = page.read_text()
    for png in ("rewards.png", "pareto.png", "architecture.png"):
        assert (page.parent / png).stat().st_size > 5000
        assert f'src="{png}"' in html
    assert result.chosen.arch_id in html and "nas:t" in html
    assert "R = Acc · (p / P)^(−β/100), β = 7" in html
    assert html.count("<tr>") >= 1 + len(result.finalists) + len(result.steps)
