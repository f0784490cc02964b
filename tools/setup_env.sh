#!/usr/bin/env bash
# Create (or reuse) .venv with Python >= 3.12 and install rlp_megatron with its test extras.
# Idempotent: a second call only re-installs the package itself. CPU-only machines get the CPU
# backend automatically; transformer-engine / mamba-ssm are optional extras ([gpu]) and are not
# installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLP_VENV:-.venv}

find_python() {
  local c v
  for c in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || continue
    v=$("$c" -c 'import sys; print(int(sys.version_info >= (3, 12)))' 2>/dev/null) || continue
    [ "$v" = 1 ] && { command -v "$c"; return 0; }
  done
  # pyenv installs that are not selected in this shell
  local root
  root=$( (pyenv root 2>/dev/null) || echo "$HOME/.pyenv")
  for c in "$root"/versions/3.1[2-9]*/bin/python3; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python) || { echo "setup_env: need Python >= 3.12 (python3.12 on PATH or a pyenv install)" >&2; exit 1; }
  echo "setup_env: creating $VENV with $PY ($("$PY" --version))"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, megatron.core' >/dev/null 2>&1; then
  echo "setup_env: installing torch 2.13.0 and megatron-core (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
