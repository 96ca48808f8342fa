"""Stage 1: one track in, its prepared frames and pair flows out, cached on disk.

Each kept frame is decoded, masked, resized and PNG-encoded once; each adjacent pair of kept
frames gets its flow once. Frames stream through: a CPU flow backend sees each pair as soon as
its second frame is ready, so a task holds two frames at a time, not a whole video. A frame that
fails ends the clip it was in. The cache of a track (``frames.bin``, optional ``masks.bin`` and
``flow.npy``, then ``meta.json`` as the commit marker) lets a killed build resume without
redoing finished tracks.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import frames as fr
from pipeline.flow import OpenCVFlow, downsample_flow, flow_msq
from pipeline.sources import IMAGE_EXTENSIONS, Track
from shards_spec.writer import atomic_write_bytes, atomic_write_json, encode_png

META = "meta.json"

Decoded = tuple[int, "np.ndarray | None", "str | None"]


@dataclass(frozen=True)
class TrackOptions:
    spec: fr.FrameSpec
    keep_mask: bool = False
    keep_flow: int = 0  # side of the stored flow field; 0 = do not store


def track_dir(work: Path, track: Track) -> Path:
    return Path(work) / "tracks" / track.track_id


def load_meta(work: Path, track: Track) -> dict | None:
    """The committed result of a track, or None when it has not finished."""
    p = track_dir(work, track) / META
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _frames(track: Track) -> Iterator[Decoded]:
    """(frame_id, rgb, reason) for every frame of the track, in order, decoded lazily."""
    if track.kind == "video":
        ids = [f.frame_id for f in track.frames]
        for fid, img in fr.iter_video(track.frames[0].path, ids):
            yield fid, img, None if img is not None else fr.UNREADABLE_VIDEO_FRAME
        return
    for f in track.frames:
        yield (f.frame_id, *fr.read_image(f.path))


def _masks(track: Track) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """The mask of every frame (None, None when the track has no masks), aligned with _frames."""
    if track.mask_video is None:
        for f in track.frames:
            yield fr.read_mask(f.mask_path)
    elif os.path.isdir(track.mask_video):
        files = sorted(
            p for p in Path(track.mask_video).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        for f in track.frames:
            yield (
                fr.read_mask(str(files[f.frame_id]))
                if f.frame_id < len(files)
                else (
                    None,
                    fr.MISSING_MASK,
                )
            )
    else:
        ids = [f.frame_id for f in track.frames]
        for _, m in fr.iter_video(track.mask_video, ids):
            yield (fr.threshold_mask(m), None) if m is not None else (None, fr.MISSING_MASK)


class _Clips:
    """Kept frames of a track grouped into clips (runs of consecutive good frames)."""

    def __init__(self, keep_flow: int):
        self.kept: list[list[int]] = []  # [frame_id, offset, length(, mask_offset, mask_length)]
        self.clips: list[list[int]] = []  # [start, end) into kept
        self.msq: list[list[float]] = []  # per clip, per adjacent pair
        self.flow_frames: list[list[np.ndarray]] = []  # per clip, when flow runs elsewhere
        self.stored: list[np.ndarray] = []  # downsampled flow fields, pair order
        self.keep_flow = keep_flow
        self.open = False

    def add(self, entry: list[int]) -> bool:
        """Add a kept frame; True when it continues the current clip."""
        self.kept.append(entry)
        cont = self.open
        if not cont:
            self.clips.append([len(self.kept) - 1, len(self.kept)])
            self.msq.append([])
            self.flow_frames.append([])
            self.open = True
        self.clips[-1][1] = len(self.kept)
        return cont

    def add_flow(self, field: np.ndarray) -> None:
        self.msq[-1].append(flow_msq(field))
        if self.keep_flow:
            self.stored.append(downsample_flow(field, self.keep_flow))


def process_track(
    work: Path, track: Track, opts: TrackOptions, flow: OpenCVFlow | None = None
) -> tuple[dict, list[list[np.ndarray]] | None]:
    """Decode, mask, resize and encode every frame, writing frames.bin (and masks.bin).

    With a CPU ``flow`` the pairs are computed here and the track is committed: returns
    (meta, None). Without, returns the uncommitted meta and each clip's flow-resolution frames,
    for a flow actor to finish with :func:`commit_flow`.
    """
    tdir = track_dir(work, track)
    tdir.mkdir(parents=True, exist_ok=True)
    frames, masks = bytearray(), bytearray()
    clips = _Clips(opts.keep_flow)
    skipped: list[list] = []
    paths = {f.frame_id: f.path for f in track.frames}
    prev = None
    flow_side = 0
    for (fid, rgb, reason), (mask, mask_reason) in zip(_frames(track), _masks(track), strict=True):
        prepared = None
        if reason is None:
            reason = mask_reason
            if reason is None:
                prepared, reason = fr.prepare(rgb, mask, opts.spec)
        if prepared is None:
            skipped.append([paths[fid], fid, reason])
            clips.open = False
            continue
        png = encode_png(prepared.out)
        entry = [fid, len(frames), len(png)]
        frames += png
        if opts.keep_mask and prepared.mask is not None:
            mpng = encode_png(prepared.mask)
            entry += [len(masks), len(mpng)]
            masks += mpng
        flow_side = flow_side or int(prepared.flow.shape[0])
        continues = clips.add(entry)
        if flow is None:
            clips.flow_frames[-1].append(prepared.flow)
            continue
        cur = flow.prepare(prepared.flow)
        if continues:
            clips.add_flow(flow.calc(prev, cur))
        prev = cur
    atomic_write_bytes(tdir / "frames.bin", bytes(frames))
    if masks:
        atomic_write_bytes(tdir / "masks.bin", bytes(masks))
    meta = {
        "track_id": track.track_id,
        "frames": clips.kept,
        "clips": clips.clips,
        "skipped": skipped,
        "n_input": len(track.frames),
        "has_masks": bool(masks),
        "flow_side": flow_side,
    }
    if flow is None:
        return meta, clips.flow_frames
    return _commit(tdir, meta, clips), None


def commit_flow(
    work: Path, track: Track, meta: dict, flows: Sequence[Sequence[np.ndarray]], keep_flow: int
) -> dict:
    """Attach the flow fields computed elsewhere (one list per clip) and commit the track."""
    clips = _Clips(keep_flow)
    for clip_flows in flows:
        clips.msq.append([])
        for field in clip_flows:
            clips.add_flow(field)
    return _commit(track_dir(work, track), meta, clips)


def _commit(tdir: Path, meta: dict, clips: _Clips) -> dict:
    if clips.keep_flow:
        side = clips.keep_flow
        arr = np.stack(clips.stored) if clips.stored else np.zeros((0, 2, side, side), np.float16)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(tdir / "flow.npy", buf.getvalue())
    meta = {**meta, "pair_msq": clips.msq}
    atomic_write_json(tdir / META, meta)
    return meta
