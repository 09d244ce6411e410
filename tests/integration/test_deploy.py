"""Deployment files stay valid and agree with each other: Dockerfile (hadolint), compose (the compose-spec
schema shipped by check-jsonschema, plus what a schema cannot see), Kubernetes (kustomize render validated
against the Kubernetes schemas), and the container check's output verifier (the MAP: test_map.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import nibabel as nib
import numpy as np
import pytest
import yaml

from harness import check_output
from tests.conftest import REPO

BIN = Path(sys.executable).parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
KUSTOMIZE = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.37.0"


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN))
    assert path, f"{name} is missing from {BIN}: pip install -e '.[test]'"
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env_lines = [line[4:] for line in text.splitlines() if line.startswith("ENV ")]
    return dict(pair.split("=", 1) for line in env_lines for pair in line.split())


# --- Dockerfile ------------------------------------------------------------------------------------------------


def test_hadolint_finds_nothing():
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_final_stage_is_non_root_with_holoscan_defaults():
    text = (REPO / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER \$\{APP_UID\}", final, re.M) and "pip install" not in final and "wheelhouse" not in final
    env = dockerfile_env()
    assert env["HOLOSCAN_INPUT_PATH"] == "/var/holoscan/input"
    assert env["HOLOSCAN_OUTPUT_PATH"] == "/var/holoscan/output"
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    assert "TRITON_SERVER_NETLOC" not in env  # in process unless a deployment names a server


def test_build_context_has_what_the_dockerfile_copies():
    ignore = (REPO / ".dockerignore").read_text().split()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (REPO / "Dockerfile").read_text(), re.M)
    for source in (s for line in copied for s in line.split()):
        assert (REPO / source).exists() or source == "build/wheelhouse", source
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded by .dockerignore"


# --- compose ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_the_compose_spec():
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yaml_lint():
    files = [COMPOSE, *KUSTOMIZE.glob("*.yaml"), REPO / "app" / "app.yaml"]
    result = run(tool("yamllint"), "--strict", "-c", REPO / ".yamllint.yaml", *files)
    assert result.returncode == 0, result.stdout


def expand(value: str) -> str:
    """A compose value with every ${VAR:-default} replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_paths_and_ports_agree(compose):
    services = compose["services"]
    assert set(services) == {"triton", "app", "orthanc"}
    triton, app = services["triton"], services["app"]
    # Files the services mount or build from exist (relative to deploy/, as compose resolves them).
    build = DEPLOY / app["build"]["context"]
    assert (build / app["build"]["dockerfile"]).is_file()
    mounts = {service: [expand(v).split(":") for v in services[service]["volumes"]] for service in ("triton", "app")}
    app_targets = {target: source for source, target, *_ in mounts["app"]}
    assert set(app_targets) == {dockerfile_env()[f"HOLOSCAN_{p}_PATH"] for p in ("INPUT", "OUTPUT", "MODEL")}
    for source, *_ in mounts["triton"] + mounts["app"]:
        assert (DEPLOY / source).resolve().is_relative_to(REPO), source
    triton_models = DEPLOY / mounts["triton"][0][0]
    assert triton_models == DEPLOY / app_targets["/opt/holoscan/models"]
    # It is the folder the README's demo exports into (generated, so not in a fresh clone), and Triton loads a model
    # whose configuration export writes (its committed twin lives under tests/data).
    demo_export = re.search(r"--repository (\S+)", (REPO / "scripts" / "demo.sh").read_text())
    assert demo_export and triton_models.resolve() == (REPO / demo_export[1]).resolve()
    loaded = expand(app["environment"]["MEDDPM_MODEL"])
    assert (REPO / "tests" / "data" / "model_repository" / loaded / "config.pbtxt").is_file()
    # Triton serves the model the app asks for, on the port the app calls, with the health check on its HTTP port.
    command = [expand(c) for c in triton["command"]]
    assert f"--load-model={expand(app['environment']['MEDDPM_MODEL'])}" in command
    published = {int(p.split(":")[-1]) for p in triton["ports"]}
    assert int(app["environment"]["TRITON_SERVER_NETLOC"].rsplit(":", 1)[1]) in published
    assert "8000/v2/health/ready" in " ".join(triton["healthcheck"]["test"]) and 8000 in published
    assert triton["shm_size"] and triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # Shared memory transport: the app lives in Triton's network and IPC namespaces.
    assert app["network_mode"] == app["ipc"] == "service:triton" and triton["ipc"] == "shareable"
    assert app["environment"]["TRITON_SERVER_NETLOC"].startswith("localhost:")
    assert app["depends_on"]["triton"]["condition"] == "service_healthy"
    orthanc = services["orthanc"]
    assert "8042/system" in " ".join(orthanc["healthcheck"]["test"])
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))


# --- Kubernetes ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    result = run(tool("kubectl"), "kustomize", KUSTOMIZE)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(manifests: list[dict], kind: str) -> list[dict]:
    return [m for m in manifests if m["kind"] == kind]


def test_rendered_manifests_validate_against_kubernetes_schemas(manifests):
    assert {m["kind"] for m in manifests} == {"Deployment", "Service", "Job", "PersistentVolumeClaim"}
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_validation_rejects_a_broken_manifest(manifests):
    broken = json.loads(json.dumps(by_kind(manifests, "Deployment")[0]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_triton_deployment(manifests):
    (deployment,) = by_kind(manifests, "Deployment")
    kustomization = yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())
    assert deployment["spec"]["replicas"] == kustomization["replicas"][0]["count"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000 and ports["grpc"] == 8001
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/models"]["readOnly"] and "persistentVolumeClaim" in volumes[mounts["/models"]["name"]]
    assert "--model-repository=/models" in container["args"]


def test_job_points_at_the_service(manifests):
    (service,) = by_kind(manifests, "Service")
    (deployment,) = by_kind(manifests, "Deployment")
    (job,) = by_kind(manifests, "Job")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    host, port = env["TRITON_SERVER_NETLOC"].rsplit(":", 1)
    assert host == service["metadata"]["name"]
    grpc = next(p for p in service["spec"]["ports"] if p["port"] == int(port))
    assert grpc["targetPort"] == "grpc"
    triton_env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MEDDPM_MODEL"] == triton_env["MEDDPM_MODEL"]
    compose_app = yaml.safe_load(COMPOSE.read_text())["services"]["app"]
    assert container["image"] == compose_app["image"]
    image_uid = int(re.search(r"ARG APP_UID=(\d+)", (REPO / "Dockerfile").read_text())[1])
    assert pod["securityContext"]["runAsUser"] == image_uid
    claims = {m["metadata"]["name"] for m in by_kind(manifests, "PersistentVolumeClaim")}
    for volume in pod["volumes"] + deployment["spec"]["template"]["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for name in ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH"):
        assert any(env[name].startswith(path) for path in mounted), name
    # pods share the data volume: each shard reads and writes folders of its own, never another pod's
    assert env["HOLOSCAN_INPUT_PATH"].endswith("$(SHARD)") and env["HOLOSCAN_OUTPUT_PATH"].endswith("$(SHARD)")


def test_deployment_files_named_in_the_readmes_exist():
    for readme in (REPO / "README.md", DEPLOY / "README.md"):
        text = readme.read_text()
        named = set(re.findall(r"`((?:deploy|app|scripts)/[\w./-]+\.(?:yaml|py|sh))`", text))
        named |= set(re.findall(r"-f (deploy/[\w./]+)", text)) | set(re.findall(r"apply -k (deploy/[\w/]+)", text))
        assert named, readme
        for path in named:
            assert (REPO / path).exists(), f"{readme.name} names {path}, which does not exist"


# --- the container check's verifier ----------------------------------------------------------------------------


@pytest.fixture
def result_folder(tmp_path):
    """A result folder as the app writes it, holding the mask's ideal phantom image."""
    mask_path = check_output.write_mask(tmp_path / "head.nii.gz")
    mask = nib.load(mask_path)
    labels = np.asarray(mask.dataobj)
    image = np.where(labels == 1, 0.3, np.where(labels == 2, 0.9, -1.0)).astype(np.float32)
    folder = tmp_path / "out" / "head"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, mask.affine), folder / "sample_0.nii.gz")
    (folder / "preview.png").write_bytes(b"")
    (folder / "record.json").write_text(
        json.dumps({"backend": "openvino (fp32)", "model": {"verification_passed": True}})
    )
    return mask_path, folder, image


def test_verifier_accepts_a_right_result(result_folder):
    mask_path, folder, _ = result_folder
    assert check_output.problems(mask_path, folder, reference=folder) == []
    assert "expected 'triton" in check_output.problems(mask_path, folder, backend="triton meddpm_demo_cpu (shm)")[0]


def test_verifier_rejects_wrong_results(result_folder, tmp_path):
    mask_path, folder, image = result_folder
    other = tmp_path / "other"
    other.mkdir()
    nib.save(nib.Nifti1Image(image + 1e-3, nib.load(mask_path).affine), other / "sample_0.nii.gz")
    assert "differs from the reference" in check_output.problems(mask_path, folder, reference=other)[0]
    nib.save(nib.Nifti1Image(-image, nib.load(mask_path).affine), folder / "sample_0.nii.gz")
    assert "brain Dice" in check_output.problems(mask_path, folder)[0]
    assert check_output.problems(mask_path, folder, trained=False) == []  # an untrained model draws no head
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "sample_0.nii.gz")
    assert "grid" in check_output.problems(mask_path, folder)[0]
    (folder / "preview.png").unlink()
    assert "missing ['preview.png']" in check_output.problems(mask_path, folder)[0]
