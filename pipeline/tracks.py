"""Stage 1: one track in, its prepared frames and pair flows out, cached on disk.

Each kept frame is decoded, masked, resized and PNG-encoded once; each adjacent pair of kept
frames gets its flow once. Frames stream through: a CPU flow backend sees each pair as soon as
its second frame is ready (two frames held at a time), and a RAFT actor gets a clip's frames in
bounded chunks, so no task holds a whole video. A frame that fails ends the clip it was in.

The cache of a track (``frames.bin``, optional ``masks.bin`` and ``flow.npy``, then
``meta.json`` as the commit marker) lets a killed build resume without redoing finished tracks.
A cache is reused only when its key (the track's input files, every option that changes
frames or flow, and ``CACHE_VERSION``) still matches, so plan-only options (seed, window, shard
size, ...) reuse it and a restored or changed input file is processed again. An entry written
before per-pair magnitudes were recorded (``CACHE_VERSION`` 2, shard spec 1.0: no
``pair_mag``) is a miss: its track is processed again, once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline import frames as fr
from pipeline.flow import downsample_flow, pair_values
from pipeline.sources import FRAME_STRIDE, Track, numbered_images
from shards_spec.atomic import atomic_write_bytes
from shards_spec.format import MAG_ATOL, MAG_RTOL
from shards_spec.writer import atomic_write_json, encode_png

META = "meta.json"  # written last: the commit marker
FRAMES_FILE = "frames.bin"  # the PNG bytes of the kept frames, back to back
MASKS_FILE = "masks.bin"  # the PNG bytes of their masks (--keep-mask)
FLOW_FILE = "flow.npy"  # the stored flow fields, pair order (--keep-flow)
CACHE_VERSION = 3  # 3: meta.json records pair_mag (mean |F| per pair) beside pair_msq

# (frame_id, source path, rgb, reason, mask, mask_reason)
Decoded = tuple[int, str, "np.ndarray | None", "str | None", "np.ndarray | None", "str | None"]


@dataclass(frozen=True)
class TrackOptions:
    spec: fr.FrameSpec
    keep_mask: bool = False
    keep_flow: int = 0  # side of the stored flow field; 0 = do not store
    flow: str = "dis"  # backend name (part of the cache key)
    flow_id: str = ""  # what else identifies the flow values (RAFT weights, precision, iters)

    def cache_key(self, track: Track) -> str:
        h = hashlib.sha256(
            json.dumps(
                {"v": CACHE_VERSION, "opts": asdict(self), "track": asdict(track)},
                sort_keys=True,
                default=str,
            ).encode()
        )
        return h.hexdigest()


def track_dir(cache: Path, track: Track) -> Path:
    return Path(cache) / track.track_id


def load_meta(cache: Path, track: Track, opts: TrackOptions) -> dict | None:
    """The committed result of a track, or None when it must be (re)computed."""
    p = track_dir(cache, track) / META
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("cache_key") != opts.cache_key(track) or meta.get("retry"):
        return None
    if not isinstance(meta.get("pair_mag"), list):  # written before flow_mag: recompute
        return None
    if not _well_formed(meta):  # edited or damaged: recompute rather than build on it
        return None
    return meta


def _pair_list(values, n: int) -> np.ndarray | None:
    """One clip's per-pair values as float64, or None unless they are ``n`` finite numbers >= 0
    (JSON numbers: no strings, nulls, booleans or nested lists)."""
    if not isinstance(values, list) or len(values) != n:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return None
    arr = np.asarray(values, np.float64)
    return arr if np.isfinite(arr).all() and (arr >= 0).all() else None


def _well_formed(meta: dict) -> bool:
    """Whether a cache entry's clips and per-pair values fit together: every clip a
    [start, end) range of ``frames``, with ``end - start - 1`` values in ``pair_msq`` and in
    ``pair_mag``, all finite numbers >= 0, and flow_mag^2 <= flow_msq per pair (Jensen; the
    validator's tolerance). The plan lays the pairs of all tracks out by these lengths, so an
    entry that breaks them would shift or leave unset the values of other windows."""
    frames, clips = meta.get("frames"), meta.get("clips")
    msq, mag = meta.get("pair_msq"), meta.get("pair_mag")
    if not all(isinstance(x, list) for x in (frames, clips, msq, mag)):
        return False
    if not len(clips) == len(msq) == len(mag):
        return False
    for clip, m, g in zip(clips, msq, mag, strict=True):
        if not (isinstance(clip, list) and len(clip) == 2
                and all(isinstance(c, int) and not isinstance(c, bool) for c in clip)):  # fmt: skip
            return False
        start, end = clip
        if not 0 <= start < end <= len(frames):
            return False
        m, g = _pair_list(m, end - start - 1), _pair_list(g, end - start - 1)
        if m is None or g is None or (g * g > m * (1 + MAG_RTOL) + MAG_ATOL).any():
            return False
    return True


def _inputs(track: Track, bgr: bool = False) -> Iterator[Decoded]:
    """Every input frame of the track, in order, decoded lazily, with its mask (frames in RGB,
    or in OpenCV's BGR order with ``bgr``)."""
    if track.kind == "video":
        yield from _video_inputs(track, bgr)
        return
    for i, fid in enumerate(track.ids):
        path = track.frame_path(i)
        rgb, reason = fr.read_image(path, bgr)
        mask, mask_reason = (None, None)
        if track.mask_dir is not None and reason is None:
            mask, mask_reason = fr.read_mask(track.mask_path(i))
        yield fid, path, rgb, reason, mask, mask_reason


def _video_inputs(track: Track, bgr: bool = False) -> Iterator[Decoded]:
    """Every frame id of a video, in order, with its mask (by frame id, never by position)."""
    masks: Iterator | None = None
    mask_files: dict[int, str] | None = None
    if track.mask_video is not None:
        if os.path.isdir(track.mask_video):
            mask_files = numbered_images(track.mask_video).by_id
        else:
            masks = fr.iter_video(track.mask_video, track.stride, bgr=bgr)
    pending = (-1, None, None)  # the mask video's next frame not yet matched; None: it ended
    n = 0
    for fid, rgb, reason in fr.iter_video(track.dir, track.stride, bgr=bgr):
        n = fid + 1
        mask, mask_reason = None, None
        if masks is not None:
            while pending is not None and pending[0] < fid:
                pending = next(masks, None)
            if pending is None or pending[0] != fid:
                mask_reason = fr.MISSING_MASK
            elif pending[1] is not None:
                mask = fr.threshold_mask(pending[1], bgr)
            elif reason is None:
                mask_reason = fr.CORRUPT_MASK
        elif mask_files is not None and reason is None:
            name = mask_files.get(fid)
            mask, mask_reason = fr.read_mask(
                None if name is None else os.path.join(track.mask_video, name)
            )
        yield fid, track.dir, rgb, reason, mask, mask_reason
    if masks is not None:
        masks.close()  # release the mask video now, not when collected
    # The header promised more frames than the stream gave: account for every one of them.
    for fid in range(n, track.expected):
        yield fid, track.dir, None, fr.VIDEO_STREAM_ENDED, None, None


class _Clips:
    """Kept frames of a track grouped into clips (runs of consecutive good frames)."""

    def __init__(self, keep_flow: int):
        self.kept: list[list[int]] = []  # [frame_id, offset, length(, mask_offset, mask_length)]
        self.clips: list[list[int]] = []  # [start, end) into kept
        self.msq: list[list[float]] = []  # per clip, per adjacent pair: mean |F|^2
        self.mag: list[list[float]] = []  # per clip, per adjacent pair: mean |F|
        self.stored: list[np.ndarray] = []  # downsampled flow fields, pair order
        self.keep_flow = keep_flow
        self.open = False

    def add(self, entry: list[int]) -> bool:
        """Add a kept frame; True when it continues the current clip (``self.current``)."""
        self.kept.append(entry)
        cont = self.open
        if not cont:
            self.clips.append([len(self.kept) - 1, len(self.kept)])
            self.msq.append([])
            self.mag.append([])
            self.open = True
        self.clips[-1][1] = len(self.kept)
        return cont

    @property
    def current(self) -> int:
        return len(self.clips) - 1

    def add_pair(self, clip: int, msq: float, mag: float, stored: np.ndarray | None) -> None:
        self.msq[clip].append(float(msq))
        self.mag[clip].append(float(mag))
        if self.keep_flow and stored is not None:
            self.stored.append(stored)


class CpuPairs:
    """Flow of each pair as soon as its second frame arrives (DIS, Farneback).

    ``push`` takes each kept frame at flow size in BGR order, as :func:`process_track` has it.
    """

    def __init__(self, flow, keep_flow: int):
        self.flow, self.keep_flow = flow, keep_flow
        self.prev = None

    def push(self, clips: _Clips, continues: bool, frame: np.ndarray) -> None:
        cur = self.flow.prepare(frame, bgr=True)
        if continues:
            field = self.flow.calc(self.prev, cur)
            stored = downsample_flow(field, self.keep_flow) if self.keep_flow else None
            clips.add_pair(clips.current, *pair_values(field), stored)
        self.prev = cur

    def finish(self, clips: _Clips) -> None:
        self.prev = None


class ChunkedPairs:
    """Flow on a remote estimator (a RAFT actor): each clip's frames go in bounded chunks.

    ``submit(frames) -> handle`` starts the flow of the pairs of consecutive ``frames``;
    ``fetch(handle) -> (msq list, mag list, stored fields or None)`` waits for it. Chunks
    overlap by one frame so every pair is computed once; at most ``depth`` chunks are in
    flight. ``push`` takes BGR frames, as :func:`process_track` has them; ``submit`` gets them
    in RGB.
    """

    def __init__(self, submit, fetch, chunk: int = 32, depth: int = 2):
        self.submit, self.fetch = submit, fetch
        self.chunk, self.depth = max(2, chunk), max(1, depth)
        self.buf: list[np.ndarray] = []
        self.clip: int | None = None
        self.pending: list[tuple[int, object]] = []

    def push(self, clips: _Clips, continues: bool, frame: np.ndarray) -> None:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)  # RAFT reads RGB
        if not continues:  # a new clip: flush what is left of the previous one
            self._flush(clips)
            self.clip, self.buf = clips.current, [frame]
            return
        self.buf.append(frame)
        if len(self.buf) >= self.chunk:
            self._flush(clips)
            self.buf = [frame]

    def _flush(self, clips: _Clips) -> None:
        if len(self.buf) >= 2 and self.clip is not None:
            self.pending.append((self.clip, self.submit(list(self.buf))))
        self.buf = []
        while len(self.pending) > self.depth:
            self._collect(clips)

    def _collect(self, clips: _Clips) -> None:
        clip, handle = self.pending.pop(0)
        msqs, mags, stored = self.fetch(handle)
        for i, (m, g) in enumerate(zip(msqs, mags, strict=True)):
            clips.add_pair(clip, m, g, None if stored is None else stored[i])

    def finish(self, clips: _Clips) -> None:
        self._flush(clips)
        while self.pending:
            self._collect(clips)


def process_track(cache: Path, track: Track, opts: TrackOptions, pairs) -> dict:
    """Decode, mask, resize and encode every frame; flow on every adjacent kept pair; commit.

    ``pairs`` is a :class:`CpuPairs` or :class:`ChunkedPairs`. Returns the committed meta.
    """
    tdir = track_dir(cache, track)
    tdir.mkdir(parents=True, exist_ok=True)
    frames, masks = bytearray(), bytearray()
    clips = _Clips(opts.keep_flow)
    skipped: list[list] = []
    n_input = 0
    shape = None  # (h, w) of the track's first usable frame
    flow_side = 0
    # frames stay in OpenCV's BGR order from decode to PNG (one colour conversion per frame: to
    # grey for the CPU flow)
    for fid, path, img, reason, mask, mask_reason in _inputs(track, bgr=True):
        n_input += 1
        if reason == FRAME_STRIDE:  # left out by --frame-stride: no gap in the kept sequence
            skipped.append([path, fid, reason])
            continue
        prepared = None
        if reason is None:
            reason = mask_reason
        if reason is None and shape is not None and img.shape[:2] != shape:
            reason = fr.FRAME_SIZE
        if reason is None:
            prepared, reason = fr.prepare(img, mask, opts.spec, bgr=True, keep_mask=opts.keep_mask)
        if prepared is None:
            skipped.append([path, fid, reason])
            clips.open = False
            continue
        shape = shape or img.shape[:2]
        png = encode_png(prepared.out, bgr=True)
        entry = [fid, len(frames), len(png)]
        frames += png
        if opts.keep_mask and prepared.mask is not None:
            mpng = encode_png(prepared.mask)
            entry += [len(masks), len(mpng)]
            masks += mpng
        flow_side = flow_side or int(prepared.flow.shape[0])
        pairs.push(clips, clips.add(entry), prepared.flow)
    pairs.finish(clips)
    atomic_write_bytes(tdir / FRAMES_FILE, bytes(frames))
    if masks:
        atomic_write_bytes(tdir / MASKS_FILE, bytes(masks))
    if opts.keep_flow:
        side = opts.keep_flow
        arr = np.stack(clips.stored) if clips.stored else np.zeros((0, 2, side, side), np.float16)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(tdir / FLOW_FILE, buf.getvalue())
    meta = {
        "track_id": track.track_id,
        "cache_key": opts.cache_key(track),
        "frames": clips.kept,
        "clips": clips.clips,
        "pair_msq": clips.msq,
        "pair_mag": clips.mag,
        "skipped": skipped,
        "n_input": n_input,
        "has_masks": bool(masks),
        "flow_side": flow_side,
        "retry": any(r in fr.TRANSIENT for _, _, r in skipped),
    }
    atomic_write_json(tdir / META, meta)
    return meta
