#!/usr/bin/env bash
# Install rigtrain into a virtual environment: torch first, then the project.
#
#   bash setup/install.sh           # what training needs
#   bash setup/install.sh --test    # plus what the tests need
#
# torch is pinned to one version so that pip picks the build that fits the machine: on a
# CPU-only machine with the CPU wheel at hand that wheel, on a GPU machine PyPI's CUDA
# build. Installing the project afterwards leaves that torch alone. Safe to run again: it
# skips whatever is already installed.
# Environment: RIGTRAIN_VENV (default: .venv in the repository), PYTHON (default: python3),
# TORCH_INDEX_URL: PyTorch's index of one build, for a driver older than PyPI's torch
# needs (https://download.pytorch.org/whl/cu126 for CUDA 12.6; rigtrain says which).
set -euo pipefail

TORCH_VERSION=2.13.0
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${RIGTRAIN_VENV:-$root/.venv}
python=${PYTHON:-python3}
extras=""
case "${1:-}" in
  --test) extras="[test]" ;;
  "") ;;
  *) echo "setup/install.sh: unknown option '$1'; use --test or nothing" >&2; exit 2 ;;
esac

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "setup/install.sh: rigtrain needs Python 3.10 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
# A venv without pip is what Debian and Ubuntu leave when python3-venv is missing: made
# again (once that package is in), rather than failing later at the first pip install.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    echo "setup/install.sh: $venv exists and is not a virtual environment; set RIGTRAIN_VENV to another folder" >&2
    exit 2
  fi
  echo "[setup] creating $venv"
  if ! why=$("$python" -m venv --clear "$venv" 2>&1); then
    if grep -q ensurepip <<<"$why"; then
      minor=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      echo "setup/install.sh: $python makes no virtual environment with pip here; on Debian or Ubuntu: sudo apt install python$minor-venv, then run this again" >&2
    else
      echo "setup/install.sh: $python -m venv $venv failed: $(tail -n 1 <<<"$why")" >&2
    fi
    exit 2
  fi
fi
py="$venv/bin/python"

no_torch() {
  # pip has said why above; what a user can do about it, in one line
  local version
  version=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  echo "setup/install.sh: pip could not install torch $TORCH_VERSION for Python $version (its words are above):" \
    "no network, or no torch wheel for this Python or machine; for the second, a newer Python:" \
    "rm -rf $venv; PYTHON=python3.12 bash $root/setup/install.sh (Ubuntu 22.04: sudo apt install python3.11-venv, PYTHON=python3.11)" >&2
  exit 2
}
# pip byte-compiles what it installs (about 25 s of a fresh install, most of it torch's),
# and stays so: where PYTHONDONTWRITEBYTECODE is set (CI images, this project's own build
# machine) Python never writes a .pyc itself, and with --no-compile every process that
# imports torch and DeepSpeed took 9 s instead of 4 (measured 2026-12-06, 2-core CPU).
index=${TORCH_INDEX_URL:-}
build=""  # the local version tag the index's wheels carry: cu126, cpu, rocm6.4
if [ -n "$index" ]; then build=$(basename "${index%/}"); fi
if "$py" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '$TORCH_VERSION' and v.endswith('$build') else 1)" 2>/dev/null; then
  echo "[setup] torch $TORCH_VERSION${build:++$build} already installed"
elif [ -n "$index" ]; then
  echo "[setup] installing torch==$TORCH_VERSION from $index"
  "$py" -m pip uninstall --disable-pip-version-check -q -y torch 2>/dev/null || true
  "$py" -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION" --index-url "$index" || no_torch
else
  echo "[setup] installing torch==$TORCH_VERSION"
  "$py" -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION" || no_torch
fi

# The project, again only when pyproject.toml or the extras changed since the last install.
stamp="$venv/.rigtrain-install"
want="$(sha1sum "$root/pyproject.toml" | cut -d' ' -f1) $extras $root"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c 'import rigtrain' 2>/dev/null; then
  echo "[setup] rigtrain$extras already installed"
else
  echo "[setup] installing rigtrain$extras and its dependencies"
  "$py" -m pip install --disable-pip-version-check -q -e "$root$extras"
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $venv/bin/rigtrain"
