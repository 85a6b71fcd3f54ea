#!/usr/bin/env bash
# Install everything the tests need, check style, run the test suite.
#   bash scripts/test.sh [pytest args]
# The suite runs in two processes (pytest-xdist: one a core, one torch thread each, for
# the processes the tests start too; a test file stays in one process, so its fixtures
# are built once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check src tests scripts bench
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
