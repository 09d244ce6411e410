#!/usr/bin/env bash
# Build the MONAI Application Package here from the stock packager's own build context and run it as MONAI Deploy
# runs a MAP; check it against the MAP specification and its volume against the same run outside the container.
#
# 1. The packager (holoscan-cli 4.2.0, `monai-deploy package`, the same arguments as scripts/map_package.sh)
#    renders the build context: manifests, Dockerfile, tools script, app, models. deploy/map/render_context.py
#    captures it where the packager would call `docker buildx build`, and makes the few edits the rendered
#    Dockerfile needs here (listed in the script and deploy/README.md, "The MAP"; the diff is printed).
# 2. podman builds it on the local stand-in base image (scripts/standin_base.sh) with the packager's build
#    arguments, without its layer cache; pip in the build steps reads deploy/map/pip.conf, mounted with the
#    wheelhouse (scripts/wheelhouse.sh): no registry is used, as on an air-gapped site.
# 3. tests/integration/test_map.py (marker container) checks the image's manifests, labels, paths and its
#    `show`/`extract` tools against the specification.
# 4. The MAP synthesises a phantom head with the demo model (DDPM 250 steps, seed 1) as the Workflow Manager of
#    MONAI Deploy Express runs our workflow's docker task (its image, entrypoint, command and HOLOSCAN_* paths,
#    input and output mounted there; not its PACS settings), in process; then through its own entry point (the tools
#    script runs app.json's command) with TRITON_SERVER_NETLOC pointing at a Triton server on this host, writing
#    NIfTI and DICOM. Both volumes must equal the run outside the container.
#    `--full-size` does the same with Med-DDPM's whole-head architecture (random weights, benchmarks/full_size.py)
#    on Med-DDPM's 128^3 sample mask with the fast path (dpmpp2m-sde, 20 steps): the volume is checked on the mask's
#    grid and against the run outside the container, not for anatomy (45 minutes in all on 2 cores, 3 runs of 20
#    steps at about 30 s a step).
# Needs root (podman), .venv (scripts/setup.sh), .venv-triton (scripts/setup_triton.sh); installs Debian's
# podman, runc and debootstrap when missing. `--context-only` stops after step 1 (no root, no podman: the CI
# smoke). Results in build/map-check/, logs in build/map-*.log; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
CONTEXT_ONLY=false FULL_SIZE=false
for argument in "$@"; do
    case $argument in
        --context-only) CONTEXT_ONLY=true ;;
        --full-size) FULL_SIZE=true ;;
        *) echo "usage: scripts/map_check.sh [--context-only] [--full-size]" >&2; exit 2 ;;
    esac
done
CONTEXT=${MAP_CONTEXT:-build/map-context}
WORK=$PWD/build/map-check
SECONDS=0
step() { echo "[map_check ${SECONDS}s] $*"; }

if $FULL_SIZE; then
    MODELS=${MAP_MODELS:-build/map-models-full/repository} MODEL=meddpm_full
    SAMPLER=(dpmpp2m-sde 20) VERIFY=(--random-weights)
    if [[ ! -d $MODELS ]]; then
        step "export the whole-head architecture (random weights) into $(dirname "$MODELS")/repository"
        MODELS=$(.venv/bin/python -m benchmarks.full_size --export-to "$(dirname "$MODELS")" | tail -1)
    fi
else
    MODELS=${MAP_MODELS:-build/map-models} MODEL=meddpm_demo
    SAMPLER=(ddpm 250) VERIFY=()
    if [[ ! -d $MODELS ]]; then
        step "export the demo model to $MODELS"
        .venv/bin/python -m export --checkpoint models/demo/model_demo.pt --preset demo --repository "$MODELS" \
            >/dev/null
    fi
fi
step "stage the app; the packager's environment build/venv-map"
MAP_STAGE_ONLY=1 scripts/map_package.sh
step "render the build context with the packager (holoscan-cli 4.2.0) into $CONTEXT"
build/venv-map/bin/python deploy/map/render_context.py "$CONTEXT" -- package build/map/app -c app/app.yaml \
    -t meddpm-deploy-map:0.1.0 --platform x86_64 --add build/map/lib --models "$MODELS" \
    --source deploy/map/artifacts.json >build/map-render.log 2>&1 || { cat build/map-render.log; exit 1; }
echo "the edits to the packager's Dockerfile for this machine ($CONTEXT/Dockerfile.diff):"
cat "$CONTEXT/Dockerfile.diff"
if $CONTEXT_ONLY; then
    exit 0
fi

scripts/setup_containers.sh
export CONTAINERS_CONF=$PWD/build/podman/containers.conf
step "stand-in base image"
scripts/standin_base.sh
step "wheelhouse"
scripts/wheelhouse.sh pip==25.3  # the MAP's requirements hold pip<26: scripts/map_package.sh says why
IMAGE=localhost/$(jq -r '.tags[0]' "$CONTEXT/build.json")
mapfile -t BUILD_ARGS < <(jq -r '.build_args | to_entries[] | "--build-arg=\(.key)=\(.value)"' "$CONTEXT/build.json")
step "podman build $IMAGE (log: build/map-build.log)"
build_start=$SECONDS
podman build --no-cache --network=host --pull=never "${BUILD_ARGS[@]}" \
    -f "$CONTEXT/$(jq -r .file "$CONTEXT/build.json")" \
    -v "$PWD/build/wheelhouse:/wheelhouse:ro" -v "$PWD/deploy/map/pip.conf:/etc/pip.conf:ro" \
    -t "$IMAGE" "$CONTEXT" >build/map-build.log 2>&1 || { tail -40 build/map-build.log; exit 1; }
echo "built in $((SECONDS - build_start)) s; $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"

step "the image against the MAP specification"
MEDDPM_MAP_IMAGE=$IMAGE .venv/bin/python -m pytest -q -m container -p no:cacheprovider tests/integration/test_map.py

rm -rf "$WORK"
mkdir -p "$WORK/output-workflow-manager" "$WORK/output-triton"
chown 1000:1000 "$WORK"/output-*  # the packager's user, holoscan (UID and GID in build.json)
if $FULL_SIZE; then
    mkdir -p "$WORK/input" && cp tests/data/whole_head_mask_sample_0.nii.gz "$WORK/input/head.nii.gz"
else
    .venv/bin/python -m harness.check_output mask "$WORK/input/head.nii.gz" >/dev/null
fi
step "the same run outside the container (${SAMPLER[*]} steps)"
# FP32 throughout: the Triton run below serves FP32, and `auto` may pick the demo model's gated mixed precision on a
# CPU with native BF16 (docs/performance.md), which would differ from it by round-off.
run_start=$SECONDS
.venv/bin/python -m app -i "$WORK/input" -o "$WORK/reference" -m "$MODELS" --seed 1 --precision fp32 -l WARN \
    --scheduler "${SAMPLER[0]}" --steps "${SAMPLER[1]}" >/dev/null
echo "ran in $((SECONDS - run_start)) s"

step "run as the Workflow Manager runs the docker task of deploy/monai-deploy-express/meddpm-workflow.json: in process"
task() { jq -r ".tasks[] | select(.type == \"docker\") | .args | $1" deploy/monai-deploy-express/meddpm-workflow.json; }
if [[ localhost/$(task .container_image) != "$IMAGE" ]]; then
    echo "the workflow runs $(task .container_image), not this MAP ($IMAGE)" >&2
    exit 1
fi
run_start=$SECONDS
podman run --rm --network=none --entrypoint "$(task '.entrypoint | split(",") | tojson')" \
    -e HOLOSCAN_INPUT_PATH="$(task .env_HOLOSCAN_INPUT_PATH)" \
    -e HOLOSCAN_OUTPUT_PATH="$(task .env_HOLOSCAN_OUTPUT_PATH)" \
    -e HOLOSCAN_MODEL_PATH="$(task .env_HOLOSCAN_MODEL_PATH)" -e MEDDPM_SEED=1 -e MEDDPM_PRECISION=fp32 \
    -e MEDDPM_SCHEDULER="${SAMPLER[0]}" -e MEDDPM_STEPS="${SAMPLER[1]}" \
    -v "$WORK/input:$(task .env_HOLOSCAN_INPUT_PATH):ro" \
    -v "$WORK/output-workflow-manager:$(task .env_HOLOSCAN_OUTPUT_PATH)" "$IMAGE" "$(task .command)"
echo "ran in $((SECONDS - run_start)) s"
.venv/bin/python -m harness.check_output verify "$WORK/input/head.nii.gz" "$WORK/output-workflow-manager/head" \
    --reference "$WORK/reference/head" "${VERIFY[@]}"

step "run through the MAP's entry point with the UNet on a Triton server on this host (shared memory)"
scripts/setup_triton.sh
run_start=$SECONDS
.venv/bin/python - "$WORK" "$MODELS" "$IMAGE" "${SAMPLER[@]}" <<'PY'
import subprocess
import sys
from pathlib import Path

from harness.local_triton import LocalTriton

work, models, image, scheduler, steps = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
with LocalTriton(models, log_path=work / "tritonserver.log") as server:
    subprocess.run(["podman", "run", "--rm", "--network=host", "--ipc=host",
                    "-e", f"TRITON_SERVER_NETLOC={server.url}", "-e", "MEDDPM_TRITON_TRANSPORT=shm",
                    "-v", f"{work}/input:/var/holoscan/input:ro", "-v", f"{work}/output-triton:/var/holoscan/output",
                    image, "--seed", "1", "--scheduler", scheduler, "--steps", steps, "--output-format", "nifti,dicom"],
                   check=True)
PY
echo "ran in $((SECONDS - run_start)) s (the server's start included)"
.venv/bin/python -m harness.check_output verify "$WORK/input/head.nii.gz" "$WORK/output-triton/head" \
    --reference "$WORK/reference/head" --backend "triton ${MODEL}_cpu (shm)" "${VERIFY[@]}"
slices=$(find "$WORK/output-triton/head/dicom" -name '*.dcm' | wc -l)
expected=$(.venv/bin/python -c 'import sys, nibabel; print(nibabel.load(sys.argv[1]).shape[2])' "$WORK/input/head.nii.gz")
if [[ $slices != "$expected" ]]; then
    echo "the MAP wrote $slices DICOM slices, not the mask's $expected" >&2
    exit 1
fi
step "MAP $IMAGE: built by the packager's context, satisfies the specification, and wrote the same volume as" \
    "outside the container as a Workflow Manager docker task (in process) and through its entry point (Triton)"
