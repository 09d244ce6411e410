#!/usr/bin/env bash
# Package the app as a MONAI Application Package with the stock packager: `monai-deploy package` from
# holoscan-cli 4.2.0 (the last release with it; 4.3 and 5.x, which the SDK pulls, dropped it), installed in its own
# environment, build/venv-map. Needs Docker with buildx and registry access (deploy/README.md, "The MAP");
# scripts/map_check.sh builds the same packager output here with podman instead.
#
# The packager runs `python3 /opt/holoscan/app` and copies the contents of each --add folder into
# /opt/holoscan/lib, putting every folder under it on PYTHONPATH ahead of lib itself; lib/app/app.py would then
# shadow the `app` package. So the staged application folder holds only requirements.txt and a __main__.py that
# puts lib first, and the packages (app, meddpm, export) go under lib. The exported repository is embedded with
# --models.
# Usage: scripts/map_package.sh [MODEL_REPOSITORY] [more `monai-deploy package` arguments]
# MAP_STAGE_ONLY=1 stops after making build/venv-map and staging build/map (scripts/map_check.sh uses both).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${1:-model_repository}
shift || true
PACKAGER=4.2.0
# Every package the packager needs, so that an install cut short (a killed run) is redone, not trusted.
if ! build/venv-map/bin/python -c "import importlib.metadata as m; assert m.version('holoscan-cli') == '$PACKAGER'
assert m.version('holoscan-cu13') == '4.6.0' and m.version('monai-deploy-app-sdk') == '4.0.0'" 2>/dev/null; then
    rm -rf build/venv-map
    python3 -m venv build/venv-map
    # holoscan-cli reads the Holoscan and SDK versions from packages installed beside it (metadata only;
    # wheel-axle-runtime finishes holoscan's installation).
    build/venv-map/bin/pip install --quiet holoscan-cli==$PACKAGER wheel-axle-runtime==0.0.13
    build/venv-map/bin/pip install --quiet --no-deps holoscan-cu13==4.6.0 monai-deploy-app-sdk==4.0.0
fi
STAGE=build/map
rm -rf "$STAGE"
mkdir -p "$STAGE/app" "$STAGE/lib"
cat >"$STAGE/app/__main__.py" <<'PY'
import pathlib
import sys

# the MAP's lib folder first: the packager also puts its subfolders on PYTHONPATH, and lib/app/app.py would shadow app
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "lib"))
from app.app import main  # noqa: E402

raise SystemExit(main())
PY
# The packager's Dockerfile upgrades pip in the user's site-packages, then installs these requirements, which bring
# holoscan; its next pip command is the first Python start after that, where holoscan's wheel-axle .pth finishes the
# install and imports the system pip (Ubuntu's 24.0, Debian's 23.0.1) ahead of the user's. pip 26's `pip` script
# imports pip._internal.cli.main:cli, which those lack: `ImportError: cannot import name 'cli'` at
# `pip install monai-deploy-app-sdk` (seen here). pip 25's script imports :main, which they have.
{
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))'
    echo "pip<26"
} >"$STAGE/app/requirements.txt"
for package in app meddpm export; do
    cp -r "$package" "$STAGE/lib/$package"
done
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
if [[ ${MAP_STAGE_ONLY:-0} == 1 ]]; then
    exit 0
fi
build/venv-map/bin/monai-deploy package "$STAGE/app" -c app/app.yaml -t meddpm-deploy-map:0.1.0 \
    --platform x86_64 --add "$STAGE/lib" --models "$MODELS" "$@"
