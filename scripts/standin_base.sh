#!/usr/bin/env bash
# Make the local stand-in for NVIDIA's CUDA runtime base image, which cannot be pulled here: Debian 12 from
# debootstrap plus what the app loads from that image without a GPU, libcudart (holoscan links it), taken from
# NVIDIA's wheel of it. Used by scripts/container_check.sh and scripts/map_check.sh; prints the image name.
# Needs root and Debian's podman and debootstrap (scripts/setup_containers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/build/podman/containers.conf}
BASE=localhost/meddpm-cuda-standin:bookworm
if ! podman image exists $BASE; then
    rm -rf build/rootfs build/cudart
    debootstrap --variant=minbase bookworm build/rootfs >/dev/null
    .venv/bin/pip download --quiet --no-deps --only-binary=:all: -d build/cudart nvidia-cuda-runtime==13.0.96
    mkdir -p build/rootfs/usr/local/cuda/lib64
    .venv/bin/python -c 'import sys, zipfile; open(sys.argv[2], "wb").write(
        zipfile.ZipFile(sys.argv[1]).read("nvidia/cu13/lib/libcudart.so.13"))' \
        build/cudart/*.whl build/rootfs/usr/local/cuda/lib64/libcudart.so.13
    echo /usr/local/cuda/lib64 >build/rootfs/etc/ld.so.conf.d/cuda.conf
    chroot build/rootfs ldconfig
    tar -C build/rootfs -c . | podman import - $BASE >/dev/null
    rm -rf build/rootfs build/cudart
fi
echo $BASE
