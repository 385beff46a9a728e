"""Fixtures of the SplitFed tests (helpers in splitfed_helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The tests folders are not packages: make the helpers importable however pytest is started.
sys.path.insert(0, str(Path(__file__).parent))
from splitfed_helpers import small_cnn


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return small_cnn()
