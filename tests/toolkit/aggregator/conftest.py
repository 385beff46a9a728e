"""Fixtures of the aggregator tests (helpers in aggregator_helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

# The tests folders are not packages: make the helpers importable however pytest is started.
sys.path.insert(0, str(Path(__file__).parent))
from aggregator_helpers import Clock, make_coordinator

from toolkit.aggregator.app import create_app
from toolkit.aggregator.coordinator import Coordinator


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def coordinator(tmp_path, clock) -> Coordinator:
    return make_coordinator(tmp_path, clock, fedavg={"min_reports": 2, "deadline_s": 60})


@pytest.fixture
def client(coordinator) -> TestClient:
    return TestClient(create_app(coordinator))
