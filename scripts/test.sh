#!/usr/bin/env bash
# Set up .venv (and .venv-triton, the local Triton server the integration tests start), then run the linters
# and the whole test suite (unit and integration tiers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup_triton.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
