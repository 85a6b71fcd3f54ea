#!/usr/bin/env bash
# Install mergekit-lrp with its dependencies into a virtual environment, at the exact
# versions in constraints.txt (the set the tests and the documented figures were made with).
#   bash scripts/install.sh [EXTRAS]      (EXTRAS defaults to "dev"; VENV defaults to .venv)
# Order matters: torch first (a bare torch requirement can pull a multi-GB CUDA build;
# override with TORCH_SPEC, which then takes torch out of the constraints), then lxt
# without its dependencies (lxt 2.1 declares torchvision/open_clip/bitsandbytes, which
# mergekit-lrp does not use and which break beside a CPU torch), then this package in
# editable mode under the constraints. An existing environment is moved to the pinned set.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-dev}
PINNED_TORCH=$(grep '^torch==' constraints.txt)
TORCH_SPEC=${TORCH_SPEC:-$PINNED_TORCH}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_q() {  # quiet pip that still fails loudly
  local log
  if ! log=$("$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1); then
    printf '%s\n' "$log" >&2
    return 1
  fi
}
CONSTRAINTS=constraints.txt
if [ "$TORCH_SPEC" != "$PINNED_TORCH" ]; then
  CONSTRAINTS=$(mktemp)
  trap 'rm -f "$CONSTRAINTS"' EXIT
  grep -v '^torch==' constraints.txt > "$CONSTRAINTS"
fi
"$PY" -c "import torch" 2>/dev/null || pip_q "$TORCH_SPEC"
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('lxt') is None)" || pip_q --no-deps "lxt==2.1"
pip_q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
"$PY" -c "import importlib.util as u, torch, mergekit, mergekit_lrp; assert u.find_spec('lxt')"
"$PY" -c "from mergekit_lrp.versions import warn_if_untested; warn_if_untested()"
echo "installed into $VENV (python: $PY)" >&2
