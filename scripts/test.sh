#!/usr/bin/env bash
# Set up .venv and run the linters and the whole test suite (unit and integration tiers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
