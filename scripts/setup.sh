#!/usr/bin/env bash
# Make the dev environment on a fresh Debian 12 machine: .venv from requirements.lock (hashes checked) and the
# project installed in editable mode. Safe to run again: the venv is rebuilt only when the lock changes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
want=$(sha256sum requirements.lock | cut -d' ' -f1)
stamp=.venv/.lock-sha256
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv from requirements.lock"
  rm -rf .venv
  "$python" -m venv .venv
  .venv/bin/pip install --quiet --require-hashes -r requirements.lock
  echo "$want" > "$stamp"
fi
.venv/bin/pip install --quiet --no-deps -e .
echo "setup: ready ($(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
