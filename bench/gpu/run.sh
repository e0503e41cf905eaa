#!/usr/bin/env bash
# The GPU run kit: every hardware path, run for real and measured (bench/gpu/kit.py says
# which), into OUT_DIR/report.json and a printed table.
#
#   bash bench/gpu/run.sh OUT_DIR          # a CUDA machine: under 9 minutes on one H100
#   bash bench/gpu/run.sh --cpu OUT_DIR    # every step on the CPU at toy sizes (under a minute)
#
# Python, the first that applies:
# - $PYTHON, when set;
# - the repository's environment (setup/install.sh; $RIGTRAIN_VENV), when it has DeepSpeed;
# - an offline GPU box: the wheels in bench/gpu/wheels/ (made by build_wheels.sh on a
#   connected machine) go into OUT_DIR/site, put on PYTHONPATH for python3 as it is, with
#   its own torch, tensorboard, nvidia-ml-py, numpy, ...; nothing is downloaded. Not a venv:
#   where python3 is itself a venv's (as on the H200 image, /opt/torch/.venv), a venv made
#   from it with --system-site-packages sees the base Python's packages, not that torch;
# - else python3 as it is.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mode=()
if [ "${1:-}" = "--cpu" ]; then mode=(--cpu); shift; fi
if [ $# -lt 1 ]; then
  echo "usage: bash bench/gpu/run.sh [--cpu] OUT_DIR [--presets demo small base]" >&2
  exit 2
fi
out=$1; shift
mkdir -p "$out"
out=$(cd "$out" && pwd)

venv=${RIGTRAIN_VENV:-$root/.venv}
wheels=$root/bench/gpu/wheels
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("deepspeed") is None)' 2>/dev/null; then
  py=$venv/bin/python
elif [ -d "$wheels" ]; then
  if [ ! -f "$out/site/.installed" ]; then
    echo "[kit] installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $out/site (offline)"
    python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
      --target "$out/site" "$wheels"/*.whl
    touch "$out/site/.installed"
  fi
  export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$out/site/bin:$PATH"  # the wheels' own commands (ninja for DeepSpeed's JIT ops)
  py=python3
else
  py=python3
fi
missing=$("$py" - <<'PY'
import importlib.util
need = ["torch", "deepspeed", "numpy", "einops", "psutil", "yaml", "filelock", "xxhash", "tomli_w", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "bench/gpu/run.sh: $py lacks $missing; run bash setup/install.sh --test, or bring bench/gpu/wheels (bench/gpu/build_wheels.sh)" >&2
  exit 2
fi
# the checkout itself, not an installed copy: the kit measures what is here
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" "$root/bench/gpu/kit.py" "${mode[@]}" "$out" "$@"
