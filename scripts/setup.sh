#!/usr/bin/env bash
# Install the project into the active Python environment (a virtualenv is recommended).
# torch 2.13.0 goes first: a bare `torch` requirement on a machine without torch pulls a multi-GB CUDA build,
# while 2.13.0 resolves to the CPU build where one is provided locally (and to PyPI's build elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import rlhf, torch" 2>/dev/null; then
  exit 0
fi
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
echo "$want" > "$stamp"
