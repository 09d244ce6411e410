#!/usr/bin/env bash
# Create .venv-triton: a local Triton Inference Server (the real `tritonserver` binary shipped in the
# nvidia-pytriton wheel) with the python backend, OpenVINO and ONNX Runtime (the `_cpu` model), torch and
# diffusers (the server-side loop), for development and the integration tests.
# Its own environment because nvidia-pytriton pins numpy < 2 and the application needs numpy >= 2.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-triton
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv $VENV
fi
$VENV/bin/pip install --quiet nvidia-pytriton==0.7.0 onnxruntime==1.31.1 openvino==2026.4.1 numpy==1.26.4
# The server-side sampling loop (<name>_sampler) runs meddpm.sampling.loop: torch first, pinned to the local CPU build
# (any other pin pulls the CUDA build), then diffusers at the app's version; the meddpm package itself travels
# in the model repository (python -m export copies it).
$VENV/bin/pip install --quiet torch==2.13.0
$VENV/bin/pip install --quiet diffusers==0.42.1 numpy==1.26.4
# The python backend runs models through a stub built for the running Python; the wheel ships one per version.
SERVER=$($VENV/bin/python -c "import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / 'tritonserver')")
PYVER=$($VENV/bin/python -c "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')")
install -m 0755 "$SERVER/python_backend_stubs/$PYVER/triton_python_backend_stub" "$SERVER/backends/python/"
