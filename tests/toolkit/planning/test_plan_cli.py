"""`fedkit plan` through the real CLI (typer's CliRunner)."""

from __future__ import annotations

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
