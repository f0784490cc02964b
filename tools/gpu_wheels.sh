#!/usr/bin/env bash
# Download (here, with network) the wheels the GPU check kit installs on a bare GPU machine that
# has Python 3.12 and a CUDA build of torch but no network: megatron-core and the small
# pure-Python dependencies, into .whl/ (git-ignored). benchmarks/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "megatron-core==0.19.2" einops psutil sentencepiece packaging pytest iniconfig pluggy
ls -la .whl
