#!/usr/bin/env bash
# Run rlp_megatron.train on this machine under torchrun.
#
#   launch/local.sh NPROC <training flags...>
#
#   PYTHON=/path/to/venv/bin/python launch/local.sh 8 --tensor-model-parallel-size 4 ... --objective rlp
#
# Environment: PYTHON (default python3), MASTER_PORT (default: a free port), OMP_NUM_THREADS
# (default 1), CUDA_DEVICE_MAX_CONNECTIONS (default: 1 when the flags ask for TP > 1 or CP > 1
# without FSDP, else left alone; Megatron-LM skills/mcore-run-on-slurm). Paths in the flags are
# relative to the directory you run this from; the repository is put on PYTHONPATH.
set -euo pipefail

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
NPROC=$1
shift

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

# Value of a flag in "$@" (last one wins, as argparse does), or $2 when absent.
flag_value() {
    local name=$1 value=$2
    shift 2
    while [[ $# -gt 0 ]]; do
        case $1 in
            "$name") [[ $# -ge 2 ]] && value=$2 ;;
            "$name"=*) value=${1#*=} ;;
        esac
        shift
    done
    printf '%s\n' "$value"
}

has_flag() {
    local name=$1
    shift
    local arg
    for arg in "$@"; do
        [[ "$arg" == "$name" || "$arg" == "$name"=* ]] && return 0
    done
    return 1
}

if [[ -z "${CUDA_DEVICE_MAX_CONNECTIONS:-}" ]]; then
    tp=$(flag_value --tensor-model-parallel-size 1 "$@")
    cp=$(flag_value --context-parallel-size 1 "$@")
    if (( tp > 1 || cp > 1 )) && ! has_flag --use-megatron-fsdp "$@" && ! has_flag --use-torch-fsdp2 "$@"; then
        export CUDA_DEVICE_MAX_CONNECTIONS=1
    fi
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes=1 --nproc-per-node="$NPROC" \
    --master-addr=127.0.0.1 --master-port="$MASTER_PORT" \
    -m rlp_megatron.train "$@"
