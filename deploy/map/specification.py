"""What the MONAI Application Package specification requires of a MAP, as JSON schemas and checks.

Written from the specification (Project-MONAI/monai-deploy, guidelines/monai-application-package.md, version
1.0.0, the file as of commit f0057f0f0e3bab9c7ed7c7d32e1cef87cf052c68): the sections "Table of Application
Manifest Fields", "Table of Package Manifest Fields", "Table of Environment Variables", "Image Annotations" and
"Table of Important Paths". Where the packager (holoscan-cli 4.2.0, the SDK's own implementation) writes a field
in another shape than the specification's tables, the schema accepts both and the comment says which is whose.
"""

from __future__ import annotations

import re

import jsonschema

APP_MANIFEST = "/etc/holoscan/app.json"
PKG_MANIFEST = "/etc/holoscan/pkg.json"
APP_ROOT = "/opt/holoscan/app"
MODEL_ROOT = "/opt/holoscan/models"
INPUT_PATH = "/var/holoscan/input"
OUTPUT_PATH = "/var/holoscan/output"

SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
ABSOLUTE_PATH = r"^/"
# "Decimal values followed by units": the text names MiB and GiB, its examples (1.5Gi, 2048Mi) and the
# packager use Mi and Gi.
MEMORY = r"^\d+(\.\d)?(Mi|Gi|MiB|GiB)$"
# decimal counts are positive and "rounded to the nearest tenth" (checked in problems: multipleOf 0.1 and floats)
DECIMAL = {"type": "number", "exclusiveMinimum": 0}
COUNT = {"type": "number", "minimum": 0}

FORMATS = {"type": "array", "minItems": 1, "items": {"type": ["string", "object"]}}
PROBE = {
    "type": ["object", "null"],
    "required": ["type"],
    "properties": {"type": {"enum": ["tcp", "grpc", "http-get", "command"]}},
}

APP_MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["command", "input", "output"],
    "properties": {
        "apiVersion": {"type": "string", "pattern": SEMVER},
        "command": {"type": "string", "minLength": 1},
        "environment": {"type": "object", "additionalProperties": {"type": "string"}},
        "input": {
            "type": "object",
            "required": ["formats"],
            "properties": {"formats": FORMATS, "path": {"type": "string"}},
        },
        # the table requires `output.format` (an object); the packager writes `output.formats`, a list like
        # input's
        "output": {
            "type": "object",
            "anyOf": [
                {"required": ["format"], "properties": {"format": {"type": "object"}}},
                {"required": ["formats"], "properties": {"formats": FORMATS}},
            ],
            "properties": {"path": {"type": "string"}},
        },
        "readiness": PROBE,
        "liveness": PROBE,
        "sdk": {"type": "string"},
        "sdkVersion": {"type": "string", "pattern": SEMVER},
        "timeout": {"type": "integer", "minimum": 0},
        "version": {"type": "string", "pattern": SEMVER},
        "workingDirectory": {"type": "string", "pattern": ABSOLUTE_PATH},
        # the text says a MAP MUST define `type`, the table does not list it and the packager does not write it
        "type": {"enum": ["service", "application"]},
    },
}

# "A MAP SHALL contain the following environment variables and their default values" (app.json#environment).
# The table names HOLOSCAN_DOCS and HOLOSCAN_LOGS; the packager writes HOLOSCAN_DOCS_PATH and HOLOSCAN_LOGS_PATH.
REQUIRED_ENVIRONMENT = (
    ("HOLOSCAN_INPUT_PATH",),
    ("HOLOSCAN_OUTPUT_PATH",),
    ("HOLOSCAN_WORKDIR",),
    ("HOLOSCAN_MODEL_PATH",),
    ("HOLOSCAN_CONFIG_PATH",),
    ("HOLOSCAN_APP_MANIFEST_PATH",),
    ("HOLOSCAN_PKG_MANIFEST_PATH",),
    ("HOLOSCAN_DOCS", "HOLOSCAN_DOCS_PATH"),
    ("HOLOSCAN_LOGS", "HOLOSCAN_LOGS_PATH"),
)

RESOURCES = {
    "cpu": DECIMAL,
    "cpuLimit": DECIMAL,
    "gpu": COUNT,
    "gpuLimit": COUNT,
    **{
        name: {"type": "string", "pattern": MEMORY}
        for name in ("memory", "memoryLimit", "gpuMemory", "gpuMemoryLimit", "sharedMemory", "sharedMemoryLimit")
    },
}
# "SHALL NOT contain any Unicode whitespace or control characters" and "SHALL NOT exceed 128 bytes"
MODEL_NAME = {"type": "string", "pattern": r"^[^\s\x00-\x1f\x7f]+$", "maxLength": 128}

PKG_MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["applicationRoot"],
    "properties": {
        "apiVersion": {"type": "string", "pattern": SEMVER},
        "applicationRoot": {"type": "string", "pattern": ABSOLUTE_PATH},
        "modelRoot": {"type": "string", "pattern": ABSOLUTE_PATH},
        # the table: an array of {name, path}; the packager writes an object from name to absolute path
        "models": {
            "anyOf": [
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": MODEL_NAME, "path": {"type": "string"}},
                    },
                },
                {"type": "object", "propertyNames": MODEL_NAME, "additionalProperties": {"type": "string"}},
            ]
        },
        "resources": {"type": "object", "properties": RESOURCES},
        "version": {"type": "string", "pattern": SEMVER},
    },
}

TITLE_LABEL = "org.opencontainers.image.title"
VERSION_LABEL = "org.opencontainers.image.version"


def problems(app: dict, pkg: dict, labels: dict[str, str]) -> list[str]:
    """Every way the manifests and image labels fall short of the specification; empty when they satisfy it."""
    found = [
        f"{name}: {error.json_path}: {error.message}"
        for name, document, schema in (
            ("app.json", app, APP_MANIFEST_SCHEMA),
            ("pkg.json", pkg, PKG_MANIFEST_SCHEMA),
        )
        for error in jsonschema.Draft202012Validator(schema).iter_errors(document)
    ]
    environment = app.get("environment") or {}
    found += [
        f"app.json: environment lacks {' or '.join(names)}"
        for names in REQUIRED_ENVIRONMENT
        if not any(name in environment for name in names)
    ]
    found += [
        f"pkg.json: resources.{name}={value} is not rounded to the nearest tenth"
        for name, value in (pkg.get("resources") or {}).items()
        if isinstance(value, float) and round(value, 1) != value
    ]
    if not labels.get(TITLE_LABEL, "").strip():
        found.append(f"label {TITLE_LABEL} is missing or empty")
    version = labels.get(VERSION_LABEL, "")
    if not re.match(SEMVER, version):
        found.append(f"label {VERSION_LABEL}={version!r} is not a semantic version")
    elif version != app.get("version"):
        found.append(f"label {VERSION_LABEL}={version!r} differs from app.json's version {app.get('version')!r}")
    return found


def model_paths(pkg: dict) -> list[str]:
    """The absolute path of every model pkg.json lists, in either shape (see PKG_MANIFEST_SCHEMA)."""
    root = pkg.get("modelRoot", MODEL_ROOT)
    models = pkg.get("models") or []
    entries = models.items() if isinstance(models, dict) else ((m["name"], m.get("path")) for m in models)
    return [path if path and path.startswith("/") else f"{root}/{path or name}" for name, path in entries]
