"""The search's report: ``OUT/report/index.html`` and its PNG plots, from ``OUT/search.json`` alone.

- the reward per controller step: every sampled network's, the step's mean, and the controller's
  moving-average baseline;
- validation accuracy against parameters for every sampled network, its Pareto front (no other
  network is both smaller and more accurate), the chosen network and the all-MobileNetV2 baseline;
- the chosen architecture as its block list: one box per pool coloured by family, an adapter box
  wherever the family changes;
- the finalists: the top networks by reward, re-evaluated with the final shared weights.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.ticker import MaxNLocator

from toolkit.nas.result import NetworkRecord, SearchResult
from toolkit.report import _pct, _table

FAMILY_COLOURS = {"mobilenet_v2": "tab:blue", "efficientnet_lite0": "tab:orange", "efficientnet_lite1": "tab:green"}
STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto} table{border-collapse:collapse;margin:1em 0}"
    " td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:90%} img{max-width:100%}"
)


def build_report(out_dir: str | Path, result: SearchResult | None = None) -> Path:
    """Writes ``OUT/report/index.html`` and its plots; returns the HTML's path."""
    out_dir = Path(out_dir)
    result = result or SearchResult.load(out_dir)
    folder = out_dir / "report"
    folder.mkdir(exist_ok=True)
    plot_rewards(result, folder / "rewards.png")
    plot_pareto(result, folder / "pareto.png")
    plot_architecture(result, folder / "architecture.png")
    page = folder / "index.html"
    page.write_text(render_html(result))
    return page


def pareto_front(records: list[NetworkRecord]) -> list[NetworkRecord]:
    """The networks no other beats on both counts (fewer or equal parameters and higher accuracy,
    or fewer parameters and equal accuracy), by parameters ascending; one per architecture."""
    best: dict[str, NetworkRecord] = {}
    for r in records:  # a network sampled twice: its best accuracy
        if r.arch_id not in best or r.accuracy > best[r.arch_id].accuracy:
            best[r.arch_id] = r
    front: list[NetworkRecord] = []
    for r in sorted(best.values(), key=lambda r: (r.params, -r.accuracy)):
        if not front or r.accuracy > front[-1].accuracy:
            front.append(r)
    return front


def plot_rewards(result: SearchResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter(
        [r.step for r in result.history],
        [r.reward for r in result.history],
        s=10,
        alpha=0.4,
        color="grey",
        label="each sampled network",
    )
    steps = [s.step for s in result.steps]
    ax.plot(steps, [s.mean_reward for s in result.steps], marker="o", markersize=3, label="step mean")
    ax.plot(steps, [s.max_reward for s in result.steps], linestyle=":", label="step best")
    baselines = [(s.step, s.baseline) for s in result.steps if s.baseline is not None]
    if baselines:
        ax.plot(*zip(*baselines, strict=True), linestyle="--", label="moving-average baseline")
    ax.axhline(result.chosen.reward, color="tab:red", linewidth=0.8, label="chosen (final re-evaluation)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("controller step" if result.strategy == "controller" else "step (random search)")
    ax.set_ylabel(f"reward ({result.reward_formula}, β = {result.beta})")
    ax.set_title(f"{result.name}: reward per step ({result.strategy})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pareto(result: SearchResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    points = ax.scatter(
        [r.params / 1e6 for r in result.history],
        [100 * r.accuracy for r in result.history],
        c=[r.step for r in result.history],
        cmap="viridis",
        s=14,
        alpha=0.8,
    )
    fig.colorbar(points, ax=ax, label="step sampled")
    front = pareto_front(result.history)
    ax.step(
        [r.params / 1e6 for r in front],
        [100 * r.accuracy for r in front],
        where="post",
        color="tab:red",
        marker="o",
        markerfacecolor="none",
        label="Pareto front (sampled)",
    )
    chosen = result.chosen
    ax.plot(
        chosen.params / 1e6,
        100 * chosen.val_accuracy,
        "r*",
        markersize=16,
        label=f"chosen {chosen.arch_id} (final re-evaluation)",
    )
    if result.baseline_network is not None:
        b = result.baseline_network
        ax.plot(b.params / 1e6, 100 * b.accuracy, "kD", markersize=8, label="all MobileNetV2 (final re-evaluation)")
    ax.axvline(result.baseline_params / 1e6, color="grey", linestyle=":", label="P (MobileNetV2's parameters)")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("every sampled network (shared weights of its step)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_architecture(result: SearchResult, path: Path) -> None:
    """The chosen network's block list, top to bottom: a box per pool in its family's colour, a
    white box for each adapter."""
    lines = result.chosen.description
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(lines) + 0.8))
    ax.set_xlim(0, 1)
    ax.set_ylim(len(lines), -0.6)
    ax.axis("off")
    for row, line in enumerate(lines):
        adapter = line.lstrip().startswith("adapter")
        family = next((f for f in FAMILY_COLOURS if f in line.split("(")[0]), None)
        colour = "white" if adapter or family is None else FAMILY_COLOURS[family]
        left, width = (0.12, 0.76) if adapter else (0.02, 0.96)
        ax.add_patch(
            plt.Rectangle(
                (left, row + 0.08), width, 0.84, facecolor=colour, alpha=1 if adapter else 0.35, edgecolor="black"
            )
        )
        ax.text(left + 0.01, row + 0.5, line.strip(), va="center", family="monospace", fontsize=8.5)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.35) for f, c in FAMILY_COLOURS.items() if f in result.families
    ]
    ax.legend(
        handles,
        [f for f in FAMILY_COLOURS if f in result.families],
        ncol=3,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        fontsize="small",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_html(result: SearchResult) -> str:
    c = result.chosen
    t = result.times
    b = result.baseline_network
    distinct = len({r.arch_id for r in result.history})
    facts: list[list[object]] = [
        ["chosen network", f"{c.arch_id}, saved as {c.model_id} (--model {c.model_id}) in {c.saved_to}"],
        [
            "reward",
            f"{c.reward:.4f} = {c.val_accuracy:.4f} · ({c.params:,} / {result.baseline_params:,})^(−{result.beta}/100)",
        ],
        ["validation accuracy (whole slice, final shared weights)", _pct(c.val_accuracy)],
        ["test accuracy (held-out slice)", _pct(c.test_accuracy)],
        [
            "parameters",
            f"{c.params:,} ({100 * c.params / result.baseline_params:.0f} % of P = {result.baseline_params:,})",
        ],
        ["forward MFLOPs per image (32×32)", f"{c.mflops:.2f}"],
        [
            "all-MobileNetV2 path, same shared weights",
            "–"
            if b is None
            else f"validation {_pct(b.accuracy)}, test {_pct(result.baseline_test_accuracy)}, reward {b.reward:.4f}, "
            f"{b.mflops:.2f} MFLOPs",
        ],
        ["reward formula", f"{result.reward_formula}, β = {result.beta} (toolkit/nas/reward.py says why)"],
        ["strategy, reward source", f"{result.strategy}, {result.reward_source}"],
        ["families", ", ".join(result.families)],
        [
            "sampled networks",
            f"{len(result.history)} ({distinct} distinct) over {len(result.steps)} steps, seed {result.seed}",
        ],
        [
            "warm-up",
            "mean training loss per 50 batches: " + (", ".join(f"{x:.2f}" for x in result.warmup_losses) or "–"),
        ],
        [
            "time",
            f"setup {t.setup_s:.0f} s, warm-up {t.warmup_s:.0f} s, search {t.search_s:.0f} s, final {t.final_s:.0f} s",
        ],
    ]
    finalists = [
        [
            i + 1,
            f.arch_id + (" (chosen)" if f.arch_id == c.arch_id else ""),
            f"{f.params / 1e6:.2f}",
            f"{f.mflops:.2f}",
            "–" if f.search_reward is None else f"{f.search_reward:.4f}",
            _pct(f.accuracy),
            f"{f.reward:.4f}",
        ]
        for i, f in enumerate(result.finalists)
    ]
    if b is not None:
        finalists.append(
            [
                "–",
                b.arch_id + " (all MobileNetV2)",
                f"{b.params / 1e6:.2f}",
                f"{b.mflops:.2f}",
                "–",
                _pct(b.accuracy),
                f"{b.reward:.4f}",
            ]
        )
    front = [
        [r.arch_id, f"{r.params / 1e6:.2f}", f"{r.flops / 1e6:.2f}", _pct(r.accuracy), f"{r.reward:.4f}", r.step]
        for r in pareto_front(result.history)
    ]
    steps = [
        [
            s.step,
            f"{s.mean_reward:.4f}",
            f"{s.max_reward:.4f}",
            "–" if s.baseline is None else f"{s.baseline:.4f}",
            "–" if s.entropy is None else f"{s.entropy:.2f}",
        ]
        for s in result.steps
    ]
    name = html.escape(result.name)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedkit search {name}</title>
<style>{STYLE}</style></head>
<body><h1>fedkit search {name}</h1>
{_table(["", ""], facts)}
<h2>Reward per step</h2><img src="rewards.png" alt="reward per step">
<h2>Accuracy against parameters</h2>
<p>Each point is a sampled network's validation accuracy when it was sampled (the shared weights of that step;
rewards use the first validation images only); the star and the diamond are re-evaluated on the whole
validation slice with the final shared weights.</p>
<img src="pareto.png" alt="validation accuracy against parameters">
<h2>The chosen architecture</h2><img src="architecture.png" alt="the chosen network's block list">
<h2>Top networks</h2>
<p>The {len(result.finalists)} distinct networks with the highest rewards during the search, re-evaluated with
the final shared weights on the whole validation slice; the highest reward is chosen.</p>
{_table(["rank", "network", "parameters (M)", "MFLOPs", "search reward", "validation accuracy", "reward"], finalists)}
<h2>Pareto front of the sampled networks</h2>
{_table(["network", "parameters (M)", "MFLOPs", "validation accuracy", "reward", "step"], front)}
<h2>Steps</h2>
{_table(["step", "mean reward", "best reward", "baseline after the step", "policy entropy (nats)"], steps)}
</body></html>
"""
