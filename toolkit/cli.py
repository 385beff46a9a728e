"""The `fedkit` command line. Each command parses its options, calls one library function and
renders the result with Rich.

Every failure, a FedkitError or a usage error (an unknown option, a missing one, a value of the
wrong type or out of range), is one line on stderr starting with "error:" and exit code 1.
Inputs and outputs are checked before any long work. A file output (``--out FILE``) must be in
an existing folder and replaces an existing file whole (written beside it, then renamed); a
folder output (``--out DIR``) must not exist, or be empty, and appears only when complete.
Work over a few seconds shows progress on stderr."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from typer.core import TyperGroup

from toolkit import __version__
from toolkit.errors import FedkitError

if TYPE_CHECKING:
    from toolkit.models import ExitModel, SplittableModel


class _Commands(TyperGroup):
    """Typer's command group with two changes, so every command behaves alike:

    - a usage error ends like a FedkitError: one line on stderr and exit code 1, instead of
      Typer's usage text and boxed panel (exit code 2);
    - a flag shows no value in `--help`: Typer 0.29 prints `--local <bool>` there, as if it
      took one (`--local true` is refused), where click prints none.
    """

    def get_params(self, ctx):
        return _flags_show_no_value(super().get_params(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _flags_show_no_value(command.get_params(ctx))
        return command

    def parse_args(self, ctx, args):
        if not args:  # no_args_is_help: the help, not an error
            return super().parse_args(ctx, args)
        with _usage_errors_in_one_line(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with _usage_errors_in_one_line(ctx):
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_in_one_line(ctx):
    try:
        yield
    except typer.TyperException as exc:  # Typer's click errors: UsageError, BadParameter, ...
        command = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
        _print_error(f"{exc.format_message().rstrip('.')}: see {command} --help")
        raise typer.Exit(1) from exc


def _flags_show_no_value(params: list) -> list:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # the help's type column shows the metavar when there is one
    return params


app = typer.Typer(
    cls=_Commands,
    name="fedkit",
    help="Federated transfer learning and split learning for pretrained vision models on phones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings wrap as paragraphs, not at their source line breaks
)
console = Console()
err_console = Console(stderr=True)


def fails_cleanly(fn: Callable) -> Callable:
    """Turns a FedkitError into one red line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedkitError as exc:
            _print_error(str(exc))
            raise typer.Exit(1) from exc

    return wrapper


def _print_error(message: str) -> None:
    from rich.text import Text

    # one line: soft_wrap keeps Rich from breaking it; Text keeps brackets in the message literal
    err_console.print(
        Text.assemble(("error:", "red"), " ", message.replace("\n", " ")), highlight=False, soft_wrap=True
    )


def _check_file_output(path: Path, option: str = "--out") -> None:
    """A file output, checked before any long work: its folder must exist and be writable."""
    folder = path.parent
    if path.is_dir():
        raise FedkitError(f"{option} {path} is a folder: give a file name in it")
    if not folder.is_dir():
        raise FedkitError(
            f"{option} {path}: folder {folder} does not exist: create it (mkdir -p {folder}) or choose another {option}"
        )
    if not os.access(folder, os.W_OK):
        raise FedkitError(f"{option} {path}: folder {folder} is not writable: choose another {option}")


def _check_folder_output(path: Path, option: str = "--out") -> None:
    """A folder output, checked before any long work: it must not exist, or be empty."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FedkitError(f"{option} {path} already exists: remove it or choose another {option}")


def _write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """Runs ``write`` on a hidden file beside ``path`` and renames it to ``path``: an existing
    file is replaced whole, and a failure leaves nothing behind."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _version(value: bool) -> None:
    if value:
        console.print(f"fedkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Federated transfer learning and split learning for pretrained vision models on phones."""


# The zoo's names (toolkit.models.MODELS, written out: importing it would import torch) and saved networks
_MODEL_NAMES = "mobilenet_v2, efficientnet_lite0, efficientnet_lite1, small_cnn, or nas:NAME (saved by fedkit search)"


@app.command("train-central")
@fails_cleanly
def train_central(
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 30,
    model: Annotated[str, typer.Option(help=f"Model: {_MODEL_NAMES}.")] = "mobilenet_v2",
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute the backbone features instead of using the cache.")
    ] = False,
    max_train: Annotated[int | None, typer.Option(help="Train on the first N training images only.")] = None,
    max_test: Annotated[int | None, typer.Option(help="Evaluate on the first N test images only.")] = None,
    out: Annotated[
        Path, typer.Option(help="Where to write the result JSON (its folder must exist; an existing file is replaced).")
    ] = Path("benchmarks/results/central.json"),
) -> None:
    """Train the head centrally on frozen-backbone features of Fashion-MNIST: the reference
    accuracy federated runs are measured against."""
    from rich.table import Table

    _check_file_output(out)

    from toolkit import central  # imports torch: only when the command runs
    from toolkit.benchmarking import benchmark_record

    result = central.train_central(model, epochs=epochs, max_train=max_train, max_test=max_test, use_cache=not no_cache)
    table = Table(title=f"{model}: head trained centrally on {result.config['train_images']:,} images")
    table.add_column("epoch", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("test accuracy", justify="right")
    for epoch, (loss, accuracy) in enumerate(zip(result.train_loss, result.test_accuracy, strict=True), start=1):
        table.add_row(str(epoch), f"{loss:.4f}", f"{accuracy:.2%}")
    console.print(table)
    source = "read from the cache" if result.cache_hit else "computed"
    console.print(
        f"final accuracy [bold]{result.final_accuracy:.2%}[/bold]; features of {result.extracted_images:,} images "
        f"{source} in {result.extraction_seconds:.1f} s; training {result.train_seconds:.1f} s"
    )
    record = benchmark_record("central", result.config, result.figures())  # as benchmarks/central.py writes it
    console.print(f"result written to {record.write(out)}")


@app.command()
@fails_cleanly
def export(
    out: Annotated[Path, typer.Option(help="Folder to create for the bundle (must not exist, or be empty).")],
    model: Annotated[
        str, typer.Option(help=f"Model: {_MODEL_NAMES}; NAME+exits[:P,Q] with early exits.")
    ] = "mobilenet_v2",
    cut: Annotated[
        int | None,
        typer.Option(
            help="Blocks [0, CUT) run on the phone, the rest on the edge (SplitFed). Default: all on the phone. "
            "A model with exits: the phone's exit (its model ends there, trained with every exit up to it)."
        ),
    ] = None,
    train_blocks: Annotated[
        int,
        typer.Option(
            min=1, help="How many of the phone's last blocks with parameters train there; 1 = the classifier only."
        ),
    ] = 1,
    engine: Annotated[
        Literal["ort", "executorch", "numpy", "both"],
        typer.Option(
            help="Engine to export for (numpy: a linear head, on phones with ONNX Runtime's inference build only, "
            "e.g. arm64); with both, the phone runs ort and the bundle also holds the ExecuTorch programs.",
        ),
    ] = "ort",
    encoding: Annotated[
        str,
        typer.Option(help="How the phone encodes its updates: fp32, fp16, int8, int4, sign1, topk or layered:BITS."),
    ] = "int8",
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per training step on the phone.")] = 32,
    plan_file: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            help="A plan from `fedkit plan`: export one bundle per distinct phone choice into OUT "
            "(the model and choices come from the plan) and OUT/phones.json.",
        ),
    ] = None,
) -> None:
    """Export the bundle for one phone: its part of the model for inference and training on the
    chosen engine, the initial trainable weights, and manifest.json with every file's sha256."""
    from device_runtime.manifest import DevicePlan
    from exporters.bundle import export_bundle  # imports torch: only when the command runs
    from toolkit.data import LABEL_NAMES
    from toolkit.models import load_model

    _check_folder_output(out)
    if plan_file is not None:
        _export_plan(plan_file, out)
        return
    splittable = load_model(model)
    cut = len(splittable.block_names) if cut is None else cut
    if splittable.exits and cut not in splittable.exits:
        raise FedkitError(
            f"{splittable.model_id} has exits at {', '.join(map(str, splittable.exits))}: --cut one of them"
        )
    exits = tuple(p for p in splittable.exits if p <= cut)
    engines = ("ort", "executorch") if engine == "both" else (engine,)
    plan = DevicePlan(
        cut=cut,
        train_from=splittable.train_from(cut, train_blocks),
        engine=engines[0],
        encoding=encoding,
        batch_size=batch_size,
        exits=exits,
        exit_weights=(1.0,) * len(exits),
    )
    with _step_progress() as progress:
        manifest = export_bundle(splittable, plan, out, engines, label_names=LABEL_NAMES, progress=progress)
    _print_bundle(out, manifest, splittable.stats)


@contextlib.contextmanager
def _step_progress():
    """A transient progress bar over an exporter's named steps; yields the progress callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("checking the plan", total=None)
        yield lambda step, done, total: bar.update(task, description=step, completed=done, total=total)


@contextlib.contextmanager
def _spinner(description: str):
    """A transient spinner with the elapsed time on stderr, for work of unknown length."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True
    ) as bar:
        bar.add_task(description, total=None)
        yield


def _check_url(url: str, option: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FedkitError(f"{option} {url!r} is not an http(s) URL: give the aggregator's, e.g. http://127.0.0.1:8080")


def _export_plan(plan_file: Path, out: Path) -> None:
    from rich.table import Table

    from toolkit.planning import export_plan_bundles, load_plan

    fleet = load_plan(plan_file)
    with _step_progress() as progress:
        bundles = export_plan_bundles(fleet, out, progress)
    table = Table(title=f"bundles for {fleet.model_id} in {out}")
    for column in ("bundle", "cut", "trains from", "engine", "encoding", "batch", "phones"):
        table.add_column(column)
    for b in bundles:
        p = b.plan
        cut = f"exit {p.cut}" if p.exits else str(p.cut)
        table.add_row(
            b.folder.name, cut, str(p.train_from), p.engine, p.encoding, str(p.batch_size), ", ".join(b.phones)
        )
    console.print(table)
    for phone in fleet.infeasible:
        err_console.print(
            f"[yellow]warning:[/yellow] no bundle for {phone.profile}: {phone.reason}", highlight=False, soft_wrap=True
        )


def _print_bundle(out: Path, manifest, stats) -> None:
    from rich.table import Table

    plan = manifest.plan
    files = Table(title=f"bundle {out}")
    files.add_column("role")
    files.add_column("file")
    files.add_column("size", justify="right")
    for role, entry in sorted(manifest.files.items()):
        files.add_row(role, entry.path, _size(entry.size))
    files.add_row("[bold]total[/bold]", "", f"[bold]{_size(sum(e.size for e in manifest.files.values()))}[/bold]")
    console.print(files)

    names = manifest.block_names
    summary = Table(show_header=False, title=f"{manifest.model_id} on the phone")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("blocks on the phone", f"{plan.cut} of {len(names)} ({_span(names, 0, plan.cut)})")
    summary.add_row("frozen (inference only)", _span(names, 0, plan.train_from) or "none")
    summary.add_row("trained on the phone", _span(names, plan.train_from, plan.cut))
    trainable = sum(math.prod(t.shape) for t in manifest.trainable)
    summary.add_row("trainable parameters", f"{trainable:,} in {len(manifest.trainable)} tensors")
    if manifest.is_splitfed:
        per_sample = stats[plan.cut - 1].out_bytes
        summary.add_row(
            "activation at the cut",
            f"{_size(per_sample)} per sample, "
            f"{_size(per_sample * plan.batch_size)} per batch of {plan.batch_size} (fp32)",
        )
    elif plan.exits:
        weights = ", ".join(f"{w:g}" for w in plan.exit_weights)
        summary.add_row("exits", f"{', '.join(map(str, plan.exits))}, trained with loss weights {weights}")
        summary.add_row("activation at the cut", "none: the phone's model ends at its exit, only weights travel")
    else:
        summary.add_row("activation at the cut", "none: the whole model is on the phone, only weights travel")
    summary.add_row("engines", ", ".join(manifest.engines) + f" (the phone runs {plan.engine})")
    summary.add_row("update encoding", plan.encoding)
    console.print(summary)


def _span(names: tuple[str, ...], start: int, stop: int) -> str:
    if start >= stop:
        return ""
    return names[start] if stop - start == 1 else f"{names[start]} … {names[stop - 1]}"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    if n < 1024**2:
        return f"{n / 1024:,.1f} KB"
    return f"{n / 1024**2:,.1f} MB"


@app.command()
@fails_cleanly
def serve(
    config: Annotated[Path, typer.Option(help="Run config (TOML): weights, mode, stages.")],
    db: Annotated[
        Path | None, typer.Option(help="SQLite database. Default: aggregator.sqlite in the run's directory.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM); with --keyfile, serves HTTPS.")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
) -> None:
    """Run the edge aggregator: phones enrol, pull tasks and weights, push updates; one JSON
    line per event on stderr. Restarting on the same database continues the run."""
    from toolkit.aggregator.server import serve as run_server

    run_server(config, db, host, port, certfile, keyfile)


@app.command()
@fails_cleanly
def status(
    db: Annotated[Path, typer.Option(help="The aggregator's SQLite database.")],
    plan_file: Annotated[
        Path | None,
        typer.Option("--plan", help="The run's fleet plan: show each phone's predicted round beside the measured one."),
    ] = None,
) -> None:
    """Show a run: stage, round, reports, accuracy, traffic, the last rounds, and per phone its
    rounds, seconds and bytes (beside the plan's prediction with --plan). An exit model's run also
    shows its best exit-point model: accuracy per exit and total loss."""
    from rich.table import Table

    from toolkit.aggregator.status import against_plan, read_status

    predicted = {}
    if plan_file is not None:
        from toolkit.planning import load_plan

        predicted = {p.profile: p.plan.predicted for p in load_plan(plan_file).phones if p.plan is not None}
    s = read_status(db)
    summary = Table(show_header=False, title=f"run {s.name} ({s.mode})")
    summary.add_column(style="bold")
    summary.add_column()
    state = "done" if s.done else f"stage {s.stage} ({(s.stage_index or 0) + 1} of {s.stages}), round {s.round}"
    summary.add_row("state", state)
    summary.add_row("latest model version", str(s.latest_version))
    summary.add_row("accuracy", "–" if s.accuracy is None else f"{s.accuracy:.2%}")
    summary.add_row("devices enrolled", str(s.devices))
    summary.add_row("updates accepted", f"{s.updates_accepted:,} ({_size(s.bytes_received)})")
    if s.best is not None:
        summary.add_row("versions evaluated per exit", str(s.best.evaluated))
        summary.add_row(
            "best exit-point model",
            f"version {s.best.version}: {s.best.mean_accuracy:.2%} mean over exits, loss {s.best.loss:.4f}",
        )
    console.print(summary)
    if s.best is not None:
        exits = Table(title="best model, per exit")
        for column in ("exit", "accuracy", "loss"):
            exits.add_column(column, justify="right")
        for e in s.best.exits:
            exits.add_row(str(e.position), f"{e.accuracy:.2%}", f"{e.loss:.4f}")
        console.print(exits)
    rounds = Table(title="last rounds")
    for column in ("round", "stage", "from version", "state", "assigned", "reports", "version", "accuracy"):
        rounds.add_column(column, justify="left" if column in ("stage", "state") else "right")
    for r in s.rounds:
        accuracy = "–" if r.accuracy is None else f"{r.accuracy:.2%}"
        version = "–" if r.version is None else str(r.version)
        rounds.add_row(
            str(r.round),
            r.stage,
            str(r.base_version),
            "open" if r.open else "closed",
            str(r.assigned),
            str(r.reports),
            version,
            accuracy,
        )
    console.print(rounds)
    phones = Table(title="per phone and round: measured" + (" / the plan's prediction" if plan_file else ""))
    for column in ("phone", "rounds", "seconds", "update up", "weights down"):
        phones.add_column(column, justify="left" if column == "phone" else "right")

    def pair(measured: float | None, guess: float | None, show: Callable[[float], str]) -> str:
        text = "–" if measured is None else show(measured)
        return text + (f" / {show(guess)}" if guess is not None else "")

    for row in against_plan(s, predicted):
        phones.add_row(
            row.device_id,
            str(row.rounds),
            pair(row.measured_s, row.predicted_s, lambda v: f"{v:.2f} s"),
            pair(row.measured_up, row.predicted_up, lambda v: _size(int(v))),
            pair(row.measured_down, row.predicted_down, lambda v: _size(int(v))),
        )
    console.print(phones)


@app.command("enrol-token")
@fails_cleanly
def enrol_token(
    db: Annotated[Path, typer.Option(help="The aggregator's SQLite database (created if missing).")],
    count: Annotated[int, typer.Option(min=1, help="How many tokens to issue.")] = 1,
    admin: Annotated[bool, typer.Option("--admin", help="Issue admin tokens (status, evaluations) instead.")] = False,
) -> None:
    """Issue one-time enrolment tokens for phones (one line each); only their hashes are stored."""
    from toolkit.aggregator.admin import issue_tokens
    from toolkit.aggregator.store import Store

    store = Store(db)
    try:
        for token in issue_tokens(store, count, "admin" if admin else "enrol"):
            typer.echo(token)
    finally:
        store.close()


@app.command("export-global")
@fails_cleanly
def export_global(
    db: Annotated[Path, typer.Option(help="The aggregator's SQLite database.")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the PyTorch state dict (.pt; its folder must exist, an existing file is replaced)."
        ),
    ] = None,
    early_exit: Annotated[
        Path | None,
        typer.Option(
            "--early-exit",
            help="Where to write the phone's early-exit folder of a model with exits (one ONNX file per exit; "
            "fedkit predict runs it). It must not exist, or be empty.",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model zoo name. Default: the run config's 'model'.")] = None,
    version: Annotated[int | None, typer.Option(min=0, help="Model version. Default: the latest.")] = None,
    best: Annotated[
        bool,
        typer.Option("--best", help="Export an exit model's best exit-point version (fedkit status shows it)."),
    ] = False,
    test_images: Annotated[
        int,
        typer.Option(min=0, max=10000, help="Evaluate on the first N Fashion-MNIST test images (0: do not evaluate)."),
    ] = 10000,
) -> None:
    """Write the global model of a run (the zoo model with the aggregated tensors merged in) as a
    PyTorch state dict, as the phone's early-exit folder, or both, and print its test accuracy."""
    if out is None and early_exit is None:
        raise FedkitError("give --out FILE (a PyTorch state dict), --early-exit DIR (an early-exit folder) or both")
    if out is not None:
        _check_file_output(out)
    if early_exit is not None:
        _check_folder_output(early_exit, "--early-exit")
    import torch

    from toolkit.aggregator.admin import global_tensors, merged_state_dict, model_accuracy
    from toolkit.models import load_model

    if best:
        from toolkit.aggregator.admin import best_version

        if version is not None:
            raise FedkitError("--best and --version both choose the version: pass one of them")
        version = best_version(db)
    name, tensors = global_tensors(db, model, version)  # read and decoded once, the model loaded once
    splittable = load_model(name)
    exit_model = _exit_model(splittable, early_exit) if early_exit is not None else None
    state = merged_state_dict(splittable, tensors)
    # evaluated before anything is written: missing test data fails the command with no file left
    accuracy = model_accuracy(splittable, tensors, test_images) if test_images else None
    if exit_model is not None and early_exit is not None:
        from exporters.early_exit import export_early_exit
        from toolkit.data import LABEL_NAMES

        exit_model.root.load_state_dict(state)
        index = export_early_exit(exit_model, early_exit, label_names=LABEL_NAMES)
        flops = ", ".join(f"{s.exit}: {s.flops / 1e6:.2f}" for s in index.segments)
        console.print(f"early-exit folder written to {early_exit} (MFLOPs per image leaving at each exit: {flops})")
    if out is not None:
        _write_whole(out, lambda path: torch.save(state, path))
        console.print(f"global model written to {out}")
    if accuracy is not None:
        console.print(f"test accuracy on {test_images:,} Fashion-MNIST test images: [bold]{accuracy:.2%}[/bold]")


def _exit_model(splittable: SplittableModel, folder: Path) -> ExitModel:
    """The run's model, checked for an early-exit export before the evaluation, not after it."""
    from exporters.early_exit import check_early_exit
    from toolkit.data import LABEL_NAMES
    from toolkit.models import ExitModel

    if not isinstance(splittable, ExitModel):
        raise FedkitError(
            f"the run's model {splittable.model_id} has no early exits, so --early-exit has nothing to export: "
            'use it on a run of a model with exits (e.g. model = "small_cnn+exits:1,2"), or write --out alone'
        )
    check_early_exit(splittable, folder, LABEL_NAMES)
    return splittable


@app.command()
@fails_cleanly
def predict(
    early_exit: Annotated[
        Path, typer.Option("--early-exit", help="An early-exit folder (fedkit export-global --early-exit).")
    ],
    threshold: Annotated[
        list[float] | None,
        typer.Option(help="A confidence threshold; repeat it for several. Default: a grid of 10 per criterion."),
    ] = None,
    criterion: Annotated[
        Literal["max_softmax", "entropy"],
        typer.Option(help="An image leaves at an exit when its max softmax is >= the threshold, or its entropy <= it."),
    ] = "max_softmax",
    test_images: Annotated[
        int, typer.Option(min=1, max=10000, help="Predict the first N Fashion-MNIST test images.")
    ] = 10000,
) -> None:
    """Early-exit inference on Fashion-MNIST's test images, on this host as on a phone: per
    threshold, the accuracy, the mean MFLOPs per image and the share leaving at each exit,
    against the final exit alone (the plain model, no branch run). Computed from every exit's
    logits with the predictor's own stopping rule (device_runtime.early_exit)."""
    from rich import box
    from rich.table import Table

    from device_runtime.early_exit import EarlyExitPredictor, early_exit_curve, final_exit_alone
    from toolkit.data import load_fashion_mnist

    predictor = EarlyExitPredictor(early_exit)
    test = load_fashion_mnist("test")
    images, labels = test.images[:test_images], test.labels[:test_images]
    with _spinner(f"running {len(images):,} images through every exit"):
        logits = predictor.logits(images)
    index = predictor.index
    baseline = final_exit_alone(logits, labels, index.segments[-1].alone_flops)
    points = early_exit_curve(logits, labels, index.flops, tuple(threshold) if threshold else None, criterion)
    table = Table(
        title=f"early exits of {index.model_id}, {len(images):,} test images, {criterion}",
        caption="final exit: the final exit alone (the plain model, no branch run); Δ pt and saved against it",
        box=box.SIMPLE,
    )
    shares = f"% out at {'/'.join(map(str, index.exits))}"
    for column in ("threshold", "accuracy", "Δ pt", "MFLOPs", "saved", shares):
        table.add_column(column, justify="right", no_wrap=True)
    for point in [baseline, *points]:
        table.add_row(
            "final exit" if point.threshold is None else f"{point.threshold:g}",
            f"{point.accuracy:.2%}",
            f"{(point.accuracy - baseline.accuracy) * 100:+.2f}",
            f"{point.mean_mflops:.2f}",
            f"{1 - point.mean_mflops / baseline.mean_mflops:.1%}",
            "/".join(f"{share:.0%}".removesuffix("%") for share in point.exit_shares),
        )
    console.print(table)


@app.command()
@fails_cleanly
def profile(
    local: Annotated[bool, typer.Option("--local", help="Profile this host.")] = False,
    adb: Annotated[
        str | None, typer.Option("--adb", help="Profile the phone with this adb serial (see `adb devices`).")
    ] = None,
    arm64: Annotated[
        bool,
        typer.Option(
            "--arm64", help="Profile the emulated arm64 phone (qemu user mode): emulated timings, its engines."
        ),
    ] = False,
    catalog: Annotated[
        str | None,
        typer.Option("--catalog", help="A phone of this catalogue class (its published figures, nothing measured)."),
    ] = None,
    link: Annotated[
        str | None, typer.Option(help="With --catalog: put it on this link (3g, 4g, 5g, wifi) instead of its own.")
    ] = None,
    model: Annotated[str | None, typer.Option(help=f"Also time each block of this model ({_MODEL_NAMES}).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Time each kernel more often (slower, steadier).")] = False,
    aggregator: Annotated[str | None, typer.Option(help="Aggregator URL to measure RTT and bandwidth to.")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size the model's blocks are timed at.")] = 32,
    name: Annotated[
        str | None, typer.Option(help="Profile name. Default: the host name, the adb serial or arm64-emulated.")
    ] = None,
    python: Annotated[str, typer.Option(help="Python interpreter on the phone (with --adb).")] = "python3",
    out: Annotated[
        Path | None,
        typer.Option(help="Write the profile JSON here (its folder must exist; an existing file is replaced)."),
    ] = None,
) -> None:
    """Measure a device: compute (GFLOP/s of ONNX Runtime kernels, per-block latency of a
    model), memory, engines, and the link to an aggregator. Or, with --catalog, write the
    profile of a catalogue phone class (its published figures and sources; nothing measured)."""
    from rich.table import Table

    from toolkit.errors import InternalError, PlanError
    from toolkit.models import load_model
    from toolkit.profiling import catalog_profiles, measure_local, probe_adb, probe_arm64

    if [local, adb is not None, arm64, catalog is not None].count(True) != 1:
        raise PlanError("choose one of --local, --adb SERIAL, --arm64 or --catalog CLASS")
    if link is not None and catalog is None:
        raise PlanError(
            "--link sets a catalogue phone's link: use it with --catalog (a measured link comes from --aggregator)"
        )
    if catalog is not None and (model or aggregator):
        raise PlanError("--model and --aggregator measure a device: a catalogue profile (--catalog) measures nothing")
    if out is not None:
        _check_file_output(out)
    if aggregator is not None:
        _check_url(aggregator, "--aggregator")
    device = "this host" if local else "the emulated arm64 phone" if arm64 else adb or catalog
    with _spinner(f"profiling {device}" + (f" and {model}'s blocks" if model else "")):
        splittable = load_model(model) if model else None
        if catalog is not None:
            p = catalog_profiles([catalog], link)[0]
            p = p.model_copy(update={"name": name}) if name else p
        elif local:
            p = measure_local(quick=not full, model=splittable, aggregator=aggregator, batch=batch, name=name)
        elif arm64:
            p = probe_arm64(quick=not full, model=splittable, aggregator=aggregator, batch=batch, name=name)
        elif adb is not None:
            p = probe_adb(adb, quick=not full, model=splittable, aggregator=aggregator, batch=batch, python=python)
            p = p.model_copy(update={"name": name}) if name else p
        else:  # the options were checked above: one device
            raise InternalError("profile with no device to profile")
    table = Table(show_header=False, title=f"profile {p.name} ({p.source})")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("compute", f"{p.gflops:.1f} GFLOP/s (dense conv, ONNX Runtime, {p.cpu_cores} cores)")
    for kind, gflops in p.kernel_gflops.items():
        table.add_row(f"  {kind}", f"{gflops:.1f} GFLOP/s")
    table.add_row("memory budget", f"{p.memory_mb:,.0f} MB")
    table.add_row("engines", ", ".join(p.engines) or "none")
    if p.link:
        table.add_row(
            "link",
            f"up {p.link.uplink_mbps:.1f} Mbit/s, down {p.link.downlink_mbps:.1f} Mbit/s, RTT {p.link.rtt_ms:.1f} ms",
        )
    for timing in p.block_timings:
        total = sum(timing.seconds.values())
        table.add_row(
            f"{timing.model_id} forward",
            f"{total * 1000:.2f} ms per batch of {timing.batch} ({len(timing.seconds)} blocks)",
        )
    console.print(table)
    if out:
        _write_whole(out, p.save)
        console.print(f"profile written to {out}")


@app.command()
@fails_cleanly
def plan(
    out: Annotated[
        Path,
        typer.Option(help="Where to write the fleet plan JSON (its folder must exist; an existing file is replaced)."),
    ],
    profiles: Annotated[Path | None, typer.Option(help="Folder of profile JSON files (from `fedkit profile`).")] = None,
    catalog: Annotated[bool, typer.Option("--catalog", help="Plan the catalogue's phone classes.")] = False,
    classes: Annotated[
        str | None, typer.Option(help="With --catalog: comma-separated class names. Default: all.")
    ] = None,
    link: Annotated[str | None, typer.Option(help="Put every phone on this link: 3g, 4g, 5g or wifi.")] = None,
    model: Annotated[
        str,
        typer.Option(
            help=f"Model: {_MODEL_NAMES}; NAME+exits adds early exits (default positions), "
            "NAME+exits:P,Q at those: the planner then chooses each phone's exit."
        ),
    ] = "mobilenet_v2",
    edge: Annotated[
        Path | None, typer.Option(help="The edge's profile JSON. Default: this host, profiled now.")
    ] = None,
    edge_load: Annotated[int, typer.Option(min=1, help="Phones training on the edge at once (they share it).")] = 1,
    samples: Annotated[int, typer.Option(min=1, help="Training samples per phone per round.")] = 3000,
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Reference batch size; smaller only to fit memory.")] = 32,
    encodings: Annotated[
        str, typer.Option(help="Update encodings to choose from, most faithful preferred.")
    ] = "fp32,fp16,int8,int4",
    slack: Annotated[
        float, typer.Option(min=0, help="Accept rounds up to (1 + SLACK) x the fastest, for deeper training.")
    ] = 0.10,
    budget_s: Annotated[float | None, typer.Option(help="Round-time budget in seconds (replaces --slack).")] = None,
    energy_budget_j: Annotated[float | None, typer.Option(help="Phone energy budget per round in joules.")] = None,
    allow_raw_upload: Annotated[
        bool,
        typer.Option(
            "--allow-raw-upload", help="Consider cut 0: raw images leave the phone (a baseline, not private)."
        ),
    ] = False,
    mode: Annotated[
        Literal["auto", "federated", "splitfed"],
        typer.Option(
            help="auto: any cut; federated: the whole model on every phone; "
            "splitfed: every phone cuts before the last block."
        ),
    ] = "auto",
    max_train_blocks: Annotated[
        int | None, typer.Option(min=1, help="Train at most this many blocks (deeper can diverge).")
    ] = None,
    train_blocks: Annotated[
        int | None,
        typer.Option(min=1, help="Train exactly this many blocks on every phone (the planner picks the rest)."),
    ] = None,
    cut: Annotated[
        list[str] | None,
        typer.Option(help="PHONE=N pins that phone's cut (blocks [0, N) on it); repeat for more phones."),
    ] = None,
    depth: Annotated[
        list[str] | None,
        typer.Option(help="PHONE=K pins how many blocks that phone trains (1: the classifier); repeat."),
    ] = None,
    stage_depths: Annotated[
        str | None,
        typer.Option(
            help="Depths a stage may name, e.g. 1 (a head-only warm-up): whole-model phones also get these bundles."
        ),
    ] = None,
    exit_policy: Annotated[
        Literal["plan", "random"],
        typer.Option(
            help="A model with exits: plan: each phone's deepest exit within the round budget that fits it; "
            "random: an exit drawn among those that fit it (the baseline; --seed)."
        ),
    ] = "plan",
    exit_weights: Annotated[
        str | None,
        typer.Option(
            help="Loss weight of each exit: POSITION=WEIGHT pairs (others 1), e.g. 7=0.5,21=2, "
            "or one weight per exit in order. Default: 1 each."
        ),
    ] = None,
    exit_accuracy: Annotated[
        str | None,
        typer.Option(
            help="Validation accuracy of each exit (fractions), e.g. from a previous run: POSITION=ACCURACY "
            "pairs or one per exit in order, every exit. Each phone stops at the shallowest exit within 0.5 point "
            "of the best it can afford."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --exit-policy random (with each phone's name).")] = 0,
) -> None:
    """Choose per phone the cut, trainable depth, engine, update encoding and batch size, and
    predict its round time: the deepest training within the slack (or budget) of the fastest.
    A model with exits (--model NAME+exits): each phone's exit instead, the deepest within the
    budget (default: 1 + slack times the fastest phone's round at the final exit).

    A phone where nothing fits is listed as infeasible with the reason (a warning; the plan is
    written and the exit code is 0). When no phone fits, nothing is written and the exit code is 1."""
    from rich.markup import escape
    from rich.table import Table

    from toolkit.errors import PlanError
    from toolkit.planning import Pin, PlanConfig, plan_fleet
    from toolkit.profiling import DeviceProfile, catalog_profiles, load_profiles

    if catalog == (profiles is not None):
        raise PlanError("choose one of --profiles DIR or --catalog")
    if classes and not catalog:
        raise PlanError("--classes selects catalogue classes: use it with --catalog")
    _check_file_output(out)
    for option, value, unit in (
        ("--budget-s", budget_s, "seconds, e.g. 60"),
        ("--energy-budget-j", energy_budget_j, "joules, e.g. 50"),
    ):
        if value is not None and not value > 0:
            raise PlanError(f"{option} must be more than 0, got {value}: give the budget per round in {unit}")
    phones = (
        load_profiles(profiles) if profiles is not None else catalog_profiles(classes.split(",") if classes else None)
    )
    config = PlanConfig(
        samples=samples,
        local_epochs=local_epochs,
        batch_size=batch_size,
        encodings=tuple(encodings.split(",")),
        slack=slack,
        budget_s=budget_s,
        energy_budget_j=energy_budget_j,
        edge_load=edge_load,
        allow_raw_upload=allow_raw_upload,
        mode=mode,
        max_train_blocks=max_train_blocks,
        train_blocks=train_blocks,
        stage_depths=_integers(stage_depths, "--stage-depths") if stage_depths else (),
        exit_policy=exit_policy,
        exit_weights=_per_exit(exit_weights, "--exit-weights") if exit_weights else None,
        exit_accuracy=_per_exit(exit_accuracy, "--exit-accuracy") if exit_accuracy else None,
        seed=seed,
    )
    cuts, depths = _phone_numbers(cut, "--cut"), _phone_numbers(depth, "--depth")
    pins = {phone: Pin(cut=cuts.get(phone), depth=depths.get(phone)) for phone in cuts.keys() | depths.keys()}
    edge_profile = DeviceProfile.load(edge) if edge else None
    with _spinner("planning" if edge_profile else "profiling this host as the edge, then planning"):
        fleet = plan_fleet(model, phones, edge_profile, config, link, pins)
    if len(fleet.infeasible) == len(fleet.phones):
        reasons = "; ".join(f"{p.profile}: {p.reason}" for p in fleet.infeasible)
        raise PlanError(f"no phone can be planned, so no plan was written ({reasons})")
    _write_whole(out, fleet.save)
    table = Table(
        title=f"{fleet.model_id} for {len(fleet.phones)} phones, edge {fleet.edge}; "
        "predicted seconds per round, up and down also in MB"
    )
    for column in ("phone", "choice", "compute", "up", "down", "edge", "total", "MB"):
        table.add_column(
            column, justify="left" if column in ("phone", "choice") else "right", no_wrap=column == "phone"
        )
    for p in fleet.phones:
        if p.plan is None:
            table.add_row(p.profile, "[red]infeasible[/red]")
            continue
        d, t = p.plan, p.plan.predicted
        if d.exits:  # the branches it trains besides its blocks: one per exit held, the final one a block
            branches = len(d.exits) - (d.cut == len(fleet.block_names))
            trains = f"{p.trainable_blocks} block(s) + {branches} branch(es)"
            where = f"exit {d.cut}"
        else:
            trains = str(p.trainable_blocks)
            where = "all on phone" if d.cut == len(fleet.block_names) else f"cut {d.cut}"
        choice = f"{where}, trains {trains}, {d.engine}, {d.encoding}, b{d.batch_size}"
        # every byte of the round: the update and SplitFed activations up, the weights and gradients down
        mb_up = (t.get("up_bytes", 0) + t.get("activation_bytes", 0)) / 1e6
        mb_down = (t.get("down_bytes", 0) + t.get("gradient_bytes", 0)) / 1e6
        table.add_row(
            p.profile,
            choice,
            f"{t['compute']:.2f}",
            f"{t['upload']:.2f}\n{mb_up:.2f} MB",
            f"{t['download']:.2f}\n{mb_down:.2f} MB",
            *(f"{t[k]:.2f}" for k in ("edge", "total")),
            f"{p.memory_mb:.0f}",
        )
    console.print(table)
    for p in fleet.infeasible:
        err_console.print(
            f"[yellow]warning:[/yellow] {escape(p.profile)} infeasible: {escape(p.reason)}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"plan written to {out}"
        + (f"; [red]{len(fleet.infeasible)} phone(s) infeasible[/red]" if fleet.infeasible else "")
    )


def _phone_numbers(pins: list[str] | None, option: str) -> dict[str, int]:
    """``PHONE=N`` options as {phone: N}."""
    from toolkit.errors import PlanError

    out = {}
    for pin in pins or []:
        phone, _, n = pin.partition("=")
        if not phone or not n.isdigit() or int(n) < 1:
            raise PlanError(f"{option} takes PHONE=N with N of 1 or more (e.g. {option} weak=3), got {pin!r}")
        out[phone] = int(n)
    return out


def _per_exit(text: str, option: str) -> dict[int, float] | tuple[float, ...]:
    """``7=0.5,11=1`` as {7: 0.5, 11: 1.0}; ``0.5,1,1`` (one per exit, in order) as a tuple."""
    from toolkit.errors import PlanError

    items = text.split(",")
    try:
        if all("=" in item for item in items):
            pairs = [item.split("=", 1) for item in items]
            out = {int(position): float(value) for position, value in pairs}
            if len(out) == len(pairs):
                return out
        elif not any("=" in item for item in items):
            return tuple(float(item) for item in items)
    except ValueError:
        pass
    raise PlanError(
        f"{option} takes POSITION=VALUE pairs (e.g. 7=0.5,11=1), each exit once, or one value per exit "
        f"(e.g. 0.5,1,1); got {text!r}"
    )


def _integers(text: str, option: str) -> tuple[int, ...]:
    from toolkit.errors import PlanError

    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise PlanError(f"{option} takes comma-separated whole numbers, got {text!r}") from exc


def _run_simulation(config, out: Path) -> None:
    """Runs a simulation with a live display and prints where the report is."""
    from rich.live import Live
    from rich.table import Table

    from toolkit.simulation import simulate

    last = {"tick": None, "step": "starting"}

    def view(tick=None, step: str | None = None) -> Table:
        # a step after training (the report) keeps the last round's figures on screen
        last["tick"], last["step"] = tick or last["tick"], step or ("" if tick else last["step"])
        table = Table(
            title=f"fedkit simulate {config.name}: {len(config.phones)} phone group(s), {config.num_phones} phones",
            caption=last["step"],
        )
        for column in ("elapsed", "stage", "round", "reports", "accuracy", "uplink", "phones", "faults"):
            table.add_column(column)
        tick = last["tick"]
        if tick is not None:
            table.add_row(
                f"{tick.elapsed_s:.0f} s",
                tick.stage or "done",
                str(tick.round or "–"),
                f"{tick.reports}/{tick.assigned}",
                "–" if tick.accuracy is None else f"{tick.accuracy:.2%}",
                _size(tick.bytes_up),
                str(tick.phones_running),
                ", ".join(tick.faults[-3:]) or "none",
            )
        return table

    with Live(view(), console=err_console, refresh_per_second=2, transient=False) as live:
        summary = simulate(
            config, out, on_tick=lambda t: live.update(view(t)), on_step=lambda s: live.update(view(step=s))
        )
        live.update(view(step="report written"))
    if not err_console.is_terminal:
        err_console.print()  # Live leaves its last frame's line open where it is not a terminal (a log)
    accuracy = summary.final_accuracy
    ref = summary.reference
    console.print(
        f"{summary.rounds} rounds in {summary.wall_s:.0f} s; final accuracy "
        f"[bold]{'–' if accuracy is None else f'{accuracy:.2%}'}[/bold]"
        + (f" (centralized reference {ref.final_accuracy:.2%})" if ref else "")
        + f"; {summary.updates_accepted} updates accepted, {summary.accepted_lost} lost; "
        f"{len(summary.faults)} fault event(s)"
    )
    console.print(f"report: {summary.report}")


@app.command()
@fails_cleanly
def simulate(
    config: Annotated[Path, typer.Option(help="Simulation config (TOML): phones, data split, stages, faults.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder to create (must not exist, or be empty). Default: runs/<name>-<time>."),
    ] = None,
    netem: Annotated[
        bool,
        typer.Option("--netem", help="Shape links with network namespaces and tc (root only) instead of in-process."),
    ] = False,
) -> None:
    """Run a federation of emulated phones (one process each) against the real aggregator on this
    host, and write a run folder with the metrics, the aggregator database and an HTML report."""
    import time

    from toolkit.simulation import load_simulation

    if out is not None:
        _check_folder_output(out)
    sim = load_simulation(config)
    if netem:
        sim = sim.model_copy(update={"netem": True})
    _run_simulation(sim, out or Path("runs") / f"{sim.name}-{time.strftime('%Y%m%d-%H%M%S')}")


@app.command()
@fails_cleanly
def demo() -> None:
    """The whole loop in one command: 8 emulated phones of 4 catalogue classes fine-tune
    MobileNetV2 on Fashion-MNIST (head, then each phone's planned depth; int8 updates; one phone
    killed mid-training and resumed). Under 10 minutes on 2 cores; prints where the report is."""
    import time

    from toolkit.simulation import demo_config

    _run_simulation(demo_config(), Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")


@app.command()
@fails_cleanly
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by fedkit simulate or fedkit demo.")],
) -> None:
    """Rebuild a run's HTML report and plots from its run folder."""
    from toolkit.report import build_report

    console.print(f"report: {build_report(run_dir)}")


@app.command()
@fails_cleanly
def search(
    config: Annotated[
        Path, typer.Option(help="Search config (TOML): families, data slices, supernet, controller, reward β.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Search folder: new (or empty), or one holding this config's search, which continues where it "
            "stopped. Default: runs/search-<name>."
        ),
    ] = None,
) -> None:
    """Search a network: an LSTM controller samples networks from block pools of MobileNetV2 and
    EfficientNet-Lite (weights shared in one supernet) and learns from their rewards, accuracy
    scaled by size. Saves the chosen one as nas:NAME for plan, export and simulate, and writes
    search.json and an HTML report. Killed, it resumes from its last step when run again."""
    from toolkit.nas.config import load_nas

    nas = load_nas(config)
    _run_search(nas, out or Path("runs") / f"search-{nas.name}")


def _run_search(config, out: Path) -> None:
    """Runs a search with a progress bar and prints the chosen network, where it was saved and the report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from toolkit.nas.search import run_search

    phases = {"setup": "setting up", "warm-up": "warm-up batches", "search": "controller steps", "final": "finalists"}
    if config.strategy == "random":
        phases["search"] = "random steps"
    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("setting up", total=None, info="")

        def show(p) -> None:
            info = "" if p.last_reward is None else f"last reward {p.last_reward:.4f}"
            if p.best_reward is not None and p.phase == "search":
                info += f", best {p.best_reward:.4f} ({p.best_arch})"
            total = None if p.phase == "setup" else p.total
            bar.update(task, description=phases.get(p.phase, p.phase), completed=p.done, total=total, info=info)

        try:
            result = run_search(config, out, progress=show)
        except KeyboardInterrupt:
            bar.stop()
            _print_error(f"interrupted: run the same command again to continue from the last saved step in {out}")
            raise typer.Exit(130) from None
    c = result.chosen
    table = Table(title=f"chosen network: {c.arch_id}", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("blocks", "\n".join(c.description))
    table.add_row("parameters", f"{c.params:,} ({100 * c.params / result.baseline_params:.0f} % of MobileNetV2's)")
    table.add_row("MFLOPs / image", f"{c.mflops:.2f}")
    table.add_row("validation / test accuracy", f"{c.val_accuracy:.2%} / {c.test_accuracy:.2%}")
    table.add_row("reward", f"{c.reward:.4f} ({result.reward_formula}, β = {result.beta})")
    t = result.times
    table.add_row("time", f"{t.setup_s + t.warmup_s + t.search_s + t.final_s:.0f} s")
    console.print(table)
    # soft_wrap: a path stays whole on its line, for copying
    console.print(f"saved as [bold]{c.model_id}[/bold] in {c.saved_to}: use --model {c.model_id}", soft_wrap=True)
    console.print(f"report: {result.report}", soft_wrap=True)


@app.command()
@fails_cleanly
def deploy(
    bundle: Annotated[
        list[Path] | None, typer.Argument(help="Bundle folder(s) to install on one phone (one per trainable depth).")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="local:DIR (a phone folder on this host), adb:SERIAL (a phone over adb) or arm64:NAME "
            "(the emulated arm64 phone's folder /opt/fedkit/phones/NAME); "
            "with --fleet, local:DIR: each phone in DIR/PHONE."
        ),
    ] = None,
    shard: Annotated[Path | None, typer.Option(help="The phone's data shard (.npz with images and labels).")] = None,
    credential: Annotated[
        Path | None, typer.Option(help="JSON with url, device_id and token (or enrol_token) for the aggregator.")
    ] = None,
    fleet: Annotated[
        Path | None, typer.Option(help="phones.json of `fedkit export --plan`: deploy every phone of the plan.")
    ] = None,
    shards: Annotated[
        Path | None, typer.Option(help="With --fleet: the folder of `fedkit shards` (PHONE.npz).")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="With --fleet: the aggregator's URL (what `fedkit serve` listens on).")
    ] = None,
    enrol_tokens: Annotated[
        Path | None, typer.Option(help="With --fleet: a file of enrolment tokens, one per line (`fedkit enrol-token`).")
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Start the phone's sync loop after installing.")] = False,
) -> None:
    """Install bundles, a data shard and a credential on a phone, verify every hash there, and
    optionally start the runtime. With --fleet, every phone of a plan's export, each into its
    own folder with its shard and a credential made from --url and one enrolment token.
    Everything is checked first; a phone folder appears whole or not at all."""
    from android_harness.deploy import deploy as run_deploy
    from android_harness.deploy import deploy_fleet
    from toolkit.errors import DeployError

    if target is None:
        raise DeployError("--target is missing: local:DIR, adb:SERIAL or arm64:NAME")
    if fleet is None:
        if not bundle or shard is None or credential is None:
            raise DeployError(
                "a phone needs its bundle(s), --shard and --credential (or deploy a whole plan with --fleet)"
            )
        done = [run_deploy(bundle, target, shard, credential, start)]
    else:
        from toolkit.planning.export import read_index

        if bundle or shard or credential:
            raise DeployError(
                "--fleet takes the bundles, shards and credentials from the plan: drop BUNDLE, --shard and --credential"
            )
        if shards is None or url is None or enrol_tokens is None:
            raise DeployError("--fleet needs --shards DIR, --url URL and --enrol-tokens FILE")
        kind, _, root = target.partition(":")
        if kind != "local" or not root:
            raise DeployError(f"--fleet deploys to local:DIR, got {target!r}: deploy adb phones one at a time")
        try:
            tokens = [line.strip() for line in enrol_tokens.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise DeployError(
                f"cannot read the enrolment tokens {enrol_tokens} ({exc.strerror}): fedkit enrol-token --count N > FILE"
            ) from exc
        done = deploy_fleet(read_index(fleet), shards, url, tokens, Path(root), start)
    for d in done:
        console.print(
            f"deployed to {d.target}: {len(d.bundles)} bundle(s) verified there, shard sha256 {d.shard_sha256[:12]}…"
            + (f"; started ({d.started})" if d.started else "")
        )


@app.command("shards")
@fails_cleanly
def shards_command(
    out: Annotated[Path, typer.Option(help="Folder to create: PHONE.npz per phone and shards.json.")],
    plan_file: Annotated[
        Path | None, typer.Option("--plan", help="Name the shards after the plan's feasible phones.")
    ] = None,
    phones: Annotated[int | None, typer.Option(min=1, help="Or this many phones, phone-1 … phone-N.")] = None,
    partition: Annotated[
        Literal["iid", "dirichlet", "shards"], typer.Option(help="How labels spread over phones.")
    ] = "dirichlet",
    alpha: Annotated[float, typer.Option(min=0.001, help="Dirichlet concentration (smaller: more skew).")] = 0.5,
    shards_per_phone: Annotated[
        int, typer.Option(min=1, help="With --partition shards: label-sorted shards per phone.")
    ] = 2,
    images: Annotated[
        int, typer.Option(min=1, max=60000, help="Split the first N Fashion-MNIST training images.")
    ] = 60000,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
) -> None:
    """Split Fashion-MNIST's training images into one data shard per phone. A shard is an .npz
    with `images` (uint8, N×H×W) and `labels` (integers, N); bring your own images in that
    format (toolkit.data.write_shard) to train on them."""
    from rich.table import Table

    from toolkit.data import write_shards
    from toolkit.errors import ConfigError

    if plan_file is not None and phones is None:
        from toolkit.planning import load_plan

        names = [p.profile for p in load_plan(plan_file).phones if p.plan is not None]
    elif phones is not None and plan_file is None:
        names = [f"phone-{i}" for i in range(1, phones + 1)]
    else:
        raise ConfigError("choose one of --plan PLAN.json or --phones N")
    index = write_shards(
        out, names, partition, alpha=alpha, shards_per_phone=shards_per_phone, seed=seed, train_images=images
    )
    table = Table(title=f"{len(index)} shards in {out} ({partition})")
    table.add_column("phone")
    table.add_column("images", justify="right")
    table.add_column("images per label 0…9")
    for phone, entry in index.items():
        table.add_row(phone, f"{entry['images']:,}", " ".join(str(n) for n in entry["labels"]))
    console.print(table)


@app.command("run-config")
@fails_cleanly
def run_config_command(
    plan_file: Annotated[Path, typer.Option("--plan", help="The fleet plan (`fedkit plan`).")],
    out: Annotated[Path, typer.Option(help="Folder to create: run.toml and weights.bin (version 0).")],
    name: Annotated[str, typer.Option(help="The run's name.")] = "fleet",
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of the run's one stage.")] = 10,
    lr: Annotated[float, typer.Option(min=1e-9, help="Learning rate of the phones' SGD.")] = 0.01,
    head_rounds: Annotated[
        int,
        typer.Option(
            min=0, help="First, this many rounds training the classifier alone (needs --stage-depths 1 in the plan)."
        ),
    ] = 0,
    min_reports: Annotated[int, typer.Option(min=1, help="Updates a round waits for (until its deadline).")] = 1,
    deadline_s: Annotated[float, typer.Option(min=0.1, help="Seconds a round waits for its reports.")] = 120.0,
    evaluate: Annotated[
        int,
        typer.Option(
            min=0,
            max=10000,
            help="The aggregator evaluates every model version (every exit of an exit model) on this many "
            "Fashion-MNIST test images and keeps the best; 0: no evaluation.",
        ),
    ] = 0,
) -> None:
    """Write a run's config (run.toml) and its version-0 weights for `fedkit serve`: every block
    any phone of the plan trains, the SplitFed edge's too, and every branch of a model with
    exits. Each phone trains its own plan (encoding, batch, depth); edit run.toml's stages to
    override what a stage names."""
    from toolkit.planning import load_plan
    from toolkit.runs import evaluation_section, run_config, write_run

    fleet = load_plan(plan_file)
    if head_rounds and any(p.plan is not None and p.plan.exits for p in fleet.phones):
        raise FedkitError("an exit run trains one depth on every phone (the plan's train_blocks): drop --head-rounds")
    stages = [{"name": "head", "rounds": head_rounds, "lr": lr, "trainable_blocks": 1}] if head_rounds else []
    stages.append({"name": "train", "rounds": rounds, "lr": lr})
    sections: dict[str, Any] = {"fedavg": {"min_reports": min_reports, "deadline_s": deadline_s}}
    if evaluate:
        sections["evaluation"] = evaluation_section(fleet, evaluate)
    config = run_config(fleet, name, stages, **sections)
    path = write_run(config, fleet, out)
    console.print(
        f"run config written to {path} (version 0: {out / 'weights.bin'}"
        + ("; SplitFed edge on" if config.splitfed else "")
        + (f"; evaluated on {evaluate} test images" if evaluate else "")
        + f"); serve it with: fedkit serve --config {path}"
    )
