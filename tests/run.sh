#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs every test (CPU, gloo). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
