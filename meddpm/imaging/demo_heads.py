"""The heads each demo model is trained on, and how its synthetic images are segmented back, by preset name.

Training (training/train_demo.py) draws its pairs here; the quality benchmarks draw held-out masks and score
synthetic images with the same source's `segment`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from meddpm.errors import ConfigurationError
from meddpm.imaging import phantom_heads, template_heads

HeadMaker = Callable[[np.random.Generator, tuple[int, int, int], float], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class HeadSource:
    """Random (mask, image) pairs on a preset's grid, the segmentation that reads labels back from an image, and
    the names of the labels it scores."""

    make: HeadMaker
    segment: Callable[[np.ndarray], np.ndarray]
    labels: dict[str, int]


HEAD_SOURCES = {
    "demo": HeadSource(
        phantom_heads.make_phantom,
        phantom_heads.segment,
        {"brain": phantom_heads.BRAIN, "tumour": phantom_heads.TUMOUR},
    ),
    "mni152-demo": HeadSource(
        template_heads.make_template_head,
        template_heads.segment,
        {"head": template_heads.HEAD, "tumour": template_heads.TUMOUR},
    ),
}


def head_source(preset_name: str) -> HeadSource:
    """The heads the `preset_name` demo model was trained on."""
    if preset_name not in HEAD_SOURCES:
        raise ConfigurationError(
            f"preset '{preset_name}' has no synthetic heads to train or score on; the demo presets are "
            f"{', '.join(sorted(HEAD_SOURCES))}"
        )
    return HEAD_SOURCES[preset_name]
