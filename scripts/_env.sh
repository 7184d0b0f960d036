# Sourced by serve.sh and test.sh: pick the Python to use and install the project into it.
#   setup_env EXTRAS INSTALL   (EXTRAS e.g. "[test]"; INSTALL 1 or 0)
# Sets PY. Uses $PYTHON when given, the active virtualenv when there is one, else makes .venv here
# (with the system's site-packages visible, so an installed torch is reused, not copied).
# pip runs only when needed: when the project is not importable from that Python, or when
# pyproject.toml or constraints.txt changed since the last install (a stamp file in the environment,
# or in $CLIPSEARCH_STAMP_DIR, holds their hash, this checkout's path and the extras).
setup_env() {
  local extras=$1 install=${2:-1}
  if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
  elif [ -n "${VIRTUAL_ENV:-}" ]; then
    PY=python
  else
    if [ ! -x .venv/bin/python ]; then
      echo "==> creating a virtualenv in .venv (activate one first to use your own)"
      python3 -m venv --system-site-packages .venv
    fi
    PY=$PWD/.venv/bin/python
  fi
  [ "$install" = 1 ] || return 0
  local want stamp
  want="$(cat pyproject.toml constraints.txt | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())') $PWD"
  stamp="${CLIPSEARCH_STAMP_DIR:-$("$PY" -c 'import sys; print(sys.prefix)')}/.clipsearch-install${extras:+-test}"
  if install_is_current "$stamp" "$want" "$extras"; then
    echo "==> project already installed (pyproject.toml and constraints.txt unchanged; --no-install skips this check)"
    return 0
  fi
  if ! "$PY" -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
    # No GPU here: the CPU build of torch is ~0.2 GB instead of several GB of CUDA libraries.
    # Quietly fall back to the default index where PyTorch's CPU index cannot be reached.
    "$PY" -m pip install -q --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu \
      -c constraints.txt torch torchvision >/dev/null 2>&1 || true
  fi
  echo "==> installing the project (pip, constraints.txt keeps the installed torch)"
  "$PY" -m pip install -q -c constraints.txt -e ".$extras"
  mkdir -p "$(dirname "$stamp")" 2>/dev/null && printf '%s\n' "$want" > "$stamp" 2>/dev/null || true
}

# install_is_current STAMP WANT EXTRAS: the stamp (or, for no extras, the test extras' stamp, a
# superset) records WANT, and the installed project imports from outside this folder.
install_is_current() {
  local stamp=$1 want=$2 extras=$3 f ok=1 stamps=("$1")
  [ -n "$extras" ] || stamps+=("$stamp-test")
  for f in "${stamps[@]}"; do
    if [ -f "$f" ] && [ "$(cat "$f")" = "$want" ]; then ok=0; break; fi
  done
  [ "$ok" = 0 ] || return 1
  # -I: not from the current folder, so a project that is only lying here does not count as installed
  (cd / && "$PY" -I -c "import clipsearch, offline, app" 2>/dev/null)
}
