#!/usr/bin/env bash
# Creates .venv and installs the project with its test extras. torch and torchvision are
# pinned (pyproject.toml) and installed first, on their own, so pip resolves the pinned
# wheels instead of pulling a different CUDA build through another package's range.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --upgrade --quiet pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[test]"
touch .venv/.installed
echo "installed distillery into .venv"
