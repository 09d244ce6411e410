"""The MONAI Application Package: the staged app, the build context the packager renders for it, and the built
image, each held against the MAP specification (deploy/map/specification.py cites its sections).

The built image's checks carry the marker `container` (deselected by default): scripts/map_check.sh builds the MAP
with podman as root and runs them on it with MEDDPM_MAP_IMAGE set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from deploy.map import specification
from tests.conftest import REPO

MAP_VENV_PYTHON = REPO / "build" / "venv-map" / "bin" / "python"


def test_staged_app_runs_as_the_map_starts_it(tmp_path):
    """The staged MAP (scripts/map_package.sh) run as the packager's image runs it: `python3 APP_DIR`, with every
    folder under lib on PYTHONPATH ahead of lib itself (holoscan-cli 4.2.0's Dockerfile template)."""
    staged = subprocess.run(
        [REPO / "scripts" / "map_package.sh"],
        cwd=REPO,
        env={**os.environ, "MAP_STAGE_ONLY": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert staged.returncode == 0, staged.stderr
    lib = REPO / "build" / "map" / "lib"
    assert sorted(p.name for p in lib.iterdir()) == ["app", "export", "meddpm"]
    path = [str(p) for p in sorted(lib.rglob("*")) if p.is_dir()] + [str(lib)]
    environment = {**os.environ, "PYTHONPATH": ":".join(path)}
    result = subprocess.run(
        [sys.executable, REPO / "build" / "map" / "app", "--help"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage: python -m app" in result.stdout, result.stderr[-2000:]


def test_app_yaml_resources():
    text = (REPO / "app" / "app.yaml").read_text()
    config = yaml.safe_load(text)
    assert set(config["resources"]) == {"cpu", "gpu", "memory"}
    assert re.match(specification.MEMORY, config["resources"]["memory"])
    assert "/usr/bin/time -v" in text  # the comment says how the figures were measured


@pytest.fixture(scope="module")
def rendered_context(demo_repository, tmp_path_factory):
    """scripts/map_check.sh's cheap part: the packager renders the MAP's build context for the demo model."""
    context = tmp_path_factory.mktemp("map") / "context"
    result = subprocess.run(
        [REPO / "scripts" / "map_check.sh", "--context-only"],
        cwd=REPO,
        env={**os.environ, "MAP_CONTEXT": str(context), "MAP_MODELS": str(demo_repository)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return context


def dockerfile_labels(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r'^LABEL (\S+)="(.*)"$', dockerfile, re.M))


def test_rendered_manifests_and_labels_meet_the_specification(rendered_context, demo_repository):
    app = json.loads((rendered_context / "map" / "app.json").read_text())
    pkg = json.loads((rendered_context / "map" / "pkg.json").read_text())
    labels = dockerfile_labels((rendered_context / "Dockerfile").read_text())
    assert specification.problems(app, pkg, labels) == []
    assert json.loads(app["command"]) == ["python3", specification.APP_ROOT]
    assert app["input"]["formats"] == ["file"]  # from app.yaml's input-formats
    entries = sorted(p.name for p in demo_repository.iterdir() if p.is_dir())
    assert specification.model_paths(pkg) == [f"{specification.MODEL_ROOT}/{name}" for name in entries]
    assert sorted(p.name for p in (rendered_context / "models").iterdir()) == entries
    assert pkg["resources"] == yaml.safe_load((REPO / "app" / "app.yaml").read_text())["resources"]


def test_local_edits_leave_the_map_as_the_packager_wrote_it(rendered_context):
    """Only the lines the edits name differ; the manifests, labels, paths, user and entry point stay."""
    packager = (rendered_context / "Dockerfile.packager").read_text().splitlines()
    local = (rendered_context / "Dockerfile").read_text().splitlines()
    removed = [line for line in packager if line not in local]
    added = [line for line in local if line not in packager]
    assert len(removed) == 7 and any("cuda-keyring" in line for line in removed), removed
    assert added == [
        "# [local build] NVIDIA's CUDA apt key not fetched: deploy/README.md, The MAP",
        "ENV PYTHON_VERSION=3.11.2-*",
        "ENV PYTHON_PIP_VERSION=23.0.1+dfsg-*",
    ]
    for kept in (
        f"COPY ./map/app.json {specification.APP_MANIFEST}",
        f"COPY ./map/pkg.json {specification.PKG_MANIFEST}",
        f"COPY ./app {specification.APP_ROOT}",
        f"COPY ./models  {specification.MODEL_ROOT}",
        "USER $UNAME",
        'ENTRYPOINT ["/var/holoscan/tools"]',
    ):
        assert kept in local
    assert dockerfile_labels("\n".join(local)) == dockerfile_labels("\n".join(packager))


def test_the_express_workflow_runs_this_map(rendered_context):
    """The Workflow Manager's docker task (deploy/monai-deploy-express) names the image the packager tags, starts
    the app as the MAP's manifest does, and reads the models embedded in the MAP."""
    workflow = json.loads((REPO / "deploy" / "monai-deploy-express" / "meddpm-workflow.json").read_text())
    (task,) = [task["args"] for task in workflow["tasks"] if task["type"] == "docker"]
    build = json.loads((rendered_context / "build.json").read_text())
    assert task["container_image"] == build["tags"][0]
    assert task["command"].split() == ["python3", "-u", f"{specification.APP_ROOT}/"]
    assert task["env_HOLOSCAN_MODEL_PATH"].rstrip("/") == specification.MODEL_ROOT


def test_an_unexpected_packager_dockerfile_is_refused(rendered_context):
    """A packager whose Dockerfile no longer has what an edit is for fails the render instead of building."""
    script = (
        "import sys; sys.path.insert(0, 'deploy/map'); from render_context import adapt_dockerfile\n"
        "adapt_dockerfile(open(sys.argv[1]).read().replace('ENV PYTHON_VERSION=3.12.3-*', ''))"
    )
    result = subprocess.run(
        [MAP_VENV_PYTHON, "-c", script, rendered_context / "Dockerfile.packager"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "PackagerChanged" in result.stderr and "found 0" in result.stderr and "LOCAL_EDITS" in result.stderr


# --- the built image (scripts/map_check.sh) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def map_image():
    image = os.environ.get("MEDDPM_MAP_IMAGE")
    if not image:
        pytest.fail("MEDDPM_MAP_IMAGE is not set: run scripts/map_check.sh, which builds the MAP and runs these tests")
    return image


def podman(*arguments: str, **kwargs) -> str:
    result = subprocess.run(["podman", *arguments], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"podman {' '.join(arguments)}: {result.stderr[-2000:]}"
    return result.stdout


def read_in_image(image: str, path: str) -> str:
    return podman("run", "--rm", "--network=none", "--entrypoint", "cat", image, path)


@pytest.mark.container
def test_built_map_meets_the_specification(map_image):
    app = json.loads(read_in_image(map_image, specification.APP_MANIFEST))
    pkg = json.loads(read_in_image(map_image, specification.PKG_MANIFEST))
    inspected = json.loads(podman("image", "inspect", map_image))[0]
    config = inspected.get("Config") or inspected["config"]
    assert specification.problems(app, pkg, config["Labels"]) == []
    assert config["Entrypoint"] == ["/var/holoscan/tools"]
    folders = [specification.APP_ROOT, specification.INPUT_PATH, specification.OUTPUT_PATH]
    tests = " && ".join(f"test -d {path}" for path in folders + specification.model_paths(pkg))
    podman("run", "--rm", "--network=none", "--entrypoint", "/bin/sh", map_image, "-c", tests)
    environment = dict(
        line.split("=", 1) for line in podman("run", "--rm", "--network=none", "--entrypoint", "env", map_image).split()
    )
    assert environment["HOLOSCAN_APP_MANIFEST_PATH"] == specification.APP_MANIFEST
    assert environment["HOLOSCAN_MODEL_PATH"] == specification.MODEL_ROOT


@pytest.mark.container
def test_built_map_shows_and_extracts_its_manifests(map_image, tmp_path):
    shown = podman("run", "--rm", "--network=none", map_image, "show")
    for manifest in (specification.APP_MANIFEST, specification.PKG_MANIFEST):
        assert json.dumps(json.loads(read_in_image(map_image, manifest))["version"]) in shown
    assert '"applicationRoot"' in shown and '"command"' in shown
    export = tmp_path / "export"
    export.mkdir()
    os.chown(export, 1000, 1000)  # the packager's user, holoscan
    podman("run", "--rm", "--network=none", "-v", f"{export}:/var/run/holoscan/export", map_image, "extract")
    assert (export / "app" / "__main__.py").is_file()
    assert {"app.json", "pkg.json"} <= {p.name for p in (export / "config").iterdir()}
    pkg = json.loads((export / "config" / "pkg.json").read_text())
    for path in specification.model_paths(pkg):
        assert (export / "models" / path.rsplit("/", 1)[1] / "config.pbtxt").is_file()
