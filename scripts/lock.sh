#!/usr/bin/env bash
# Regenerate requirements.lock (pinned, with hashes) from requirements.in.
set -euo pipefail
cd "$(dirname "$0")/.."
pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
  --output-file requirements.lock requirements.in
