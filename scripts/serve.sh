#!/usr/bin/env bash
# The main job: set up (a virtualenv; the project installed when it or its dependencies changed), then
# `clipsearch serve`: build what is missing and serve search on http://127.0.0.1:8000.
#
#   bash scripts/serve.sh --data ../shared/flickr8k     # build the model on Flickr8k once, serve all of it
#   bash scripts/serve.sh --media ~/Pictures            # search your photo folder (captions optional)
#   bash scripts/serve.sh --download                    # fetch Flickr8k into data/flickr8k first
#
# Every option of `clipsearch serve --help` works here (--data, --media or a folder, --collection,
# --data-collection, --model, --pretrained, --rebuild, --host, --port, --no-serve, --no-watch, and
# anything after `--` goes to `python -m offline build`), plus --no-install: use the environment as it
# is. Without an active virtualenv (or $PYTHON), one is made in .venv. Artifacts go to $ARTIFACTS_DIR,
# else artifacts/ in this checkout. Paths are taken relative to the directory you run this from.
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$CALLER/$1" ;; esac; }

INSTALL=1 HAS_DATA=0 DOWNLOAD=0 REST=0
ARGS=()
for a in "$@"; do
  if [ "$REST" = 1 ]; then ARGS+=("$a"); continue; fi
  case "$a" in
    --no-install) INSTALL=0 ;;
    --data|--data=*) HAS_DATA=1; ARGS+=("$a") ;;
    --download) DOWNLOAD=1; ARGS+=("$a") ;;
    --) REST=1; ARGS+=("$a") ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; echo; ARGS+=("$a") ;;
    *) ARGS+=("$a") ;;
  esac
done
# --download without --data: into this checkout's data/flickr8k, wherever this is run from
if [ "$DOWNLOAD" = 1 ] && [ "$HAS_DATA" = 0 ]; then ARGS=(--data "$REPO/data/flickr8k" "${ARGS[@]}"); fi
if [ -n "${ARTIFACTS_DIR:-}" ]; then ARTIFACTS_DIR=$(abspath "$ARTIFACTS_DIR"); else ARTIFACTS_DIR="$REPO/artifacts"; fi
export ARTIFACTS_DIR

. "$REPO/scripts/_env.sh"
setup_env "" "$INSTALL"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$CALLER"
exec "$PY" -m offline.console serve "${ARGS[@]}"
