"""Any video: a video file, or a folder (walked recursively) of video files and frame folders.

One track per video file; a frame folder is ordered by frame number (``2.png`` before
``10.png``), keeps the numbers as frame ids, and a gap in the numbering ends a track, as in
HanCo. Masks come from ``--mask-root``: a mask video or a numbered mask folder with the same
relative path and name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sources import (
    DUPLICATE_MASK_ID,
    FRAME_STRIDE,
    IMAGE_EXTENSIONS,
    MAX_CLIPS,
    VIDEO_EXTENSIONS,
    Discovery,
    Excluded,
    SourceError,
    Track,
    consecutive_runs,
    discovery_fingerprint,
    fingerprint_of,
    first_side,
    numbered_images,
    relative,
    safe_name,
)


def _entries(root: Path) -> Iterator[tuple[Path, bool]]:
    """(path, is_video): video files and frame folders under ``root`` (itself included),
    recursively, in sorted path order. A link to a missing video is listed, so it is recorded."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in filenames):
            yield here, False
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS:
                yield here / f, True


@dataclass
class _Listing:
    """What the inputs of a video source give, in input order."""

    tracks: list[Track] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unmasked: list[str] = field(default_factory=list)  # inputs --mask-root has no mask for


def discover_video(
    root: str | os.PathLike,
    *,
    mask_root: str | None = None,
    frame_stride: int = 1,
    max_clips: int | None = None,
    split_by: str = "sequence",
    keep_mask: bool = False,
) -> Discovery:
    """Tracks of a video file or a folder tree of videos and frame folders."""
    root = Path(root)
    if not root.exists():
        raise SourceError(f"no video source at {root}: expected a video file or a folder of videos")
    mroot = Path(mask_root) if mask_root else None
    if mroot is not None and not mroot.is_dir():
        raise SourceError(f"--mask-root {mroot} is not a folder")
    base = root.parent if root.is_file() else root
    if root.is_file():
        if root.suffix.lower() not in VIDEO_EXTENSIONS:
            raise SourceError(f"{root} is not a video ({', '.join(VIDEO_EXTENSIONS)})")
        entries = [(root, True)]
    else:
        entries = list(_entries(root))
    found = _Listing()
    owner: dict[str, str] = {}  # clip-name prefix -> the input that has it
    for entry, is_video in entries:
        rel = relative(base, entry) if entry != base else entry.name
        name = safe_name(str(Path(rel).with_suffix("")) if is_video else rel)
        if owner.setdefault(name, rel) != rel:
            raise SourceError(
                f"{owner[name]!r} and {rel!r} under {root} map to the same clip name {name!r}; "
                "rename one"
            )
        add = _add_video_file if is_video else _add_frame_folder
        add(found, entry, rel=rel, name=name, base=base, mroot=mroot, frame_stride=frame_stride)
    _check_masks(found, mroot, n_inputs=len(entries), keep_mask=keep_mask)
    tracks, excluded = found.tracks, found.excluded
    if max_clips is not None and len(tracks) > max_clips:
        for t in tracks[max_clips:]:
            excluded.append(_whole_track(t, MAX_CLIPS))
        tracks = tracks[:max_clips]
    if not tracks:
        raise SourceError(
            f"empty dataset: no readable videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders "
            f"under {root}"
        )
    fp = discovery_fingerprint(str(root), tracks, [f"excluded {sum(map(len, excluded))}"])
    return Discovery(
        tracks=tracks, excluded=excluded, fingerprint=fp, root=str(root), notes=found.notes
    )


def _add_video_file(
    found: _Listing,
    entry: Path,
    *,
    rel: str,
    name: str,
    base: Path,
    mroot: Path | None,
    frame_stride: int,
) -> None:
    """One track for a video file (its frames are counted when it is decoded); a video that
    does not open is recorded as ``unreadable_video``."""
    from pipeline.frames import video_header  # local import: image sources need no OpenCV

    opened, n, side = video_header(str(entry))
    if not opened:
        found.excluded.append(Excluded(clip_id=f"{name}-00000000", dir=str(base), names=(rel,),
                                       ids=(-1,), reason="unreadable_video"))  # fmt: skip
        found.notes.append(f"cannot open video {entry}: recorded as unreadable_video")
        return
    mvideo = _matching(mroot, base, entry, video=True)
    if mroot is not None and mvideo is None:
        found.unmasked.append(rel)
    found.tracks.append(
        Track(
            track_id=f"{name}-00000000",
            prefix=name,
            source="video",
            kind="video",
            dir=str(entry),
            mask_video=mvideo,
            expected=max(n, 0),
            stride=frame_stride,
            side=side,
            fingerprint=fingerprint_of(
                [f"{rel} {entry.stat().st_size}"]
                + ([f"m {mvideo} {_size(mvideo)}"] if mvideo else [])
            ),
            group=f"video-{name}",
        )
    )


def _add_frame_folder(
    found: _Listing,
    entry: Path,
    *,
    rel: str,
    name: str,
    base: Path,
    mroot: Path | None,
    frame_stride: int,
) -> None:
    """The tracks of a folder of numbered frames: one per run of consecutive frame numbers,
    every ``frame_stride``-th frame kept; unnumbered, duplicated and strided frames recorded."""
    files = numbered_images(entry)
    d = str(entry)
    mdir = _matching(mroot, base, entry, video=False)
    if mroot is not None and mdir is None:
        found.unmasked.append(rel)
    masks = numbered_images(mdir) if mdir else None
    found.excluded.extend(files.excluded(name, d))
    ids = sorted(files.by_id)  # a duplicated id is missing: a gap, which ends a track
    if masks is not None:
        bad = [f for f in ids if f in masks.duplicates]
        for run in consecutive_runs(bad):
            found.excluded.append(Excluded(clip_id=f"{name}-{run[0]:08d}", dir=d,
                                           names=tuple(files.by_id[f] for f in run),
                                           ids=tuple(run), reason=DUPLICATE_MASK_ID))  # fmt: skip
        ids = [f for f in ids if f not in masks.duplicates]
    for run in consecutive_runs(ids):
        kept = run[::frame_stride]
        strided = [f for i, f in enumerate(run) if i % frame_stride]
        if strided:
            found.excluded.append(Excluded(clip_id=f"{name}-{run[0]:08d}", dir=d,
                                           names=tuple(files.by_id[f] for f in strided),
                                           ids=tuple(strided), reason=FRAME_STRIDE))  # fmt: skip
        names = tuple(files.by_id[f] for f in kept)
        mask_names = tuple(masks.by_id.get(f) for f in kept) if masks is not None else ()
        found.tracks.append(
            Track(
                track_id=f"{name}-{kept[0]:08d}",
                prefix=name,
                source="video",
                kind="images",
                dir=d,
                ids=tuple(kept),
                names=names,
                mask_dir=mdir,
                mask_names=mask_names,
                expected=len(kept),
                side=first_side(os.path.join(d, n) for n in names),
                fingerprint=fingerprint_of(
                    [f"{n} {files.sizes.get(n, -1)}" for n in names]
                    + [f"m {n} {masks.sizes.get(n, -1)}" for n in mask_names if masks and n]
                ),
                group=f"video-{name}",
            )
        )


def _check_masks(found: _Listing, mroot: Path | None, *, n_inputs: int, keep_mask: bool) -> None:
    """Inputs without a mask: refused with --keep-mask, else used unmasked with a note."""
    unmasked = found.unmasked
    if unmasked:
        shown = ", ".join(unmasked[:5]) + (
            f" and {len(unmasked) - 5} more" if len(unmasked) > 5 else ""
        )
        if keep_mask:
            raise SourceError(
                f"--keep-mask needs a mask for every video: --mask-root {mroot} has none for "
                f"{shown}"
            )
        found.notes.append(f"--mask-root {mroot} has no mask for {len(unmasked)} of {n_inputs} "
                           f"inputs ({shown}); they are used unmasked")  # fmt: skip
    if keep_mask and mroot is None:
        raise SourceError("--keep-mask with --src video needs --mask-root (masks to keep)")


def _whole_track(t: Track, reason: str) -> Excluded:
    if t.kind == "video":
        return Excluded(clip_id=t.track_id, dir=os.path.dirname(t.dir),
                        names=(os.path.basename(t.dir),), ids=(-1,), reason=reason)  # fmt: skip
    return Excluded(clip_id=t.track_id, dir=t.dir, names=t.names, ids=t.ids, reason=reason)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _matching(mroot: Path | None, base: Path, entry: Path, *, video: bool) -> str | None:
    """The mask video or folder at the same relative path as ``entry`` under ``mroot``."""
    if mroot is None:
        return None
    rel = entry.relative_to(base) if entry != base else Path(entry.name)
    if video:
        stem = rel.with_suffix("")
        for ext in VIDEO_EXTENSIONS:
            cand = mroot / stem.with_suffix(ext)
            if cand.is_file():
                return str(cand)
        cand = mroot / stem
        return str(cand) if cand.is_dir() else None
    cand = mroot / rel
    return str(cand) if cand.is_dir() else None
