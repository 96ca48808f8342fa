"""Per-frame work: decode, mask, centre-crop, resize. Each frame passes through once.

Every function returns either pixels or a skip reason; nothing here raises on bad input.
"""

from __future__ import annotations

import math
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
    """A frame ready for writing (``out``) and for flow (``flow``, at flow size), in the channel
    order it was given in (RGB, or BGR with ``prepare(..., bgr=True)``)."""

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


def read_image(path: str, bgr: bool = False) -> tuple[np.ndarray | None, str | None]:
    """Decode an image file to RGB uint8 (BGR, OpenCV's own order, with ``bgr``), or give the
    reason it cannot be used."""
    data, reason = _read(path, MISSING_IMAGE, EMPTY_FILE, READ_ERROR)
    if data is None:
        return None, reason
    if path.lower().endswith((".jpg", ".jpeg")) and not _jpeg_complete(data):
        return None, TRUNCATED_JPEG if data[:2] == b"\xff\xd8" else CORRUPT_IMAGE
    img = _decode(data, cv2.IMREAD_COLOR)
    if img is None or img.ndim != 3:
        return None, CORRUPT_IMAGE
    return (img if bgr else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)), None


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


def threshold_mask(m: np.ndarray, bgr: bool = False) -> np.ndarray:
    """A grey (or RGB, BGR with ``bgr``) uint8 mask -> 0/255: 255 where above 127."""
    if m.ndim == 3:
        m = cv2.cvtColor(m, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    return cv2.threshold(m, 127, 255, cv2.THRESH_BINARY)[1]


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


def _has_foreground(mask: np.ndarray) -> bool:
    if mask.ndim == 2 and mask.dtype == np.uint8:
        return cv2.countNonZero(mask) > 0
    return bool(mask.any())


def prepare(
    rgb: np.ndarray,
    mask: np.ndarray | None,
    spec: FrameSpec,
    *,
    bgr: bool = False,
    keep_mask: bool = True,
) -> tuple[Prepared | None, str | None]:
    """Mask, crop and resize one decoded frame (RGB; BGR with ``bgr``: the background colour is
    then given in that order). The output-size mask is made only with ``keep_mask``."""
    square = center_crop(rgb)
    out_mask = None
    if mask is not None:
        if mask.shape[:2] != rgb.shape[:2]:
            return None, MASK_SIZE
        if not _has_foreground(mask):
            return None, EMPTY_MASK
        mask = center_crop(mask)
        # the background where the mask is 0, the frame elsewhere (on the square only: the
        # pixels the crop drops are never used)
        filled = np.empty(square.shape, np.uint8)
        filled[:] = spec.bg[::-1] if bgr else spec.bg
        where = mask if mask.dtype == np.uint8 else (mask > 0).astype(np.uint8)
        square = cv2.copyTo(square, where, filled)
        if keep_mask:
            out_mask = threshold_mask(resize(mask, spec.size))
    out = resize(square, spec.size)
    # flow at --flow-size, else at the source side rounded down to a multiple of 8 (RAFT's grid)
    flow = resize(square, spec.flow_size or square.shape[0] // 8 * 8)
    return Prepared(np.ascontiguousarray(out), np.ascontiguousarray(flow), out_mask), None


MAX_GRAB_FAILURES = 32  # consecutive failed grabs before a video is taken to have ended
MAX_ID_GAP = 100_000  # the most ids a timestamp may skip, whatever the header says


def _grab(cap) -> bool:
    try:
        return bool(cap.grab())
    except Exception:  # a decoder error must not end the build
        return False


def _prop(cap, prop: int) -> float:
    """A capture property, NaN when OpenCV cannot give one."""
    try:
        v = float(cap.get(prop))
    except Exception:
        return math.nan
    return v if math.isfinite(v) else math.nan


def iter_video(
    path: str, stride: int = 1, max_failures: int = MAX_GRAB_FAILURES, bgr: bool = False
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Decode a video sequentially to its real end: (frame_id, RGB or None, reason); frames
    come in OpenCV's BGR order with ``bgr``.

    Every frame id from 0 to the last one given is yielded exactly once, in order, and no frame
    is yielded twice. Without a failed grab, ids count the frames the stream gave (timestamps
    are not trusted there: some codecs report a decoder delay as a jump, some containers shift
    them or give none); the header's frame count is not
    trusted either (it can be smaller or larger). Frames whose id is not a multiple of
    ``stride`` are grabbed but not decoded (reason ``frame_stride``); a grabbed frame that does
    not decode is ``unreadable_video_frame``.

    A failed grab is retried (never seeked past: seeking in a broken stream can return earlier
    frames again, under new ids), up to ``max_failures`` failures in a row. A frame grabbed
    after a failure is used only if it is provably new: its timestamp must be later than the
    last good frame's. It gets the id its timestamp implies (relative to the last good frame,
    at least the next id) and the ids skipped on the way are ``unreadable_video_frame``. When
    the timestamp does not advance, the frame rate is unknown or the jump is implausible, the
    stream is taken to have ended there; the caller records what the header promised beyond
    the last id (``video_stream_ended``).
    """
    try:
        cap = cv2.VideoCapture(path)
    except Exception:  # nothing readable: the caller records the header's frames
        return
    try:
        if not cap.isOpened():
            return
        fps = _prop(cap, cv2.CAP_PROP_FPS)
        header = _prop(cap, cv2.CAP_PROP_FRAME_COUNT)
        header = int(header) if header > 0 else 0
        last_id, last_ms = -1, -math.inf  # the last frame grabbed (none yet)
        failed = 0
        while True:
            if not _grab(cap):
                failed += 1
                if failed >= max_failures:
                    return
                continue
            if failed:
                ms = _prop(cap, cv2.CAP_PROP_POS_MSEC)
                if not (fps > 0 and ms > last_ms):  # NaN compares False: not provably new
                    return
                if last_id < 0:  # nothing good before: the timestamp counts from 0
                    fid = max(0, round(ms * fps / 1000))
                else:
                    fid = max(last_id + 1, last_id + round((ms - last_ms) * fps / 1000))
                if fid - last_id - 1 > max(failed, min(header - last_id - 1, MAX_ID_GAP)):
                    return  # more frames lost than failures and than the header promised
                for gap in range(last_id + 1, fid):
                    yield gap, None, UNREADABLE_VIDEO_FRAME
                failed = 0
            else:
                fid = last_id + 1
            last_id = fid
            last_ms = _prop(cap, cv2.CAP_PROP_POS_MSEC)
            if fid % stride:
                yield fid, None, "frame_stride"
                continue
            try:
                ok, img = cap.retrieve()
            except Exception:
                ok, img = False, None
            if ok and img is not None and img.ndim == 3 and img.size:
                yield fid, (img if bgr else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)), None
            else:
                yield fid, None, UNREADABLE_VIDEO_FRAME
    finally:
        cap.release()


def video_header(path: str) -> tuple[bool, int, int]:
    """(opened, header frame count, min(width, height)) of a video; never raises.

    The count may be wrong (0 when unknown or negative); the side is 0 when unknown.
    """
    try:
        cap = cv2.VideoCapture(path)
    except Exception:
        return False, 0, 0
    try:
        if not cap.isOpened():
            return False, 0, 0
        n = _prop(cap, cv2.CAP_PROP_FRAME_COUNT)
        side = min(_prop(cap, cv2.CAP_PROP_FRAME_WIDTH), _prop(cap, cv2.CAP_PROP_FRAME_HEIGHT))
        return True, int(n) if n > 0 else 0, int(side) if side > 0 else 0
    finally:
        cap.release()
