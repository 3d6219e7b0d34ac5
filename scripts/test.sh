#!/usr/bin/env bash
# Set up with the test extras, then run the whole suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q -n 2 --durations=15 tests "$@"
