#!/usr/bin/env bash
# Set up and run the test suite: `bash scripts/test.sh` (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q -c constraints.txt -e '.[test]'
# pytest exits non-zero on any failure; exit 5 (no tests collected) is a failure too.
exec "$PY" -m pytest -q "$@"
