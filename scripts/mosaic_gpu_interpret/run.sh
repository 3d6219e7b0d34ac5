#!/usr/bin/env bash
# Runs the GPU-marked Mosaic GPU tests (flash, block-sparse, decode) in JAX 0.11's
# GPU interpret mode on the CPU: no Hopper needed. See README.md here.
#   bash scripts/mosaic_gpu_interpret/run.sh JAX_SOURCE [pytest args]
# JAX_SOURCE: a jax-ml/jax checkout (or bare git directory) at 0.11.x.
# MGPU_RACES=1 turns on the interpreter's race detector; PYTHON312 names a Python >= 3.12
# (JAX 0.11 needs it) when python3.12 is not on PATH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
src="${1:?usage: run.sh JAX_SOURCE [pytest args]}"
shift
work="${MGPU_WORKDIR:-/tmp/mosaic_gpu_interpret}"
pin() { sed -n "s/.*\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml; }  # the project's own pins
mkdir -p "$work"
if [ ! -x "$work/venv/bin/python" ]; then
  "${PYTHON312:-python3.12}" -m venv "$work/venv"
  "$work/venv/bin/pip" install --quiet --disable-pip-version-check "jaxlib==$(pin jaxlib)" \
    ml_dtypes opt_einsum scipy "numpy>=2,<3" "pytest==$(pin pytest)"
fi
rm -rf "$work/jax"
if [ -d "$src/jax" ]; then
  cp -r "$src/jax" "$work/jax"
else
  git --git-dir="$src" archive HEAD jax | tar -x -C "$work"
fi
patch -d "$work" -p1 --quiet < "$here/interpreter.patch"
gcc -shared -fPIC -O2 -o "$work/fakecpus.so" "$here/fakecpus.c"
LD_PRELOAD="$work/fakecpus.so" PYTHONPATH="$here:$work:$PWD" "$work/venv/bin/python" -m pytest \
  -p plugin -p no:cacheprovider -m gpu -k mosaic tests/pallas_kernels "$@"
