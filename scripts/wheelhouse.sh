#!/usr/bin/env bash
# Collect every wheel the container image installs (the project's pinned dependencies, torch's CPU build,
# setuptools to build the project) into a folder, build/wheelhouse by default. The image build installs from
# it with --no-index, so the build itself needs no registry: an air-gapped site runs this script where the
# registry is reachable and carries the folder over. Extra arguments go to `pip download`, e.g.
# `--python-version 3.12` for a base image whose Python differs from this one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WHEELHOUSE=${WHEELHOUSE:-build/wheelhouse}
mkdir -p "$WHEELHOUSE"
"$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > "$WHEELHOUSE/requirements.txt"
"$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$WHEELHOUSE" "$@" \
    -r "$WHEELHOUSE/requirements.txt" "setuptools>=68"
