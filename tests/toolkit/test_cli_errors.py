"""Every bad input to every command: exit code 1, one "error:" line on stderr, no traceback, and
nothing written. Each case runs in its own empty folder (also the working directory), so a
file written anywhere under it, even by a relative default path, fails the case.

To add a case, add a row to CASES: the command line ("{tmp}" is the case's folder), the files
it needs (FILES' names), and a fragment of the error line. Keep it fast: no export, no training.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nas_helpers import TINY_NAS
from serving import self_signed_certificate
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.nas.config import parse_nas
from toolkit.profiling import DeviceProfile

runner = CliRunner()
DEMO = Path(__file__).parents[2] / "toolkit" / "simulation" / "demo.toml"


def _edge(folder: Path) -> Path:
    DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000).save(folder / "edge.json")
    return folder / "edge.json"


def _pem_pair(folder: Path) -> None:
    self_signed_certificate(folder)


def _run_config(folder: Path) -> None:  # a valid config whose initial weights are missing
    (folder / "run.toml").write_text(
        'name = "t"\nmodel = "small_cnn"\nweights = "weights.bin"\n[[stages]]\nname = "s"\nrounds = 1\nlr = 0.1\n'
    )


def _garbage(name: str, content: bytes = b"\x00\xffnot what fedkit wrote\x13" * 40):
    def make(folder: Path) -> None:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(content)

    return make


def _text(name: str, text: str):
    def make(folder: Path) -> None:
        (folder / name).write_text(text)

    return make


def _other_search(folder: Path) -> None:  # a search folder of another config (another seed)
    (folder / "out").mkdir()
    fingerprint = json.loads(parse_nas(tomllib.loads(TINY_NAS) | {"seed": 9}).fingerprint())
    (folder / "out" / "config.json").write_text(json.dumps(fingerprint))


def _full_folder(name: str):
    def make(folder: Path) -> None:
        (folder / name).mkdir()
        (folder / name / "keep.txt").write_text("someone's file\n")

    return make


def _profiles(folder: Path) -> None:  # a profile folder with one file that is not a profile
    (folder / "profiles").mkdir()
    (folder / "profiles" / "phone.json").write_text('{"name": "phone", "gflops": "fast"}')


def _bad_bundle(folder: Path) -> None:
    (folder / "bundle").mkdir()
    (folder / "bundle" / "manifest.json").write_text("{ not json")


def _unexportable_plan(folder: Path) -> None:  # a small_cnn plan whose second phone's encoding no phone reads
    from dataclasses import replace

    from toolkit.models import load_model
    from toolkit.planning import PlanConfig, Planner
    from toolkit.profiling import links

    phones = [
        DeviceProfile(name=name, source="catalog", cpu_cores=8, gflops=20.0, memory_mb=900.0, link=links()["4g"])
        for name in ("a", "b")
    ]
    fleet = Planner(load_model("small_cnn"), DeviceProfile.load(_edge(folder)), PlanConfig()).plan(phones)
    b = fleet.phones[1]
    bad = b.model_copy(update={"plan": replace(b.plan, encoding="int3", batch_size=b.plan.batch_size // 2)})
    fleet.model_copy(update={"phones": [fleet.phones[0], bad]}).save(folder / "plan.json")
    (folder / "edge.json").unlink()


def _credential(folder: Path) -> None:
    (folder / "cred.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "device_id": "p", "token": "t"}))


FILES = {  # name → how to make it in a case's folder
    "edge.json": _edge,
    "pem pair": _pem_pair,
    "run.toml": _run_config,
    "corrupt plan.json": _garbage("plan.json"),
    "unexportable plan.json": _unexportable_plan,
    "truncated plan.json": _garbage("plan.json", b'{"schema_version": 1, "model_id": "sma'),
    "corrupt run.toml": _garbage("run.toml"),
    "corrupt sim.toml": _garbage("sim.toml"),
    "corrupt db.sqlite": _garbage("db.sqlite"),
    "corrupt cert.pem": _garbage("cert.pem"),
    "corrupt edge.json": _garbage("edge.json"),
    "truncated edge.json": _garbage("edge.json", b'{"name": "edge", "gfl'),
    "corrupt data": lambda folder: [
        _garbage(f"data/{name}")(folder)
        for name in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    ],
    "data folder": lambda folder: (folder / "data").mkdir(),
    "full out": _full_folder("out"),
    "full run": _full_folder("run"),
    "corrupt profiles": _profiles,
    "corrupt bundle": _bad_bundle,
    "cred.json": _credential,
    "empty run": lambda folder: (folder / "run").mkdir(),
    "tiny nas.toml": _text("tiny.toml", TINY_NAS),
    "nas.toml, not TOML": _text("nas.toml", 'name = "x\n'),
    "nas.toml, unknown key": _text("nas.toml", 'name = "x"\n[controller]\nstepz = 3\n'),
    "nas.toml, bad value": _text("nas.toml", 'name = "x"\n[reward]\nbeta = -7\n'),
    "nas.toml, one family": _text("nas.toml", 'name = "x"\nfamilies = ["mobilenet_v2"]\n'),
    "other search": _other_search,
}


@dataclass(frozen=True)
class Case:
    args: str  # the command line; "{tmp}" is the case's folder
    says: str  # a fragment of the one error line
    files: tuple[str, ...] = ()  # FILES the case needs, made before it runs
    env: dict[str, str] = field(default_factory=dict)  # "{tmp}" is the case's folder here too


CASES = {
    # search: --config NAS.toml, --out DIR (new, empty, or this config's search)
    "search: missing config": Case("search --config {tmp}/nope.toml --out {tmp}/out", "nope.toml does not exist"),
    "search: not TOML": Case(
        "search --config {tmp}/nas.toml --out {tmp}/out", "is not valid TOML", ("nas.toml, not TOML",)
    ),
    "search: unknown key": Case(
        "search --config {tmp}/nas.toml --out {tmp}/out", "controller.stepz", ("nas.toml, unknown key",)
    ),
    "search: bad value": Case(
        "search --config {tmp}/nas.toml --out {tmp}/out", "reward.beta", ("nas.toml, bad value",)
    ),
    "search: one family": Case(
        "search --config {tmp}/nas.toml --out {tmp}/out", "two or more distinct", ("nas.toml, one family",)
    ),
    "search: no config option": Case("search --out {tmp}/out", "Missing option '--config'"),
    "search: out holds other files": Case(
        "search --config {tmp}/tiny.toml --out {tmp}/out", "not a search folder", ("tiny nas.toml", "full out")
    ),
    "search: out holds another config's search": Case(
        "search --config {tmp}/tiny.toml --out {tmp}/out", "differing: seed", ("tiny nas.toml", "other search")
    ),
    "search: missing dataset": Case(
        "search --config {tmp}/tiny.toml --out {tmp}/out",
        "is missing",
        ("tiny nas.toml", "data folder"),
        {"FEDKIT_DATA_DIR": "{tmp}/data"},
    ),
    # train-central: data in $FEDKIT_DATA_DIR, --out FILE
    "train-central: missing dataset": Case(
        "train-central --model small_cnn --out {tmp}/c.json",
        "is missing",
        ("data folder",),
        {"FEDKIT_DATA_DIR": "{tmp}/data"},
    ),
    "train-central: corrupt dataset": Case(
        "train-central --model small_cnn --out {tmp}/c.json",
        "data",
        ("corrupt data",),
        {"FEDKIT_DATA_DIR": "{tmp}/data"},
    ),
    "train-central: epochs 0": Case("train-central --epochs 0 --out {tmp}/c.json", "epochs must be at least 1"),
    "train-central: max-train 0": Case("train-central --max-train 0 --out {tmp}/c.json", "at least 1"),
    "train-central: out folder missing": Case("train-central --out {tmp}/missing/c.json", "missing does not exist"),
    # export: --out DIR (must not exist, or be empty), --plan FILE
    "export: missing plan": Case("export --plan {tmp}/nope.json --out {tmp}/out", "nope.json"),
    "export: corrupt plan": Case("export --plan {tmp}/plan.json --out {tmp}/out", "plan", ("corrupt plan.json",)),
    "export: truncated plan": Case(
        "export --plan {tmp}/plan.json --out {tmp}/out", "plan.json", ("truncated plan.json",)
    ),
    "export --plan: an entry that cannot be exported": Case(
        "export --plan {tmp}/plan.json --out {tmp}/out", "int3", ("unexportable plan.json",)
    ),
    "export: out exists": Case("export --out {tmp}/out --model small_cnn", "already exists", ("full out",)),
    "export --plan: out exists": Case(
        "export --plan {tmp}/plan.json --out {tmp}/out", "already exists", ("corrupt plan.json", "full out")
    ),
    "export: batch size 0": Case("export --out {tmp}/out --batch-size 0", "--batch-size"),
    "export: train blocks 0": Case("export --out {tmp}/out --train-blocks 0", "--train-blocks"),
    # serve: --config FILE, --port, TLS files; a failed start leaves no database
    "serve: missing config": Case("serve --config {tmp}/nope.toml", "does not exist"),
    "serve: corrupt config": Case("serve --config {tmp}/run.toml", "run.toml", ("corrupt run.toml",)),
    "serve: missing initial weights": Case("serve --config {tmp}/run.toml", "weights.bin", ("run.toml",)),
    "serve: port 99999": Case("serve --config {tmp}/run.toml --port 99999", "--port", ("run.toml",)),
    "serve: port 0": Case("serve --config {tmp}/run.toml --port 0", "--port", ("run.toml",)),
    "serve: missing certificate": Case(
        "serve --config {tmp}/run.toml --certfile {tmp}/nope.pem --keyfile {tmp}/key.pem",
        "nope.pem does not exist",
        ("run.toml", "pem pair"),
    ),
    "serve: missing key": Case(
        "serve --config {tmp}/run.toml --certfile {tmp}/cert.pem --keyfile {tmp}/nope.pem",
        "nope.pem does not exist",
        ("run.toml", "pem pair"),
    ),
    "serve: corrupt certificate": Case(
        "serve --config {tmp}/run.toml --certfile {tmp}/cert.pem --keyfile {tmp}/key.pem",
        "not a PEM certificate",
        ("run.toml", "pem pair", "corrupt cert.pem"),
    ),
    "serve: certificate without key": Case(
        "serve --config {tmp}/run.toml --certfile {tmp}/cert.pem",
        "both --certfile and --keyfile",
        ("run.toml", "pem pair"),
    ),
    # status, enrol-token, export-global: --db FILE
    "status: missing db": Case("status --db {tmp}/nope.sqlite", "no aggregator database"),
    "status: corrupt db": Case("status --db {tmp}/db.sqlite", "db.sqlite", ("corrupt db.sqlite",)),
    "enrol-token: count -2": Case("enrol-token --db {tmp}/db.sqlite --count -2", "--count"),
    "enrol-token: count 0": Case("enrol-token --db {tmp}/db.sqlite --count 0", "--count"),
    "enrol-token: corrupt db": Case("enrol-token --db {tmp}/db.sqlite", "db.sqlite", ("corrupt db.sqlite",)),
    "export-global: missing db": Case("export-global --db {tmp}/nope.sqlite --out {tmp}/g.pt", "nope.sqlite"),
    "export-global: corrupt db": Case(
        "export-global --db {tmp}/db.sqlite --out {tmp}/g.pt", "db.sqlite", ("corrupt db.sqlite",)
    ),
    "export-global: out folder missing": Case(
        "export-global --db {tmp}/db.sqlite --out {tmp}/missing/g.pt", "missing does not exist", ("corrupt db.sqlite",)
    ),
    "export-global: version -1": Case(
        "export-global --db {tmp}/db.sqlite --out {tmp}/g.pt --version -1", "--version", ("corrupt db.sqlite",)
    ),
    # profile: checked before measuring
    "profile: out folder missing": Case("profile --local --out {tmp}/missing/p.json", "missing does not exist"),
    "profile: aggregator not a URL": Case("profile --local --aggregator notaurl", "not an http(s) URL"),
    "profile: batch 0": Case("profile --local --batch 0", "--batch"),
    "profile: a flag given a value": Case("profile --local true", "unexpected extra argument"),
    "profile: neither source": Case("profile", "choose one of --local"),
    # plan: --out FILE, profiles in, numbers; no phone feasible is a failure
    "plan: slack -1": Case("plan --catalog --slack -1 --out {tmp}/p.json", "--slack"),
    "plan: samples 0": Case("plan --catalog --samples 0 --out {tmp}/p.json", "--samples"),
    "plan: budget 0": Case("plan --catalog --budget-s 0 --out {tmp}/p.json", "--budget-s must be more than 0"),
    "plan: energy budget -1": Case("plan --catalog --energy-budget-j -1 --out {tmp}/p.json", "--energy-budget-j"),
    "plan: out folder missing": Case("plan --catalog --out {tmp}/missing/plan.json", "missing does not exist"),
    "plan: missing profiles": Case(
        "plan --profiles {tmp}/nope --edge {tmp}/edge.json --out {tmp}/p.json", "nope", ("edge.json",)
    ),
    "plan: corrupt profile": Case(
        "plan --profiles {tmp}/profiles --edge {tmp}/edge.json --out {tmp}/p.json",
        "phone.json",
        ("edge.json", "corrupt profiles"),
    ),
    "plan: missing edge": Case("plan --catalog --edge {tmp}/nope.json --out {tmp}/p.json", "nope.json"),
    "plan: corrupt edge": Case(
        "plan --catalog --edge {tmp}/edge.json --out {tmp}/p.json", "edge.json", ("corrupt edge.json",)
    ),
    "plan: truncated edge": Case(
        "plan --catalog --edge {tmp}/edge.json --out {tmp}/p.json", "edge.json", ("truncated edge.json",)
    ),
    "plan: unknown link": Case(
        "plan --catalog --link 7g --edge {tmp}/edge.json --out {tmp}/p.json", "7g", ("edge.json",)
    ),
    "plan: every phone infeasible": Case(
        "plan --catalog --budget-s 0.001 --model small_cnn --edge {tmp}/edge.json --out {tmp}/p.json",
        "no phone can be planned",
        ("edge.json",),
    ),
    # simulate: --config FILE, --out DIR (must not exist, or be empty)
    "simulate: missing config": Case("simulate --config {tmp}/nope.toml --out {tmp}/run", "nope.toml"),
    "simulate: corrupt config": Case(
        "simulate --config {tmp}/sim.toml --out {tmp}/run", "sim.toml", ("corrupt sim.toml",)
    ),
    "simulate: out exists": Case(f"simulate --config {DEMO} --out {{tmp}}/run", "already exists", ("full run",)),
    # report: RUN_DIR
    "report: missing run folder": Case("report {tmp}/nope", "nope"),
    "report: not a run folder": Case("report {tmp}/run", "run", ("empty run",)),
    # deploy: BUNDLE folders, --target
    "deploy: missing bundle": Case(
        "deploy {tmp}/nope --target local:{tmp}/phone --shard {tmp}/s.npz --credential {tmp}/cred.json",
        "nope",
        ("cred.json",),
    ),
    "deploy: corrupt bundle": Case(
        "deploy {tmp}/bundle --target local:{tmp}/phone --shard {tmp}/s.npz --credential {tmp}/cred.json",
        "bundle",
        ("corrupt bundle", "cred.json"),
    ),
    "deploy: no shard or credential": Case(
        "deploy {tmp}/bundle --target local:{tmp}/phone", "--shard and --credential", ("corrupt bundle",)
    ),
    "deploy: no target": Case(
        "deploy {tmp}/bundle --shard {tmp}/s.npz --credential {tmp}/cred.json", "--target is missing", ("cred.json",)
    ),
    "deploy --fleet: missing index": Case(
        "deploy --fleet {tmp}/nope.json --shards {tmp} --url http://127.0.0.1:1 "
        "--enrol-tokens {tmp}/cred.json --target local:{tmp}/phones",
        "nope.json",
        ("cred.json",),
    ),
    "deploy --fleet: missing tokens": Case(
        "deploy --fleet {tmp}/nope.json --shards {tmp} --url http://127.0.0.1:1 "
        "--enrol-tokens {tmp}/tokens.txt --target local:{tmp}/phones",
        "enrolment tokens",
    ),
    "deploy --fleet: adb target": Case(
        "deploy --fleet {tmp}/nope.json --shards {tmp} --url http://127.0.0.1:1 "
        "--enrol-tokens {tmp}/cred.json --target adb:x",
        "one at a time",
        ("cred.json",),
    ),
    "deploy --fleet: with a bundle": Case(
        "deploy {tmp}/bundle --fleet {tmp}/nope.json --target local:{tmp}/phones", "drop BUNDLE", ("corrupt bundle",)
    ),
    # shards: --out DIR (must not exist, or be empty), --plan FILE or --phones N
    "shards: neither source": Case("shards --out {tmp}/s", "choose one of --plan"),
    "shards: phones 0": Case("shards --phones 0 --out {tmp}/s", "--phones"),
    "shards: alpha 0": Case("shards --phones 2 --alpha 0 --out {tmp}/s", "--alpha"),
    "shards: out exists": Case("shards --phones 2 --out {tmp}/out", "already exists", ("full out",)),
    "shards: corrupt plan": Case("shards --plan {tmp}/plan.json --out {tmp}/s", "plan.json", ("corrupt plan.json",)),
    # run-config: --plan FILE, --out DIR (must not exist, or be empty)
    "run-config: missing plan": Case("run-config --plan {tmp}/nope.json --out {tmp}/run", "nope.json"),
    "run-config: corrupt plan": Case(
        "run-config --plan {tmp}/plan.json --out {tmp}/run", "plan.json", ("corrupt plan.json",)
    ),
    "run-config: out exists": Case(
        "run-config --plan {tmp}/plan.json --out {tmp}/run", "already exists", ("unexportable plan.json", "full run")
    ),
    "run-config: rounds 0": Case("run-config --plan {tmp}/plan.json --out {tmp}/run --rounds 0", "--rounds"),
    # profile --catalog and plan pins
    "profile: unknown catalogue class": Case("profile --catalog nope", "unknown phone class"),
    "profile: --link without --catalog": Case("profile --local --link wifi", "use it with --catalog"),
    "plan: a pin without a number": Case(
        "plan --catalog --cut weak --edge {tmp}/edge.json --out {tmp}/p.json", "--cut takes PHONE=N", ("edge.json",)
    ),
    "plan: a pin naming no phone": Case(
        "plan --catalog --depth nope=1 --edge {tmp}/edge.json --out {tmp}/p.json", "pins name nope", ("edge.json",)
    ),
    # any command: usage errors are one line too
    "unknown command": Case("nope", "No such command"),
    "unknown option": Case("status --bogus", "No such option"),
    "missing option": Case("status", "Missing option '--db'"),
}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder``: (size, modification time)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_bad_input_fails_in_one_line_and_writes_nothing(case: Case, tmp_path, monkeypatch):
    # Prepare: the case's files in an empty folder, which is also the working directory
    for name in case.files:
        FILES[name](tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    args = case.args.format(tmp=tmp_path).split()
    env = {k: v.format(tmp=tmp_path) for k, v in case.env.items()}

    # Execute
    result = runner.invoke(app, args, env=env)

    # Assert
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.says in lines[0]
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert "Traceback" not in result.output
    assert _snapshot(tmp_path) == before, "the failed command wrote files"


@pytest.mark.parametrize("command", ["", "profile", "plan", "train-central", "enrol-token", "simulate", "deploy"])
def test_boolean_options_are_flags_without_a_value_in_help(command):
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert "--help" in result.output and "<bool>" not in result.output
