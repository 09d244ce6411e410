#!/usr/bin/env bash
# The code checks, on .venv (scripts/setup.sh makes it): format, lint, the core's layers, the types of the core, the
# app and the export.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/lint-imports   # the layers of meddpm and what each may load: pyproject.toml [tool.importlinter]
.venv/bin/mypy           # meddpm/, app/ and export/: pyproject.toml [tool.mypy]
