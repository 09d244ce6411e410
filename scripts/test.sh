#!/usr/bin/env bash
# Set up .venv, .venv-triton (the local Triton server) and Orthanc (the PACS), which the integration tests
# start, then run the linters and the whole test suite (unit and integration tiers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup_triton.sh
scripts/setup_pacs.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
