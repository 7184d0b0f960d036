#!/usr/bin/env bash
# Set up and run the test suite: `bash scripts/test.sh` (extra args go to pytest). CI runs exactly this.
#   bash scripts/test.sh --quick    the fast lane: leaves out the tests marked slow (SIGKILL/crash,
#                                   fuzzing, soak, browser, offline-model builds; tests/conftest.py)
# Without an active virtualenv (or $PYTHON), one is made in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=()
if [ "${1:-}" = "--quick" ]; then shift; QUICK=(-m "not slow"); fi
. scripts/_env.sh
setup_env "[test]" 1
# pytest exits non-zero on any failure; exit 5 (no tests collected) is a failure too.
exec "$PY" -m pytest -q "${QUICK[@]}" "$@"
