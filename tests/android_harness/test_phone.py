from __future__ import annotations

import subprocess
import sys

from android_harness.link import LinkShape, LinkWindow
from android_harness.phone import PhoneSpec


def test_spec_round_trips_through_json(tmp_path):
    spec = PhoneSpec(
        "dir",
        "phone-1",
        "mid-2022",
        1.9,
        922.0,
        LinkShape(9.0, 30.0, 40.0, 0.1, (LinkWindow(1.0, 2.0, 5.0, 0.2),)),
        ((1.0, 2.0),),
        123.0,
        True,
    )
    spec.save(tmp_path / "spec.json")
    assert PhoneSpec.load(tmp_path / "spec.json") == spec
    assert spec.address_space_mb() == 1536 + 922


def test_rlimit_as_makes_a_big_allocation_fail_with_memory_error():
    code = (
        "from android_harness.phone import limit_memory\n"
        "limit_memory(700)\n"
        "try:\n    bytearray(800 * 1024 * 1024)\nexcept MemoryError:\n    print('capped')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "capped", out.stderr
