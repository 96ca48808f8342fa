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
VIDEO_STREAM_ENDED = "video_stream_ended"  # the header promised frames the stream never gave
FRAME_SIZE = "frame_size_mismatch"
EMPTY_FILE = "empty_file"  # zero bytes: an interrupted download or copy
EMPTY_MASK_FILE = "empty_mask_file"
READ_ERROR = "read_error"  # an I/O error: worth retrying on the next run
MASK_READ_ERROR = "mask_read_error"
TRANSIENT = frozenset({READ_ERROR, MASK_READ_ERROR})

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


def _read(path: str, missing: str, empty: str, error: str) -> tuple[bytes | None, str | None]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, missing
    except IsADirectoryError:
        return None, missing
    except OSError:
        return None, error
    return (data, None) if data else (None, empty)


def _decode(data: bytes, flags: int) -> np.ndarray | None:
    """cv2.imdecode that never raises: whatever the decoder does with bad bytes, None."""
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except Exception:  # OpenCV asserts on some inputs (e.g. empty buffers in OpenCV 5)
        return None
    return img if img is not None and img.size else None


def read_image(path: str) -> tuple[np.ndarray | None, str | None]:
    """Decode an image file to RGB uint8, or give the reason it cannot be used."""
    data, reason = _read(path, MISSING_IMAGE, EMPTY_FILE, READ_ERROR)
    if data is None:
        return None, reason
    if path.lower().endswith((".jpg", ".jpeg")) and not _jpeg_complete(data):
        return None, TRUNCATED_JPEG
    img = _decode(data, cv2.IMREAD_COLOR)
    if img is None or img.ndim != 3:
        return None, CORRUPT_IMAGE
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), None


def _jpeg_complete(data: bytes) -> bool:
    """A JPEG starts with SOI and ends with EOI (trailing padding allowed)."""
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" in data.rstrip(b"\x00\r\n ")[-2:]


def read_mask(path: str | None) -> tuple[np.ndarray | None, str | None]:
    """Decode a JPEG/PNG mask and threshold it at half intensity (JPEG edges are soft)."""
    if path is None:
        return None, MISSING_MASK
    data, reason = _read(path, MISSING_MASK, EMPTY_MASK_FILE, MASK_READ_ERROR)
    if data is None:
        return None, reason
    m = _decode(data, cv2.IMREAD_GRAYSCALE)
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


def iter_video(path: str, stride: int = 1) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Decode a video sequentially to its real end: (frame_id, RGB or None, reason).

    Frame ids count the frames the stream actually gave, in order; the header's frame count is
    not trusted (it can be smaller or larger). Frames that are not a multiple of ``stride`` are
    grabbed but not decoded (reason ``frame_stride``). A frame whose data does not decode is
    ``unreadable_video_frame`` and decoding goes on with the next one; a failed grab ends the
    stream: OpenCV cannot tell a broken stream from its end, and seeking past the break can
    return earlier frames again under new ids, so nothing after it is used. The caller records
    what the header promised beyond that point (``video_stream_ended``).
    """
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            return
        i = 0
        while True:
            try:
                ok = cap.grab()
            except Exception:
                ok = False
            if not ok:
                return
            if i % stride:
                yield i, None, "frame_stride"
            else:
                try:
                    ok, img = cap.retrieve()
                except Exception:
                    ok, img = False, None
                if ok and img is not None and img.ndim == 3 and img.size:
                    yield i, cv2.cvtColor(img, cv2.COLOR_BGR2RGB), None
                else:
                    yield i, None, UNREADABLE_VIDEO_FRAME
            i += 1
    finally:
        cap.release()


def video_frame_count(path: str) -> int:
    """The header's frame count (may be wrong; 0 when unknown)."""
    cap = cv2.VideoCapture(path)
    try:
        return max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))) if cap.isOpened() else 0
    finally:
        cap.release()
