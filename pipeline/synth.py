"""A synthetic hand-video dataset written in the exact HanCo layout.

``generate(out)`` renders an articulated, hand-like figure seen by several fixed cameras and
writes::

    out/rgb/{seq:04d}/cam{c}/{frame:08d}.jpg        RGB frames (size x size JPEG)
    out/mask_fg/{seq:04d}/cam{c}/{frame:08d}.jpg    hand + held object (white) on black
    out/mask_hand/{seq:04d}/cam{c}/{frame:08d}.jpg  hand only
    out/meta.json                                   {key: [[one value per frame] per sequence]}

with ``meta.json`` in HanCo's real format: keys ``is_train``, ``subject_id``, ``is_valid``,
``object_id`` and ``has_fit``, each a list indexed by the integer sequence id whose entries are
lists indexed by frame id (``meta["is_train"][sid][fid]``).

The figure is a palm with five jointed fingers (thumb 2 segments, the others 3) on a forearm.
Finger flexion, finger spread, wrist roll/pitch/yaw, hand distance and a small translation follow
smooth random curves that are played back at a varying speed: each sequence has pauses (almost no
motion for several frames), slow, normal and fast phases, so the optical flow between consecutive
frames spans a wide range. Each subject has its own hand size and skin tone; some sequences hold an
object (part of ``mask_fg``, not of ``mask_hand``); each camera sees the hand through its own fixed
3D rotation, 2D similarity and mild perspective. Most sequences are recorded on a green screen
(``is_train`` true); every fourth sequence (at least one when there are two or more) has a cluttered
background and ``is_train`` false, like HanCo's non-green-screen recordings.

Output is deterministic: the same arguments give the same bytes in every file. Every file is
written atomically; an interrupted run is resumed by calling ``generate`` again with the same
arguments (existing files are kept, ``meta.json`` is written last and marks completion).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.handco import META_KEYS  # the keys of HanCo's meta.json, which synth writes
from shards_spec.atomic import atomic_write_bytes

__all__ = ["generate", "add_arguments", "run", "META_KEYS"]

# Seed-sequence tags, so that each random stream is independent of the others.
_TAG_SEQUENCE = 1
_TAG_CAMERA = 2
_TAG_SUBJECT = 3
_TAG_BACKGROUND = 4

_N_SUBJECTS = 8
_N_OBJECTS = 10
_INVALID_FRAME_RATE = 0.01

_SHIFT = 4  # fractional bits for cv2 drawing: sub-pixel positions give smooth motion
_ONE = 1 << _SHIFT

_PARAMS_MARKER = ".synth-params.json"  # present only while a generation is in progress

# Hand model, in hand units (about 1.9 units from wrist to middle fingertip), x right, y down,
# z towards the viewer; the camera sees the back of a right hand, fingers pointing up.
_WRIST = np.array([0.0, 0.42, 0.0])
_HAND_CENTRE = np.array([0.0, -0.45, 0.0])
_PALM = np.array(
    [
        [-0.30, 0.42],
        [-0.42, 0.05],
        [-0.40, -0.40],
        [-0.30, -0.53],
        [-0.10, -0.58],
        [0.10, -0.55],
        [0.28, -0.47],
        [0.38, -0.36],
        [0.40, 0.05],
        [0.28, 0.42],
    ]
)
_FOREARM = np.array([[-0.28, 0.30], [-0.40, 3.2], [0.40, 3.2], [0.27, 0.30]])
_KNUCKLES = np.array([[-0.30, -0.50], [-0.10, -0.55], [0.10, -0.52], [0.28, -0.44]])
_SEGMENTS = np.array(
    [
        [0.40, 0.24, 0.19],  # index
        [0.45, 0.28, 0.20],  # middle
        [0.42, 0.26, 0.19],  # ring
        [0.33, 0.19, 0.17],  # pinky
    ]
)
_WIDTHS = np.array([0.165, 0.17, 0.16, 0.135])
_TAPER = np.array([1.0, 0.93, 0.86])
_SPLAY = np.array([-0.16, -0.05, 0.05, 0.15])  # finger directions (rad from "up") at mean spread
_MAX_FLEX = np.array([1.35, 1.6, 1.1])  # MCP, PIP, DIP
_THUMB_BASE = np.array([-0.33, 0.10, 0.0])
_THUMB_SEGMENTS = np.array([0.38, 0.29])
_THUMB_WIDTH = 0.19
_THUMB_MAX_FLEX = np.array([0.9, 1.2])
_TENDON_BASES = np.array([[-0.16, 0.30], [-0.05, 0.32], [0.06, 0.32], [0.16, 0.30]])

_SKIN_TONES = np.array(
    [
        [226, 178, 146],
        [200, 138, 104],
        [164, 108, 78],
        [112, 74, 52],
        [236, 194, 168],
        [184, 140, 110],
        [140, 92, 64],
        [214, 160, 124],
    ],
    dtype=np.float64,
)
_OBJECT_COLOURS = np.array(
    [
        [220, 40, 40],
        [40, 80, 220],
        [240, 200, 30],
        [150, 60, 200],
        [240, 120, 20],
        [30, 180, 200],
        [230, 230, 230],
        [60, 60, 60],
        [200, 40, 150],
        [120, 80, 40],
    ],
    dtype=np.float64,
)

# Pose parameters, each a smooth curve in [-1, 1] per frame.
_POSE_KEYS = (
    ("curl_common",)
    + tuple(f"curl{i}" for i in range(5))
    + tuple(f"hook{i}" for i in range(5))
    + ("spread", "roll", "pitch", "yaw", "tx", "ty", "dist")
)

# Speed states of the time warp: pause, slow, normal, fast (latent time per frame).
_PAUSE, _SLOW, _NORMAL, _FAST = range(4)
_SPEED_RANGES = ((0.0, 0.02), (0.25, 0.5), (0.8, 1.2), (2.2, 3.2))
_SPEED_PROBS = (0.25, 0.2, 0.3, 0.25)

# ----------------------------------------------------------------------------------------------
# Plan: everything random about a dataset, decided before any pixel is drawn.


@dataclass(frozen=True)
class _Subject:
    scale: float
    skin: np.ndarray  # RGB, float
    finger_scale: np.ndarray  # (4,) finger length factors
    moles: np.ndarray  # (k, 2) palm positions of small dark spots


@dataclass(frozen=True)
class _Camera:
    rot3d: np.ndarray  # (3, 3) rotation of the hand seen by this camera
    homography: np.ndarray  # (3, 3) hand units (x, y) -> pixels
    px_per_unit: float
    gain: np.ndarray  # (3,) RGB white balance


@dataclass(frozen=True)
class _Sequence:
    index: int
    green_screen: bool
    subject_id: int
    object_id: int | None
    object_radius: float
    object_spin: float
    pose: dict[str, np.ndarray]  # key -> (frames,) curve values in [-1, 1]
    is_valid: list[bool]


def _subject(seed: int, subject_id: int) -> _Subject:
    rng = np.random.default_rng([seed, _TAG_SUBJECT, subject_id])
    skin = np.clip(_SKIN_TONES[subject_id % len(_SKIN_TONES)] + rng.normal(0, 6, 3), 30, 250)
    moles = np.column_stack([rng.uniform(-0.3, 0.3, 5), rng.uniform(-0.45, 0.3, 5)])
    return _Subject(
        scale=float(rng.uniform(0.86, 1.12)),
        skin=skin,
        finger_scale=rng.uniform(0.94, 1.06, 4),
        moles=moles[: int(rng.integers(2, 6))],
    )


def _rotation(roll: float, pitch: float, yaw: float) -> np.ndarray:
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ ry @ rx


def _camera(seed: int, cam: int, cameras: int, size: int) -> _Camera:
    rng = np.random.default_rng([seed, _TAG_CAMERA, cam])
    rot3d = _rotation(0.0, rng.uniform(-0.3, 0.3), rng.uniform(-0.45, 0.45))
    angle = 2 * np.pi * cam / cameras + rng.uniform(-0.35, 0.35)
    scale = rng.uniform(0.9, 1.1)
    px_per_unit = 0.34 * size * scale
    offset = rng.uniform(-0.06, 0.06, 2) * size
    p1, p2 = rng.uniform(-0.08, 0.08, 2)
    centre = np.array([[1, 0, -_HAND_CENTRE[0]], [0, 1, -_HAND_CENTRE[1]], [0, 0, 1]])
    persp = np.array([[1, 0, 0], [0, 1, 0], [p1, p2, 1]])
    c, s = np.cos(angle), np.sin(angle)
    sim = np.array(
        [
            [px_per_unit * c, -px_per_unit * s, size / 2 + offset[0]],
            [px_per_unit * s, px_per_unit * c, size / 2 + offset[1]],
            [0, 0, 1],
        ]
    )
    return _Camera(rot3d, sim @ persp @ centre, float(px_per_unit), rng.uniform(0.93, 1.07, 3))


def _speed_profile(rng: np.random.Generator, n: int) -> np.ndarray:
    """Latent time advanced between consecutive frames: runs of pause/slow/normal/fast."""
    if n <= 0:
        return np.zeros(0)
    states: list[int] = []
    while len(states) < n:
        states += [int(rng.choice(4, p=_SPEED_PROBS))] * int(rng.integers(2, 6))
    st = np.array(states[:n])
    if n >= 3 and not (st == _PAUSE).any():
        i = int(rng.integers(0, n - 2))
        st[i : i + 3] = _PAUSE
    if n >= 2 and not (st == _FAST).any():
        cand = np.flatnonzero(st != _PAUSE)
        if len(cand) == 0:
            st[n // 2 :] = _FAST
        else:
            j = int(cand[rng.integers(len(cand))])
            st[j] = _FAST
            if j + 1 < n and st[j + 1] != _PAUSE:
                st[j + 1] = _FAST
    lo = np.array([_SPEED_RANGES[s][0] for s in st])
    hi = np.array([_SPEED_RANGES[s][1] for s in st])
    v = rng.uniform(lo, hi)
    # ease in and out of each phase, but keep pauses still
    padded = np.concatenate([v[:1], v, v[-1:]])
    smooth = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    return np.where(st == _PAUSE, v, smooth)


def _smooth_curve(rng: np.random.Generator, tau: np.ndarray) -> np.ndarray:
    """A sum of three sinusoids of latent time, normalised to [-1, 1]."""
    periods = rng.uniform(16.0, 60.0, 3)
    phases = rng.uniform(0.0, 2 * np.pi, 3)
    amps = np.array([1.0, 0.6, 0.35]) * rng.uniform(0.7, 1.3, 3)
    waves = amps[:, None] * np.sin(2 * np.pi * tau[None, :] / periods[:, None] + phases[:, None])
    return waves.sum(0) / amps.sum()


def _sequence_plan(seed: int, seq: int, sequences: int, frames: int) -> _Sequence:
    rng = np.random.default_rng([seed, _TAG_SEQUENCE, seq])
    green = not _cluttered(seq, sequences)
    subject_id = int(rng.integers(_N_SUBJECTS))
    has_object = seq % 3 == 1
    object_id = int(rng.integers(_N_OBJECTS))
    object_radius = float(rng.uniform(0.22, 0.3))
    object_spin = float(rng.uniform(0, np.pi))
    speed = _speed_profile(rng, frames - 1)
    tau = rng.uniform(0, 200) + np.concatenate([[0.0], np.cumsum(speed)])
    pose = {key: _smooth_curve(rng, tau) for key in _POSE_KEYS}
    is_valid = (rng.random(frames) >= _INVALID_FRAME_RATE).tolist()
    return _Sequence(
        index=seq,
        green_screen=green,
        subject_id=subject_id,
        object_id=object_id if has_object else None,
        object_radius=object_radius,
        object_spin=object_spin,
        pose=pose,
        is_valid=is_valid,
    )


def _cluttered(seq: int, sequences: int) -> bool:
    """Every fourth sequence is off the green screen; at least one once there are two."""
    if seq % 4 == 3:
        return True
    return 2 <= sequences <= 3 and seq == sequences - 1


# ----------------------------------------------------------------------------------------------
# Geometry


@dataclass
class _HandPose:
    rot: np.ndarray  # (3, 3) hand rotation about the wrist
    arm_rot: np.ndarray  # (3, 3) forearm rotation (follows a fraction of the roll)
    shift: np.ndarray  # (3,) translation
    dist: float  # scale about the hand centre (closer/farther)
    fingers: list[np.ndarray]  # index, middle, ring, pinky, thumb: (segments + 1, 3) joints
    widths: list[float]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _hand_pose(plan: _Sequence, subject: _Subject, f: int) -> _HandPose:
    p = {k: float(v[f]) for k, v in plan.pose.items()}
    spread = 0.5 + 0.5 * np.tanh(2.0 * p["spread"])
    fingers, widths = [], []
    away = np.array([0.0, 0.0, -1.0])
    for i in range(4):
        curl = 0.5 + 0.5 * np.tanh(2.4 * (0.55 * p["curl_common"] + 0.45 * p[f"curl{i}"]))
        hook = 0.3 * p[f"hook{i}"]
        flex = curl * _MAX_FLEX * np.array([1 - hook, 1 + hook, 1 + hook])
        a = _SPLAY[i] * (0.4 + 1.6 * spread)
        d0 = np.array([np.sin(a), -np.cos(a), 0.0])
        joints = [np.array([*_KNUCKLES[i], 0.0])]
        phi = 0.0
        for k in range(3):
            phi += flex[k]
            direction = np.cos(phi) * d0 + np.sin(phi) * away
            joints.append(joints[-1] + _SEGMENTS[i, k] * subject.finger_scale[i] * direction)
        fingers.append(np.array(joints))
        widths.append(float(_WIDTHS[i]))
    # thumb: points up and out to the left, flexes across and under the palm
    curl = 0.5 + 0.5 * np.tanh(2.4 * (0.5 * p["curl_common"] + 0.5 * p["curl4"]))
    a = -(0.75 + 0.35 * spread)
    d0 = np.array([np.sin(a), -np.cos(a), 0.0])
    n = _unit(np.array([0.55, -0.1, -0.83]))
    n = _unit(n - (n @ d0) * d0)
    flex = curl * _THUMB_MAX_FLEX * (1 + 0.3 * p["hook4"] * np.array([-1.0, 1.0]))
    joints = [_THUMB_BASE.copy()]
    phi = 0.0
    for k in range(2):
        phi += flex[k]
        joints.append(joints[-1] + _THUMB_SEGMENTS[k] * (np.cos(phi) * d0 + np.sin(phi) * n))
    fingers.append(np.array(joints))
    widths.append(_THUMB_WIDTH)
    roll, pitch, yaw = 0.45 * p["roll"], 0.35 * p["pitch"], 0.45 * p["yaw"]
    return _HandPose(
        rot=_rotation(roll, pitch, yaw),
        arm_rot=_rotation(0.35 * roll, 0.0, 0.0),
        shift=np.array([0.12 * p["tx"], 0.12 * p["ty"], 0.0]),
        dist=1.0 + 0.07 * p["dist"],
        fingers=fingers,
        widths=widths,
    )


class _Projector:
    """Hand-local 3D points -> pixel coordinates for one (pose, subject, camera)."""

    def __init__(self, pose: _HandPose, subject: _Subject, camera: _Camera) -> None:
        self.pose, self.camera = pose, camera
        self.scale = subject.scale * pose.dist
        self.px = camera.px_per_unit * self.scale

    def _finish(self, pts: np.ndarray) -> np.ndarray:
        pts = (pts - _HAND_CENTRE) @ self.camera.rot3d.T * self.scale + _HAND_CENTRE
        h = np.column_stack([pts[:, 0], pts[:, 1], np.ones(len(pts))]) @ self.camera.homography.T
        return h[:, :2] / h[:, 2:3]

    def hand(self, pts: np.ndarray) -> np.ndarray:
        pts = np.atleast_2d(pts)
        if pts.shape[1] == 2:
            pts = np.column_stack([pts, np.zeros(len(pts))])
        return self._finish((pts - _WRIST) @ self.pose.rot.T + _WRIST + self.pose.shift)

    def arm(self, pts: np.ndarray) -> np.ndarray:
        pts = np.column_stack([pts, np.zeros(len(pts))])
        return self._finish((pts - _WRIST) @ self.pose.arm_rot.T + _WRIST + self.pose.shift)


def _capsule(a: np.ndarray, b: np.ndarray, r: float, n: int = 7) -> np.ndarray:
    """Polygon of a segment a-b with half-width r and round caps (pixel coordinates)."""
    d = b - a
    length = float(np.hypot(*d))
    d = d / length if length > 1e-6 else np.array([1.0, 0.0])
    nrm = np.array([-d[1], d[0]])
    t = np.linspace(0, np.pi, n)[:, None]
    cap_b = b + r * (nrm * np.cos(t) + d * np.sin(t))
    cap_a = a + r * (-nrm * np.cos(t) - d * np.sin(t))
    return np.vstack([cap_b, cap_a])


def _shrink(poly: np.ndarray, k: float, centre: np.ndarray | None = None) -> np.ndarray:
    c = poly.mean(0) if centre is None else centre
    return c + k * (poly - c)


# ----------------------------------------------------------------------------------------------
# Drawing


class _Canvas:
    """An RGB frame plus its two masks, drawn with the same anti-aliased primitives."""

    def __init__(self, background: np.ndarray) -> None:
        self.rgb = background.copy()
        size = background.shape[0]
        self.fg = np.zeros((size, size), np.uint8)
        self.hand = np.zeros((size, size), np.uint8)

    @staticmethod
    def _fix(pts: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(pts) * _ONE).astype(np.int32).reshape(-1, 1, 2)

    def poly(self, pts: np.ndarray, colour: np.ndarray, part: str | None = None) -> None:
        """Fill a polygon; ``part`` ("hand"/"object") also draws it into the masks."""
        p = [self._fix(pts)]
        col = tuple(float(c) for c in np.clip(colour, 0, 255))
        cv2.fillPoly(self.rgb, p, col, cv2.LINE_AA, _SHIFT)
        if part is not None:
            cv2.fillPoly(self.fg, p, 255, cv2.LINE_AA, _SHIFT)
            cv2.fillPoly(self.hand, p, 255 if part == "hand" else 0, cv2.LINE_AA, _SHIFT)

    def line(self, a: np.ndarray, b: np.ndarray, colour: np.ndarray, thickness: int = 1) -> None:
        pa, pb = self._fix(a).ravel(), self._fix(b).ravel()
        col = tuple(float(c) for c in np.clip(colour, 0, 255))
        cv2.line(
            self.rgb, tuple(map(int, pa)), tuple(map(int, pb)), col, thickness, cv2.LINE_AA, _SHIFT
        )

    def dot(self, c: np.ndarray, r: float, colour: np.ndarray) -> None:
        col = tuple(float(x) for x in np.clip(colour, 0, 255))
        centre = tuple(int(v) for v in self._fix(c).ravel())
        cv2.circle(self.rgb, centre, max(1, round(r * _ONE)), col, -1, cv2.LINE_AA, _SHIFT)


def _green_screen(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([rng.uniform(30, 60), rng.uniform(150, 185), rng.uniform(50, 80)])
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    vignette = 1.0 - rng.uniform(0.5, 0.8) * ((xx - cx) ** 2 + (yy - cy) ** 2)
    img = base[None, None, :] * vignette[..., None] + rng.normal(0, 2.5, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _cluttered_background(rng: np.random.Generator, size: int) -> np.ndarray:
    c0, c1 = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang), 0, 1)[..., None]
    img = np.ascontiguousarray(((1 - t) * c0 + t * c1).astype(np.uint8))
    for _ in range(int(rng.integers(10, 18))):
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.06, 0.4, 2) * size
        col = tuple(float(c) for c in rng.uniform(0, 255, 3))
        pt0, pt1 = (int(x0), int(y0)), (int(x0 + w), int(y0 + h))
        cv2.rectangle(img, pt0, pt1, col, -1, cv2.LINE_AA)
        if rng.random() < 0.5:
            edge = tuple(float(c) * 0.5 for c in col)
            cv2.rectangle(img, pt0, pt1, edge, max(1, size // 112), cv2.LINE_AA)
    for _ in range(int(rng.integers(3, 7))):
        centre = tuple(int(v) for v in rng.uniform(0, size, 2))
        radius = int(rng.uniform(0.03, 0.12) * size)
        cv2.circle(
            img, centre, radius, tuple(float(c) for c in rng.uniform(0, 255, 3)), -1, cv2.LINE_AA
        )
    for _ in range(int(rng.integers(3, 7))):
        p0 = tuple(int(v) for v in rng.uniform(0, size, 2))
        p1 = tuple(int(v) for v in rng.uniform(0, size, 2))
        cv2.line(img, p0, p1, tuple(float(c) for c in rng.uniform(0, 255, 3)), 1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (3, 3), 0)
    noise = rng.normal(0, 2.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _background(seed: int, plan: _Sequence, cam: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _TAG_BACKGROUND, plan.index, cam])
    if plan.green_screen:
        return _green_screen(rng, size)
    return _cluttered_background(rng, size)


def _draw_segment(
    cv: _Canvas, a: np.ndarray, b: np.ndarray, r: float, skin: np.ndarray, *, nail: bool
) -> None:
    """A finger segment: dark rim, skin fill, highlight stripe, optional nail near b."""
    rim = max(0.7, 0.16 * r)
    cv.poly(_capsule(a, b, r), skin * 0.6, "hand")
    cv.poly(_capsule(a, b, r - rim), skin)
    d = b - a
    length = float(np.hypot(*d))
    if length > 1e-6:
        nrm = np.array([-d[1], d[0]]) / length
        off = -0.35 * r * nrm
        cv.poly(_capsule(a + off, b + off, 0.22 * r), skin * 1.12 + 12)
    if nail and length > 0.6 * r:
        c = a + 0.72 * (b - a)
        cv.dot(c, 0.45 * r, skin * 1.05 + np.array([20.0, 8.0, 10.0]))
        cv.dot(c - 0.1 * (b - a), 0.25 * r, skin * 1.15 + 25)


def _crease(cv: _Canvas, a: np.ndarray, b: np.ndarray, r: float, skin: np.ndarray) -> None:
    """A short dark line across the segment at ``a`` (knuckle wrinkle)."""
    d = b - a
    length = float(np.hypot(*d))
    if length < 0.5 * r:
        return
    nrm = np.array([-d[1], d[0]]) / length
    c = a + 0.15 * d
    cv.line(c - 0.55 * r * nrm, c + 0.55 * r * nrm, skin * 0.7)


def _render(
    plan: _Sequence,
    subject: _Subject,
    camera: _Camera,
    background: np.ndarray,
    f: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pose = _hand_pose(plan, subject, f)
    proj = _Projector(pose, subject, camera)
    skin = subject.skin
    cv = _Canvas(background)

    # forearm
    arm = proj.arm(_FOREARM)
    cv.poly(arm, skin * 0.6, "hand")
    cv.poly(_shrink(arm, 0.93), skin * 0.88)
    cv.poly(_shrink(arm, 0.55, arm[:2].mean(0) * 0.6 + arm[2:].mean(0) * 0.4), skin * 0.96)

    # finger segments: those bent behind the palm plane are drawn first (the palm hides them)
    front: list[tuple[int, int]] = []
    behind: list[tuple[float, int, int]] = []
    for i, joints in enumerate(pose.fingers):
        for k in range(len(joints) - 1):
            z = 0.5 * (joints[k, 2] + joints[k + 1, 2])
            if k > 0 and z < -0.1:
                behind.append((z, i, k))
            else:
                front.append((i, k))
    projected = [proj.hand(j) for j in pose.fingers]
    radius = [0.5 * w * proj.px for w in pose.widths]

    def segment(i: int, k: int) -> None:
        joints = pose.fingers[i]
        a, b = projected[i][k], projected[i][k + 1]
        r = radius[i] * _TAPER[k]
        last = k == len(joints) - 2
        facing = float(_unit(joints[k + 1] - joints[k])[2]) > -0.6
        _draw_segment(cv, a, b, r, skin, nail=last and facing)
        if k > 0:
            _crease(cv, a, b, r, skin)

    for _, i, k in sorted(behind):
        segment(i, k)

    # palm: rim, then lighter layers towards the centre, tendons and moles for texture
    palm = proj.hand(_PALM)
    centre = proj.hand(np.array([0.0, -0.12]))[0]
    cv.poly(palm, skin * 0.6, "hand")
    for k, shade in ((0.94, 0.86), (0.78, 0.93), (0.55, 1.0), (0.3, 1.05)):
        cv.poly(_shrink(palm, k, centre), skin * shade)
    thick = max(1, round(0.025 * proj.px))
    for base, knuckle in zip(_TENDON_BASES, _KNUCKLES, strict=True):
        ends = proj.hand(np.array([base, base + 0.8 * (knuckle - base)]))
        cv.line(ends[0], ends[1], skin * 0.84, thick)
    for m in proj.hand(subject.moles):
        cv.dot(m, max(0.6, 0.022 * proj.px), skin * 0.5)

    # front segments: pinky to index; then the held object; then the thumb over it
    order = {3: 0, 2: 1, 1: 2, 0: 3, 4: 5}
    front.sort(key=lambda ik: (order[ik[0]], ik[1]))
    drawn_object = False
    for i, k in front:
        if order[i] > 3 and not drawn_object:
            _draw_object(cv, plan, pose, proj)
            drawn_object = True
        segment(i, k)
    if not drawn_object:
        _draw_object(cv, plan, pose, proj)

    rgb = np.clip(cv.rgb.astype(np.float32) * camera.gain[None, None, :].astype(np.float32), 0, 255)
    return rgb.astype(np.uint8), cv.fg, cv.hand


def _draw_object(cv: _Canvas, plan: _Sequence, pose: _HandPose, proj: _Projector) -> None:
    if plan.object_id is None:
        return
    thumb_tip, index_tip = pose.fingers[4][-1], pose.fingers[0][-1]
    anchor = np.array([-0.22, -0.78, 0.12])
    centre = 0.5 * (0.5 * (thumb_tip + index_tip)) + 0.5 * anchor
    centre[2] = max(centre[2], 0.05)
    r = plan.object_radius
    colour = _OBJECT_COLOURS[plan.object_id % len(_OBJECT_COLOURS)]
    if plan.object_id % 2 == 0:  # disc
        t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        shape = np.column_stack([np.cos(t), np.sin(t), np.zeros_like(t)])
    else:  # box
        t = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
        shape = np.column_stack([np.cos(t), np.sin(t), np.zeros_like(t)]) * 0.9
    c, s = np.cos(plan.object_spin), np.sin(plan.object_spin)
    spin = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    local = centre + r * shape @ spin.T
    outline = proj.hand(local)
    mid = proj.hand(centre)[0]
    cv.poly(outline, colour * 0.55, "object")
    cv.poly(_shrink(outline, 0.84, mid), colour)
    stripe = proj.hand(centre + r * np.array([[-0.8, 0.0, 0.0], [0.8, 0.0, 0.0]]) @ spin.T)
    cv.line(stripe[0], stripe[1], 255 - colour, max(1, round(0.02 * proj.px)))
    cv.dot(mid + 0.35 * (outline[len(outline) // 8] - mid), 0.12 * r * proj.px, colour * 0.5 + 128)


# ----------------------------------------------------------------------------------------------
# Files


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _meta(plans: list[_Sequence], frames: int) -> dict:
    """HanCo's format: per key, a list indexed by sequence id of lists indexed by frame id."""
    plans = sorted(plans, key=lambda p: p.index)
    assert [p.index for p in plans] == list(range(len(plans)))
    return {
        "is_train": [[p.green_screen] * frames for p in plans],
        "subject_id": [[p.subject_id] * frames for p in plans],
        "is_valid": [list(p.is_valid) for p in plans],
        "object_id": [[p.object_id] * frames for p in plans],
        "has_fit": [[True] * frames for p in plans],
    }


def _validate(
    *, sequences: int, cameras: int, frames: int, size: int, seed: int, quality: int
) -> None:
    for name, value in (("sequences", sequences), ("cameras", cameras), ("frames", frames)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"synth: {name} must be an integer >= 1, got {value!r}")
    if not isinstance(size, (int, np.integer)) or size < 32 or size % 8:
        raise ValueError(f"synth: size must be an integer >= 32 and a multiple of 8, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synth: seed must be an integer >= 0, got {seed!r}")
    if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"synth: quality must be an integer in 1..100, got {quality!r}")


def _paths(root: Path, seq: int, cam: int, frame: int) -> tuple[Path, Path, Path]:
    rel = Path(f"{seq:04d}", f"cam{cam}", f"{frame:08d}.jpg")
    return root / "rgb" / rel, root / "mask_fg" / rel, root / "mask_hand" / rel


def _complete(root: Path, *, sequences: int, cameras: int, frames: int, size: int) -> bool:
    for seq in range(sequences):
        for cam in range(cameras):
            for frame in range(frames):
                if not all(p.is_file() for p in _paths(root, seq, cam, frame)):
                    return False
    return _first_image_size_ok(root, size)


def _first_image_size_ok(root: Path, size: int) -> bool:
    first = _paths(root, 0, 0, 0)[0]
    if not first.is_file():
        return True
    img = cv2.imread(str(first), cv2.IMREAD_UNCHANGED)
    return img is not None and img.shape[:2] == (size, size)


def generate(
    out: str | Path,
    sequences: int = 4,
    cameras: int = 2,
    frames: int = 24,
    size: int = 224,
    seed: int = 0,
    quality: int = 95,
    progress: bool = True,
) -> dict:
    """Write a synthetic HanCo-layout dataset under ``out`` and return a summary.

    Deterministic (same arguments, same bytes) and resumable: re-running with the same arguments
    after an interruption completes the missing files; a finished dataset returns at once. A
    folder that holds other data (or a dataset made with other arguments) is refused.
    """
    _validate(
        sequences=sequences, cameras=cameras, frames=frames, size=size, seed=seed, quality=quality
    )
    root = Path(out)
    plans = [_sequence_plan(seed, s, sequences, frames) for s in range(sequences)]
    meta_text = json.dumps(_meta(plans, frames), sort_keys=True)
    params_text = json.dumps(
        {
            "sequences": sequences,
            "cameras": cameras,
            "frames": frames,
            "size": size,
            "seed": seed,
            "quality": quality,
        },
        sort_keys=True,
    )
    summary = {
        "root": str(root),
        "sequences": sequences,
        "cameras": cameras,
        "frames": frames,
        "images": sequences * cameras * frames,
        "green_screen_sequences": [p.index for p in plans if p.green_screen],
        "object_sequences": [p.index for p in plans if p.object_id is not None],
    }

    meta_path, marker = root / "meta.json", root / _PARAMS_MARKER
    if root.exists() and not root.is_dir():
        raise ValueError(f"synth: {root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        if marker.is_file():
            if marker.read_text() != params_text:
                raise ValueError(
                    f"synth: {root} holds an unfinished dataset made with other arguments "
                    f"({marker.read_text()}); use another --out or delete it"
                )
        elif meta_path.is_file():
            if meta_path.read_text() != meta_text or not _first_image_size_ok(root, size):
                raise ValueError(
                    f"synth: {root} already holds a different dataset; use another --out"
                )
            if _complete(root, sequences=sequences, cameras=cameras, frames=frames, size=size):
                return summary
        else:
            raise ValueError(f"synth: {root} is not empty and holds no synthetic dataset")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(marker, params_text.encode())

    subjects: dict[int, _Subject] = {}
    cams = [_camera(seed, c, cameras, size) for c in range(cameras)]
    with tqdm(
        total=sequences * cameras * frames, desc="synth", unit="img", disable=not progress
    ) as bar:
        for plan in plans:
            subject = subjects.setdefault(plan.subject_id, _subject(seed, plan.subject_id))
            for c, camera in enumerate(cams):
                for d in _paths(root, plan.index, c, 0):
                    d.parent.mkdir(parents=True, exist_ok=True)
                background = None
                for f in range(frames):
                    paths = _paths(root, plan.index, c, f)
                    if all(p.is_file() for p in paths):
                        bar.update(1)
                        continue
                    if background is None:
                        background = _background(seed, plan, c, size)
                    rgb, fg, hand = _render(plan, subject, camera, background, f)
                    images = (np.ascontiguousarray(rgb[..., ::-1]), fg, hand)
                    for path, img in zip(paths, images, strict=True):
                        if not path.is_file():  # (not durable: a rerun makes it again)
                            atomic_write_bytes(path, _jpeg(img, quality), durable=False)
                    bar.update(1)
    atomic_write_bytes(meta_path, meta_text.encode())
    marker.unlink(missing_ok=True)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``pipeline synth``."""
    parser.add_argument("--out", required=True, help="output folder (HanCo layout)")
    parser.add_argument("--sequences", type=int, default=4, help="number of sequences (default 4)")
    parser.add_argument("--cameras", type=int, default=2, help="cameras per sequence (default 2)")
    parser.add_argument("--frames", type=int, default=24, help="frames per sequence (default 24)")
    parser.add_argument(
        "--size", type=int, default=224, help="image side in pixels, multiple of 8 (default 224)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset described by ``args``; print a one-line summary."""
    summary = generate(
        args.out,
        sequences=args.sequences,
        cameras=args.cameras,
        frames=args.frames,
        size=args.size,
        seed=args.seed,
        quality=getattr(args, "quality", 95),
        progress=not getattr(args, "no_progress", False),
    )
    print(
        f"synth: {summary['images']} frames ({summary['sequences']} sequences x "
        f"{summary['cameras']} cameras x {summary['frames']} frames, {args.size}px) in "
        f"{summary['root']}; green screen: {summary['green_screen_sequences']}, "
        f"with object: {summary['object_sequences']}"
    )
    return 0
