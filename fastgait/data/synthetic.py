"""Synthetic gait: the embedded default dataset (data.md §5).

    python -m fastgait.data.synthetic OUT --preset casia-b|oumvlp|small|real-scene --seed S

Each subject is a body of capsules, ellipsoids and boxes with its own proportions, thickness
and walking style (cadence, stride, joint-curve amplitudes and phases, lean, arm swing and
carriage, toe-out), posed frame by frame along literature gait-cycle curves, rotated to the
camera view, projected orthographically, rasterised with segmentation noise (erosion and
dilation, ragged edges, holes), and put through the pretreatment of real frames
(``fastgait.data.pretreat``). Bags (BG) and coats (CL) are per subject, as in CASIA-B where a
subject carries the same bag in bg-01 and bg-02. Identity therefore lives in body shape and
gait, and survives a change of view only as far as a model can see past it.

Output: ``OUT/<sid>/<type>/<view>/<view>.pkl`` (plain pickled uint8 ``[T, 64, 64]``),
``OUT/partition.json`` (with a ``PROBE_SET`` for the real-scene preset) and ``OUT/meta.json``
(written last: its presence marks a finished set). The generator refuses a non-empty folder that
is not a set of the same preset and seed (``.fastgait-synthetic.json``, written first, marks an
unfinished one).
Every sequence is drawn from ``numpy.random.default_rng`` seeded with the dataset seed and its
(subject, type, view), so a set is the same bytes whatever the number of workers.
"""
from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np

from ._parallel import parallel_map
from .io import PathLike, atomic_write_bytes, save_sequence
from .layout import write_partition
from .pretreat import pretreat_frames

GENERATOR_VERSION = 1
FPS = 25.0

CASIA_B_VIEWS = tuple(f"{v:03d}" for v in range(0, 181, 18))
CASIA_B_TYPES = tuple(f"nm-{i:02d}" for i in range(1, 7)) + ("bg-01", "bg-02", "cl-01", "cl-02")
OUMVLP_VIEWS = tuple(f"{v:03d}" for v in list(range(0, 91, 15)) + list(range(180, 271, 15)))


@dataclass(frozen=True)
class Preset:
    """A synthetic protocol: subjects, their sequences and the split.

    The first ``train_subjects`` subjects form TRAIN_SET (with ``train_types``), the rest
    TEST_SET (with ``test_types``). A sequence is ``ceil(min_cycles * cycle) + U{0..extra_frames}``
    frames long (a gait cycle is 24-32 frames). ``missing`` is the fraction of test sequences
    left out, as OU-MVLP lacks some (it makes the "invalid probe" case real).
    ``probes_per_subject``: real-scene style; that many sequences of each test subject (drawn from
    the seed) are the probes, listed as ``<id>-<type>-<view>`` keys in the partition's ``PROBE_SET``
    (as Gait3D's JSON), and the rest are the gallery (protocol ``gait3d``).
    """

    subjects: int
    train_subjects: int
    views: tuple[str, ...]
    train_types: tuple[str, ...]
    test_types: tuple[str, ...]
    min_cycles: float = 2.0
    extra_frames: int = 8
    missing: float = 0.0
    subject_digits: int = 3
    probes_per_subject: int = 0  # > 0: partition.json gets a PROBE_SET (Gait3D-style keys) of that many per test subject


PRESETS = {
    # CASIA-B-like: 124 subjects, 10 sequences x 11 views, LT split (74 train / 50 test).
    "casia-b": Preset(124, 74, CASIA_B_VIEWS, CASIA_B_TYPES, CASIA_B_TYPES),
    # OU-MVLP-like: 2 sequences x 14 views, about one gait cycle each, 5% of test sequences missing.
    "oumvlp": Preset(
        400, 200, OUMVLP_VIEWS, ("00", "01"), ("00", "01"), min_cycles=1.2, extra_frames=6, missing=0.05,
        subject_digits=5,
    ),
    # For tests and the CPU demo: fewer subjects, views, sequences and frames; CASIA-B's test protocol.
    "small": Preset(
        48, 32, ("000", "036", "072", "108", "144", "180"),
        ("nm-01", "nm-02", "nm-03", "nm-04", "bg-01", "cl-01"),
        ("nm-01", "nm-02", "nm-03", "nm-04", "nm-05", "nm-06", "bg-01", "cl-01"),
        min_cycles=1.4, extra_frames=4,
    ),
    # Real-scene style (Gait3D/GREW-like): many subjects, one sequence type, few views; one
    # sequence of each test subject is its probe, the rest the gallery (protocol gait3d).
    "real-scene": Preset(
        300, 200, ("000", "045", "090", "135"), ("00",), ("00",), min_cycles=1.2, extra_frames=6,
        probes_per_subject=1,
    ),
}


# ---------------------------------------------------------------------------------------------
# Gait cycle curves (degrees over the cycle phase from heel strike, flexion positive), fitted as
# short Fourier series through literature values; data.md §5.

def _fourier_fit(points: list[tuple[float, float]], order: int) -> np.ndarray:
    phase, angle = np.array(points, dtype=np.float64).T
    return np.linalg.lstsq(_fourier_basis(phase, order), angle, rcond=None)[0]


def _fourier_basis(phase: np.ndarray, order: int) -> np.ndarray:
    k = np.arange(1, order + 1)
    arg = 2 * np.pi * phase[..., None] * k
    return np.concatenate([np.ones_like(phase)[..., None], np.cos(arg), np.sin(arg)], axis=-1)


_HIP = _fourier_fit([(0.0, 25), (0.1, 22), (0.3, 5), (0.5, -10), (0.6, -5), (0.75, 18), (0.87, 30), (0.95, 28)], 3)
_KNEE = _fourier_fit(
    [(0.0, 3), (0.15, 18), (0.3, 8), (0.4, 3), (0.5, 12), (0.6, 40), (0.72, 65), (0.85, 35), (0.95, 5)], 3
)
_ANKLE = _fourier_fit([(0.0, 0), (0.08, -5), (0.3, 8), (0.45, 10), (0.6, -20), (0.7, -12), (0.8, 0), (0.95, 0)], 4)


def _curve(coefficients: np.ndarray, phase: np.ndarray, amplitude: float) -> np.ndarray:
    """The curve at ``phase`` (any shape), its swing about the cycle mean scaled by ``amplitude``."""
    order = (len(coefficients) - 1) // 2
    values = _fourier_basis(np.mod(phase, 1.0), order) @ coefficients
    return coefficients[0] + amplitude * (values - coefficients[0])


# ---------------------------------------------------------------------------------------------
# Subjects: what identity is made of.

def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _key(name: str) -> int:
    """A stable integer for a type or view name (rng streams must not depend on preset order)."""
    return zlib.crc32(name.encode())


@dataclass
class Subject:
    """Body and walking style of one subject; lengths in metres, angles in degrees."""

    height: float
    thigh: float
    shank: float
    upper_arm: float
    forearm: float
    foot: float
    torso: float  # hip joint to shoulder line
    shoulder_width: float
    hip_width: float
    head: np.ndarray  # semi-axes (depth, width, height)
    neck: float
    chest: np.ndarray  # semi-axes (depth, width)
    belly: float  # depth of the abdomen
    radii: dict[str, float]  # capsule radii per limb segment
    cycle_frames: float
    hip_amp: float
    knee_amp: float
    ankle_amp: float
    arm_swing: float
    elbow: float
    knee_phase: float
    ankle_phase: float
    arm_phase: float
    lean: float
    arm_abduction: float
    toe_out: float
    pelvis_yaw: float
    bag: dict = field(default_factory=dict)
    coat: dict = field(default_factory=dict)


def draw_subject(rng: np.random.Generator) -> Subject:
    """A random subject: proportions of data.md §5 (±5% lengths, ±15% thickness) and a walking style."""
    u = rng.uniform
    height = u(1.50, 1.90)

    def length(fraction: float) -> float:
        return height * fraction * u(0.95, 1.05)

    build = u(0.87, 1.15)  # one factor for all thickness, so heavy subjects are heavy everywhere

    def thick(fraction: float) -> float:
        return height * fraction * build * u(0.93, 1.07)

    thigh, shank = length(0.245), length(0.246)
    cadence = u(95.0, 125.0)  # steps per minute; a cycle is two steps
    stride = u(0.75, 0.95)  # stride length / height, realised through the hip and knee excursion
    bag = {
        "kind": int(rng.integers(4)),  # 0 hip bag, 1 backpack, 2 hand-held box, 3 shoulder bag on the side
        "side": float(rng.choice([-1.0, 1.0])),
        "size": u(0.8, 1.25, size=3) * height,
        "swing": u(0.3, 0.7),
    }
    coat = {
        "torso": u(1.15, 1.4),  # torso depth/width factor
        "arm": u(1.3, 1.7),  # sleeve factor on arm radii
        "hem": u(0.45, 0.95),  # how far down the thigh the coat reaches
        "flare": u(1.4, 2.0),  # skirt radius over thigh radius
    }
    return Subject(
        height=height,
        thigh=thigh,
        shank=shank,
        upper_arm=length(0.186),
        forearm=length(0.146) + length(0.05),  # forearm and hand
        foot=length(0.15),
        torso=length(0.82) - (thigh + shank + length(0.039)),
        shoulder_width=length(0.26),
        hip_width=length(0.19),
        head=np.array([thick(0.052), thick(0.044), height * 0.062 * u(0.9, 1.1)]),
        neck=length(0.045),
        chest=np.array([thick(0.075), length(0.26) * 0.5 * build ** 0.5]),
        belly=thick(0.07) * u(0.85, 1.2),
        radii={
            "thigh": thick(0.040),
            "shank": thick(0.028),
            "foot": thick(0.018),
            "upper_arm": thick(0.023),
            "forearm": thick(0.019),
            "neck": thick(0.026),
        },
        cycle_frames=FPS * 120.0 / cadence,
        hip_amp=stride / 0.85 * u(0.9, 1.1),
        knee_amp=u(0.8, 1.2),
        ankle_amp=u(0.8, 1.2),
        arm_swing=u(0.5, 1.5),
        elbow=u(10.0, 30.0),
        knee_phase=u(-0.03, 0.03),
        ankle_phase=u(-0.03, 0.03),
        arm_phase=u(-0.03, 0.03),
        lean=u(0.0, 8.0),
        arm_abduction=u(4.0, 14.0),
        toe_out=u(0.0, 15.0),
        pelvis_yaw=u(2.0, 7.0),
        bag=bag,
        coat=coat,
    )


# ---------------------------------------------------------------------------------------------
# Posing: 3D primitives per frame. Body frame: x forward (walking direction), y left, z up,
# origin at the pelvis centre. Every array has a leading frame axis T.

@dataclass
class Primitives:
    """Body parts of one sequence in 3D (world) or 2D (image, pixels).

    ``capsules``: list of ``(a [T, d], b [T, d], radius)``; ``ellipsoids``: list of
    ``(centre [T, d], shape [T, d, d])`` with ``x^T shape^-1 x <= 1`` inside; ``boxes``: list of
    ``(centre [T, d], half_axes [T, 3, d])`` (a box is centre + sum of ``s_i * half_axes[i]``, |s_i| <= 1).
    """

    capsules: list = field(default_factory=list)
    ellipsoids: list = field(default_factory=list)
    boxes: list = field(default_factory=list)


def _rot_z(angle: np.ndarray) -> np.ndarray:
    """Rotations about the vertical axis, ``[T, 3, 3]`` for angles ``[T]`` in radians."""
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(angle), np.ones_like(angle)
    return np.stack([np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1), np.stack([zero, zero, one], -1)], -2)


def _rot_y(angle: np.ndarray) -> np.ndarray:
    """Rotations about the lateral axis (positive tips +z toward +x: forward lean), ``[T, 3, 3]``."""
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(angle), np.ones_like(angle)
    return np.stack([np.stack([c, zero, s], -1), np.stack([zero, one, zero], -1), np.stack([-s, zero, c], -1)], -2)


def _sagittal(angle_deg: np.ndarray, lateral: float = 0.0) -> np.ndarray:
    """Unit vectors pointing down, swung forward by ``angle_deg`` ``[T]`` and out sideways by ``lateral`` (rad)."""
    a = np.radians(angle_deg)
    return np.stack([np.sin(a) * np.cos(lateral), np.full_like(a, np.sin(lateral)), -np.cos(a) * np.cos(lateral)], -1)


def _ellipsoid_shape(semi_axes: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """``R diag(a^2) R^T`` for semi-axes ``[3]`` (or ``[T, 3]``) and rotations ``[T, 3, 3]``."""
    return rotation @ (np.asarray(semi_axes)[..., :, None] ** 2 * np.swapaxes(rotation, -1, -2))


def pose(subject: Subject, phase: np.ndarray, condition: str) -> Primitives:
    """The body at cycle phases ``phase [T]`` (right heel strike at 0), dressed for ``condition`` ("nm"/"bg"/"cl")."""
    s = subject
    T = phase.shape[0]
    radii = dict(s.radii)
    coat = s.coat if condition == "cl" else None
    bag = s.bag if condition == "bg" else None
    arm_swing = {1.0: s.arm_swing, -1.0: s.arm_swing}
    if bag is not None and bag["kind"] == 2:
        arm_swing[bag["side"]] *= bag["swing"]  # a carried box damps that arm's swing
    if coat is not None:
        radii["upper_arm"] *= coat["arm"]
        radii["forearm"] *= 0.5 + 0.5 * coat["arm"]

    out = Primitives()
    cycle = 2 * np.pi * phase
    yaw = np.radians(s.pelvis_yaw) * np.cos(cycle)  # pelvis turns with the leading leg
    pelvis = np.stack([np.zeros(T), 0.012 * s.height * np.sin(cycle), np.zeros(T)], -1)  # lateral sway
    pelvis_rot = _rot_z(yaw)
    trunk_rot = _rot_y(np.full(T, np.radians(s.lean))) @ _rot_z(-0.6 * yaw)  # shoulders counter-rotate
    up = trunk_rot[..., :, 2]
    forward = trunk_rot[..., :, 0]
    neck_base = pelvis + s.torso * up
    wrists = {}
    for side in (1.0, -1.0):  # left (+y) leg leads by half a cycle
        leg_phase = phase + (0.5 if side > 0 else 0.0)
        hip = pelvis + pelvis_rot @ np.array([0.0, side * 0.42 * s.hip_width, 0.0])
        hip_angle = _curve(_HIP, leg_phase, s.hip_amp)
        knee_angle = _curve(_KNEE, leg_phase + s.knee_phase, s.knee_amp)
        ankle_angle = _curve(_ANKLE, leg_phase + s.ankle_phase, s.ankle_amp)
        knee = hip + s.thigh * _sagittal(hip_angle, side * 0.03)
        shank_angle = hip_angle - knee_angle
        ankle = knee + s.shank * _sagittal(shank_angle)
        toe_dir = _rot_z(np.full(T, side * np.radians(s.toe_out))) @ np.array([1.0, 0.0, 0.0])
        foot_pitch = np.radians(shank_angle + ankle_angle)
        toe_dir = toe_dir * np.cos(foot_pitch)[:, None] + np.array([0.0, 0.0, 1.0]) * np.sin(foot_pitch)[:, None]
        heel = ankle + 0.03 * s.height * _sagittal(shank_angle) - 0.25 * s.foot * toe_dir
        out.capsules += [
            (hip, knee, radii["thigh"]),
            (knee, ankle, radii["shank"]),
            (heel, heel + s.foot * toe_dir, radii["foot"]),
        ]
        if coat is not None:  # the skirt of the coat over the upper thigh
            hem = hip + coat["hem"] * s.thigh * _sagittal(hip_angle, side * 0.12)
            out.capsules.append((hip, hem, radii["thigh"] * coat["flare"]))

        shoulder = neck_base + (trunk_rot @ np.array([0.0, side * 0.5 * s.shoulder_width, -0.03 * s.height]))
        swing = -0.75 * arm_swing[side] * (_curve(_HIP, leg_phase + s.arm_phase, 1.0) - _HIP[0]) + 3.0
        elbow_angle = s.elbow + 0.4 * np.clip(swing, 0, None)
        abduction = side * np.radians(s.arm_abduction + (8.0 if coat is not None else 0.0))
        elbow = shoulder + s.upper_arm * _sagittal(swing, abduction)
        wrist = elbow + s.forearm * _sagittal(swing + elbow_angle, abduction)
        wrists[side] = wrist
        out.capsules += [(shoulder, elbow, radii["upper_arm"]), (elbow, wrist, radii["forearm"])]

    thickness = coat["torso"] if coat is not None else 1.0
    chest_depth, chest_width = s.chest * thickness
    out.ellipsoids += [
        # chest, abdomen, pelvis and head
        (pelvis + 0.68 * s.torso * up, _ellipsoid_shape(np.array([chest_depth, chest_width, 0.36 * s.torso]), trunk_rot)),
        (
            pelvis + 0.3 * s.torso * up + 0.2 * s.belly * forward,
            _ellipsoid_shape(np.array([s.belly * thickness, 0.85 * chest_width, 0.3 * s.torso]), trunk_rot),
        ),
        (
            pelvis + np.array([0.0, 0.0, 0.02 * s.height]),
            _ellipsoid_shape(
                np.array([0.8 * s.chest[0] * thickness, 0.5 * s.hip_width + 0.8 * radii["thigh"], 0.09 * s.height]),
                pelvis_rot,
            ),
        ),
        (neck_base + (s.neck + 0.8 * s.head[2]) * up, _ellipsoid_shape(s.head, trunk_rot)),
    ]
    out.capsules.append((neck_base - 0.03 * s.height * up, neck_base + s.neck * up, radii["neck"]))
    if coat is not None and coat["hem"] > 0.6:  # a long coat also closes the gap between the thighs
        out.ellipsoids.append(
            (
                pelvis - np.array([0.0, 0.0, 0.5 * coat["hem"] * s.thigh]),
                _ellipsoid_shape(
                    np.array([s.chest[0], 0.5 * s.hip_width + radii["thigh"], 0.5 * coat["hem"] * s.thigh]), pelvis_rot
                ),
            )
        )
    if bag is not None:
        _add_bag(out, s, bag, pelvis, pelvis_rot, trunk_rot, neck_base, wrists, cycle)
    return out


def _add_bag(out, s, bag, pelvis, pelvis_rot, trunk_rot, neck_base, wrists, cycle) -> None:
    depth, width, tall = bag["size"] * np.array([0.05, 0.035, 0.08])
    side = bag["side"]
    T = cycle.shape[0]
    swing = bag["swing"] * 0.02 * s.height * np.sin(cycle)[:, None] * np.array([1.0, 0.0, 0.0])
    if bag["kind"] == 0:  # a soft bag hanging at the hip
        centre = pelvis + pelvis_rot @ np.array([0.0, side * (0.5 * s.hip_width + s.radii["thigh"] + width), -0.03 * s.height])
        out.ellipsoids.append((centre + swing, _ellipsoid_shape(np.array([depth * 1.3, width, tall]), pelvis_rot)))
    elif bag["kind"] == 1:  # a backpack
        centre = neck_base - trunk_rot @ np.array([s.chest[0] + depth, 0.0, 0.35 * s.torso])
        half = np.array([depth, 2.5 * width, 1.6 * tall])
        out.boxes.append((centre, np.swapaxes(trunk_rot, -1, -2) * half[None, :, None]))
    elif bag["kind"] == 2:  # a box held in one hand
        centre = wrists[side] - np.array([0.0, 0.0, tall])
        half = np.array([1.6 * depth, width, tall])
        out.boxes.append((centre, np.broadcast_to(np.diag(half), (T, 3, 3))))
    else:  # a bag on a strap, at the side of the body just below the waist
        centre = neck_base + trunk_rot @ np.array([0.0, side * (0.5 * s.shoulder_width), -0.85 * s.torso])
        half = np.array([1.4 * depth, 0.8 * width, tall])
        out.boxes.append((centre + swing, np.swapaxes(trunk_rot, -1, -2) * half[None, :, None]))


# ---------------------------------------------------------------------------------------------
# Camera and rasterisation.

def project(world: Primitives, azimuth_deg: float, pitch_deg: float, scale: float) -> Primitives:
    """Orthographic view from azimuth (0 = facing the camera, 90 = from the side) tilted down by pitch.

    Returns 2D primitives in pixels with rows growing downward (image convention, origin arbitrary).
    """
    az, pitch = np.radians(azimuth_deg), np.radians(pitch_deg)
    right = np.array([-np.sin(az), np.cos(az), 0.0])
    up = np.array([-np.sin(pitch) * np.cos(az), -np.sin(pitch) * np.sin(az), np.cos(pitch)])
    to_image = scale * np.stack([right, -up])  # [2, 3]: (column, row) per metre

    def points(x):
        return x @ to_image.T

    image = Primitives()
    image.capsules = [(points(a), points(b), scale * r) for a, b, r in world.capsules]
    image.ellipsoids = [(points(c), to_image @ shape @ to_image.T) for c, shape in world.ellipsoids]
    image.boxes = [(points(c), points(half)) for c, half in world.boxes]
    return image


def _bounds(image: Primitives) -> tuple[np.ndarray, np.ndarray]:
    """Per-primitive pixel bounds over the whole sequence: ``lo [N, 2]``, ``hi [N, 2]`` in (col, row)."""
    lo, hi = [], []
    for a, b, r in image.capsules:
        lo.append(np.minimum(a, b).min(0) - r)
        hi.append(np.maximum(a, b).max(0) + r)
    for c, shape in image.ellipsoids:
        extent = np.sqrt(np.diagonal(shape, axis1=-2, axis2=-1))
        lo.append((c - extent).min(0))
        hi.append((c + extent).max(0))
    for c, half in image.boxes:
        extent = np.abs(half).sum(-2)
        lo.append((c - extent).min(0))
        hi.append((c + extent).max(0))
    return np.array(lo), np.array(hi)


def _capsule_sdf(cols, rows, a, b, radius):
    """Signed distance (pixels) to a 2D capsule for every frame; ``cols [1, 1, W]``, ``rows [1, H, 1]``."""
    d = (b - a)[:, None, None, :]
    inv = 1.0 / np.maximum((d**2).sum(-1), 1e-6)
    rx = cols - a[:, None, None, 0]  # [T, 1, W]
    ry = rows - a[:, None, None, 1]  # [T, H, 1]
    t = np.clip((rx * d[..., 0] + ry * d[..., 1]) * inv, 0.0, 1.0)
    return np.sqrt((rx - t * d[..., 0]) ** 2 + (ry - t * d[..., 1]) ** 2) - radius


def _ellipse_sdf(cols, rows, centre, shape):
    """Approximate signed distance to an ellipse ``x^T shape^-1 x <= 1`` (exact for circles)."""
    inv = np.linalg.inv(shape)  # [T, 2, 2]
    rx = cols - centre[:, None, None, 0]
    ry = rows - centre[:, None, None, 1]
    q = inv[:, None, None, 0, 0] * rx**2 + 2 * inv[:, None, None, 0, 1] * rx * ry + inv[:, None, None, 1, 1] * ry**2
    mean_radius = np.linalg.det(shape) ** 0.25
    return (np.sqrt(q) - 1.0) * mean_radius[:, None, None]


def _box_sdf(cols, rows, centre, half):
    """Signed distance (a lower bound outside) to a projected box: a zonotope with generators ``half [T, 3, 2]``.

    A 2D zonotope's edges are parallel to its generators, so testing the three normals suffices.
    """
    normals = np.stack([-half[..., 1], half[..., 0]], -1)  # [T, 3, 2]
    normals = normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-6)
    reach = np.abs(normals @ np.swapaxes(half, -1, -2)).sum(-1)  # [T, 3]
    rx = cols - centre[:, None, None, 0]
    ry = rows - centre[:, None, None, 1]
    sdf = None
    for i in range(3):
        n = normals[:, i, None, None, :]
        edge = np.abs(rx * n[..., 0] + ry * n[..., 1]) - reach[:, i, None, None]
        sdf = edge if sdf is None else np.maximum(sdf, edge)
    return sdf


@dataclass(frozen=True)
class Noise:
    """Segmentation noise of one sequence, in render pixels."""

    offset: float  # > 0 dilates, < 0 erodes
    jitter: float  # per-frame std of the offset
    ragged: float  # amplitude of the smooth random edge field
    holes: float  # expected holes per frame
    blob: float  # probability per frame of a spurious blob near the feet (shadow)


def rasterise(image: Primitives, noise: Noise, rng: np.random.Generator, margin: int = 4) -> np.ndarray:
    """Anti-aliased silhouettes uint8 ``[T, H, W]`` of 2D primitives, with segmentation noise."""
    lo, hi = _bounds(image)
    origin = np.floor(lo.min(0)) - margin
    width, height = (np.ceil(hi.max(0) - origin) + margin).astype(int)
    T = image.capsules[0][0].shape[0]
    sdf = np.full((T, height, width), np.inf, np.float32)
    f32 = partial(np.asarray, dtype=np.float32)
    prims = (
        [(_capsule_sdf, (f32(a - origin), f32(b - origin), r)) for a, b, r in image.capsules]
        + [(_ellipse_sdf, (f32(c - origin), f32(shape))) for c, shape in image.ellipsoids]
        + [(_box_sdf, (f32(c - origin), f32(half))) for c, half in image.boxes]
    )
    pad = 2 + noise.offset + 3 * noise.jitter + 2 * noise.ragged
    for (fn, args), p_lo, p_hi in zip(prims, lo - origin, hi - origin):
        c0, r0 = np.maximum(np.floor(p_lo - pad), 0).astype(int)
        c1, r1 = np.minimum(np.ceil(p_hi + pad), [width, height]).astype(int)
        cols = (np.arange(c0, c1, dtype=np.float32) + 0.5)[None, None, :]
        rows = (np.arange(r0, r1, dtype=np.float32) + 0.5)[None, :, None]
        window = sdf[:, r0:r1, c0:c1]
        np.minimum(window, fn(cols, rows, *args), out=window)

    offset = noise.offset + noise.jitter * rng.standard_normal(T).astype(np.float32)
    sdf -= offset[:, None, None] + noise.ragged * _smooth_field(rng, T, height, width)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)
    _punch_holes(alpha, sdf, noise.holes, rng)
    _add_blobs(alpha, noise.blob, rng)
    return (alpha * 255.0 + 0.5).astype(np.uint8)


def _smooth_field(rng: np.random.Generator, T: int, height: int, width: int, cell: int = 6) -> np.ndarray:
    """Random field ``[T, H, W]`` of about unit variance, smooth over ~``cell`` pixels, correlated across frames."""
    h, w = height // cell + 2, width // cell + 2
    coarse = rng.standard_normal((T, h, w)).astype(np.float32)
    for t in range(1, T):  # temporal correlation: segmentation errors persist a few frames
        coarse[t] = 0.6 * coarse[t - 1] + 0.8 * coarse[t]
    up_rows = _linear_upsampler(height, h, cell)
    up_cols = _linear_upsampler(width, w, cell)
    return up_rows @ coarse @ up_cols.T


def _linear_upsampler(n_out: int, n_in: int, cell: int) -> np.ndarray:
    """``[n_out, n_in]`` linear-interpolation weights from a grid of spacing ``cell``."""
    position = np.arange(n_out, dtype=np.float32) / cell
    left = np.minimum(np.floor(position).astype(int), n_in - 2)
    frac = position - left
    weights = np.zeros((n_out, n_in), np.float32)
    weights[np.arange(n_out), left] = 1 - frac
    weights[np.arange(n_out), left + 1] = frac
    return weights


def _disk(alpha: np.ndarray, row: float, col: float, radius_rows: float, radius_cols: float, value: float) -> None:
    """Set an axis-aligned elliptic disk of one frame ``alpha [H, W]`` to ``value`` (only its bounding box is touched)."""
    r0, r1 = max(int(row - radius_rows), 0), min(int(row + radius_rows) + 2, alpha.shape[0])
    c0, c1 = max(int(col - radius_cols), 0), min(int(col + radius_cols) + 2, alpha.shape[1])
    rr = (np.arange(r0, r1)[:, None] - row) / radius_rows
    cc = (np.arange(c0, c1)[None, :] - col) / radius_cols
    alpha[r0:r1, c0:c1][rr**2 + cc**2 <= 1.0] = value


def _punch_holes(alpha: np.ndarray, sdf: np.ndarray, rate: float, rng: np.random.Generator) -> None:
    """Small holes inside the body (missed foreground), at ~``rate`` per frame."""
    width = alpha.shape[2]
    for t in np.flatnonzero(rng.random(len(alpha)) < min(rate, 1.0)):
        inside = np.flatnonzero(sdf[t].ravel() < -2.0)
        if inside.size == 0:
            continue
        for centre in rng.choice(inside, size=int(rng.integers(1, 4))):
            radius = rng.uniform(1.0, 2.5)
            _disk(alpha[t], *divmod(int(centre), width), radius, radius, 0.0)


def _add_blobs(alpha: np.ndarray, rate: float, rng: np.random.Generator) -> None:
    """A flat shadow-like blob beside the feet in some frames (spurious foreground)."""
    width = alpha.shape[2]
    for t in np.flatnonzero(rng.random(len(alpha)) < rate):
        rows = np.flatnonzero(alpha[t].any(1))
        if rows.size == 0:
            continue
        row, col = rows[-1] - rng.uniform(0, 3), rng.uniform(0.2, 0.8) * width
        _disk(alpha[t], row, col, 1.5, rng.uniform(3, 8), 1.0)


# ---------------------------------------------------------------------------------------------
# Sequences and datasets.

def render_sequence(subject: Subject, type_name: str, view: str, rng: np.random.Generator, preset: Preset) -> np.ndarray:
    """One pretreated sequence uint8 ``[T, 64, 64]`` of ``subject`` in condition ``type_name`` seen from ``view``."""
    condition = type_name[:2] if type_name[:2] in ("nm", "bg", "cl") else "nm"
    cycle_frames = subject.cycle_frames * rng.uniform(0.97, 1.03)  # walking speed varies a little
    n_frames = int(np.ceil(preset.min_cycles * cycle_frames)) + int(rng.integers(0, preset.extra_frames + 1))
    phase = rng.uniform() + np.arange(n_frames) / cycle_frames
    world = pose(subject, phase, condition)
    scale = rng.uniform(72.0, 88.0) / subject.height  # pixels per metre: the body is ~80 rows tall
    image = project(world, float(view) + rng.uniform(-2.0, 2.0), rng.uniform(3.5, 6.5), scale)
    noise = Noise(
        offset=rng.uniform(-0.3, 0.6),
        jitter=rng.uniform(0.1, 0.4),
        ragged=rng.uniform(0.3, 1.2),
        holes=rng.uniform(0.0, 0.5),
        blob=rng.uniform(0.0, 0.3),
    )
    sils = pretreat_frames(rasterise(image, noise, rng))
    if len(sils) == 0:
        raise RuntimeError(f"synthetic sequence {type_name}/{view} lost every frame in pretreatment")
    return sils


def subject_sequences(preset: Preset, seed: int, subject_index: int) -> list[tuple[str, str]]:
    """(type, view) of every sequence this subject has: its split's types in every view, less the missing ones."""
    test = subject_index >= preset.train_subjects
    types = preset.test_types if test else preset.train_types
    return [
        (t, v)
        for t in types
        for v in preset.views
        if not (test and _rng(seed, 2, subject_index, _key(t), _key(v)).random() < preset.missing)
    ]


def render_subject(preset: Preset, seed: int, subject_index: int) -> dict[tuple[str, str], np.ndarray]:
    """Every sequence of one subject, keyed by (type, view)."""
    subject = draw_subject(_rng(seed, 0, subject_index))
    return {
        (type_name, view): render_sequence(
            subject, type_name, view, _rng(seed, 1, subject_index, _key(type_name), _key(view)), preset
        )
        for type_name, view in subject_sequences(preset, seed, subject_index)
    }


def _subject_id(preset: Preset, subject_index: int) -> str:
    return f"{subject_index + 1:0{preset.subject_digits}d}"


def _write_subject(job: tuple[Preset, int, int, str]) -> int:
    preset, seed, subject_index, out = job
    sid = _subject_id(preset, subject_index)
    sequences = render_subject(preset, seed, subject_index)
    for (type_name, view), sils in sequences.items():
        save_sequence(Path(out) / sid / type_name / view / f"{view}.pkl", sils)
    return len(sequences)


def resolve_preset(preset: str | Preset, **overrides) -> Preset:
    """A named preset (``"casia-b"``, ``"oumvlp"``, ``"small"``) or a :class:`Preset`, with fields overridden."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    resolved = replace(preset, **overrides)
    if not 0 < resolved.train_subjects < resolved.subjects:
        raise ValueError(f"need 0 < train_subjects < subjects, got {resolved.train_subjects} of {resolved.subjects}")
    return resolved


def generate(
    out: PathLike,
    preset: str | Preset = "small",
    seed: int = 0,
    workers: Optional[int] = None,
    progress: bool = True,
    **overrides,
) -> Path:
    """Generate a synthetic dataset in the OpenGait layout under ``out``; returns ``out``.

    ``overrides`` replace fields of the preset (e.g. ``subjects=6, train_subjects=3`` for tests).
    ``workers``: processes (default: one per CPU; 1 renders in this process). A finished set
    (``meta.json`` matching preset and seed) is reused as is; an unfinished one (its marker
    ``.fastgait-synthetic.json`` matching) is completed (subjects whose files all exist are
    skipped). Any other non-empty folder is refused: the generator never writes into a user's
    dataset. Same seed and preset: the same bytes.
    """
    import multiprocessing

    out = Path(out)
    resolved = resolve_preset(preset, **overrides)
    meta = {"generator": GENERATOR_VERSION, "seed": seed, "preset": preset if isinstance(preset, str) else "custom"}
    meta["config"] = json.loads(json.dumps(asdict(resolved)))
    if not resolved.probes_per_subject:  # keep the meta of sets generated before this field existed
        del meta["config"]["probes_per_subject"]
    meta_path = out / "meta.json"
    _check_target(out, meta)
    if meta_path.exists():
        return out
    atomic_write_bytes(out / MARKER, (json.dumps(meta, indent=1) + "\n").encode())
    ids = [_subject_id(resolved, i) for i in range(resolved.subjects)]
    todo = [i for i in range(resolved.subjects) if not _subject_done(out / ids[i], resolved, seed, i)]
    workers = workers or multiprocessing.cpu_count()
    jobs = [(resolved, seed, i, str(out)) for i in todo]
    for _ in parallel_map(_write_subject, jobs, workers, desc=f"synthetic {meta['preset']}", unit="subject", progress=progress):
        pass
    write_partition(out / "partition.json", ids[: resolved.train_subjects], ids[resolved.train_subjects :],
                    probe_keys(resolved, seed, ids))
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return out


def probe_keys(preset: Preset, seed: int, ids: list[str]) -> Optional[list[str]]:
    """The ``PROBE_SET`` of a real-scene preset: ``probes_per_subject`` sequences of each test subject."""
    if not preset.probes_per_subject:
        return None
    keys = []
    for i in range(preset.train_subjects, preset.subjects):
        sequences = subject_sequences(preset, seed, i)
        if len(sequences) <= preset.probes_per_subject:
            continue  # keep a gallery sequence for every subject that has probes
        chosen = _rng(seed, 3, i).choice(len(sequences), preset.probes_per_subject, replace=False)
        keys += [f"{ids[i]}-{sequences[j][0]}-{sequences[j][1]}" for j in sorted(chosen)]
    return keys


MARKER = ".fastgait-synthetic.json"  # written first: an unfinished set is recognised as ours


def _check_target(out: Path, meta: dict) -> None:
    """Refuse a folder that holds anything but a finished or unfinished synthetic set of ``meta``."""
    meta_path, marker = out / "meta.json", out / MARKER
    if meta_path.exists():
        existing = json.loads(meta_path.read_text())
        if existing != meta:
            raise FileExistsError(
                f"{out} holds another synthetic set ({meta_path}: preset {existing.get('preset')!r}, seed "
                f"{existing.get('seed')}); remove it or choose another folder"
            )
        return
    if marker.exists():
        if json.loads(marker.read_text()) != meta:
            raise FileExistsError(
                f"{out} holds an unfinished synthetic set of another preset or seed ({marker}); remove it or choose "
                "another folder"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} is not empty and is not a synthetic set of this preset and seed: the generator writes only into "
            "an empty or new folder (it would mix its subjects and partition.json with what is there); choose another"
        )


def _subject_done(folder: Path, preset: Preset, seed: int, subject_index: int) -> bool:
    """Whether every sequence file of a subject exists: a resumed run skips it."""
    return all(
        (folder / type_name / view / f"{view}.pkl").exists()
        for type_name, view in subject_sequences(preset, seed, subject_index)
    )


from .._cli import cli_main  # noqa: E402 - one-line errors for this CLI


@cli_main
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastgait.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = generate(args.out, args.preset, args.seed, args.workers, progress=not args.no_progress)
    print(f"wrote the {args.preset} preset (seed {args.seed}) to {out}")


if __name__ == "__main__":
    import sys

    sys.exit(main())
