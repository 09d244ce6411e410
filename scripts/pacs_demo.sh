#!/usr/bin/env bash
# The PACS demo: Orthanc with the synthesis plugin (deploy/orthanc/) and its Web Viewer on loopback ports; a phantom
# MR study and its SEG stored through Orthanc's DICOM port; prints the synthetic series that comes back and the time
# it took, checks it with dciodvfy, saves a screenshot of it in the viewer (headless Chromium), and stops everything
# it started. Needs .venv (scripts/setup.sh) and Orthanc's plugins and Chromium (scripts/setup_pacs.sh, root).
# Results in build/pacs-demo/; arguments go to `python -m harness.pacs_demo` (e.g. --keep-running).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_pacs.sh
exec .venv/bin/python -m harness.pacs_demo "$@"
