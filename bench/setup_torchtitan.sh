#!/usr/bin/env bash
# Installs torchtitan's Llama3 model for bench/train_throughput.py into .bench/torchtitan (bench-only: not in the
# project's lock, not in the image), hash-checked, without dependencies, on top of the project's .venv torch.
# Idempotent. bench/train_throughput.py puts the folder on sys.path when it exists.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="$root/.bench/torchtitan"
stamp="$target/.installed"
reqs="$root/bench/torchtitan-requirements.txt"
if [ -f "$stamp" ] && cmp -s "$stamp" "$reqs"; then
    echo "torchtitan bench env: up to date in $target"
    exit 0
fi
rm -rf "$target"
"$root/.venv/bin/python" -m pip install --quiet --no-deps --require-hashes --target "$target" -r "$reqs"
cp "$reqs" "$stamp"
PYTHONPATH="$target" "$root/.venv/bin/python" -c "import torchtitan.models.llama3 as m; print('torchtitan bench env:', m.__file__)"
