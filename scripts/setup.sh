#!/usr/bin/env bash
# Create .venv in the repository root and install the project with its test tools.
# torch goes first, pinned to the local CPU build, so that no other package pulls the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[demo,test]"
