"""The codec's C kernels built two ways, for x86-64's baseline (SSE2) and for AVX2, which the
installed module picks between at load time: both write and read the same bytes, so an update
does not depend on the phone's or the aggregator's CPU."""

import importlib.util
import platform
import subprocess
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest

import device_runtime
from device_runtime import codec

SOURCE = Path(device_runtime.__file__).with_name("_kernels.c")
DISPATCH = '#define DISPATCH __attribute__((target_clones("avx2", "default")))'
HEADER = codec.UpdateHeader("phone-1", round=1, base_version=0, num_samples=10)

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX2 clones exist on x86-64 only")


def build(tmp_path: Path, variant: str, dispatch: str):
    source = tmp_path / f"{variant}.c"
    source.write_text(SOURCE.read_text().replace(DISPATCH, f"#define DISPATCH {dispatch}"))
    library = tmp_path / variant / "_kernels.so"
    library.parent.mkdir()
    compiler = sysconfig.get_config_var("CC").split()
    flags = [
        "-O3",
        "-ffp-contract=off",
        "-fno-trapping-math",
        "-shared",
        "-fPIC",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    subprocess.run([*compiler, *flags, str(source), "-o", str(library)], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("_kernels", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    assert DISPATCH in SOURCE.read_text()  # what the variants replace
    tmp = tmp_path_factory.mktemp("kernels")
    return build(tmp, "baseline", ""), build(tmp, "avx2", '__attribute__((target("avx2")))')


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    sparse = rng.standard_normal(70_001).astype(np.float32)
    sparse[rng.random(sparse.size) < 0.9] = 0  # most of an update's entries can be exactly 0
    return {
        "conv": (rng.standard_normal((96, 1, 3, 3)) * 1e-3).astype(np.float32),  # short channels
        "dense": rng.standard_normal((320, 1281)).astype(np.float32),  # chunks and an odd tail
        "sparse": sparse,
        "tiny": np.array([1e-42, -3e-39, 0.5], np.float32),  # subnormal inputs
        "scalar": np.float32(-2.5),
    }


@pytest.mark.parametrize("encoding", codec.ENCODINGS)
def test_baseline_and_avx2_builds_agree_byte_for_byte(builds, encoding, monkeypatch):
    x = tensors()
    jobs = [
        (name.encode(), codec.ENCODINGS.index(encoding), np.asarray(t), 11 + i) for i, (name, t) in enumerate(x.items())
    ]

    packed = [m.pack(b"", jobs, 0.01, zlib.crc32) for m in builds]
    data = codec.encode(HEADER, x, encoding, rng=np.random.default_rng(0))
    decoded = []
    for module in builds:
        monkeypatch.setattr(codec, "_kernels", module)
        decoded.append(codec.decode(data).tensors)

    assert packed[0] == packed[1]
    for name in x:
        np.testing.assert_array_equal(decoded[0][name], decoded[1][name], err_msg=name)
