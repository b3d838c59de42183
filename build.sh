#!/usr/bin/env bash
# Build the image (see `./build.sh --help`): a thin wrapper over the Python build tool, which uses the Docker SDK
# against Docker Engine or podman's Docker-compatible API. Uses the project's venv when there is one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if [ -x "${here}/.venv/bin/python" ]; then
  python="${here}/.venv/bin/python"
fi
cd "${here}"
exec "${python}" -m llama3_hyperpod.image.build "$@"
