#!/usr/bin/env bash
# One GPU check in at most 8 minutes (CUDA tests, every paper preset's first iterations, fractional
# packing, precision); JSON lines on stdout and in test-output/gpu_check.jsonl. See benchmarks/gpu_check.py.
#
# Usage: scripts/gpu_check.sh [--smoke | --full] [--out FILE] [--only CHECK,...] [--record | --no-record]
#   no flag: full sizes when CUDA is available, else the CPU smoke size (< 2 min)
#   PYTHON=/path/to/python overrides the interpreter (default: the project's .venv, else python3);
#   DISTILLERY_DATA=/path points at the data folder holding cifar10/ (default ../shared/data).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
