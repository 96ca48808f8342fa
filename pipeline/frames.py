"""Per-frame work: decode, mask, centre-crop, resize. Each frame passes through once.

Every function returns either pixels or a skip reason; nothing here raises on bad input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Skip reasons, as recorded in skipped.parquet and counted in the summary.
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_JPEG = "truncated_jpeg"
MISSING_IMAGE = "missing_image"
MISSING_MASK = "missing_mask"
CORRUPT_MASK = "corrupt_mask"
EMPTY_MASK = "empty_mask"
MASK_SIZE = "mask_size_mismatch"
UNREADABLE_VIDEO_FRAME = "unreadable_video_frame"
FRAME_SIZE = "frame_size_mismatch"

BG_NAMES = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}


def parse_bg(spec: str) -> tuple[int, int, int]:
    """'black' | 'white' | 'gray' | 'R,G,B' -> an RGB triple."""
    if spec in BG_NAMES:
        return BG_NAMES[spec]
    parts = spec.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        raise ValueError(f"--bg must be black, white, gray or R,G,B (0-255), not {spec!r}")
    r, g, b = (int(p) for p in parts)
    return r, g, b


@dataclass(frozen=True)
class FrameSpec:
    size: int  # output side
    flow_size: int | None  # flow side; None: the cropped source side (down to a multiple of 8)
    bg: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Prepared:
    """A frame ready for writing (``out``, RGB) and for flow (``flow``, RGB at flow size)."""

    out: np.ndarray
    flow: np.ndarray
    mask: np.ndarray | None  # output-size uint8 0/255, when a mask was applied


def read_image(path: str) -> tuple[np.ndarray | None, str | None]:
    """Decode an image file to RGB uint8, or give the reason it cannot be used."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, MISSING_IMAGE
    except OSError:
        return None, CORRUPT_IMAGE
    if path.lower().endswith((".jpg", ".jpeg")) and not _jpeg_complete(data):
        return None, TRUNCATED_JPEG
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return None, CORRUPT_IMAGE
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), None


def _jpeg_complete(data: bytes) -> bool:
    """A JPEG starts with SOI and ends with EOI (trailing padding allowed)."""
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" in data.rstrip(b"\x00\r\n ")[-2:]


def read_mask(path: str | None) -> tuple[np.ndarray | None, str | None]:
    """Decode a JPEG/PNG mask and threshold it at half intensity (JPEG edges are soft)."""
    if path is None:
        return None, None
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, MISSING_MASK
    m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if m is None or (path.lower().endswith((".jpg", ".jpeg")) and not _jpeg_complete(data)):
        return None, CORRUPT_MASK
    return threshold_mask(m), None


def threshold_mask(m: np.ndarray) -> np.ndarray:
    if m.ndim == 3:
        m = cv2.cvtColor(m, cv2.COLOR_RGB2GRAY)
    return np.where(m > 127, 255, 0).astype(np.uint8)


def center_crop(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return img[y : y + s, x : x + s]


def resize(img: np.ndarray, side: int) -> np.ndarray:
    if img.shape[0] == side and img.shape[1] == side:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > side else cv2.INTER_LINEAR
    return cv2.resize(img, (side, side), interpolation=interp)


def prepare(
    rgb: np.ndarray, mask: np.ndarray | None, spec: FrameSpec
) -> tuple[Prepared | None, str | None]:
    """Mask, crop and resize one decoded frame."""
    if mask is not None:
        if mask.shape[:2] != rgb.shape[:2]:
            return None, MASK_SIZE
        if not mask.any():
            return None, EMPTY_MASK
        rgb = np.where(mask[..., None] > 0, rgb, np.asarray(spec.bg, np.uint8))
        mask = center_crop(mask)
    square = center_crop(rgb)
    out = resize(square, spec.size)
    # flow at --flow-size, else at the source side rounded down to a multiple of 8 (RAFT's grid)
    flow = resize(square, spec.flow_size or square.shape[0] // 8 * 8)
    out_mask = None
    if mask is not None:
        out_mask = np.where(resize(mask, spec.size) > 127, 255, 0).astype(np.uint8)
    return Prepared(np.ascontiguousarray(out), np.ascontiguousarray(flow), out_mask), None


def iter_video(path: str, frame_ids: list[int]) -> Iterator[tuple[int, np.ndarray | None]]:
    """Decode the wanted frames of a video sequentially: (frame_id, RGB or None if unreadable)."""
    wanted = set(frame_ids)
    last = max(frame_ids) if frame_ids else -1
    cap = cv2.VideoCapture(path)
    try:
        i = 0
        while i <= last:
            ok = cap.grab()
            if not ok:
                # A failed grab in the middle of a stream: report it and try to go on.
                if i in wanted:
                    yield i, None
                i += 1
                if not cap.set(cv2.CAP_PROP_POS_FRAMES, i):
                    break
                continue
            if i in wanted:
                ok, img = cap.retrieve()
                yield i, cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if ok and img is not None else None
            i += 1
        for j in sorted(f for f in wanted if f >= i):  # stream ended early
            yield j, None
    finally:
        cap.release()
