"""Synthetic chest CT phantoms with known ground truth, and a cohort writer (NIfTI or DICOM plus a datalist).

The phantoms stand in for patient scans wherever the ground truth must be known: the demo, the tests and learning
checks of the bundles. Each volume holds a body (fat, muscle, ribs, spine, mediastinum, heart, aorta) on a curved
patient table, two lungs split into five lobes, a trachea with main bronchi, pulmonary vessels, and class-dependent
lesions:

- ``task="screening"``: label 1 (COVID-19-like) = bilateral, peripheral and posterior ground-glass opacities with
  crazy paving; label 0 (bacterial-like) = unilateral lobar or segmental consolidation with air bronchograms. Lesion
  burden and density overlap between the classes so that no global statistic separates them: a classifier has to
  look at location and texture.
- ``task="severity"``: COVID-19-like lesions only; the label (1 = severe) is decided by the lesion burden (fraction
  of lung volume) and its spread over lobes.

Array convention (relied upon by the rest of the package): numpy arrays indexed ``[x, y, z]`` in LPS voxel order:
x increases toward the patient's left, y toward posterior, z toward superior, as a DICOM axial series is stored.
The patient's right lung lies at low x; the table lies at high y (patient supine). The matching NIfTI (RAS) affine
is ``diag(-sx, -sy, sz, 1)`` plus the origin, see :func:`phantom_affine`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from chestct.constants import (
    HU_AIR,
    LOBE_LEFT_LOWER,
    LOBE_LEFT_UPPER,
    LOBE_NAMES,
    LOBE_RIGHT_LOWER,
    LOBE_RIGHT_MIDDLE,
    LOBE_RIGHT_UPPER,
    LUNG_LABELS,
    LUNG_LEFT,
    LUNG_RIGHT,
    SCREENING_LABELS,
    SEVERITY_LABELS,
)
from chestct.dicom_series import write_dicom_series

__all__ = ["IMAGE_FORMATS", "TASKS", "Phantom", "generate_cohort", "make_phantom", "phantom_affine"]

TASKS: tuple[str, ...] = ("screening", "severity")
IMAGE_FORMATS: tuple[str, ...] = ("nifti", "dicom")

# Smallest volume that still shows every structure (ribs, both lungs, five lobes) at the coarse spacing it implies.
MIN_INPLANE_SIZE: int = 32
MIN_SLICES: int = 8

# --- Tissue CT numbers (HU); each case draws its value from the range. ---------------------------------------------
HU_FAT: tuple[float, float] = (-120.0, -80.0)
HU_MUSCLE: tuple[float, float] = (35.0, 55.0)
HU_SOFT_TISSUE: tuple[float, float] = (30.0, 45.0)  # mediastinal fat/tissue mix and upper abdomen
HU_HEART: tuple[float, float] = (35.0, 50.0)  # non-contrast blood and myocardium are alike
HU_BLOOD: tuple[float, float] = (35.0, 50.0)  # aorta and pulmonary vessels
HU_CSF: float = 10.0  # spinal canal
HU_CORTICAL_BONE: tuple[float, float] = (600.0, 900.0)
HU_CANCELLOUS_BONE: tuple[float, float] = (300.0, 400.0)
# Aerated parenchyma; the wide range mimics different inspiration depths (and keeps mean lung HU uninformative).
HU_LUNG: tuple[float, float] = (-890.0, -780.0)
HU_AIRWAY_LUMEN: float = HU_AIR
HU_GGO: tuple[float, float] = (-700.0, -450.0)  # ground-glass opacity
HU_CRAZY_PAVING_EXTRA: tuple[float, float] = (120.0, 260.0)  # thickened interlobular septa inside the GGO
HU_CONSOLIDATION: tuple[float, float] = (-100.0, 50.0)
HU_MIXED_CONSOLIDATION: tuple[float, float] = (-250.0, -50.0)  # dense core of some COVID-like opacities
HU_AIR_BRONCHOGRAM: tuple[float, float] = (-950.0, -880.0)
HU_EFFUSION: tuple[float, float] = (10.0, 20.0)
HU_TABLE_SKIN: float = 250.0  # carbon-fibre shell of the patient table
HU_TABLE_CORE: float = -700.0  # foam core of the table
HU_PARENCHYMA_TEXTURE: float = 18.0  # amplitude of the smooth parenchymal texture
HU_GRAVITY_GRADIENT: float = 30.0  # dependent (posterior) lung is denser in a supine patient
HU_INT16_MIN: int = -32768
HU_INT16_MAX: int = 32767
HU_MIN_RECONSTRUCTED: float = -1024.0  # scanners do not reconstruct below this (padding aside)
PADDING_VALUES: tuple[int, int] = (-3024, -2048)
PADDING_PROBABILITY: float = 0.5
NOISE_SIGMA_HU: tuple[float, float] = (10.0, 40.0)
PARTIAL_VOLUME_SIGMA_VOXELS: float = 0.6

# --- Physical size (mm). -----------------------------------------------------------------------------------------
FOV_MM: tuple[float, float] = (300.0, 420.0)
Z_EXTENT_MM: tuple[float, float] = (220.0, 320.0)

# --- Lesion burden (fraction of lung volume) per task and label. ---------------------------------------------------
# Screening: burdens are drawn log-uniformly and overlap on purpose; COVID-like ground glass is less dense than a
# consolidation, so it is given a somewhat larger burden: mean lung HU and lesion fraction then both overlap.
SCREENING_COVID_BURDEN: tuple[float, float] = (0.035, 0.32)
SCREENING_BACTERIAL_BURDEN: tuple[float, float] = (0.025, 0.18)
# Severity: burden decides the label; the ranges touch at the boundary so a few cases are ambiguous, as in practice.
SEVERITY_NON_SEVERE_BURDEN: tuple[float, float] = (0.01, 0.20)
SEVERITY_SEVERE_BURDEN: tuple[float, float] = (0.18, 0.50)
MIXED_FINDING_PROBABILITY: float = 0.3
COVID_BILATERAL_PROBABILITY: float = 0.9
MAX_BLOBS: int = 60
# Pulmonary vessel tree: (branches per parent, reach in mm) per level, from the hilum outward.
VESSEL_LEVELS: tuple[tuple[int, float], ...] = ((5, 90.0), (3, 55.0), (2, 35.0))
VESSEL_MIN_RADIUS_MM: float = 0.8
LOBE_INVOLVED_MIN_FRACTION: float = 0.01  # a lobe counts as involved above 1 % of its volume


@dataclass
class Phantom:
    """One synthetic chest CT with its ground truth.

    Attributes:
        image: (X, Y, Z) int16 Hounsfield units, LPS voxel order.
        body: (X, Y, Z) uint8 0/1 body mask (the patient, without the table).
        lungs: (X, Y, Z) uint8, 0 background, 1 right lung, 2 left lung (lesions and effusion included).
        lobes: (X, Y, Z) uint8 lobe codes 0..5 (see ``chestct.constants``), same support as ``lungs``.
        lesions: (X, Y, Z) uint8 0/1 lesion mask (inside the lungs).
        spacing: voxel size in mm, (sx, sy, sz).
        label: class label of the case (task dependent).
        info: JSON-serialisable facts about the case (task, burden, lobes involved, padding value, seed, ...).
        origin: LPS position in mm of voxel (0, 0, 0).
    """

    image: np.ndarray
    body: np.ndarray
    lungs: np.ndarray
    lobes: np.ndarray
    lesions: np.ndarray
    spacing: tuple[float, float, float]
    label: int
    info: dict
    origin: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))

    @property
    def affine(self) -> np.ndarray:
        """4x4 NIfTI (RAS) affine of the arrays."""
        return phantom_affine(self.spacing, self.origin)


def phantom_affine(
    spacing: tuple[float, float, float], origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """NIfTI (RAS) affine of an LPS-ordered ``[x, y, z]`` array.

    Args:
        spacing: (sx, sy, sz) in mm.
        origin: LPS position in mm of voxel (0, 0, 0) (the DICOM ``ImagePositionPatient`` of the first slice).

    Returns:
        (4, 4) float64 affine ``diag(-sx, -sy, sz, 1)`` with translation ``(-ox, -oy, oz)`` (LPS to RAS flips x, y).
    """
    sx, sy, sz = (float(s) for s in spacing)
    ox, oy, oz = (float(o) for o in origin)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = (-ox, -oy, oz)
    return affine


# ------------------------------------------------------------------------------------------------------------------
# Drawing helpers. Points are given in the anatomical frame (mm): u toward the patient's left, v toward posterior,
# w above the lowest slice; the frame's (u, v) origin is the centre of the slice.
# ------------------------------------------------------------------------------------------------------------------


class _Grid:
    """Coordinates of a phantom volume, as broadcastable (X,1,1), (1,Y,1), (1,1,Z) float32 arrays in mm."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        nx, ny, nz = shape
        self.offset = np.array([(nx - 1) / 2 * spacing[0], (ny - 1) / 2 * spacing[1], 0.0])
        self.u = (np.arange(nx, dtype=np.float32) * spacing[0] - self.offset[0]).reshape(nx, 1, 1)
        self.v = (np.arange(ny, dtype=np.float32) * spacing[1] - self.offset[1]).reshape(1, ny, 1)
        self.w = (np.arange(nz, dtype=np.float32) * spacing[2]).reshape(1, 1, nz)

    def to_voxel(self, p: np.ndarray) -> np.ndarray:
        """Anatomical mm (u, v, w) to continuous voxel index."""
        return (np.asarray(p, dtype=np.float64) + self.offset) / self.spacing

    def to_mm(self, idx: np.ndarray) -> np.ndarray:
        """Voxel index (..., 3) to anatomical mm."""
        return np.asarray(idx, dtype=np.float64) * self.spacing - self.offset

    def box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the mm box [lo, hi], or ``None`` when it misses the volume."""
        lo = np.floor(self.to_voxel(lo_mm)).astype(int)
        hi = np.ceil(self.to_voxel(hi_mm)).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]

    def sub(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The coordinate arrays restricted to ``box``."""
        return self.u[box[0]], self.v[:, box[1]], self.w[:, :, box[2]]


def _tube(grid: _Grid, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float):
    """Voxels within a tapered tube (radius r0 at p0 to r1 at p1, mm) around the segment p0-p1.

    Only the bounding box of the segment is evaluated, which keeps many small branches cheap.

    Returns:
        (box, mask) with mask a bool array of the box's shape, or ``None`` when the tube misses the volume.
    """
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    rmax = max(r0, r1)
    box = grid.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if box is None:
        return None
    u, v, w = grid.sub(box)
    d = p1 - p0
    dd = float(d @ d) or 1e-6
    t = ((u - p0[0]) * d[0] + (v - p0[1]) * d[1] + (w - p0[2]) * d[2]) / dd
    t = np.clip(t, 0.0, 1.0)
    dist2 = (u - p0[0] - t * d[0]) ** 2 + (v - p0[1] - t * d[1]) ** 2 + (w - p0[2] - t * d[2]) ** 2
    radius = r0 + t * (r1 - r0)
    return box, dist2 <= radius**2


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (float32)."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field_ / max(float(field_.std()), 1e-6)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, bv: float) -> np.ndarray:
    """Normalised squared elliptic radius ((u - cu) / au)^2 + ((v - cv) / bv)^2 (< 1 inside)."""
    return ((u - cu) / au) ** 2 + ((v - cv) / bv) ** 2


@dataclass
class _LungGeometry:
    """Per-lung shape parameters (mm), kept for lobes, lesions and effusion."""

    side: int  # -1 right (low u), +1 left
    cu: float
    cv: float
    ra: float
    rb: float
    w_low: float
    w_apex: float
    hilum: np.ndarray


def _check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        shape_t = tuple(int(s) for s in shape)
    except TypeError as e:
        raise ValueError(f"shape must be 3 integers (X, Y, Z), got {shape!r}.") from e
    if len(shape_t) != 3:
        raise ValueError(f"shape must be 3 integers (X, Y, Z), got {shape!r}.")
    if min(shape_t[:2]) < MIN_INPLANE_SIZE or shape_t[2] < MIN_SLICES:
        raise ValueError(
            f"shape {shape_t} is too small: need at least {MIN_INPLANE_SIZE} voxels in plane and {MIN_SLICES} slices."
        )
    return shape_t  # type: ignore[return-value]


def _check_task_label(task: str, label: int) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}.")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")


def make_phantom(
    label: int,
    task: str = "screening",
    shape: tuple[int, int, int] = (160, 160, 64),
    seed: int = 0,
    effusion_probability: float = 0.0,
    burden: float | None = None,
) -> Phantom:
    """Generate one synthetic chest CT with known body, lung, lobe and lesion masks.

    Args:
        label: class label. Screening: 1 COVID-19-like, 0 bacterial-like pneumonia; severity: 1 severe, 0 non-severe.
        task: ``"screening"`` or ``"severity"``.
        shape: (X, Y, Z) voxels; at least 32 in plane and 8 slices. The physical size is drawn per case (in-plane
            field of view 300-420 mm, z extent 220-320 mm), so the spacing follows from the shape.
        seed: seed of the case's random generator; the phantom is a pure function of its arguments.
        effusion_probability: probability of a dependent pleural effusion (fluid, inside the lung masks).
        burden: lesion burden (fraction of lung volume) to aim at; drawn from the task and label's range when
            ``None``. The reached burden is reported in ``info["lesion_fraction"]``.

    Returns:
        A :class:`Phantom` whose arrays are (X, Y, Z) in LPS voxel order.

    Raises:
        ValueError: unknown task, label not 0/1, shape too small, probability or burden outside [0, 1].
    """
    _check_task_label(task, label)
    shape_t = _check_shape(shape)
    _check_probability("effusion_probability", effusion_probability)
    if burden is not None and not 0.0 < float(burden) < 1.0:
        raise ValueError(f"burden must be in (0, 1), got {burden!r}.")
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape_t

    # Physical size: square pixels, field of view and z extent vary per case.
    fov = rng.uniform(*FOV_MM)
    sxy = fov / nx
    sz = rng.uniform(*Z_EXTENT_MM) / nz
    spacing = (float(sxy), float(sxy), float(sz))
    grid = _Grid(shape_t, spacing)
    u, v, w = grid.u, grid.v, grid.w
    half_x = (nx - 1) / 2 * sxy
    half_y = (ny - 1) / 2 * sxy
    z_top = (nz - 1) * sz
    recon_radius = min(half_x, half_y) * rng.uniform(0.97, 1.0)

    # ---- body ellipse, placed so that the table fits below it inside the image -----------------------------------
    # Air between the patient's back and the table top: at least two voxels, so the two never touch in the image.
    table_gap = max(rng.uniform(8.0, 25.0), 2.5 * sxy)
    table_thickness = rng.uniform(10.0, 16.0)
    a_body = min(half_x, half_y) * rng.uniform(0.62, 0.86)
    b_body = a_body * rng.uniform(0.58, 0.75)
    below = table_gap + table_thickness + rng.uniform(4.0, 15.0)
    margin = 1.5 * sxy  # keep air around the patient even at coarse spacing
    # Centre the patient-plus-table stack in the image; shrink the patient if it would leave the reconstruction
    # circle or the image.
    vc = -below / 2
    theta = np.linspace(0, 2 * np.pi, 90)
    for _ in range(30):
        reach = np.hypot(a_body * np.cos(theta), vc + b_body * np.sin(theta)).max()
        fits_y = vc - b_body >= -half_y + margin and vc + b_body + table_gap <= half_y - margin
        if fits_y and reach <= recon_radius - margin:
            break
        a_body *= 0.97
        b_body *= 0.97
    fat = rng.uniform(4.0, 12.0) + 12.0 * (a_body / half_x - 0.6)  # larger patients carry more fat
    fat = float(np.clip(fat, 3.0, 25.0))
    muscle = rng.uniform(7.0, 14.0)
    rib_ring = rng.uniform(5.0, 8.0)
    a_cav = a_body - fat - muscle - rib_ring
    b_cav = b_body - fat - muscle - rib_ring

    e_body = _ellipse(u, v, 0.0, vc, a_body, b_body)  # (X, Y, 1)
    body2d = e_body <= 1.0
    e_muscle = _ellipse(u, v, 0.0, vc, a_body - fat, b_body - fat)
    e_ring = _ellipse(u, v, 0.0, vc, a_body - fat - muscle, b_body - fat - muscle)
    e_cav = _ellipse(u, v, 0.0, vc, a_cav, b_cav)
    cavity2d = e_cav <= 1.0

    image = np.full(shape_t, HU_AIR, dtype=np.float32)

    # ---- curved table: its top follows a gentle parabola that stays below the body's back everywhere -------------
    table_half_width = min(a_body * rng.uniform(1.0, 1.3), half_x)
    curvature = 0.45 * b_body / (2 * a_body**2)
    us = np.linspace(-table_half_width, table_half_width, 201)
    inside_body_u = np.abs(us) < a_body
    v_back = np.where(inside_body_u, vc + b_body * np.sqrt(np.clip(1 - (us / a_body) ** 2, 0, 1)), -np.inf)
    v_top0 = vc + b_body + table_gap
    lift = (v_top0 - curvature * us**2) - v_back
    v_top0 += max(0.0, table_gap - float(lift.min()))  # keep the gap everywhere, not only under the spine
    table_top = v_top0 - curvature * u**2  # (X, 1, 1)
    table2d = (v >= table_top) & (v <= table_top + table_thickness) & (np.abs(u) <= table_half_width)
    skin = 2.0
    core2d = table2d & (v >= table_top + skin) & (v <= table_top + table_thickness - skin)
    image[np.broadcast_to(table2d, shape_t)] = HU_TABLE_SKIN
    image[np.broadcast_to(core2d, shape_t)] = HU_TABLE_CORE

    # ---- body wall: fat, muscle, rib ring, sternum, spine -----------------------------------------------------------
    hu_soft = rng.uniform(*HU_SOFT_TISSUE)
    image[np.broadcast_to(body2d, shape_t)] = rng.uniform(*HU_FAT)
    image[np.broadcast_to(e_muscle <= 1.0, shape_t)] = rng.uniform(*HU_MUSCLE)
    image[np.broadcast_to(cavity2d, shape_t)] = hu_soft

    # Ribs run obliquely around the chest, so an axial slice cuts them into short segments whose angular position
    # drifts from slice to slice; a rotating cosine pattern on the rib ring imitates that.
    angle = np.arctan2(v - vc, u)  # (X, Y, 1)
    n_ribs = int(rng.integers(7, 11))
    rib_pitch = rng.uniform(22.0, 32.0)
    rib_phase = rng.uniform(0, 2 * np.pi)
    ring = (e_ring <= 1.0) & ~cavity2d
    rib_pattern = np.cos(n_ribs * angle + 2 * np.pi * w / rib_pitch + rib_phase) > 0.3
    bone_cortical = rng.uniform(*HU_CORTICAL_BONE)
    bone_cancellous = rng.uniform(*HU_CANCELLOUS_BONE)
    image[ring & rib_pattern] = bone_cortical
    sternum2d = ring & (np.abs(u) < 12.0) & (v < vc)
    image[np.broadcast_to(sternum2d, shape_t)] = bone_cancellous

    r_vert = rng.uniform(14.0, 20.0)
    v_vert = vc + b_cav - 0.8 * r_vert  # the vertebral body bulges into the back of the chest cavity
    d_vert = np.hypot(u, v - v_vert)
    vert2d = d_vert <= r_vert
    image[np.broadcast_to(vert2d, shape_t)] = bone_cortical
    image[np.broadcast_to(d_vert <= r_vert - 2.5, shape_t)] = bone_cancellous
    v_canal = v_vert + r_vert + 7.0
    d_canal = np.hypot(u, v - v_canal)
    arch2d = (d_canal <= 11.0) & body2d
    spinous2d = (np.abs(u) <= 3.5) & (v >= v_canal) & (e_muscle <= 1.0)
    image[np.broadcast_to(arch2d | spinous2d, shape_t)] = bone_cortical
    image[np.broadcast_to(d_canal <= 6.5, shape_t)] = HU_CSF

    # ---- mediastinum: aorta and heart -------------------------------------------------------------------------------
    r_aorta = rng.uniform(10.0, 14.0)
    u_aorta, v_aorta = r_vert + r_aorta * 0.7, v_vert - r_vert * 0.6
    aorta2d = np.hypot(u - u_aorta, v - v_aorta) <= r_aorta
    image[np.broadcast_to(aorta2d & cavity2d, shape_t)] = rng.uniform(*HU_BLOOD)

    # ---- lung geometry ----------------------------------------------------------------------------------------------
    r_trachea = rng.uniform(7.5, 10.0)
    mediastinum_half = max(rng.uniform(10.0, 20.0), r_trachea + 6.0)
    w_low = z_top * rng.uniform(0.04, 0.14)  # posterior costophrenic recess, the lowest lung point
    w_apex = z_top * rng.uniform(0.88, 0.97)
    lung_height = w_apex - w_low
    w_widest = w_low + lung_height * rng.uniform(0.25, 0.4)

    heart_u, heart_v = 0.18 * a_cav, vc - 0.3 * b_cav  # slightly left and anterior
    heart_ru, heart_rv = (rng.uniform(0.33, 0.42) * a_cav, rng.uniform(0.38, 0.48) * b_cav)
    heart_w0 = w_low + lung_height * rng.uniform(0.1, 0.2)
    heart_w1 = w_low + lung_height * rng.uniform(0.55, 0.65)
    heart_c, heart_rw = (heart_w0 + heart_w1) / 2, (heart_w1 - heart_w0) / 2
    heart = (_ellipse(u, v, heart_u, heart_v, heart_ru, heart_rv) + ((w - heart_c) / heart_rw) ** 2) <= 1.0
    heart &= cavity2d
    image[heart] = rng.uniform(*HU_HEART)
    heart_margin = (
        _ellipse(u, v, heart_u, heart_v, heart_ru + 4, heart_rv + 4) + ((w - heart_c) / (heart_rw + 4)) ** 2
    ) <= 1.0
    excluded2d = (d_vert <= r_vert + 4.0) | (np.hypot(u - u_aorta, v - v_aorta) <= r_aorta + 4.0)
    cavity_inner2d = _ellipse(u, v, 0.0, vc, a_cav - 2.0, b_cav - 2.0) <= 1.0  # pleura: lungs stay off the ribs

    taper = np.ones_like(w)
    above = w > w_widest
    taper[above] = np.sqrt(np.clip(1.0 - ((w[above] - w_widest) / (w_apex - w_widest)) ** 2, 1e-6, 1.0))

    lungs = np.zeros(shape_t, dtype=np.uint8)
    lobes = np.zeros(shape_t, dtype=np.uint8)
    rho = np.zeros(shape_t, dtype=np.float32)  # elliptic radius inside each lung (1 = chest wall): periphery
    geoms: dict[int, _LungGeometry] = {}
    hilum_w = w_low + lung_height * rng.uniform(0.5, 0.6)
    for side, code in ((-1, LUNG_RIGHT), (1, LUNG_LEFT)):
        lateral = a_cav - 1.0
        cu = side * (lateral + mediastinum_half) / 2
        # Generous ellipse: the chest cavity and the mediastinum, not the ellipse, bound the lung at its widest.
        ra = (lateral - mediastinum_half) / 2 * 1.35
        cv = vc + b_cav * rng.uniform(0.03, 0.1)
        rb = b_cav * 1.1
        # Diaphragm dome: highest under the lung centre, higher anteriorly, lowest in the posterior recess;
        # the right dome sits higher (liver).
        dome_h = lung_height * rng.uniform(0.16, 0.26) + (rng.uniform(5.0, 15.0) if side < 0 else 0.0)
        tilt = rng.uniform(10.0, 25.0)
        e0 = _ellipse(u, v, cu, cv, ra, rb)
        dome = w_low + dome_h * np.clip(1.0 - e0, 0.0, 1.0) + tilt * np.clip((cv + rb - v) / (2 * rb), 0.0, 1.0)
        e = _ellipse(u, v, cu, cv, ra * taper, rb * taper)
        # The medial border bows: the mediastinum is wider in front of and behind the hilum than at it.
        medial = mediastinum_half * (1.0 + 0.4 * ((v - (vc - 0.1 * b_cav)) / b_cav) ** 2)
        lung = (e < 1.0) & (w >= dome) & (w <= w_apex) & cavity_inner2d & (side * u > medial)
        lung &= ~excluded2d & ~heart_margin
        lungs[lung] = code
        rho[lung] = np.sqrt(e[lung])
        geoms[side] = _LungGeometry(
            side=side,
            cu=cu,
            cv=cv,
            ra=ra,
            rb=rb,
            w_low=w_low,
            w_apex=w_apex,
            hilum=np.array([side * (mediastinum_half + 6.0), cv - 0.15 * rb, hilum_w]),
        )

        # Lobes: the oblique fissure rises from anterior-inferior to posterior-superior; below/behind it is the lower
        # lobe. On the right, a horizontal fissure splits the anterior part into upper and middle lobes.
        tz = (w - w_low) / lung_height
        tv = (v - (cv - rb)) / (2 * rb)  # 0 anterior .. 1 posterior
        o_ant = rng.uniform(0.08, 0.18)
        o_post = rng.uniform(0.58, 0.72) + (0.04 if side > 0 else 0.0)
        lateral_warp = rng.uniform(-0.05, 0.05) * (u - cu) / ra  # fissures are not perfect planes
        lower = tz < o_ant + (o_post - o_ant) * tv + lateral_warp
        if side < 0:
            horizontal = rng.uniform(0.42, 0.55)
            lobe_map = np.where(lower, LOBE_RIGHT_LOWER, np.where(tz < horizontal, LOBE_RIGHT_MIDDLE, LOBE_RIGHT_UPPER))
        else:
            lobe_map = np.where(lower, LOBE_LEFT_LOWER, LOBE_LEFT_UPPER)
        lobes[lung] = np.broadcast_to(lobe_map, shape_t)[lung]

    lung_any = lungs > 0
    body = np.broadcast_to(body2d, shape_t).astype(np.uint8)

    # ---- parenchyma ---------------------------------------------------------------------------------------------
    texture = _smooth_noise(rng, shape_t, 1.5)
    blob_noise = _smooth_noise(rng, shape_t, 2.5)
    reticular = _smooth_noise(rng, shape_t, 1.0)
    hu_lung = rng.uniform(*HU_LUNG)
    posterior = np.clip((v - (vc - b_cav)) / (2 * b_cav), 0.0, 1.0)
    parenchyma = hu_lung + HU_PARENCHYMA_TEXTURE * texture + HU_GRAVITY_GRADIENT * posterior
    image[lung_any] = parenchyma[lung_any]

    # ---- lesions ------------------------------------------------------------------------------------------------
    lesions = np.zeros(shape_t, dtype=bool)
    lung_voxels = int(lung_any.sum())
    info_lesion: dict[str, Any] = {}
    if burden is None:
        if task == "screening":
            lo, hi = SCREENING_COVID_BURDEN if label == 1 else SCREENING_BACTERIAL_BURDEN
        else:
            lo, hi = SEVERITY_SEVERE_BURDEN if label == 1 else SEVERITY_NON_SEVERE_BURDEN
        burden = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    target = float(burden) * lung_voxels

    def covid_blobs(
        n_target_voxels: float,
        lobe_sets: list[list[int]],
        crazy_probability: float,
        mixed: bool,
        radius_scale: float = 1.0,
    ) -> int:
        """Peripheral, posterior ground-glass blobs in the given lobes until ``n_target_voxels`` are covered."""
        n_planned = max(len(lobe_sets), int(rng.integers(2, 9)))
        voxel_ml = float(np.prod(spacing))
        # Blobs sit at the lung surface, so roughly half of each is clipped away: aim at twice the volume.
        r_mean = (3 * 2.0 * n_target_voxels * voxel_ml / (4 * np.pi * n_planned)) ** (1 / 3) * radius_scale
        r_mean = float(np.clip(r_mean, 2.0 * sxy, 0.45 * a_cav))
        added = 0
        count = 0
        while added < n_target_voxels and count < MAX_BLOBS:
            lobe_set = lobe_sets[count % len(lobe_sets)]
            count += 1
            candidates = np.flatnonzero(np.isin(lobes, lobe_set).ravel())
            if candidates.size == 0:
                continue
            # Peripheral and dependent (posterior) voxels are much more likely centres, as in COVID-19 pneumonia.
            idx = np.unravel_index(candidates, shape_t)
            weights = np.exp(6.0 * (rho[idx] - 1.0)) * (0.3 + posterior[0, idx[1], 0])
            pick = candidates[rng.choice(candidates.size, p=weights / weights.sum())]
            centre = grid.to_mm(np.array(np.unravel_index(pick, shape_t)))
            radii = r_mean * rng.uniform(0.6, 1.4) * rng.uniform(0.75, 1.25, size=3)
            box = grid.box(centre - radii * 1.4, centre + radii * 1.4)
            if box is None:
                continue
            bu, bv, bw = grid.sub(box)
            d = np.sqrt(
                ((bu - centre[0]) / radii[0]) ** 2
                + ((bv - centre[1]) / radii[1]) ** 2
                + ((bw - centre[2]) / radii[2]) ** 2
            )
            blob = (d + 0.3 * blob_noise[box] < 1.0) & lung_any[box]
            new = blob & ~lesions[box]
            added += int(new.sum())
            hu = rng.uniform(*HU_GGO)
            values = hu + 12.0 * texture[box]
            if rng.random() < crazy_probability:
                # Crazy paving: a network of thin denser lines (zero crossings of band-limited noise).
                values = values + rng.uniform(*HU_CRAZY_PAVING_EXTRA) * (np.abs(reticular[box]) < 0.3)
            if mixed and rng.random() < 0.5:
                core = d < 0.45
                values = np.where(core, rng.uniform(*HU_MIXED_CONSOLIDATION) + 10.0 * texture[box], values)
            region = image[box]
            region[blob] = np.maximum(region[blob], values[blob])
            lesions[box] |= blob
        return count

    def consolidation(n_target_voxels: float, lobe: int) -> None:
        """Lobar or segmental consolidation with air bronchograms in one lobe."""
        lobe_mask = lobes == lobe
        lobe_voxels = int(lobe_mask.sum())
        if lobe_voxels == 0:
            return
        fraction = float(np.clip(n_target_voxels / lobe_voxels, 0.3, 0.95))
        idx = np.array(np.nonzero(lobe_mask))
        pts = grid.to_mm(idx.T)
        # Grow from a point at the pleural surface of the lobe: the consolidation fills the part of the lobe
        # nearest to it, with an irregular front.
        per = np.exp(5.0 * (rho[lobe_mask] - 1.0))
        seed_pt = pts[rng.choice(len(pts), p=per / per.sum())]
        dist = np.linalg.norm(pts - seed_pt, axis=1)
        score = dist / max(float(dist.max()), 1e-6) + 0.12 * blob_noise[lobe_mask]
        region_sel = score <= np.quantile(score, fraction)
        region = np.zeros(shape_t, dtype=bool)
        region[tuple(idx[:, region_sel])] = True
        hu = rng.uniform(*HU_CONSOLIDATION)
        image[region] = hu + 10.0 * texture[region]
        # Air bronchograms: air-filled bronchi that stay visible through the consolidated lung.
        side = -1 if lobe <= LOBE_RIGHT_LOWER else 1
        hilum = geoms[side].hilum
        rpts = pts[region_sel]
        start = rpts[np.argmin(np.linalg.norm(rpts - hilum, axis=1))]
        for _ in range(int(rng.integers(3, 7))):
            end = rpts[rng.integers(len(rpts))]
            res = _tube(grid, start, end, rng.uniform(1.5, 2.5) + 0.3 * sxy, 0.8 + 0.3 * sxy)
            if res is None:
                continue
            box, tube = res
            tube &= region[box]
            image[box][tube] = rng.uniform(*HU_AIR_BRONCHOGRAM)
        lesions[region] = True

    right_lobes = [LOBE_RIGHT_UPPER, LOBE_RIGHT_MIDDLE, LOBE_RIGHT_LOWER]
    left_lobes = [LOBE_LEFT_UPPER, LOBE_LEFT_LOWER]
    mixed_finding = bool(rng.random() < MIXED_FINDING_PROBABILITY)
    if task == "screening" and label == 0:
        lobe = int(rng.choice([1, 2, 3, 4, 5], p=[0.18, 0.12, 0.25, 0.2, 0.25]))
        consolidation(target, lobe)
        info_lesion["lesion_type"] = "lobar_consolidation"
        info_lesion["consolidated_lobe"] = lobe
        if mixed_finding:
            # A small incidental ground-glass focus, in either lung.
            same = rng.random() < 0.5
            lobe_pool = (
                (right_lobes if lobe <= 3 else left_lobes) if same else (left_lobes if lobe <= 3 else right_lobes)
            )
            covid_blobs(0.01 * lung_voxels, [lobe_pool], 0.0, False, radius_scale=0.7)
    else:
        if task == "screening":
            bilateral = rng.random() < COVID_BILATERAL_PROBABILITY
            sets = [right_lobes, left_lobes] if bilateral else [right_lobes if rng.random() < 0.5 else left_lobes]
        else:
            all_lobes = [1, 2, 3, 4, 5]
            if label == 1:
                involved = sorted(int(x) for x in rng.choice(all_lobes, size=int(rng.integers(4, 6)), replace=False))
                if not any(x <= 3 for x in involved) or not any(x > 3 for x in involved):
                    involved = all_lobes
            else:
                involved = sorted(int(x) for x in rng.choice(all_lobes, size=int(rng.integers(1, 4)), replace=False))
            sets = [[x] for x in involved]
            rng.shuffle(sets)
        covid_blobs(target, sets, crazy_probability=0.6, mixed=mixed_finding)
        info_lesion["lesion_type"] = "ground_glass"

    # ---- airways and vessels ------------------------------------------------------------------------------------
    # Drawn after the lesions so that vessels stay visible inside ground glass and bronchi become air bronchograms.
    vessel = np.zeros(shape_t, dtype=bool)
    for side, code in ((-1, LUNG_RIGHT), (1, LUNG_LEFT)):
        lung_pts = grid.to_mm(np.argwhere(lungs == code))
        if len(lung_pts) == 0:
            continue
        # A branching tree from the hilum whose branch ends are drawn among the lung's own voxels, so that the
        # vessels fill the lung instead of leaving it; each level is thinner and shorter (toward the periphery).
        parents = [(geoms[side].hilum, rng.uniform(4.0, 6.0))]
        for n_children, reach in VESSEL_LEVELS:
            children = []
            for start, radius in parents:
                dist = np.linalg.norm(lung_pts - start, axis=1)
                near = np.flatnonzero((dist > 0.3 * reach) & (dist < reach))
                if near.size == 0:
                    continue
                r_end = max(radius * 0.6, VESSEL_MIN_RADIUS_MM + 0.25 * sxy)  # stay visible at coarse spacing
                for end in lung_pts[rng.choice(near, size=min(n_children, near.size), replace=False)]:
                    res = _tube(grid, start, end, radius, r_end)
                    if res is not None:
                        box, tube = res
                        vessel[box] |= tube & lung_any[box]
                    children.append((end, r_end))
            parents = children
    image[vessel] = np.maximum(image[vessel], rng.uniform(*HU_BLOOD) + 8.0 * texture[vessel])

    w_carina = w_low + lung_height * rng.uniform(0.6, 0.7)
    v_trachea = v_vert - r_vert - r_trachea - rng.uniform(4.0, 9.0)
    carina = np.array([0.0, v_trachea, w_carina])
    wall = 1.5
    segments = [(carina, np.array([0.0, v_trachea, z_top + sz]), r_trachea, r_trachea)]
    r_bronchus = 0.7 * r_trachea
    for side in (-1, 1):
        g = geoms[side]
        drop = rng.uniform(12.0, 20.0) if side < 0 else rng.uniform(20.0, 30.0)  # right main bronchus is steeper
        hilum = np.array([side * (mediastinum_half + 10.0), g.hilum[1], w_carina - drop])
        segments.append((carina, hilum, r_bronchus, r_bronchus * 0.9))
        for d in (
            np.array([side * 0.4, -0.3, 0.8]),
            np.array([side * 0.5, 0.3, -0.8]),
            np.array([side * 0.9, -0.5, -0.2]),
        ):
            d = d + rng.normal(0.0, 0.15, 3)
            end = hilum + d / np.linalg.norm(d) * rng.uniform(0.15, 0.25) * lung_height
            segments.append((hilum, end, r_bronchus * 0.6, 1.0))
    lumen = np.zeros(shape_t, dtype=bool)
    walls = np.zeros(shape_t, dtype=bool)
    for p0, p1, r0, r1 in segments:
        res = _tube(grid, p0, p1, r0 + wall, r1 + wall)
        if res is not None:
            box, tube = res
            walls[box] |= tube
        res = _tube(grid, p0, p1, r0, r1)
        if res is not None:
            box, tube = res
            lumen[box] |= tube
    walls &= ~lumen & body.astype(bool)
    image[walls] = hu_soft
    image[lumen & body.astype(bool)] = HU_AIRWAY_LUMEN

    # ---- pleural effusion ---------------------------------------------------------------------------------------
    effusion = np.zeros(shape_t, dtype=bool)
    effusion_sides: list[str] = []
    if rng.random() < effusion_probability:
        sides = [-1, 1] if rng.random() < 0.5 else [int(rng.choice([-1, 1]))]
        for side in sides:
            code = LUNG_RIGHT if side < 0 else LUNG_LEFT
            lung_s = lungs == code
            if not lung_s.any():
                continue
            ys = np.nonzero(lung_s.any(axis=(0, 2)))[0]
            v_back = grid.to_mm(np.array([0, ys.max(), 0]))[1]
            # Supine patient: fluid settles posteriorly with a flat (coronal) surface, giving a posterior crescent
            # in each axial slice, limited to the lung base.
            depth = rng.uniform(15.0, 35.0)
            w_limit = w_low + lung_height * rng.uniform(0.35, 0.55)
            eff = lung_s & (v >= v_back - depth) & (w <= w_limit)
            effusion |= eff
            effusion_sides.append("right" if side < 0 else "left")
        image[effusion] = rng.uniform(*HU_EFFUSION) + 5.0 * texture[effusion]
        lesions &= ~effusion  # fluid is not parenchymal disease

    # ---- scanner: partial volume, noise, field-of-view padding, integer CT numbers ------------------------------
    image = ndimage.gaussian_filter(image, PARTIAL_VOLUME_SIGMA_VOXELS, mode="nearest")
    noise_sigma = rng.uniform(*NOISE_SIGMA_HU)
    image += rng.normal(0.0, noise_sigma, shape_t).astype(np.float32)
    image = np.maximum(image, HU_MIN_RECONSTRUCTED)
    padding_value: int | None = None
    if rng.random() < PADDING_PROBABILITY:
        padding_value = int(rng.choice(PADDING_VALUES))
        outside = np.hypot(u, v) > recon_radius
        image[np.broadcast_to(outside, shape_t)] = padding_value
    image_i16 = np.clip(np.rint(image), HU_INT16_MIN, HU_INT16_MAX).astype(np.int16)

    # ---- facts --------------------------------------------------------------------------------------------------
    lesion_voxels = int(lesions.sum())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lobe_fractions = {}
    involved_lobes = []
    for code, name in LOBE_NAMES.items():
        lobe_mask = lobes == code
        n_lobe = int(lobe_mask.sum())
        frac = float((lesions & lobe_mask).sum() / n_lobe) if n_lobe else 0.0
        lobe_fractions[name] = round(frac, 5)
        if frac >= LOBE_INVOLVED_MIN_FRACTION:
            involved_lobes.append(code)
    lesion_lungs = [n for n, c in LUNG_LABELS.items() if (lesions & (lungs == c)).sum() > 0]
    n_components = int(ndimage.label(lesions)[1]) if lesion_voxels else 0
    labels_map = SCREENING_LABELS if task == "screening" else SEVERITY_LABELS
    origin = (-float(grid.offset[0]), -float(grid.offset[1]), -round((nz - 1) / 2 * sz, 6))
    info: dict[str, Any] = {
        "task": task,
        "label": int(label),
        "label_name": labels_map[int(label)],
        "seed": int(seed),
        "shape": [int(s) for s in shape_t],
        "spacing_mm": [round(s, 6) for s in spacing],
        "field_of_view_mm": round(float(fov), 3),
        "target_burden": round(float(burden), 5),
        "lesion_fraction": round(lesion_voxels / max(lung_voxels, 1), 5),
        "lesion_volume_ml": round(lesion_voxels * voxel_ml, 3),
        "lung_volume_ml": round(lung_voxels * voxel_ml, 3),
        "lesion_count": n_components,
        "lobes_involved": involved_lobes,
        "lobe_lesion_fractions": lobe_fractions,
        "lesion_lungs": lesion_lungs,
        "bilateral": len(lesion_lungs) == 2,
        "mixed_finding": mixed_finding,
        "effusion": bool(effusion.any()),
        "effusion_sides": effusion_sides,
        "effusion_volume_ml": round(int(effusion.sum()) * voxel_ml, 3),
        "padding_value": padding_value,
        "noise_sigma_hu": round(float(noise_sigma), 3),
        **info_lesion,
    }
    return Phantom(
        image=image_i16,
        body=body,
        lungs=lungs,
        lobes=lobes,
        lesions=lesions.astype(np.uint8),
        spacing=spacing,
        label=int(label),
        info=info,
        origin=origin,
    )


# ------------------------------------------------------------------------------------------------------------------
# Cohort writer
# ------------------------------------------------------------------------------------------------------------------

NIFTI_GZIP_LEVEL: int = 6
MASK_KEYS: tuple[str, ...] = ("lungs", "lobes", "body", "lesions")


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a ``.nii.gz`` whose bytes depend only on the data (gzip time stamp fixed to 0)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=NIFTI_GZIP_LEVEL, mtime=0))


def _cohort_labels(num_cases: int, task: str, severe_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Class labels of a cohort in a shuffled, seeded order (screening 50/50, severity ``severe_fraction`` severe)."""
    n_positive = num_cases // 2 if task == "screening" else round(num_cases * severe_fraction)
    labels = np.zeros(num_cases, dtype=int)
    labels[:n_positive] = 1
    return rng.permutation(labels)


def _stratified_folds(labels: np.ndarray, num_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index per case: each class is shuffled and dealt round-robin, continuing the count across classes so
    that fold sizes differ by at most one and each fold holds its share of every class."""
    folds = np.zeros(len(labels), dtype=int)
    position = 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        folds[members] = (position + np.arange(len(members))) % num_folds
        position += len(members)
    return folds


def generate_cohort(
    out_dir: str | Path,
    num_cases: int,
    task: str = "screening",
    shape: tuple[int, int, int] = (160, 160, 64),
    seed: int = 0,
    image_format: str = "nifti",
    num_folds: int = 5,
    severe_fraction: float = 0.2,
    effusion_probability: float = 0.0,
    progress: bool = True,
) -> Path:
    """Write a synthetic cohort (images, masks, MONAI decathlon-style datalist) under ``out_dir``.

    Layout: ``images/case_XXX.nii.gz`` (or the DICOM series folder ``images/case_XXX/``),
    ``labels/case_XXX_{lungs,lobes,body,lesions}.nii.gz`` (uint8, same affine as the image) and ``datalist.json``
    whose paths are relative to its own folder. Every case carries a ``fold`` (stratified by label) and its
    ``info``. The output is byte-for-byte reproducible for a given seed: case ``i`` uses a seed derived from
    (``seed``, ``i``) only.

    Args:
        out_dir: output folder (created).
        num_cases: number of cases, at least 1.
        task: ``"screening"`` (label 1 COVID-19-like, exactly half of the cases for even ``num_cases``) or
            ``"severity"`` (``round(num_cases * severe_fraction)`` severe cases).
        shape: (X, Y, Z) of every volume (see :func:`make_phantom`).
        seed: cohort seed.
        image_format: ``"nifti"`` or ``"dicom"`` (one file per slice, file names shuffled against slice order).
        num_folds: number of cross-validation folds (at least 1; folds can be empty when it exceeds the cases).
        severe_fraction: share of severe cases for ``task="severity"``, in (0, 1).
        effusion_probability: per-case probability of a pleural effusion.
        progress: show a tqdm progress bar.

    Returns:
        Path of ``datalist.json``.

    Raises:
        ValueError: any argument outside the ranges above (the message names the bad value).
    """
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}.")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}.")
    shape_t = _check_shape(shape)
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 1:
        raise ValueError(f"num_folds must be an integer >= 1, got {num_folds!r}.")
    if not 0.0 < float(severe_fraction) < 1.0:
        raise ValueError(f"severe_fraction must be in (0, 1), got {severe_fraction!r}.")
    _check_probability("effusion_probability", effusion_probability)

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)

    # Independent streams: the label order, the folds and each case never share random numbers, so adding cases
    # does not change the earlier ones.
    root = np.random.SeedSequence(int(seed))
    labels_ss, folds_ss, cases_ss = root.spawn(3)
    labels = _cohort_labels(num_cases, task, float(severe_fraction), np.random.default_rng(labels_ss))
    folds = _stratified_folds(labels, int(num_folds), np.random.default_rng(folds_ss))
    case_seeds = [int(ss.generate_state(1)[0]) for ss in cases_ss.spawn(num_cases)]

    iterator: Any = range(num_cases)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"phantoms ({task})", unit="case")
    entries = []
    for i in iterator:
        name = f"case_{i:03d}"
        ph = make_phantom(
            int(labels[i]), task=task, shape=shape_t, seed=case_seeds[i], effusion_probability=effusion_probability
        )
        affine = ph.affine
        if image_format == "nifti":
            image_rel = f"images/{name}.nii.gz"
            _save_nifti(ph.image, affine, out / image_rel)
        else:
            image_rel = f"images/{name}"
            target = out / image_rel
            if target.exists():
                for old in target.glob("*.dcm"):
                    old.unlink()
            write_dicom_series(
                ph.image,
                ph.spacing,
                target,
                origin=ph.origin,
                series_description=f"synthetic chest CT phantom {name}",
                patient_id=name,
                shuffle_filenames_seed=case_seeds[i],
                uid_seed=f"chestct-phantom-{seed}-{i}",
            )
        entry: dict[str, Any] = {"image": image_rel, "label": int(labels[i])}
        for key in MASK_KEYS:
            rel = f"labels/{name}_{key}.nii.gz"
            _save_nifti(getattr(ph, key).astype(np.uint8), affine, out / rel)
            entry[key] = rel
        entry["fold"] = int(folds[i])
        entry["info"] = ph.info
        entries.append(entry)

    labels_map = SCREENING_LABELS if task == "screening" else SEVERITY_LABELS
    datalist = {
        "name": f"chestct_phantoms_{task}",
        "description": (
            "Synthetic chest CT phantoms (HU) with body, lung, lobe and lesion ground truth; "
            "research and testing only, not patient data."
        ),
        "task": task,
        "labels": {str(k): v for k, v in labels_map.items()},
        "lung_labels": {str(v): k for k, v in LUNG_LABELS.items()},
        "lobe_labels": {str(k): v for k, v in LOBE_NAMES.items()},
        "seed": int(seed),
        "shape": [int(s) for s in shape_t],
        "image_format": image_format,
        "num_folds": int(num_folds),
        "numTraining": num_cases,
        "training": entries,
    }
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2, sort_keys=False) + "\n")
    return path
