"""The emulated arm64 phone for every test module that needs one (built once, cached across
sessions in ``arm64.default_cache_dir()``, not in the session's FEDKIT_CACHE_DIR). Where it cannot
run, tests skip saying why and how to enable it -- except under CI=true, where they fail: CI must
run the arm64 phone (arm64_helpers.unavailable)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from android_harness import arm64

sys.path.insert(0, str(Path(__file__).parent))
from arm64_helpers import unavailable  # noqa: E402


@pytest.fixture(scope="session")
def arm64_phone() -> arm64.Arm64Phone:
    cache_dir = arm64.default_cache_dir()
    problem = arm64.host_problem(need_debootstrap=arm64.cached_rootfs(cache_dir) is None)
    if problem is not None:
        unavailable(problem)
    return arm64.ensure_phone(cache_dir, with_test_tools=True, log=print)
