# Sourced by serve.sh and test.sh: pick the Python to use and install the project into it.
#   setup_env EXTRAS INSTALL   (EXTRAS e.g. "[test]"; INSTALL 1 or 0)
# Sets PY. Uses $PYTHON when given, the active virtualenv when there is one, else makes .venv here
# (with the system's site-packages visible, so an installed torch is reused, not copied).
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
  if ! "$PY" -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
    # No GPU here: the CPU build of torch is ~0.2 GB instead of several GB of CUDA libraries.
    # Quietly fall back to the default index where PyTorch's CPU index cannot be reached.
    "$PY" -m pip install -q --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu \
      -c constraints.txt torch torchvision >/dev/null 2>&1 || true
  fi
  echo "==> installing the project (pip, constraints.txt keeps the installed torch)"
  "$PY" -m pip install -q -c constraints.txt -e ".$extras"
}
