#!/usr/bin/env bash
# Build the application image from the repository's Dockerfile on a local Debian 12 base and run it here:
# export the demo model inside the container, synthesise a phantom head with the app's defaults (OpenVINO
# in process, DDPM 250 steps, seed 1), and check the result against the same run outside the container; then
# run the container against a Triton server on this host with shared memory across the container boundary,
# as the compose stack's app does, and check that result too.
# Needs root (podman), .venv (scripts/setup.sh) and Debian's packages (scripts/setup_containers.sh installs
# them); .venv-triton is made by scripts/setup_triton.sh. Results in build/container-check/, build log in
# build/container-build.log; the image is localhost/meddpm-deploy:check.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_containers.sh
export CONTAINERS_CONF=$PWD/build/podman/containers.conf
BASE=$(scripts/standin_base.sh)  # made once, shared with scripts/map_check.sh
IMAGE=localhost/meddpm-deploy:check
WORK=$PWD/build/container-check
APP_UID=10001
SECONDS=0
step() { echo "[container_check ${SECONDS}s] $*"; }

step "wheelhouse"
scripts/wheelhouse.sh
step "podman build"
podman build --network=host --build-arg BASE_IMAGE=$BASE --build-arg PYTHON_VERSION=3.11 \
    --build-arg APP_UID=$APP_UID -t $IMAGE . >build/container-build.log
podman image inspect $IMAGE --format 'image {{.Id}}: {{.Size}} bytes, user {{.Config.User}}'

rm -rf "$WORK"
mkdir -p "$WORK/models" "$WORK/output"
chown $APP_UID:$APP_UID "$WORK/models" "$WORK/output"
.venv/bin/python -m harness.check_output mask "$WORK/input/head.nii.gz" >/dev/null
step "export the demo model inside the container"
podman run --rm --network=none --entrypoint python \
    -v "$PWD/models/demo:/checkpoint:ro" -v "$WORK/models:/opt/holoscan/models" \
    $IMAGE -m export --checkpoint /checkpoint/model_demo.pt --preset demo --repository /opt/holoscan/models
step "synthesise in the container (read-only root, no network, non-root)"
# FP32 throughout: the Triton run below serves FP32, and `auto` may pick the demo model's gated mixed precision on a
# CPU with native BF16 (docs/performance.md), which would differ from it by round-off.
podman run --rm --network=none --read-only --tmpfs /tmp \
    -v "$WORK/input:/var/holoscan/input:ro" -v "$WORK/models:/opt/holoscan/models:ro" \
    -v "$WORK/output:/var/holoscan/output" \
    $IMAGE --seed 1 --precision fp32
step "the same run outside the container, on the repository exported in it"
/usr/bin/time -f "outside the container: peak RSS %M kB, %e s wall, %P CPU" \
    .venv/bin/python -m app -i "$WORK/input" -o "$WORK/reference" -m "$WORK/models" --seed 1 --precision fp32 -l WARN >/dev/null
step "check"
.venv/bin/python -m harness.check_output verify "$WORK/input/head.nii.gz" "$WORK/output/head" \
    --reference "$WORK/reference/head"

step "synthesise in the container with the UNet on a Triton server on this host (shared memory, --ipc=host)"
scripts/setup_triton.sh
mkdir -p "$WORK/output-triton"
chown $APP_UID:$APP_UID "$WORK/output-triton"
.venv/bin/python - "$WORK" $IMAGE <<'PY'
import subprocess
import sys
from pathlib import Path

from harness.local_triton import LocalTriton

work, image = Path(sys.argv[1]), sys.argv[2]
with LocalTriton(work / "models", log_path=work / "tritonserver.log") as server:
    subprocess.run(["podman", "run", "--rm", "--network=host", "--ipc=host", "--read-only", "--tmpfs", "/tmp",
                    "-e", f"TRITON_SERVER_NETLOC={server.url}", "-e", "MEDDPM_TRITON_TRANSPORT=shm",
                    "-v", f"{work}/input:/var/holoscan/input:ro", "-v", f"{work}/models:/opt/holoscan/models:ro",
                    "-v", f"{work}/output-triton:/var/holoscan/output", image, "--seed", "1"], check=True)
PY
step "check"
.venv/bin/python -m harness.check_output verify "$WORK/input/head.nii.gz" "$WORK/output-triton/head" \
    --reference "$WORK/reference/head" --backend "triton meddpm_demo_cpu (shm)"
