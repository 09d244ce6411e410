#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, export the committed demo model (trained on heads drawn from the
# MNI152 template) into model_repository/, write two held-out template head masks and Med-DDPM's sample mask into
# demo_input/, and synthesise an MRI for each with the app's embedded default (OpenVINO in process on a CPU) and the
# fast path. Results land in output/demo/<mask>/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m export --checkpoint models/mni152-demo/model.pt --preset mni152-demo --repository model_repository
.venv/bin/python -m meddpm.imaging.demo_heads --preset mni152-demo --out demo_input --count 2 --seed 10
cp tests/data/whole_head_mask_sample_0.nii.gz demo_input/meddpm_sample_mask.nii.gz
.venv/bin/python -m app -i demo_input -o output/demo -m model_repository --model-name meddpm_mni152_demo --scheduler dpmpp2m-sde "$@"
