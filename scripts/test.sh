#!/usr/bin/env bash
# Set up the test environments and run the whole test suite (CPU, no downloads):
# first everything but the vLLM tests in .venv, then the vLLM tests in their own step, in .venv-vllm
# (vLLM's CPU build pins its own transformers, so it lives apart).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
"${VENV:-.venv}/bin/python" -m pytest -q -m "not vllm" "$@"
bash scripts/setup-vllm.sh
"${VLLM_VENV:-.venv-vllm}/bin/python" -m pytest -q -m vllm tests/
