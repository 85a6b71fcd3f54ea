#!/usr/bin/env bash
# The main job on a fresh machine: install, build the toy family (or reuse it), score the
# experts with lrp-compute, merge with lrp and dare_ties through mergekit-yaml, compare.
#   bash scripts/demo.sh [--preset NAME]   (an accepted toy family, docs/toy-family.md)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
VENV=${VENV:-.venv}
"$VENV/bin/python" scripts/demo.py "$@"
