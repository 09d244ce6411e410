#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, export the committed demo checkpoint into
# model_repository/, write two phantom head masks into demo_input/, and synthesise an MRI for each
# with the app's embedded default (OpenVINO in process on a CPU). Results land in output/demo/<mask>/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m export --checkpoint models/demo/model_demo.pt --preset demo --repository model_repository
.venv/bin/python -m meddpm.imaging.demo_heads --preset demo --out demo_input --count 2 --seed 7
.venv/bin/python -m app -i demo_input -o output/demo -m model_repository "$@"
