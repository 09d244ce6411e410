"""Render the MAP's build context with the pinned packager's own code, then adapt it for a local podman build.

Run with the packager's Python (holoscan-cli 4.2.0, the last release with `monai-deploy package`):

    build/venv-map/bin/python deploy/map/render_context.py OUT -- package APP -c app/app.yaml -t TAG ...

The arguments after `--` are those of the stock `monai-deploy package` command. The packager runs unchanged
(manifests, Dockerfile, tools script, app, models, requirements). Only its last step is replaced:
instead of calling `docker buildx build`, this script copies the build context to OUT and writes OUT/build.json
with the tag and build arguments the packager would have passed.

The Dockerfile then gets the edits in LOCAL_EDITS, each of which must match exactly once, so that a new
packager version fails here instead of building something else. The packager's own Dockerfile is kept
beside it as Dockerfile.packager, and the difference is written to Dockerfile.diff. deploy/README.md
("The MAP") says why each edit is needed and what a site with Docker, buildx and registry access runs
instead.
"""

import difflib
import json
import re
import shutil
import sys
from pathlib import Path

from holoscan_cli import __main__ as holoscan_main
from holoscan_cli.packager import container_builder

# (why, pattern, replacement): the smallest changes that let the rendered Dockerfile build on the stand-in base
# (Debian 12, no NVIDIA or Ubuntu repository reachable). Everything that makes the image a MAP stays as rendered.
LOCAL_EDITS = [
    (
        "NVIDIA's CUDA apt key is fetched from developer.download.nvidia.com, which cannot be reached; a Python "
        "app installs nothing from NVIDIA's apt repository",
        re.compile(r"^RUN rm -f /etc/apt/sources\.list\.d/cuda\*\.list \\\n(?:.*\\\n)*.*apt-get update\n", re.M),
        "# [local build] NVIDIA's CUDA apt key not fetched: deploy/README.md, The MAP\n",
    ),
    (
        "Python is pinned to Ubuntu 24.04's 3.12.3; the stand-in base is Debian 12, whose python3 is 3.11.2",
        re.compile(r"^ENV PYTHON_VERSION=3\.12\.3-\*$", re.M),
        "ENV PYTHON_VERSION=3.11.2-*",
    ),
    (
        "pip is pinned to Ubuntu 24.04's 24.0; Debian 12's python3-pip is 23.0.1",
        re.compile(r"^ENV PYTHON_PIP_VERSION=24\.0\+dfsg-\*$", re.M),
        "ENV PYTHON_PIP_VERSION=23.0.1+dfsg-*",
    ),
]


class PackagerChanged(RuntimeError):
    """The packager rendered something these edits were not written for."""


def adapt_dockerfile(text: str) -> str:
    """Apply LOCAL_EDITS to the packager's Dockerfile; each must match exactly once."""
    for why, pattern, replacement in LOCAL_EDITS:
        text, count = pattern.subn(replacement, text)
        if count != 1:
            raise PackagerChanged(
                f"expected one match for {pattern.pattern!r} ({why}), found {count}: the packager's Dockerfile "
                "changed; read it (Dockerfile.packager) and update LOCAL_EDITS"
            )
    return text


def capture_build(out: Path):
    """A stand-in for the packager's `docker buildx build` that keeps the build context and arguments."""

    def build_docker_image(**build):
        context = Path(build["context_path"])
        shutil.copytree(context, out, symlinks=True)
        dockerfile = out / Path(build["file"]).relative_to(context)
        packager_text = dockerfile.read_text()
        dockerfile.with_name("Dockerfile.packager").write_text(packager_text)
        local_text = adapt_dockerfile(packager_text)
        dockerfile.write_text(local_text)
        diff = difflib.unified_diff(
            packager_text.splitlines(keepends=True),
            local_text.splitlines(keepends=True),
            "Dockerfile.packager",
            "Dockerfile",
        )
        dockerfile.with_name("Dockerfile.diff").write_text("".join(diff))
        recorded = {key: build[key] for key in ("tags", "platforms", "build_args")}
        recorded["file"] = dockerfile.name
        (out / "build.json").write_text(json.dumps(recorded, indent=2, default=str) + "\n")

    return build_docker_image


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    if out.exists():
        shutil.rmtree(out)
    container_builder.build_docker_image = capture_build(out)
    container_builder.create_and_get_builder = lambda name: name
    sys.argv = ["monai-deploy", *argv[2:]]  # the packager picks the SDK from the command's name
    holoscan_main.main()
    if not (out / "build.json").exists():
        print(f"the packager stopped before its build step; nothing written to {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
