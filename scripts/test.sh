#!/usr/bin/env bash
# Set up the test environment and run the whole test suite (CPU, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. "${VENV:-.venv}/bin/activate"
python -m pytest -q -m "not vllm" "$@"
