"""Shared fixtures. Every test session gets its own feature cache and models folder, so tests
never read or fill the user's ~/.cache/fedkit or saved networks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from toolkit.data import FashionMNIST, load_fashion_mnist


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDKIT_CACHE_DIR", str(tmp_path_factory.mktemp("fedkit-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _session_models_dir(tmp_path_factory):
    """Searched networks (nas:NAME) are saved to and loaded from the session's own folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDKIT_MODELS_DIR", str(tmp_path_factory.mktemp("fedkit-models")))
        yield


@pytest.fixture(scope="session")
def fashion_train() -> FashionMNIST:
    return load_fashion_mnist("train")


@pytest.fixture(scope="session")
def fashion_test() -> FashionMNIST:
    return load_fashion_mnist("test")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: on the shared 2-core machine under load, torch's
    two OpenMP threads wait on each other and small convolutions get ~30× slower."""
    import torch  # here, so modules that never ask for it stay torch-free

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_cnn_bundle(tmp_path_factory):
    """A factory of small_cnn bundles: ``small_cnn_bundle(cut=None, train_blocks=1,
    engines=("ort",))`` exports one (cut None = all blocks on the phone) the first time it is
    asked for and returns its folder. Bundles are shared by the whole session: copy one before
    changing it. Same seed, same weights: every call gives the same model."""
    made = {}

    def make(cut: int | None = None, train_blocks: int = 1, engines: tuple[str, ...] = ("ort",)):
        key = (cut, train_blocks, tuple(engines))
        if key not in made:
            import torch  # here, so tests that never ask for a bundle stay torch-free

            from device_runtime.manifest import DevicePlan
            from exporters.bundle import export_bundle
            from toolkit.data import LABEL_NAMES
            from toolkit.models import load_model

            torch.manual_seed(0)  # small_cnn's backbone is drawn from torch's global generator
            model = load_model("small_cnn")
            stop = len(model.block_names) if cut is None else cut
            plan = DevicePlan(cut=stop, train_from=model.train_from(stop, train_blocks), engine=engines[0])
            out = tmp_path_factory.mktemp("small_cnn_bundle") / "bundle"
            export_bundle(model, plan, out, engines, label_names=LABEL_NAMES)
            made[key] = out
        return made[key]

    return make


# Module-scoped: a test module may switch a model's mode or requires_grad; the next module gets
# a fresh one. load_model is deterministic (small_cnn's backbone is seeded too).
@pytest.fixture(scope="module")
def mobilenet():
    from toolkit.models import load_model  # imports torch: only for the tests that ask

    return load_model("mobilenet_v2")


@pytest.fixture(scope="module")
def small_cnn():
    from toolkit.models import load_model

    return load_model("small_cnn")


@pytest.fixture(scope="session")
def wait_for_checkpoint():
    """``wait(proc, checkpoint, reached)`` returns once the trainer checkpoint at ``checkpoint``
    satisfies ``reached(state)``, or ``proc`` has exited: where a kill test aims its SIGKILL."""
    import time

    from device_runtime.checkpoint import load_checkpoint

    def wait(proc, checkpoint, reached) -> None:
        seen = None
        while proc.poll() is None:
            mtime = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            if mtime != seen:
                seen = mtime
                state = load_checkpoint(checkpoint)
                if state is not None and reached(state):
                    return
            time.sleep(0.003)

    return wait


# The emulated arm64 phone for every test that needs one (built once: minutes; cached across
# sessions in arm64.default_cache_dir(), not in the session's FEDKIT_CACHE_DIR). Where it cannot
# run, those tests skip saying why and how to enable it -- except under CI=true, where they fail.
sys.path.insert(0, str(Path(__file__).parent))
from arm64_helpers import unavailable  # noqa: E402  (needs the sys.path entry above)


@pytest.fixture(scope="session")
def arm64_phone():
    from android_harness import arm64

    cache_dir = arm64.default_cache_dir()
    problem = arm64.host_problem(need_debootstrap=arm64.cached_rootfs(cache_dir) is None)
    if problem is not None:
        unavailable(problem)
    return arm64.ensure_phone(cache_dir, with_test_tools=True, log=print)


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    """The stand-in for a phone over adb (``fake_adb.py``) on PATH as `adb`, serial "fake-phone";
    returns (a function giving its argv log, the folder standing for its storage)."""
    from fake_adb import fake_adb_on_path

    return fake_adb_on_path(tmp_path, monkeypatch)


@pytest.fixture
def serve_run(tmp_path):
    """Serves a run on loopback (the real app, ``serving``): ``serve_run(bundle, rounds=2)``
    starts a FedAvg run whose version 0 is that bundle's weights and returns ``(url,
    coordinator)``; stopped after the test."""
    import contextlib
    import itertools

    from serving import serving

    from toolkit.aggregator.app import create_app
    from toolkit.aggregator.config import parse_config
    from toolkit.aggregator.coordinator import Coordinator
    from toolkit.aggregator.store import Store

    runs = itertools.count()
    with contextlib.ExitStack() as servers:

        def start(bundle, rounds: int = 2):
            n = next(runs)
            config = parse_config(
                {
                    "name": f"t{n}",
                    "bundle": str(bundle),
                    "fedavg": {"min_reports": 1},
                    "stages": [{"name": "s", "rounds": rounds, "lr": 0.05}],
                },
                tmp_path,
            )
            coordinator = Coordinator(config, Store(tmp_path / f"agg{n}.sqlite"))
            coordinator.start()
            return servers.enter_context(serving(create_app(coordinator, tick_seconds=0.2))), coordinator

        yield start
