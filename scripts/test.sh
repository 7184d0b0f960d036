#!/usr/bin/env bash
# Set up and run the test suite: `bash scripts/test.sh` (extra args go to pytest).
# Without an active virtualenv (or $PYTHON), one is made in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
setup_env "[test]" 1
# pytest exits non-zero on any failure; exit 5 (no tests collected) is a failure too.
exec "$PY" -m pytest -q "$@"
