"""The demo checkpoint exported at any grid, for benchmarks that time the loop at several sizes."""

from __future__ import annotations

import json
from pathlib import Path

from export.cli import main as export_main
from meddpm.model.presets import get_preset
from meddpm.model.served_model import ServedModel, find_model

DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "demo" / "model_demo.pt"


def demo_at_grid(side: int, folder: Path) -> ServedModel:
    """The demo checkpoint exported for a side^3 grid (voxels scaled to cover the same head)."""
    demo = get_preset("demo")
    voxel = demo.image.voxel_size_mm[0] * demo.image.grid[0] / side
    lines = [f"[presets.demo-{side}]", 'description = "demo model on another grid (benchmark)"']
    for section, table in demo.to_dict().items():
        if isinstance(table, dict):
            lines.append(f"[presets.demo-{side}.{section}]")
            overrides = {"grid": [side] * 3, "voxel_size_mm": [voxel] * 3}
            lines += [f"{key} = {json.dumps(overrides.get(key, value))}" for key, value in table.items()]
    presets_file = folder / f"demo-{side}.toml"
    presets_file.write_text("\n".join(lines) + "\n")
    repository = folder / f"repository-{side}"
    assert (
        export_main(
            [
                "--checkpoint",
                str(DEMO_CHECKPOINT),
                "--preset",
                f"demo-{side}",
                "--presets",
                str(presets_file),
                "--repository",
                str(repository),
                "--name",
                "meddpm_bench",
            ]
        )
        == 0
    )
    return find_model(repository, "meddpm_bench")
