#!/usr/bin/env bash
# The main job: set up, train the default model (configs/lm_tiny.py) on the embedded
# pydoc_text corpus, then evaluate its last checkpoint. Workdir: $1 or ./workdirs/lm_tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-workdirs/lm_tiny}"
bash scripts/setup.sh
.venv/bin/python train.py --config=configs/lm_tiny.py --workdir="$workdir"
.venv/bin/python eval.py --workdir="$workdir"
