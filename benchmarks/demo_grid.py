"""A preset at any grid (voxels scaled to cover the same head), and the demo checkpoint exported at one, for
benchmarks that time the loop at several sizes or run a released architecture small (a smoke test)."""

from __future__ import annotations

import json
from pathlib import Path

from export.cli import main as export_main
from meddpm.model.presets import get_preset
from meddpm.model.served_model import ServedModel, find_model

DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "demo" / "model_demo.pt"


def preset_at_grid(name: str, side: int, folder: Path) -> tuple[str, Path]:
    """Preset `name` on a side^3 grid, its voxels scaled to cover the same head: (its name, the presets file that
    holds it, for `python -m export --presets`)."""
    preset = get_preset(name)
    voxel = preset.image.voxel_size_mm[0] * preset.image.grid[0] / side
    lines = [f"[presets.{name}-{side}]", f'description = "{name} on a {side}^3 grid (benchmark)"']
    for section, table in preset.to_dict().items():
        if isinstance(table, dict):
            lines.append(f"[presets.{name}-{side}.{section}]")
            overrides = {"grid": [side] * 3, "voxel_size_mm": [voxel] * 3}
            lines += [f"{key} = {json.dumps(overrides.get(key, value))}" for key, value in table.items()]
    presets_file = folder / f"{name}-{side}.toml"
    presets_file.write_text("\n".join(lines) + "\n")
    return f"{name}-{side}", presets_file


def demo_at_grid(side: int, folder: Path) -> ServedModel:
    """The demo checkpoint exported for a side^3 grid."""
    preset_name, presets_file = preset_at_grid("demo", side, folder)
    repository = folder / f"repository-{side}"
    assert (
        export_main(
            [
                "--checkpoint",
                str(DEMO_CHECKPOINT),
                "--preset",
                preset_name,
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
