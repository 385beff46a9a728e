"""What the arm64 phone's tests share: how they give up where the phone cannot run."""

from __future__ import annotations

import os

import pytest


def unavailable(reason: str) -> None:
    """Skip, saying why and how to enable it; under CI=true, fail: CI must run the arm64 phone."""
    message = reason if "arm64 phone" in reason else f"the emulated arm64 phone cannot run here: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: CI must run the arm64 phone, so this fails instead of skipping)")
    pytest.skip(message)
