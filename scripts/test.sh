#!/usr/bin/env bash
# Set up .venv, .venv-triton (the local Triton server) and Orthanc (the PACS), which the integration tests
# start; run the code checks (scripts/check.sh), then the tests: both tiers by default, or what the arguments
# name, e.g. `scripts/test.sh tests/unit` for the unit tier alone (a few minutes, no server).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup_triton.sh
scripts/setup_pacs.sh
scripts/check.sh
.venv/bin/python -m pytest "$@"
