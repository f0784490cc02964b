#!/usr/bin/env bash
# The GPU check kit, one command: bash benchmarks/gpu_check.sh  (≤ 8 minutes on one H100/H200).
#
# Starts from a bare machine with Python 3.12 and a CUDA build of torch, without network: if
# megatron-core does not import, the wheels in .whl/ (made by tools/gpu_wheels.sh on a machine
# with network) are installed into a private directory. Then the GPU unit tests (tests/gpu,
# pytest marker `gpu`) and the end-to-end check (benchmarks/gpu_check.py: bf16 RLP on a ~300M GPT
# and a ~200M hybrid, then the log-prob memory/time table of benchmarks/logprob_memory.py) run.
# Transformer Engine and mamba-ssm are used when installed.
# `--tiny` runs the end-to-end part on CPU with tiny models (what CI runs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ! "$PY" -c 'import megatron.core, einops' >/dev/null 2>&1; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/rlp_gpu_check_site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/rlp_gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_check: megatron-core is not importable and .whl/ is empty (run tools/gpu_wheels.sh)" >&2
    exit 2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
"$PY" -c 'import torch, sys; print(f"python {sys.version.split()[0]} | torch {torch.__version__} | cuda {torch.cuda.is_available()}")'
status=0
if [ "${1:-}" != "--tiny" ]; then
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu || status=1
fi
"$PY" benchmarks/gpu_check.py "$@" || status=1
echo "gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
