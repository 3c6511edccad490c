#!/usr/bin/env bash
# Set up the test environments and run the whole test suite (CPU, no downloads), in three steps:
#   1/3 newest allowed versions: .venv as a fresh `pip install` gives it (scripts/setup.sh --test), every
#       test but vLLM's; arguments to this script go to this step's pytest.
#   2/3 oldest allowed versions: .venv-oldest pinned by constraints/oldest.txt, the fast tests (not slow).
#   3/3 vLLM: .venv-vllm (vLLM's CPU build pins its own transformers, so it lives apart), the vLLM tests.
# Each step starts with a "==> step i/3: ..." line and runs under `set -euo pipefail` on its own; a failing
# step prints "==> FAILED: step i/3: ...", the later steps still run (so one red run tells which end broke),
# and the script exits non-zero. Venvs are reused when present (VENV, OLDEST_VENV, VLLM_VENV override them);
# TEST_STEPS picks steps (e.g. TEST_STEPS=2 for the oldest versions alone; default: all three).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
OLDEST_VENV="${OLDEST_VENV:-.venv-oldest}"
VLLM_VENV="${VLLM_VENV:-.venv-vllm}"
export VLLM_VENV

names=(
  "newest allowed versions (pyproject.toml)"
  "oldest allowed versions (constraints/oldest.txt)"
  "vLLM tests (scripts/setup-vllm.sh)"
)
summary=()
failed=0

step_1() {
  VENV="$VENV" bash scripts/setup.sh --test
  "$VENV/bin/python" -m pytest -q -m "not vllm" "$@"
}
step_2() {
  VENV="$OLDEST_VENV" bash scripts/setup.sh --test --constraints constraints/oldest.txt
  "$OLDEST_VENV/bin/python" -m pytest -q -m "not vllm and not slow"
}
step_3() {
  bash scripts/setup-vllm.sh
  "$VLLM_VENV/bin/python" -m pytest -q -m vllm tests/
}

for i in ${TEST_STEPS:-1 2 3}; do
  case "$i" in 1|2|3) ;; *) echo "TEST_STEPS: no step '$i' (steps: 1 2 3)" >&2; exit 2 ;; esac
  label="step $i/3: ${names[$((i - 1))]}"
  echo
  echo "==> $label"
  start=$SECONDS
  # A subshell outside any `if`/`||`, so `set -e` stays in force inside the step.
  set +e
  ( set -euo pipefail; "step_$i" "$@" )
  rc=$?
  set -e
  took=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    summary+=("==> ok: $label (${took}s)")
  else
    echo "==> FAILED: $label (exit $rc, ${took}s)"
    summary+=("==> FAILED: $label (exit $rc, ${took}s)")
    failed=1
  fi
done

echo
printf '%s\n' "${summary[@]}"
exit "$failed"
