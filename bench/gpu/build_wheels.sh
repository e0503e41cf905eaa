#!/usr/bin/env bash
# On a connected machine: the wheels the GPU kit needs on an offline CUDA box that has only
# its own torch (Python 3.12, x86-64, with tensorboard, nvidia-ml-py, psutil, einops, numpy,
# pyyaml and opencv-python-headless). Everything else rigtrain and the kit use is here:
# DeepSpeed as a pure-Python wheel built from its source (its ops JIT-compile on the GPU box,
# which has nvcc), pydantic, hjson, soundfile and cffi, PyAV, torch-tb-profiler and pandas,
# filelock, xxhash, tomli-w, tabulate (DeepSpeed's autotuner, for bench/tune.py), pytest.
# bitsandbytes (43 MB) does not fit beside PyAV in ~60 MB:
# --with-bitsandbytes adds it; without it the planner never picks the 8-bit optimizer.
#
#   bash bench/gpu/build_wheels.sh [--with-bitsandbytes] [DIR]   # default DIR: bench/gpu/wheels
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bnb=""
if [ "${1:-}" = "--with-bitsandbytes" ]; then bnb=bitsandbytes; shift; fi
dir=${1:-$root/bench/gpu/wheels}
py=${PYTHON:-${RIGTRAIN_VENV:-$root/.venv}/bin/python}
mkdir -p "$dir"
# KIT_PYTHON (default 3.12): the GPU box's Python, as major.minor
version=${KIT_PYTHON:-3.12}
abi=cp${version/./}
target=(--only-binary=:all: --python-version "$version" --implementation cp --abi "$abi" --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform any)
# The GPU box's own packages are left out (torch and what it needs, tensorboard and its
# packaging, numpy, ...); --no-deps keeps pip from fetching a second torch.
packages=(pydantic pydantic-core annotated-types typing-inspection hjson py-cpuinfo msgpack ninja tqdm
          typing-extensions soundfile cffi pycparser av torch-tb-profiler pandas python-dateutil six
          filelock xxhash tomli-w tabulate pytest pluggy iniconfig pygments $bnb)
"$py" -m pip download -q --disable-pip-version-check --no-deps -d "$dir" "${target[@]}" "${packages[@]}"
# DeepSpeed the version installed here, as a pure-Python wheel: DS_BUILD_OPS=0 compiles nothing
ds=$("$py" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
DS_BUILD_OPS=0 "$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary deepspeed \
  -w "$dir" "deepspeed==$ds"
size=$(du -sm "$dir" | cut -f1)
echo "[wheels] $(ls "$dir"/*.whl | wc -l) wheels, ${size} MB in $dir"
if [ "$size" -gt 64 ]; then
  echo "build_wheels.sh: ${size} MB is more than a 64 MB transfer allows; leave out --with-bitsandbytes" >&2
  exit 1
fi
