#!/usr/bin/env bash
# Install everything the tests need, check style, run the test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check src tests scripts bench
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
