#!/usr/bin/env bash
# Creates .venv (once) and installs the project with the given extras ("" or "test").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
.venv/bin/pip install --quiet --disable-pip-version-check -e "$spec"
