"""The one compiled part of fedkit: the update codec's kernels (everything else is in
pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "device_runtime._kernels",
            ["device_runtime/_kernels.c"],
            # -O3 vectorises the per-element loops; no fused multiply-add, so every platform
            # rounds the arithmetic the same way.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"],
        )
    ]
)
