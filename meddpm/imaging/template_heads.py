"""Heads drawn from real anatomy: the MNI152 2009 template, deformed, with a synthetic tumour and a head around it.

The template (T1 at 1 mm, skull-stripped) comes inside nilearn's wheel (`nilearn/datasets/data/`), so nothing is
downloaded. Each head is the template under a random affine and a smooth deformation, with intensity and bias-field
variation, a tumour (an enhancing rim around a necrotic core, oedema around it, the tissue it displaces pushed
outward: mass effect), and a procedural CSF, skull and scalp shell with a neck, so that the label mask follows
Med-DDPM's whole-head convention, refined inside the brain by the template's tissue maps.

Arrays are (X, Y, Z) in RAS orientation. Labels: 0 background, 1 head (outside the brain: fluid around it, skull,
scalp, neck), 2 tumour, 3 cerebrospinal fluid, 4 grey matter, 5 white matter (the template's grey- and white-matter
probability maps, deformed with it). `whole_head` merges 3-5 into 1: Med-DDPM's convention (its sample mask).
Intensities are in the model range [-1, 1]; the tumour rim is the brightest tissue, the background the darkest, and
fluid, grey and white matter lie in T1 bands, so a synthetic image can be segmented back (`segment`) and compared
with its mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from meddpm.errors import ConfigurationError

BACKGROUND, HEAD, TUMOUR, CEREBROSPINAL_FLUID, GREY_MATTER, WHITE_MATTER = range(6)
TISSUES = (CEREBROSPINAL_FLUID, GREY_MATTER, WHITE_MATTER)
# Intensities in "T1 units" (the template's 0..255 scale); the model range is -1 + 2 * units / T1_UNITS_AT_ONE.
T1_UNITS_AT_ONE = 320.0
CSF, SKULL, MARROW, SCALP_FAT, SKIN, NECK = 35.0, 15.0, 90.0, 215.0, 140.0, 110.0
RIM, NECROSIS = 310.0, 50.0
OEDEMA_FACTOR = 0.85
# Segmenting back: the head is brighter than the background, the rim brighter than any other tissue.
HEAD_MIN = -0.85
RIM_MIN = 0.75  # 280 units: above white matter (at most about 260 after intensity variation)
# Tissue bands inside the brain, midway between the template's medians (fluid 102, grey 169, white 215 units).
FLUID_MAX, GREY_MAX = -0.2, 0.21  # 128 and 194 units

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "grey": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "white": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class Template:
    """The packaged MNI152 T1 (0..255), its grey- and white-matter probabilities (0..1) and world-to-voxel mapping."""

    t1: np.ndarray  # float32 (X, Y, Z), 0 outside the brain
    grey: np.ndarray  # float32, on t1's grid
    white: np.ndarray
    world_to_voxel: np.ndarray  # 4x4
    brain_centre_mm: np.ndarray  # (3,) world coordinates of the brain's bounding-box centre


@functools.cache
def load_template() -> Template:
    """The ICBM152 2009a nonlinear symmetric T1 (skull-stripped, 1 mm) as nilearn's wheel ships it."""
    try:
        import nilearn
    except ImportError as error:
        raise ConfigurationError(
            "the MNI152 template comes from nilearn's package data; install it with `pip install nilearn` "
            "(scripts/setup.sh does)"
        ) from error
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    images = {name: nib.Nifti1Image.from_filename(folder / file) for name, file in TEMPLATE_FILES.items()}
    t1, grey, white = (np.asarray(images[name].dataobj, dtype=np.float32) for name in ("t1", "grey", "white"))
    voxels = np.argwhere(t1 > 0)
    centre_voxel = (voxels.min(0) + voxels.max(0)) / 2
    affine = images["t1"].affine
    return Template(
        t1, grey / 255.0, white / 255.0, np.linalg.inv(affine), nib.affines.apply_affine(affine, centre_voxel)
    )


def make_template_head(
    rng: np.random.Generator, shape: tuple[int, int, int], voxel_mm: float, tumour_probability: float = 0.75
) -> tuple[np.ndarray, np.ndarray]:
    """One random head: (mask uint8, image float32), both of `shape`, voxels of `voxel_mm`.

    Drawn at half the voxel size and averaged down, so that thin layers (skull, rim) get partial volumes.
    """
    fine_shape = tuple(2 * n for n in shape)
    fine_mm = voxel_mm / 2
    points = np.stack(
        np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * fine_mm for n in fine_shape], indexing="ij"), axis=-1
    )  # (X, Y, Z, 3) millimetres from the grid centre
    to_template = _random_placement(rng, fine_shape, fine_mm)
    template = load_template()
    brain = _sample(template.t1, to_template(points)) > 0.5 * CSF

    tumour_at = _random_tumour(rng, points, brain, fine_mm) if rng.random() < tumour_probability else None
    if tumour_at is not None:
        points = _displaced(points, *tumour_at, strength=rng.uniform(0.3, 0.9))
    voxels = to_template(points)
    t1, grey, white = (_sample(volume, voxels) for volume in (template.t1, template.grey, template.white))
    brain = t1 > 0.5 * CSF
    tissue = np.where(grey + white < 0.5, CEREBROSPINAL_FLUID, np.where(white >= grey, WHITE_MATTER, GREY_MATTER))
    t1 = _vary_intensity(rng, t1, fine_mm)
    tumour = np.zeros(fine_shape, dtype=bool)
    if tumour_at is not None:
        tumour = (tumour_at[1] < 1.0) & ndimage.binary_erosion(brain, iterations=2)
        t1 = _draw_tumour(rng, t1, brain, tumour, tumour_at[1], fine_mm)
    head, shell = _head_shell(rng, brain, fine_mm)
    t1 = np.where(brain, t1, shell)
    mask = np.where(brain, tissue, np.where(head, HEAD, BACKGROUND)).astype(np.uint8)
    mask[tumour] = TUMOUR

    t1 += rng.normal(0.0, 3.0, fine_shape) * head
    image = -1.0 + 2.0 * np.clip(t1, 0.0, T1_UNITS_AT_ONE) / T1_UNITS_AT_ONE
    return _mask_down(mask), _average_down(image).astype(np.float32)


def segment(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Labels of a template-like image drawn for `mask`: the head by intensity (holes filled in axial slices, since
    the neck runs out of the grid), the tumour as the enhancing rim with what it encloses in any slice, and within the
    mask's brain, fluid, grey and white matter by their T1 bands (the brain's outline is not in the intensities)."""
    labels = np.zeros(image.shape, dtype=np.uint8)
    head = _fill_slices(ndimage.binary_closing(image > HEAD_MIN, iterations=1), axis=2)
    labels[head] = HEAD
    brain = head & np.isin(mask, TISSUES)
    labels[brain] = np.where(
        image[brain] <= FLUID_MAX, CEREBROSPINAL_FLUID, np.where(image[brain] <= GREY_MAX, GREY_MATTER, WHITE_MATTER)
    )
    rim = ndimage.binary_closing(image > RIM_MIN, iterations=1)
    tumour = rim | _fill_slices(rim, 0) | _fill_slices(rim, 1) | _fill_slices(rim, 2)
    labels[tumour & head] = TUMOUR
    return labels


def whole_head(mask: np.ndarray) -> np.ndarray:
    """The mask in Med-DDPM's whole-head convention: the brain's tissues merged into the head."""
    return np.where(np.isin(mask, TISSUES), HEAD, mask).astype(mask.dtype)


def _fill_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """Holes filled in each 2D slice across `axis`."""
    slices = [ndimage.binary_fill_holes(plane) for plane in np.moveaxis(volume, axis, 0)]
    return np.moveaxis(np.stack(slices), 0, axis)


def _random_placement(
    rng: np.random.Generator, shape: tuple[int, ...], voxel_mm: float
) -> Callable[[np.ndarray], np.ndarray]:
    """A map from grid millimetres to template voxels: rotation, scaling, shift and a smooth deformation."""
    template = load_template()
    rotation = Rotation.from_euler("xyz", rng.uniform(-8.0, 8.0, 3), degrees=True).as_matrix()
    scale = rng.uniform(0.92, 1.06) * rng.uniform(0.96, 1.04, 3)
    # The brain sits above the grid centre, leaving room for the neck below, as in Med-DDPM's whole-head masks.
    shift = template.brain_centre_mm + np.array([0.0, 0.0, -12.0]) + rng.uniform(-4.0, 4.0, 3)
    linear = rotation / scale[None, :]
    displacement = np.stack([_smooth_field(rng, shape, sigma=25.0 / voxel_mm) for _ in range(3)], axis=-1)
    displacement *= rng.uniform(2.0, 5.0)  # millimetres at most

    def to_template(points: np.ndarray) -> np.ndarray:
        world = points @ linear.T + shift + displacement
        return world @ template.world_to_voxel[:3, :3].T + template.world_to_voxel[:3, 3]

    return to_template


def _sample(volume: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """`volume` at template voxel coordinates (..., 3), trilinear, 0 outside."""
    coordinates = np.moveaxis(voxels, -1, 0)
    return ndimage.map_coordinates(volume, coordinates, order=1, cval=0.0).astype(np.float32)


def _random_tumour(
    rng: np.random.Generator, points: np.ndarray, brain: np.ndarray, voxel_mm: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Centre of a random ellipsoidal tumour inside the brain, and each point's normalised distance to it (1 on its
    wobbly surface); None when the brain has no room for one."""
    radii = rng.uniform(9.0, 24.0, 3)
    inside = np.argwhere(_coarse_distance_mm(brain, voxel_mm) > radii.max() + 3.0)
    if len(inside) == 0:
        return None
    centre = points[tuple(inside[rng.integers(len(inside))])]
    distance = np.sqrt((((points - centre) / radii) ** 2).sum(-1))
    wobble = _smooth_field(rng, brain.shape, sigma=6.0 / voxel_mm)
    return centre, distance * (1.0 + 0.12 * wobble)


def _displaced(points: np.ndarray, centre: np.ndarray, distance: np.ndarray, strength: float) -> np.ndarray:
    """Mass effect: tissue that sat at normalised distance rho now sits at (rho^3 + strength)^(1/3), pushed out."""
    outside = np.maximum(distance, 1.0)
    source = np.cbrt(np.maximum(outside**3 - strength, 0.0)) / outside
    return centre + (points - centre) * source[..., None]


def _vary_intensity(rng: np.random.Generator, t1: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Contrast (gamma), scale and a smooth multiplicative bias field, as scanners and sequences vary."""
    gamma = rng.uniform(0.85, 1.15)
    bias = np.exp(0.06 * _smooth_field(rng, t1.shape, sigma=40.0 / voxel_mm))
    return 255.0 * (t1 / 255.0) ** gamma * bias * rng.uniform(0.97, 1.03)


def _head_shell(rng: np.random.Generator, brain: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The head (brain, CSF, skull, scalp, neck) and the intensity of everything in it that is not brain."""
    hull = ndimage.binary_fill_holes(ndimage.gaussian_filter(brain.astype(np.float32), 4.0 / voxel_mm) > 0.3)
    # A neck: below the brain's lower third, the head keeps the cross-section it has there.
    levels = np.flatnonzero(hull.any(axis=(0, 1)))
    neck = np.zeros(brain.shape, dtype=bool)
    if len(levels):
        neck_level = levels[0] + len(levels) // 4
        section = ndimage.binary_erosion(hull[..., neck_level], iterations=max(1, int(8.0 / voxel_mm)))
        neck[..., :neck_level] = section[..., None] & ~hull[..., :neck_level]
    outside_mm = ndimage.distance_transform_edt(~(hull | neck)) * voxel_mm
    thickness = 1.0 + 0.15 * _smooth_field(rng, brain.shape, sigma=20.0 / voxel_mm)
    csf_mm, skull_mm, scalp_mm = (rng.uniform(*bounds) * thickness for bounds in ((1.5, 3.0), (5.0, 8.0), (4.0, 7.0)))
    skull_top, scalp_top = csf_mm + skull_mm, csf_mm + skull_mm + scalp_mm
    # Around the neck there is no skull: soft tissue, fat and skin only.
    near_neck = _coarse_distance_mm(~neck, voxel_mm) < scalp_top + 1.0
    shell = np.full(brain.shape, 0.0, dtype=np.float32)
    shell[hull | neck] = NECK
    layers = [
        (outside_mm > 0, CSF),
        (outside_mm > csf_mm, SKULL),
        (np.abs(outside_mm - (csf_mm + skull_mm / 2)) < skull_mm / 6, MARROW),
        (outside_mm > skull_top, SCALP_FAT),
        (near_neck & (outside_mm > 0), SCALP_FAT),
        (outside_mm > scalp_top - 1.5, SKIN),
        (outside_mm > scalp_top, 0.0),
    ]
    for where, value in layers:
        shell[where] = value
    head = (outside_mm <= scalp_top) | brain
    return head, ndimage.gaussian_filter(shell, 0.6)


def _draw_tumour(
    rng: np.random.Generator,
    t1: np.ndarray,
    brain: np.ndarray,
    tumour: np.ndarray,
    distance: np.ndarray,
    voxel_mm: float,
) -> np.ndarray:
    """An enhancing rim (6-9 mm, so that it survives the coarse grid) around a necrotic core, oedema around it."""
    t1 = np.where((distance < 1.6) & brain, t1 * OEDEMA_FACTOR, t1)
    box = ndimage.find_objects(tumour.astype(np.uint8))[0]
    depth_mm = np.zeros(tumour.shape, dtype=np.float32)
    depth_mm[box] = ndimage.distance_transform_edt(np.pad(tumour[box], 1))[1:-1, 1:-1, 1:-1] * voxel_mm
    rim_mm = rng.uniform(6.0, 9.0)
    core = depth_mm > rim_mm
    t1[tumour] = RIM + rng.normal(0.0, 4.0, int(tumour.sum()))
    t1[core] = NECROSIS + 15.0 * _smooth_field(rng, t1.shape, sigma=3.0 / voxel_mm)[core]
    return t1


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed noise scaled to [-1, 1]; drawn on a grid `step` times coarser and interpolated up, which
    changes nothing visible for sigma well above `step` and costs a fraction."""
    step = max(1, int(sigma // 3))
    coarse_shape = tuple(-(-n // step) + (step > 1) for n in shape)
    field = ndimage.gaussian_filter(rng.normal(size=coarse_shape), sigma=sigma / step)
    field = ndimage.zoom(field, step, order=1)[tuple(slice(0, n) for n in shape)] if step > 1 else field
    return field / (np.abs(field).max() + 1e-8)


def _coarse_distance_mm(mask: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Distance to the nearest False voxel, in mm, computed on every second voxel (8x cheaper, within a voxel)."""
    coarse = ndimage.distance_transform_edt(mask[::2, ::2, ::2]) * 2 * voxel_mm
    return ndimage.zoom(coarse, 2, order=1)[tuple(slice(0, n) for n in mask.shape)]


def _average_down(volume: np.ndarray) -> np.ndarray:
    x, y, z = (n // 2 for n in volume.shape)
    return volume.reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5))


def _mask_down(mask: np.ndarray) -> np.ndarray:
    """Each coarse voxel takes the tumour when half its fine voxels are tumour, else, when half are head, the most
    frequent of the head's other labels among them; else the background."""
    tumour = _average_down((mask == TUMOUR).astype(np.float32)) >= 0.5
    head = _average_down((mask != BACKGROUND).astype(np.float32)) >= 0.5
    inside = (HEAD, *TISSUES)
    shares = np.stack([_average_down((mask == label).astype(np.float32)) for label in inside])
    coarse = np.where(head, np.asarray(inside, dtype=np.uint8)[shares.argmax(0)], BACKGROUND).astype(np.uint8)
    coarse[tumour] = TUMOUR
    return coarse
