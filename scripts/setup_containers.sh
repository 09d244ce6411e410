#!/usr/bin/env bash
# Install what scripts/container_check.sh needs from Debian (podman, runc, debootstrap) when missing, and
# write the podman settings that make it work here as root: runc, cgroupfs, no default ulimits.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
mkdir -p build/podman
cat > build/podman/containers.conf <<'CONF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
