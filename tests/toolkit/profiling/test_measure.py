"""Measuring for real: this host in-process, the probe as a torch-free script, and adb
without a phone attached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from android_harness import probe
from toolkit.errors import PlanError
from toolkit.models import load_model
from toolkit.profiling import measure_local, probe_adb
from toolkit.profiling.kernels import write_payload
from toolkit.profiling.local import profile_from_probe


class _Echo(BaseHTTPRequestHandler):
    """The aggregator's probe route, as the probe expects it."""

    def do_GET(self):
        size = int(parse_qs(urlparse(self.path).query)["size"][0])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(bytes(size))

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_local_quick_profile_is_sane(echo_url):
    model = load_model("small_cnn")

    profile = measure_local(quick=True, model=model, aggregator=echo_url, batch=4)

    assert profile.source == "local" and profile.cpu_cores >= 1
    assert set(profile.kernel_gflops) == {"conv", "pointwise", "depthwise", "matmul"}
    assert all(0 < g < 1e5 for g in profile.kernel_gflops.values())
    assert profile.gflops == profile.kernel_gflops["conv"]
    assert 0 < profile.memory_mb < 1e7
    assert profile.engines == ("ort", "numpy")  # executorch is installed here, but needs torch: never listed
    timing = profile.timing("small_cnn")
    assert timing.batch == 4 and set(timing.seconds) == set(model.block_names)
    assert all(s > 0 for s in timing.seconds.values())
    assert profile.link.uplink_mbps > 0 and profile.link.downlink_mbps > 0 and profile.link.rtt_ms > 0


def test_probe_script_runs_without_torch(tmp_path):
    """What `fedkit profile --adb` runs on a phone, run here in a fresh interpreter that
    refuses torch."""
    payload = write_payload(tmp_path / "payload")
    refuse_torch = (
        "import sys, runpy\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('no torch on a phone')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"sys.argv = ['probe.py', {str(payload)!r}, '--repeats', '1']\n"
        f"runpy.run_path({probe.__file__!r}, run_name='__main__')\n"
    )

    done = subprocess.run([sys.executable, "-c", refuse_torch], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    profile = profile_from_probe(json.loads(done.stdout), "phone", "adb", None, 32)
    assert profile.gflops > 0 and profile.block_timings == ()
    assert profile.engines == ("ort", "numpy")  # the training API loads without torch: the phone trains with ort


def test_probe_engine_check_agrees_with_device_runtime():
    """The probe's torch-free check says ort exactly when device_runtime's ort engine imports
    with torch refused, in a fresh interpreter as on a phone."""
    refuse_torch = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('no torch on a phone')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import device_runtime.engines.ort\n"
    )

    runtime = subprocess.run([sys.executable, "-c", refuse_torch], capture_output=True, text=True, timeout=120)

    assert (runtime.returncode == 0) == probe.ort_trains_without_torch(), runtime.stderr
    assert probe.engines_present() == (["ort"] if runtime.returncode == 0 else []) + ["numpy"]


@pytest.mark.parametrize(
    ("init", "engines"),
    [
        ("class InferenceSession:\n    pass\n", ["numpy"]),  # an inference build (arm64's wheel): the numpy head engine
        ("# not even an inference session\n", []),  # nothing that runs a model: no engine
    ],
)
def test_an_onnxruntime_without_its_training_api_lists_only_numpy(tmp_path, init, engines):
    """An arm64 phone's onnxruntime wheel has no training API: the probe lists numpy (a linear
    head trained in numpy, the frozen part on ONNX Runtime inference), never ort, and never
    executorch, installed or not."""
    fake = tmp_path / "site" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(init)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    done = subprocess.run(
        [sys.executable, probe.__file__, "--repeats", "1"], capture_output=True, text=True, timeout=120, env=env
    )

    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["engines"] == engines and result["probe_version"] == probe.PROBE_VERSION
    assert profile_from_probe(result, "arm64-phone", "adb", None, 32).engines == tuple(engines)


def test_probe_errors_become_plan_errors(tmp_path):
    with pytest.raises(PlanError, match="the probe failed on phone: RuntimeError: boom"):
        profile_from_probe({"error": "RuntimeError: boom"}, "phone", "adb", None, 32)
    with pytest.raises(RuntimeError, match="cannot reach the aggregator probe route"):
        probe.network("http://127.0.0.1:9", repeats=1)


@pytest.mark.skipif(shutil.which("adb") is None, reason="needs the adb binary (Debian: apt-get install adb)")
def test_adb_without_a_device_says_what_to_do():
    with pytest.raises(PlanError) as excinfo:
        probe_adb("fedkit-no-such-phone")

    message = str(excinfo.value)
    assert "fedkit-no-such-phone" in message and "not found" in message
    assert "`adb devices`" in message


def test_adb_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(PlanError, match=r"adb is not installed.*apt-get install adb"):
        probe_adb("any")
