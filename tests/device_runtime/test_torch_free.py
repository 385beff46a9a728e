"""device_runtime runs where torch is not installed: a whole local round in a process where
``import torch`` and ``import executorch.exir`` fail, and no module of the package imports them."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import device_runtime
from device_runtime.manifest import DevicePlan
from exporters.bundle import export_bundle
from toolkit.data import LABEL_NAMES, write_shard
from toolkit.models import load_model

FORBIDDEN = ("torch", "executorch.exir")

# Runs in the child: forbid the imports, run one round through the phone's entry point, then
# report what got imported.
PHONE = """
import importlib.abc, json, sys

FORBIDDEN = {forbidden!r}

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            raise ImportError(f"{{name}} is not installed on a phone")
        return None

sys.meta_path.insert(0, NoTorch())
from device_runtime.__main__ import main
code = main({argv!r})
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
print(json.dumps({{"exit": code, "forbidden_loaded": loaded}}))
"""


def run_phone(argv: list[str]) -> dict:
    """One round in a torch-free child process; its stats (peak RSS included)."""
    run = subprocess.run(
        [sys.executable, "-c", PHONE.format(forbidden=FORBIDDEN, argv=argv)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    stats_line, report_line = run.stdout.strip().splitlines()[-2:]
    report = json.loads(report_line)
    assert report == {"exit": 0, "forbidden_loaded": []}, run.stderr
    return json.loads(stats_line)


def test_the_blocker_really_blocks():
    code = PHONE.split("from device_runtime")[0] + "import torch\n"
    run = subprocess.run([sys.executable, "-c", code.format(forbidden=FORBIDDEN)], capture_output=True, text=True)

    assert run.returncode == 1 and "torch is not installed on a phone" in run.stderr


def test_a_whole_round_runs_without_torch(tmp_path, fashion_train):
    bundle = tmp_path / "bundle"
    export_bundle(
        load_model("small_cnn"),
        DevicePlan(cut=5, train_from=2, batch_size=16),
        bundle,
        ("ort",),
        label_names=LABEL_NAMES,
    )
    shard = write_shard(tmp_path / "shard.npz", fashion_train.images[:300], fashion_train.labels[:300])
    out = tmp_path / "update.bin"

    stats = run_phone(
        ["train", "--bundle", str(bundle), "--shard", str(shard), "--workdir", str(tmp_path / "w"), "--out", str(out)]
    )

    assert stats["engine"] == "ort" and stats["num_samples"] == 270 and stats["steps"] == 17
    assert out.stat().st_size == stats["update_bytes"] > 0


@pytest.mark.slow
def test_mobilenet_v2_head_round_fits_in_150_mb(tmp_path, fashion_train):
    # B1 variant A on one phone: frozen MobileNetV2 backbone, the head trains; 3000 images, 1 epoch
    model = load_model("mobilenet_v2")
    n = len(model.block_names)
    bundle = tmp_path / "bundle"
    export_bundle(model, DevicePlan(cut=n, train_from=n - 1), bundle, ("ort",), label_names=LABEL_NAMES)
    del model
    shard = write_shard(tmp_path / "shard.npz", fashion_train.images[:3000], fashion_train.labels[:3000])

    stats = run_phone(
        ["train", "--bundle", str(bundle), "--shard", str(shard), "--workdir", str(tmp_path / "w"), "--holdout", "0"]
    )

    print(json.dumps(stats))
    assert stats["num_samples"] == 3000 and stats["steps"] == 94
    assert stats["peak_rss_mb"] <= 150, stats


# The one allowed exception: ExecuTorch's Python runtime bindings take only torch tensors, so
# the executorch engine imports torch inside the function that opens it (a phone runs the same
# programs through ExecuTorch's Android TrainingModule, without Python). Nothing imports torch
# or executorch.exir when device_runtime is imported, and the ort path never does.
LAZY_ALLOWED = {("device_runtime/engines/executorch.py", "torch")}


def _imports(tree: ast.AST, in_function: bool = False):
    """(imported module, imported inside a function?) for every import in ``tree``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module, in_function
            yield from ((f"{node.module}.{alias.name}", in_function) for alias in node.names)
        elif isinstance(node, ast.Call) and _called(node) in ("import_module", "__import__"):
            yield from (
                (a.value, in_function)
                for a in node.args[:1]
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            )
        yield from _imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _called(call: ast.Call) -> str:
    return getattr(call.func, "attr", getattr(call.func, "id", ""))


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_no_module_of_device_runtime_imports_torch_or_the_executorch_exporter():
    root = Path(device_runtime.__file__).parent
    files = sorted(root.rglob("*.py"))
    offenders = [
        f"{rel}: {name}{' (inside a function)' if lazy else ''}"
        for path in files
        for rel in [path.relative_to(root.parent).as_posix()]
        for name, lazy in _imports(ast.parse(path.read_text(), filename=str(path)))
        if _forbidden(name) and not (lazy and (rel, name) in LAZY_ALLOWED)
    ]

    assert len(files) >= 8 and offenders == []


def test_the_static_check_finds_imports_at_any_depth():
    tree = ast.parse(
        "import numpy\n"
        "from torch import nn\n"
        "try:\n    import executorch.exir as exir\nexcept ImportError:\n    pass\n"
        "def lazy():\n    import torch\n    importlib.import_module('executorch.exir')\n"
    )

    assert [(n, lazy) for n, lazy in _imports(tree) if _forbidden(n)] == [
        ("torch", False),
        ("torch.nn", False),
        ("executorch.exir", False),
        ("torch", True),
        ("executorch.exir", True),
    ]
