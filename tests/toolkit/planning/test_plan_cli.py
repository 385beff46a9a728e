"""`fedkit plan` through the real CLI (typer's CliRunner)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.planning import load_plan
from toolkit.profiling import DeviceProfile, catalog_profiles

runner = CliRunner()


def _edge(tmp_path):
    path = tmp_path / "edge.json"
    DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000).save(path)
    return path


def test_plan_catalogue_classes_writes_a_plan_and_a_table(tmp_path):
    result = runner.invoke(
        app,
        [
            "plan",
            "--catalog",
            "--classes",
            "entry-2018,flagship-2024",
            "--link",
            "3g",
            "--model",
            "small_cnn",
            "--edge",
            str(_edge(tmp_path)),
            "--out",
            str(tmp_path / "plan.json"),
        ],
    )

    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "plan.json")
    assert [p.profile for p in plan.phones] == ["entry-2018", "flagship-2024"]
    assert plan.model_id == "small_cnn" and plan.edge == "edge"
    for word in ("entry-2018", "flagship-2024", "compute", "up", "down", "edge", "total"):
        assert word in result.output


def test_plan_profiles_folder_reports_infeasible_phones(tmp_path):
    folder = tmp_path / "profiles"
    folder.mkdir()
    [phone] = catalog_profiles(["low-2019"])
    phone.save(folder / "ok.json")
    phone.model_copy(update={"name": "tiny", "memory_mb": 5}).save(folder / "tiny.json")

    result = runner.invoke(
        app,
        [
            "plan",
            "--profiles",
            str(folder),
            "--model",
            "small_cnn",
            "--edge",
            str(_edge(tmp_path)),
            "--out",
            str(tmp_path / "plan.json"),
        ],
    )

    assert result.exit_code == 0, result.output
    assert "tiny infeasible" in result.output and "nothing fits memory" in result.output
    assert len(load_plan(tmp_path / "plan.json").infeasible) == 1


def test_plan_option_errors_are_one_line(tmp_path):
    neither = runner.invoke(app, ["plan", "--out", str(tmp_path / "p.json")])
    unknown = runner.invoke(app, ["plan", "--catalog", "--classes", "nokia-3310", "--out", str(tmp_path / "p.json")])

    assert neither.exit_code == 1 and "choose one of --profiles DIR or --catalog" in neither.output
    assert unknown.exit_code == 1 and "unknown phone class" in unknown.output


def test_plan_an_exit_model_shows_each_phones_exit(tmp_path):
    result = runner.invoke(
        app,
        [
            "plan",
            "--catalog",
            "--classes",
            "low-2019,flagship-2023",
            "--model",
            "mobilenet_v2+exits",
            "--budget-s",
            "3",
            "--exit-weights",
            "7=0.5,21=2",
            "--edge",
            str(_edge(tmp_path)),
            "--out",
            str(tmp_path / "plan.json"),
        ],
        env={"COLUMNS": "200"},
    )

    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "plan.json")
    weak, flagship = (p.plan for p in plan.phones)
    assert plan.model_id == "mobilenet_v2+exits:7,11,14,17"
    assert flagship.exits == (7, 11, 14, 17, 21) and flagship.exit_weights == (0.5, 1.0, 1.0, 1.0, 2.0)
    assert weak.cut < flagship.cut and weak.exit_weights[0] == 0.5
    assert f"exit {weak.cut}, trains" in result.output and "exit 21, trains 1 block(s) + 4 branch(es)" in result.output


def _exit_plan(folder):
    from toolkit.models import load_model
    from toolkit.planning import PlanConfig, Planner

    phone = catalog_profiles(["mid-2022"])[0]
    Planner(load_model("small_cnn+exits:1,2"), DeviceProfile.load(_edge(folder)), PlanConfig()).plan([phone]).save(
        folder / "plan.json"
    )


@pytest.mark.parametrize(
    "args, says",
    [
        ("plan --model small_cnn+exits:1,2 --exit-weights x=1", "--exit-weights takes POSITION=VALUE pairs"),
        ("plan --model small_cnn+exits:1,2 --exit-weights 1=0.5,2", "--exit-weights takes POSITION=VALUE pairs"),
        ("plan --model small_cnn+exits:1,2 --exit-weights 1=1,1=2", "each exit once"),
        ("plan --model small_cnn+exits:1,2 --exit-weights 3=1", "exit weights for positions [3], which are no exits"),
        ("plan --model small_cnn+exits:1,2 --exit-weights 1=-1", "every weight must be a number of 0 or more"),
        ("plan --model small_cnn+exits:1,2 --exit-accuracy 1=0.8,2=0.9", "exit accuracies leave out exits [5]"),
        ("plan --model small_cnn+exits:1,2 --mode splitfed", "SplitFed + exits is not supported"),
        ("plan --model small_cnn+exits:1,2 --cut mid-2022=3", "cut 3 is no exit"),
        ("plan --model small_cnn+exits:x", "exit positions must be integers"),
        ("plan --model small_cnn --exit-weights 1=1", "small_cnn has no early exits"),
        ("plan --model small_cnn --exit-policy random", "plan small_cnn+exits"),
        ("export --model small_cnn+exits:1,2 --cut 3 --out {tmp}/b", "has exits at 1, 2, 5: --cut one of them"),
        ("run-config --plan {tmp}/plan.json --head-rounds 1 --out {tmp}/r", "drop --head-rounds"),
    ],
)
def test_bad_exit_options_fail_in_one_line_and_write_nothing(args, says, tmp_path, monkeypatch):
    # Prepare: an edge, an exit plan, and the plan command's phones
    _exit_plan(tmp_path)
    monkeypatch.chdir(tmp_path)
    if args.startswith("plan"):
        args += " --catalog --classes mid-2022 --edge {tmp}/edge.json --out {tmp}/p.json"
    before = sorted(tmp_path.rglob("*"))

    # Execute
    result = runner.invoke(app, args.format(tmp=tmp_path).split())

    # Assert
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert sorted(tmp_path.rglob("*")) == before
