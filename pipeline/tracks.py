"""Stage 1: one track in, its prepared frames and pair flows out, cached on disk.

Each kept frame is decoded, masked, resized and PNG-encoded once; each adjacent pair of kept
frames gets its flow once. A frame that fails ends the clip it was in. The cache of a track
(``frames.bin``, optional ``masks.bin`` and ``flow.npy``, then ``meta.json`` as the commit
marker) lets a killed build resume without redoing finished tracks.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import frames as fr
from pipeline.flow import downsample_flow, flow_msq
from pipeline.sources import IMAGE_EXTENSIONS, Track
from shards_spec.writer import atomic_write_bytes, atomic_write_json, encode_png

META = "meta.json"


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


def _decoded(track: Track) -> list[tuple[int, np.ndarray | None, str | None]]:
    """(frame_id, rgb, reason) for every frame of the track, in order."""
    if track.kind == "video":
        ids = [f.frame_id for f in track.frames]
        return [
            (fid, img, None if img is not None else fr.UNREADABLE_VIDEO_FRAME)
            for fid, img in fr.iter_video(track.frames[0].path, ids)
        ]
    out = []
    for f in track.frames:
        img, reason = fr.read_image(f.path)
        out.append((f.frame_id, img, reason))
    return out


def _masks(track: Track) -> dict[int, tuple[np.ndarray | None, str | None]]:
    if track.mask_video is None:
        return {f.frame_id: fr.read_mask(f.mask_path) for f in track.frames}
    if os.path.isdir(track.mask_video):
        files = sorted(
            p for p in Path(track.mask_video).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        return {
            f.frame_id: fr.read_mask(str(files[f.frame_id]))
            if f.frame_id < len(files)
            else (None, fr.MISSING_MASK)
            for f in track.frames
        }
    ids = [f.frame_id for f in track.frames]
    return {
        fid: ((fr.threshold_mask(m), None) if m is not None else (None, fr.MISSING_MASK))
        for fid, m in fr.iter_video(track.mask_video, ids)
    }


class TrackWriter:
    """Accumulates one track's encoded frames and commits the cache."""

    def __init__(self, work: Path, track: Track):
        self.dir = track_dir(work, track)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.frames = bytearray()
        self.masks = bytearray()

    def add(self, png: bytes, mask_png: bytes | None) -> list[int]:
        entry = [len(self.frames), len(png)]
        self.frames += png
        if mask_png is not None:
            entry += [len(self.masks), len(mask_png)]
            self.masks += mask_png
        return entry


def process_frames(
    work: Path, track: Track, opts: TrackOptions
) -> tuple[dict, list[list[np.ndarray]]]:
    """Stage 1a for one track. See :func:`commit_flow` for stage 1b."""
    masks = _masks(track) if _has_masks(track) else {}
    paths = {f.frame_id: f.path for f in track.frames}
    writer = TrackWriter(work, track)
    kept: list[list[int]] = []  # [frame_id, offset, length(, mask_offset, mask_length)]
    clips: list[list[int]] = []  # [start, end) indices into kept
    flow_frames: list[list[np.ndarray]] = []
    skipped: list[list] = []
    run_open = False
    for fid, rgb, reason in _decoded(track):
        prepared = None
        if reason is None:
            mask, reason = masks.get(fid, (None, None))
            if reason is None:
                prepared, reason = fr.prepare(rgb, mask, opts.spec)
        if prepared is None:
            skipped.append([paths[fid], fid, reason])
            run_open = False
            continue
        mask_png = (
            encode_png(prepared.mask) if opts.keep_mask and prepared.mask is not None else None
        )
        kept.append([fid, *writer.add(encode_png(prepared.out), mask_png)])
        if not run_open:
            clips.append([len(kept) - 1, len(kept)])
            flow_frames.append([])
            run_open = True
        clips[-1][1] = len(kept)
        flow_frames[-1].append(prepared.flow)
    atomic_write_bytes(writer.dir / "frames.bin", bytes(writer.frames))
    if writer.masks:
        atomic_write_bytes(writer.dir / "masks.bin", bytes(writer.masks))
    meta = {
        "track_id": track.track_id,
        "frames": kept,
        "clips": clips,
        "skipped": skipped,
        "n_input": len(track.frames),
        "has_masks": bool(writer.masks),
        "flow_side": int(flow_frames[0][0].shape[0]) if flow_frames else 0,
    }
    return meta, flow_frames


def _has_masks(track: Track) -> bool:
    return track.mask_video is not None or any(f.mask_path for f in track.frames)


def commit_flow(
    work: Path, track: Track, meta: dict, flows: Sequence[Sequence[np.ndarray]], keep_flow: int
) -> dict:
    """Stage 1b: attach per-pair flow_msq (and stored fields) to a track and commit it."""
    msq: list[list[float]] = []
    stored: list[np.ndarray] = []
    for clip_flows in flows:
        msq.append([flow_msq(f) for f in clip_flows])
        if keep_flow:
            stored.extend(downsample_flow(f, keep_flow) for f in clip_flows)
    tdir = track_dir(work, track)
    if keep_flow:
        arr = np.stack(stored) if stored else np.zeros((0, 2, keep_flow, keep_flow), np.float16)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(tdir / "flow.npy", buf.getvalue())
    meta = {**meta, "pair_msq": msq}
    atomic_write_json(tdir / META, meta)
    return meta


def process_track(
    work: Path, track: Track, opts: TrackOptions, flow_pairs: Callable | None
) -> tuple[dict, list[list[np.ndarray]] | None]:
    """Run a whole track in this process when ``flow_pairs`` is given (CPU flow backends);
    otherwise prepare its frames and hand back the flow frames for a flow actor."""
    meta, flow_frames = process_frames(work, track, opts)
    if flow_pairs is None:
        return meta, flow_frames
    flows = [flow_pairs(clip) if len(clip) > 1 else [] for clip in flow_frames]
    return commit_flow(work, track, meta, flows, opts.keep_flow), None
