"""Source adapters: turn a dataset on disk into tracks, before any pixel is read.

A *track* is one run of frames that should be consecutive in the source (a HanCo
(sequence, camera) run of consecutive frame ids, or one video). Frames that later fail to
decode split a track into several clips; see :mod:`pipeline.tracks`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SOURCES = ("handco", "synthetic", "video")


class SourceError(ValueError):
    """A source that cannot be read at all (missing root, empty dataset, bad option)."""


@dataclass(frozen=True)
class FrameRef:
    """One input frame: where its pixels and (optional) mask live."""

    frame_id: int
    path: str  # image file, or the video file for video tracks
    mask_path: str | None = None


@dataclass(frozen=True)
class Track:
    """A run of frames that should be consecutive; the unit of parallel work."""

    track_id: str  # key-safe: [A-Za-z0-9_-]
    prefix: str  # sample keys and clip ids are f"{prefix}-{frame_id:08d}"
    source: str
    kind: str  # "images" or "video"
    frames: tuple[FrameRef, ...]
    sequence: int | None = None
    camera: int | None = None
    subject: str | None = None
    object: str | None = None
    mask_video: str | None = None  # video tracks: a mask video with the same frame count
    group: str = ""  # what the train/val split keys on (sequence or subject)

    def key(self, frame_id: int) -> str:
        """Sample key of the window starting at ``frame_id`` (no dots)."""
        return f"{self.prefix}-{frame_id:08d}"


@dataclass(frozen=True)
class Excluded:
    """An input frame left out by selection (not an error): recorded, never silently lost."""

    path: str
    track_id: str
    frame_id: int
    reason: str


@dataclass
class Discovery:
    tracks: list[Track]
    excluded: list[Excluded]
    fingerprint: str
    root: str


def safe_name(name: str) -> str:
    """A string usable in a sample key: letters, digits, '_' and '-' only."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return cleaned or "clip"


def _fingerprint(root: Path, files: Sequence[Path]) -> str:
    """Hash of relative paths and sizes: changes when the dataset does, cheap to compute."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


def _consecutive_runs(ids: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _parse_selection(spec: str | None) -> set[int] | None:
    """'0,2,5-7' -> {0,2,5,6,7}; None means everything."""
    if spec is None or str(spec).strip() in ("", "all"):
        return None
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        elif part:
            out.add(int(part))
    return out


def discover_handco(
    root: str | os.PathLike,
    *,
    mask: str = "fg",
    cameras: str | None = None,
    sequences: str | None = None,
    frame_stride: int = 1,
    max_clips: int | None = None,
    green_screen_only: bool = True,
    split_by: str = "sequence",
    source_name: str = "handco",
) -> Discovery:
    """List the (sequence, camera) tracks of a HanCo-layout folder."""
    root = Path(root)
    rgb = root / "rgb"
    if not rgb.is_dir():
        raise SourceError(f"no HanCo dataset at {root}: expected {rgb}/SEQ/camC/FRAME.jpg")
    if mask not in ("fg", "hand", "none"):
        raise SourceError(f"--mask must be fg, hand or none, not {mask!r}")
    if frame_stride < 1:
        raise SourceError("--frame-stride must be >= 1")
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    seq_sel, cam_sel = _parse_selection(sequences), _parse_selection(cameras)
    mask_dir = None if mask == "none" else root / f"mask_{mask}"

    tracks: list[Track] = []
    excluded: list[Excluded] = []
    fp_files: list[Path] = [meta_path] if meta_path.is_file() else []
    for seq_dir in sorted(p for p in rgb.iterdir() if p.is_dir() and p.name.isdigit()):
        seq = int(seq_dir.name)
        if seq_sel is not None and seq not in seq_sel:
            continue
        seq_meta = {k: v.get(seq_dir.name) for k, v in meta.items() if isinstance(v, dict)}
        for cam_dir in sorted(
            p for p in seq_dir.iterdir() if p.is_dir() and p.name.startswith("cam")
        ):
            cam = int(cam_dir.name[3:])
            if cam_sel is not None and cam not in cam_sel:
                continue
            files = {
                int(f.stem): f
                for f in cam_dir.iterdir()
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.stem.isdigit()
            }
            fp_files.extend(files.values())
            track_prefix = f"{seq:04d}-cam{cam}"
            kept: list[int] = []
            for fid in sorted(files):
                reason = _handco_exclusion(seq_meta, fid, green_screen_only)
                if reason:
                    excluded.append(Excluded(str(files[fid]), track_prefix, fid, reason))
                else:
                    kept.append(fid)
            subject = _per_frame(seq_meta, "subject_id", kept)
            obj = _per_frame(seq_meta, "object_id", kept)
            for run in _consecutive_runs(kept):
                run = run[::frame_stride]
                frames = tuple(
                    FrameRef(
                        fid,
                        str(files[fid]),
                        str(mask_dir / seq_dir.name / cam_dir.name / files[fid].name)
                        if mask_dir
                        else None,
                    )
                    for fid in run
                )
                group = f"subject-{subject}" if split_by == "subject" else f"seq-{seq:04d}"
                tracks.append(
                    Track(
                        track_id=f"{track_prefix}-{run[0]:08d}",
                        prefix=track_prefix,
                        source=source_name,
                        kind="images",
                        frames=frames,
                        sequence=seq,
                        camera=cam,
                        subject=None if subject is None else str(subject),
                        object=None if obj is None else str(obj),
                        group=group,
                    )
                )
    if max_clips is not None:
        tracks = tracks[:max_clips]
    if not tracks:
        raise SourceError(
            f"empty dataset: no usable frames under {rgb}"
            + (" (all frames filtered by is_train; try --all-frames)" if excluded else "")
        )
    return Discovery(tracks, excluded, _fingerprint(root, fp_files), str(root))


def _handco_exclusion(seq_meta: dict, fid: int, green_screen_only: bool) -> str | None:
    def value(key: str):
        values = seq_meta.get(key)
        if isinstance(values, list) and 0 <= fid < len(values):
            return values[fid]
        return None

    if value("is_valid") is False:
        return "not_valid"
    if green_screen_only and value("is_train") is not True:
        return "not_green_screen"
    return None


def _per_frame(seq_meta: dict, key: str, fids: Sequence[int]):
    """The most common value of a per-frame meta list over the kept frames (None if absent)."""
    values = seq_meta.get(key)
    if not isinstance(values, list):
        return None
    seen = [values[f] for f in fids if 0 <= f < len(values)]
    seen = [v for v in seen if v is not None]
    if not seen:
        return None
    return max(sorted(set(seen), key=str), key=seen.count)


def discover_video(
    root: str | os.PathLike,
    *,
    mask_root: str | None = None,
    frame_stride: int = 1,
    max_clips: int | None = None,
    split_by: str = "sequence",
) -> Discovery:
    """A folder of videos (or one video file), or of frame folders: one track per video."""
    root = Path(root)
    if not root.exists():
        raise SourceError(f"no video source at {root}: expected a video file or a folder of videos")
    if frame_stride < 1:
        raise SourceError("--frame-stride must be >= 1")
    mroot = Path(mask_root) if mask_root else None
    if mroot is not None and not mroot.exists():
        raise SourceError(f"mask root {mroot} does not exist")
    entries = [root] if root.is_file() else sorted(root.iterdir())
    tracks: list[Track] = []
    fp_files: list[Path] = []
    base = root.parent if root.is_file() else root
    import cv2  # local import: discovery of image sources needs no OpenCV

    for entry in entries:
        name = safe_name(entry.stem if entry.is_file() else entry.name)
        if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS:
            cap = cv2.VideoCapture(str(entry))
            if not cap.isOpened():
                raise SourceError(f"cannot open video {entry}")
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            cap.release()
            if n <= 0:
                continue
            mvideo = _matching(mroot, entry, video=True)
            fids = list(range(0, n, frame_stride))
            frames = tuple(FrameRef(i, str(entry)) for i in fids)
            fp_files.append(entry)
            tracks.append(
                Track(
                    name, name, "video", "video", frames, mask_video=mvideo, group=f"video-{name}"
                )
            )
        elif entry.is_dir():
            files = sorted(f for f in entry.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                continue
            mdir = _matching(mroot, entry, video=False)
            fp_files.extend(files)
            frames = tuple(
                FrameRef(i, str(f), str(Path(mdir) / f.name) if mdir else None)
                for i, f in enumerate(files)
            )[::frame_stride]
            tracks.append(Track(name, name, "video", "images", frames, group=f"video-{name}"))
    if max_clips is not None:
        tracks = tracks[:max_clips]
    if not tracks:
        raise SourceError(
            f"empty dataset: no videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders in {root}"
        )
    if len({t.track_id for t in tracks}) != len(tracks):
        raise SourceError(f"two videos in {root} map to the same clip name; rename one")
    return Discovery(tracks, [], _fingerprint(base, fp_files), str(root))


def _matching(mroot: Path | None, entry: Path, *, video: bool) -> str | None:
    """The mask video or folder with the same name as ``entry`` under ``mroot``, if any."""
    if mroot is None:
        return None
    if video:
        for ext in VIDEO_EXTENSIONS:
            cand = mroot / (entry.stem + ext)
            if cand.is_file():
                return str(cand)
        cand = mroot / entry.stem
        return str(cand) if cand.is_dir() else None
    cand = mroot / entry.name
    return str(cand) if cand.is_dir() else None
