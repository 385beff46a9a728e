"""The report of a simulated run: ``report/index.html`` and its PNG plots, rebuilt from the run
folder alone (``fedkit report RUN_DIR``).

Plots: accuracy per round against the centralized reference; uplink bytes per round by phone
class; a timeline per phone (train, upload, download, wait, offline, killed); and the plan
table. Per round: the slowest phone's own compute and, SplitFed, the edge's compute and the
activation and gradient bytes. Everything is read from ``summary.json``, ``metrics.jsonl``, ``plan.json``,
``faults.jsonl`` and ``phones/*/events.jsonl``.

An exit model's run adds an "Exits" section: accuracy per exit per round, each phone's exit, the
best exit-point version the aggregator kept (the patent's S5.5), and the accuracy-vs-compute
curve of early-exit inference over confidence thresholds (``device_runtime.early_exit``'s
``early_exit_curve``, on the final global model's test logits in ``exit_logits.npz``) beside
the final exit alone.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

from toolkit.simulation.summary import ExitLogits, RunSummary

SPAN_COLOURS = {
    "train": "tab:blue",
    "upload": "tab:orange",
    "download": "tab:green",
    "wait": "lightgrey",
    "offline": "black",
    "killed": "tab:red",
}


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    summary = RunSummary.load(run_dir).model_dump()
    events = {p.parent.name: _jsonl(p) for p in sorted((run_dir / "phones").glob("*/events.jsonl"))}
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").exists() else None
    logits = ExitLogits.load(run_dir)
    return {
        "summary": summary,
        "metrics": _jsonl(run_dir / "metrics.jsonl"),
        "events": events,
        "plan": plan,
        "faults": _jsonl(run_dir / "faults.jsonl"),
        "exit_logits": logits,
        "early_exit": early_exit_points(logits) if logits is not None else None,
    }


def is_exit_run(run: dict) -> bool:
    return run["early_exit"] is not None or any("exit_accuracy" in m for m in run["metrics"])


def build_report(run_dir: str | Path) -> Path:
    """Writes ``RUN_DIR/report/index.html`` and its plots; returns the HTML's path."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    plot_accuracy(run, out / "accuracy.png")
    plot_bytes(run, out / "bytes.png")
    plot_timeline(run, out / "timeline.png")
    if is_exit_run(run):
        plot_exit_accuracy(run, out / "exit_accuracy.png")
        if run["early_exit"] is not None:
            plot_early_exit(run["early_exit"], out / "early_exit.png")
    page = out / "index.html"
    page.write_text(render_html(run))
    return page


def plot_accuracy(run: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [m for m in run["metrics"] if m.get("accuracy") is not None]
    ax.plot(
        [m["version"] for m in rows], [100 * m["accuracy"] for m in rows], marker="o", label="federated (global model)"
    )
    ref = run["summary"].get("reference")
    if ref:
        ax.axhline(100 * ref["final_accuracy"], color="tab:red", linestyle="--", label="centralized reference")
    title = f"{run['summary']['name']}: accuracy on {run['summary'].get('test_images', 'the')} test images"
    _save_curves(fig, ax, path, "round (model version; 0 = initial)", title, legend_size="medium")


def exit_accuracy(run: dict) -> dict[int, list[tuple[int, float]]]:
    """Per exit position: (model version, test accuracy) of every version evaluated per exit."""
    out: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for m in run["metrics"]:
        for position, accuracy in m.get("exit_accuracy", {}).items():
            out[int(position)].append((m["version"], accuracy))
    return dict(sorted(out.items()))


def plot_exit_accuracy(run: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    per_exit = exit_accuracy(run)
    final = max(per_exit, default=None)
    for position, points in per_exit.items():
        label = f"exit {position}" + (" (final)" if position == final else "")
        ax.plot([v for v, _ in points], [100 * a for _, a in points], marker="o", markersize=3, label=label)
    best = run["summary"].get("best_exit")
    if best:
        ax.axvline(best["version"], color="grey", linestyle=":", label=f"best exit-point model (v{best['version']})")
    _save_curves(fig, ax, path, "round (model version; 0 = initial)", "accuracy per exit")


def early_exit_points(logits: ExitLogits) -> dict[str, list]:
    """Per criterion (and "final exit alone"): the early-exit curve's points over the default
    thresholds, from the final global model's test logits."""
    from device_runtime.early_exit import CRITERIA, early_exit_curve, final_exit_alone

    curves: dict[str, list] = {
        criterion: early_exit_curve(logits.logits, logits.labels, logits.flops, criterion=criterion)
        for criterion in CRITERIA
    }
    curves["final exit alone"] = [final_exit_alone(logits.logits, logits.labels, logits.alone_flops)]
    return curves


def plot_early_exit(curves: dict[str, list], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for criterion, points in curves.items():
        if criterion == "final exit alone":
            (alone,) = points
            ax.plot(alone.mean_mflops, 100 * alone.accuracy, "r*", markersize=14, label=criterion)
            continue
        ax.plot(
            [p.mean_mflops for p in points],
            [100 * p.accuracy for p in points],
            marker="o",
            label=f"early exit: {criterion}",
        )
    title = "early-exit inference over confidence thresholds (final global model)"
    _save_curves(fig, ax, path, "mean forward MFLOPs per image", title)


def _save_curves(fig, ax, path: Path, xlabel: str, title: str, legend_size: str = "small") -> None:
    """Finishes a plot of test accuracy against ``xlabel`` and writes it to ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bytes_by_round(run: dict) -> dict[str, dict[int, int]]:
    """Uplink payload bytes per phone class per round, every push counted (retries included)."""
    cls = {p["device_id"]: p["phone_class"] for p in run["summary"]["phones"]}
    out: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for phone, events in run["events"].items():
        for e in events:
            if e["event"] == "upload":
                out[cls.get(phone, phone)][e["round"]] += e["bytes"]
    return {k: dict(v) for k, v in out.items()}


def plot_bytes(run: dict, path: Path) -> None:
    data = bytes_by_round(run)
    rounds = sorted({r for v in data.values() for r in v})
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rounds)
    for cls, per_round in sorted(data.items()):
        heights = [per_round.get(r, 0) / 1024 for r in rounds]
        ax.bar(rounds, heights, bottom=bottom, label=cls)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel("uplink payload (KiB)")
    ax.set_title("uplink bytes per round by phone class")
    if data:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def spans(run: dict) -> dict[str, list[tuple[str, float, float]]]:
    """Per phone: (kind, start, end) in seconds from the first event of the run."""
    t0 = min((e["t"] for events in run["events"].values() for e in events), default=0.0)
    out: dict[str, list[tuple[str, float, float]]] = {}
    for phone, events in run["events"].items():
        out[phone] = [
            (e["event"], e["start"] - t0, e["end"] - t0) for e in events if e["event"] in SPAN_COLOURS and "start" in e
        ]
    kills = {}
    for f in run["faults"]:
        if f["kind"] == "kill_phone":
            kills[f["phone"]] = f["t"]
        elif f["kind"] == "restart" and f["detail"].endswith("restarted"):
            phone = f["detail"].split()[0]
            if phone in kills and phone in out:
                out[phone].append(("killed", kills.pop(phone) - t0, f["t"] - t0))
    return out


def plot_timeline(run: dict, path: Path) -> None:
    per_phone = spans(run)
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(4, len(per_phone)) + 1))
    for row, (_phone, items) in enumerate(
        sorted(per_phone.items(), key=lambda kv: int(kv[0].split("-")[-1]) if kv[0].split("-")[-1].isdigit() else 0)
    ):
        for kind, start, end in items:
            ax.broken_barh([(start, max(end - start, 0.05))], (row - 0.4, 0.8), color=SPAN_COLOURS[kind])
    names = sorted(per_phone, key=lambda p: int(p.split("-")[-1]) if p.split("-")[-1].isdigit() else 0)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("seconds since the first phone started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in SPAN_COLOURS.values()]
    ax.legend(handles, list(SPAN_COLOURS), ncol=6, fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _mode(s: dict) -> str:
    if "+exits" in s["model"]:
        return "early exits: each phone holds the blocks and branches up to its exit and trains them"
    if s.get("mode") == "splitfed":
        return "SplitFed: each phone's cut from the planner, the edge trains the blocks past it"
    return "classifier only" if s["depth"] == "head" else "head, then the planner depth per phone"


def _slowest(m: dict) -> str:
    """The longest of the phones' own compute in the round (their "train" events)."""
    times = [t for t in m.get("phone_compute_s", {}).values() if t is not None]
    return f"{max(times):.1f}" if times else "–"


def _kib(n) -> str:
    return "–" if n is None else f"{n / 1024:.0f}"


def _pair(measured, predicted, show) -> str:
    return f"{'–' if measured is None else show(measured)} / {'–' if predicted is None else show(predicted)}"


def _exit_section(run: dict) -> str:
    """The "Exits" section of an exit model's run ("" for any other run)."""
    if not is_exit_run(run):
        return ""
    s = run["summary"]
    plans = {p["profile"]: p.get("plan") or {} for p in (run["plan"] or {}).get("phones", [])}
    phones = []
    for p in s["phones"]:
        plan = plans.get(p["phone_class"], {})
        held = ", ".join(map(str, plan.get("exits", []))) or "–"
        phones.append([p["device_id"], p["phone_class"], plan.get("cut", "–"), held, plan.get("train_from", "–")])
    per_exit = exit_accuracy(run)
    versions = sorted({v for points in per_exit.values() for v, _ in points})
    by_exit = {position: dict(points) for position, points in per_exit.items()}
    rounds = [[v] + [_pct(by_exit[position].get(v)) for position in per_exit] for v in versions]
    best = s.get("best_exit")
    if best:
        best_html = (
            f"<p>Version {best['version']} (round {best['round'] if best['round'] is not None else '–'}) of "
            f"{best['evaluated']} evaluated per exit: mean exit accuracy {_pct(best['mean_accuracy'])}, total loss "
            f"{best['loss']:.4f}. The rule: the highest mean accuracy over the exits; among the versions within "
            "0.1 point of it, the lowest total loss (toolkit/aggregator/best.py).</p>"
            + _table(
                ["exit", "accuracy", "loss (mean cross-entropy)"],
                [[e["position"], _pct(e["accuracy"]), f"{e['loss']:.4f}"] for e in best["exits"]],
            )
        )
    else:
        best_html = "<p>no version was evaluated per exit at the aggregator</p>"
    curve_html = "<p>no test logits of the final model (exit_logits.npz) in the run folder</p>"
    if run["early_exit"] is not None:
        (alone,) = run["early_exit"]["final exit alone"]
        rows = [["final exit alone", "–", _pct(alone.accuracy), f"{alone.mean_mflops:.2f}", "–", "–", "–"]]
        for criterion, points in run["early_exit"].items():
            if criterion == "final exit alone":
                continue
            rows += [
                [
                    criterion,
                    f"{p.threshold:g}",
                    _pct(p.accuracy),
                    f"{p.mean_mflops:.2f}",
                    f"{100 * (p.accuracy - alone.accuracy):+.2f}",
                    f"{100 * (p.mean_mflops / alone.mean_mflops - 1):+.1f} %",
                    " / ".join(f"{100 * share:.0f}" for share in p.exit_shares),
                ]
                for p in points
            ]
        curve_html = _table(
            [
                "criterion",
                "threshold",
                "accuracy",
                "mean MFLOPs / image",
                "accuracy vs final exit alone (points)",
                "MFLOPs vs final exit alone",
                "% of images leaving at each exit",
            ],
            rows,
        )
    exits = list(per_exit)
    version = run["exit_logits"].version if run["exit_logits"] is not None else "–"
    return f"""<h2>Exits</h2>
<p>Exits at positions {", ".join(map(str, exits)) or "–"} (position p: after block p − 1; the last is the model's
own classifier). Accuracy is each exit's on the test images; the global model's accuracy above is its final exit's.</p>
<img src="exit_accuracy.png" alt="accuracy per exit per round">
{_table(["version"] + [f"exit {p}" for p in exits], rounds)}
<h3>Each phone's exit</h3>
{_table(["phone", "class", "exit (cut)", "exits held", "train_from"], phones)}
<h3>Best exit-point model</h3>
{best_html}
<h3>Early-exit inference: accuracy against compute</h3>
<p>The final global model (version {version}): an image leaves at the first exit whose confidence passes the
threshold (max softmax at least it, or softmax entropy at most it, in nats), the last exit taking the rest; its
cost is the blocks and branches it ran. The star is the final exit alone (the plain model's forward, no branch).</p>
{'<img src="early_exit.png" alt="accuracy against MFLOPs">' if run["early_exit"] is not None else ""}
{curve_html}
"""


def render_html(run: dict) -> str:
    s = run["summary"]
    ref = s.get("reference")
    facts: list[list[object]] = [
        ["model", f"{s['model']} ({_mode(s)})"],
        ["phones", len(s["phones"])],
        ["rounds", s["rounds"]],
        ["final accuracy (global model, host evaluation)", _pct(s.get("final_accuracy"))],
        [
            "centralized reference",
            _pct(ref["final_accuracy"]) + f" ({ref['source']})"
            if ref
            else "not available: run `fedkit train-central` to produce benchmarks/results/central.json",
        ],
        ["updates accepted", f"{s['updates_accepted']} ({s['bytes_accepted'] / 1024:.1f} KiB)"],
        [
            "accepted updates lost",
            f"{s['accepted_lost']} of {s['accepted_told_phones']} the phones were told were accepted",
        ],
        ["wall time", f"{s['wall_s']:.0f} s (setup {s['setup_s']:.0f} s, training {s['train_s']:.0f} s)"],
        ["compute", s["compute_note"]],
        ["edge (as the planner priced it)", s["edge"]],
    ]
    phones = [
        [
            p["device_id"],
            p["phone_class"],
            f"× {p['compute_factor']:g}",
            "none" if p["address_space_mb"] is None else f"{p['address_space_mb']} MB",
            p["link"],
            p["samples"],
            ", ".join(p["bundles"]),
            p["starts"],
            p["exit_code"],
            p.get("peak_rss_mb", "–"),
        ]
        for p in s["phones"]
    ]
    against = [
        [
            p["device_id"],
            p["phone_class"],
            _pair(p["measured_round_s"], p["predicted"].get("total"), lambda v: f"{v:.2f}"),
            _pair(p["measured_up_bytes"], p["predicted"].get("up_bytes"), _kib),
            _pair(p["measured_down_bytes"], p["predicted"].get("down_bytes"), _kib),
        ]
        for p in s["phones"]
    ]
    faults = [[f"{f['elapsed_s']:.1f} s", f["kind"], f.get("phone", ""), f.get("detail", "")] for f in run["faults"]]
    rounds = [
        [
            m["version"],
            m.get("round") or "–",
            m.get("stage") or "–",
            _pct(m["accuracy"]),
            m["updates"],
            m.get("samples", ""),
            m.get("round_s") or "–",
            _slowest(m),
            m.get("edge_s") or "–",
            _kib(m.get("activation_bytes")) + " / " + _kib(m.get("gradient_bytes")),
        ]
        for m in run["metrics"]
    ]
    plan_rows = []
    if run["plan"]:
        for p in run["plan"]["phones"]:
            d = p.get("plan") or {}
            plan_rows.append(
                [
                    p["profile"],
                    d.get("cut", "–"),
                    d.get("train_from", "–"),
                    p.get("trainable_blocks", "–"),
                    d.get("engine", "–"),
                    d.get("encoding", "–"),
                    d.get("batch_size", "–"),
                    f"{d.get('predicted', {}).get('total', float('nan')):.2f}",
                    p["reason"],
                ]
            )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedkit run {html.escape(s["name"])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:90%}} img{{max-width:100%}}</style></head>
<body><h1>fedkit run {html.escape(s["name"])}</h1>
{_table(["", ""], facts)}
<h2>Accuracy per round</h2><img src="accuracy.png" alt="accuracy per round">
{
        _table(
            [
                "version",
                "round",
                "stage",
                "accuracy",
                "updates",
                "samples",
                "round time (s)",
                "slowest phone's compute (s)",
                "edge compute (s)",
                "activations up / gradients down (KiB)",
            ],
            rounds,
        )
    }
{_exit_section(run)}
<h2>Uplink bytes per round by phone class</h2><img src="bytes.png" alt="bytes per round">
<h2>Per-phone timeline</h2><img src="timeline.png" alt="timeline">
<h2>Phones</h2>
{
        _table(
            ["phone", "class", "compute", "RLIMIT_AS", "link", "images", "bundles", "starts", "exit", "peak RSS (MB)"],
            phones,
        )
    }
<h2>Plan against measurement</h2>
<p>Per round, as the aggregator saw it (from a task's assignment to the phone's accepted update; bytes of
updates up and weights down) beside the plan's prediction for the phone's class. The measured time
includes the emulated slowdown and the first round's frozen features (later rounds reuse them), and
every emulated phone shares this host's cores with the others and the aggregator, so it runs longer
than one phone alone. SplitFed activations and gradients are not in these bytes.</p>
{_table(["phone", "class", "round time (s): measured / planned", "update up (KiB)", "weights down (KiB)"], against)}
<h2>Faults</h2>
{_table(["at", "fault", "phone", "what happened"], faults) if faults else "<p>none injected</p>"}
<h2>Plan</h2>
{
        _table(
            [
                "class",
                "cut",
                "train_from",
                "trainable blocks",
                "engine",
                "encoding",
                "batch",
                "predicted s/round",
                "why",
            ],
            plan_rows,
        )
    }
</body></html>
"""
