"""The UNet's tensors: the one contract between the exported graph, Triton's configs and every denoiser backend.

The graph takes float32 volumes (batch, channels, D, H, W) and a timestep per sample (batch,), and returns the
predicted noise like the noisy image. Triton configs describe one sample (their batch axis is max_batch_size),
the timestep as [1], reshaped to the graph's scalar.
"""

from __future__ import annotations

from meddpm.model.presets import Preset

NOISY_IMAGE, CONDITION, TIMESTEP = "noisy_image", "condition", "timestep"
PREDICTED_NOISE = "predicted_noise"
INPUTS = (NOISY_IMAGE, CONDITION, TIMESTEP)  # in the order of the graph's inputs
IMAGE_RANGE = (-1.0, 1.0)  # intensities the model was trained on and produces
DTYPE = "float32"  # every tensor's element type


def sample_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape for one sample on the preset's grid, as a Triton config states it."""
    grid = tuple(preset.image.grid)
    return {
        NOISY_IMAGE: (preset.out_channels, *grid),
        CONDITION: (preset.condition_channels, *grid),
        TIMESTEP: (1,),
        PREDICTED_NOISE: (preset.out_channels, *grid),
    }


def graph_shapes(preset: Preset) -> dict[str, tuple[int | None, ...]]:
    """Each tensor's shape in the ONNX graph, the inputs in their order then the output; None where the graph takes
    any size (the batch, the grid's sides)."""
    return {
        NOISY_IMAGE: (None, preset.out_channels, None, None, None),
        CONDITION: (None, preset.condition_channels, None, None, None),
        TIMESTEP: (None,),
        PREDICTED_NOISE: (None, preset.out_channels, None, None, None),
    }
