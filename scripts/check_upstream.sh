#!/usr/bin/env bash
# Upstream canary: install the newest releases the registry offers of the packages whose
# internals mergekit-lrp reaches into, in a separate environment, and run the rule,
# conservation and end-to-end tests there. CI keeps the pinned set (constraints.txt).
#   bash scripts/check_upstream.sh                       newest releases
#   bash scripts/check_upstream.sh transformers==5.24.0  particular versions (any pip spec)
# Prints the versions it got and which tests break; exits non-zero if any does.
# torch stays at the pinned CPU build: newer torch wheels on the registry are CUDA
# builds of several GB (set TORCH_SPEC to try another). VENV defaults to .venv-upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-upstream}
TORCH_SPEC=${TORCH_SPEC:-$(grep '^torch==' constraints.txt)}
WATCHED=(transformers mergekit peft accelerate huggingface_hub safetensors tokenizers)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c "import torch" 2>/dev/null || pip_q "$TORCH_SPEC"
pip_q --no-deps "lxt==2.1"
specs=("${WATCHED[@]}")
[ $# -gt 0 ] && specs=("$@" "${WATCHED[@]}")
# the project's own upper bounds are what is being tested, so it goes in without deps
pip_q --upgrade --upgrade-strategy eager "${specs[@]}" click tqdm packaging \
  pytest pytest-xdist datasets "$TORCH_SPEC"
pip_q --no-deps -e .
echo "== versions in $VENV"
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -i -E '^(torch|transformers|mergekit|peft|accelerate|huggingface.hub|kernels|safetensors|tokenizers) '
"$PY" - <<'PY'
from mergekit_lrp.versions import untested_versions
for sentence in untested_versions() or ["every watched package is inside the tested range"]:
    print(f"== {sentence}")
PY
TESTS=(tests/test_attnlrp_in_effect.py tests/test_attnlrp_context.py
  tests/test_attnlrp_coverage.py tests/test_attnlrp_derivations.py
  tests/test_hybrid_conservation.py tests/test_hybrid_rules.py tests/test_hybrid_end_to_end.py
  tests/test_cli.py tests/test_plugin.py tests/test_merge_outputs.py tests/test_lora.py)
echo "== running ${#TESTS[@]} test files"
set +e
"$PY" -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -rf "${TESTS[@]}" \
  | grep -E '^(FAILED|ERROR)|passed|failed'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 0 ]; then echo "== upstream canary: all pass"; else echo "== upstream canary: broken (above)"; fi
exit "$status"
