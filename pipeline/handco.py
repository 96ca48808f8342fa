"""HanCo on disk: ``rgb/{seq:04d}/cam{c}/{frame:08d}.jpg``, masks, and the real ``meta.json``.

HanCo's ``meta.json`` is a JSON object whose keys (``is_train``, ``subject_id``, ``is_valid``,
``object_id``, ``has_fit``) each hold a *list* indexed by the integer sequence id, each entry a
list with one value per frame id: ``meta["is_train"][sid][fid]``, as HanCo's own example code
reads it. A dict keyed by sequence name (``"0012"`` or ``"12"``) is accepted too. Anything else is
refused with one line naming the file and what is wrong, before any work starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.sources import (
    DUPLICATE_MASK_ID,
    FRAME_STRIDE,
    MAX_CLIPS,
    NOT_GREEN_SCREEN,
    NOT_VALID,
    Discovery,
    Excluded,
    SourceError,
    Track,
    consecutive_runs,
    discovery_fingerprint,
    fingerprint_of,
    first_side,
    is_number,
    numbered_images,
    parse_selection,
    relative,
)

META_KEYS = ("is_train", "subject_id", "is_valid", "object_id", "has_fit")
REQUIRED_KEYS = ("is_train", "subject_id", "is_valid", "object_id")  # the ones a build reads


class HancoMeta:
    """Per-frame values of HanCo's meta.json, checked against the frames on disk."""

    def __init__(self, path: Path, data: dict | None):
        self.path = path
        self.data = data  # None: no meta.json

    @classmethod
    def load(cls, root: Path, need_file: bool) -> HancoMeta:
        """Read and check meta.json; without one, only --all-frames can go on."""
        path = root / "meta.json"
        if not path.exists():
            if need_file:
                raise SourceError(
                    f"{path} not found: is_train (which frames are green-screen) is unknown; "
                    "place HanCo's meta.json there, or pass --all-frames to use every frame"
                )
            return cls(path, None)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise SourceError(f"{path} is not readable JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise SourceError(
                f"{path}: expected a JSON object with keys {', '.join(META_KEYS)}, "
                f"found a {type(data).__name__} at the top"
            )
        for key in REQUIRED_KEYS:
            if key not in data:
                raise SourceError(f"{path}: key {key!r} is missing (found: {', '.join(data)})")
        for key, value in data.items():
            if key in META_KEYS and not isinstance(value, (list, dict)):
                raise SourceError(
                    f"{path}: {key} must be a list with one entry per sequence, "
                    f"not a {type(value).__name__}"
                )
        return cls(path, data)

    def frames(self, key: str, seq: int, seq_name: str) -> list | None:
        """The per-frame list of ``key`` for a sequence (None when the key is absent)."""
        if self.data is None or key not in self.data:
            return None
        table = self.data[key]
        if isinstance(table, list):
            if seq >= len(table):
                raise SourceError(
                    f"{self.path}: {key} has {len(table)} sequences but rgb/{seq_name} exists"
                )
            entry = table[seq]
        else:
            entry = table.get(seq_name, table.get(str(seq)))
            if entry is None:
                raise SourceError(f"{self.path}: {key} has no entry for sequence {seq_name}")
        if not isinstance(entry, list):
            raise SourceError(
                f"{self.path}: {key}[{seq}] must be a list with one value per frame, "
                f"not a {type(entry).__name__}"
            )
        return entry

    def check_length(self, key: str, values: list | None, seq_name: str, fids) -> None:
        if values is None or not fids:
            return
        last = max(fids)
        if last >= len(values):
            raise SourceError(
                f"{self.path}: {key}[{int(seq_name)}] has {len(values)} frames but "
                f"rgb/{seq_name} holds frame {last:08d}"
            )


def _value_is(values: list | None, fid: int, expected: bool) -> bool:
    if values is None:
        return True
    v = values[fid]
    return bool(v) == expected if isinstance(v, (bool, int)) else False


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
    meta = HancoMeta.load(root, need_file=green_screen_only)
    seq_sel = parse_selection(sequences, "sequences")
    cam_sel = parse_selection(cameras, "cameras")
    mask_root = None if mask == "none" else root / f"mask_{mask}"

    tracks: list[Track] = []
    excluded: list[Excluded] = []
    ignored: list[str] = []
    for seq, seq_name in _numbered_dirs(rgb, "", ignored):
        if seq_sel is not None and seq not in seq_sel:
            continue
        cam_dirs = _numbered_dirs(rgb / seq_name, "cam", ignored)
        cam_dirs = [(c, n) for c, n in cam_dirs if cam_sel is None or c in cam_sel]
        if not cam_dirs:
            continue
        per_frame = {k: meta.frames(k, seq, seq_name) for k in ("is_train", "is_valid")}
        subjects = meta.frames("subject_id", seq, seq_name)
        objects = meta.frames("object_id", seq, seq_name)
        for cam, cam_name in cam_dirs:
            tracks_here, excl = _camera_tracks(
                rgb / seq_name / cam_name,
                None if mask_root is None else mask_root / seq_name / cam_name,
                prefix=f"{seq:04d}-cam{cam}",
                seq=seq,
                cam=cam,
                seq_name=seq_name,
                meta=meta,
                per_frame=per_frame,
                subjects=subjects,
                objects=objects,
                green_screen_only=green_screen_only,
                frame_stride=frame_stride,
                split_by=split_by,
                source_name=source_name,
            )
            tracks.extend(tracks_here)
            excluded.extend(excl)
    if max_clips is not None and len(tracks) > max_clips:
        for t in tracks[max_clips:]:
            excluded.append(Excluded(clip_id=t.track_id, dir=t.dir, names=t.names, ids=t.ids,
                                     reason=MAX_CLIPS))  # fmt: skip
        tracks = tracks[:max_clips]
    if not tracks:
        n_out = sum(len(e) for e in excluded)
        why = ""
        if n_out and all(e.reason == NOT_GREEN_SCREEN for e in excluded if len(e)):
            why = f" (all {n_out} frames have is_train false in meta.json; try --all-frames)"
        elif n_out:
            why = f" ({n_out} frames excluded; see their reasons with --all-frames or the files)"
        raise SourceError(f"empty dataset: no usable frames under {rgb}{why}")
    notes = []
    if ignored:
        shown = ", ".join(ignored[:5]) + (
            f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
        )
        notes.append(f"ignored {len(ignored)} entries that are not SEQ/camC folders: {shown}")
    meta_stat = ""
    if meta.data is not None:
        st = meta.path.stat()
        meta_stat = f"meta.json {st.st_size} {st.st_mtime_ns}"
    fp = discovery_fingerprint(str(root), tracks, [meta_stat, f"excluded {len(excluded)}"])
    return Discovery(tracks=tracks, excluded=excluded, fingerprint=fp, root=str(root), notes=notes)


def _camera_tracks(
    folder: Path,
    mask_folder: Path | None,
    *,
    prefix: str,
    seq: int,
    cam: int,
    seq_name: str,
    meta: HancoMeta,
    per_frame: dict,
    subjects: list | None,
    objects: list | None,
    green_screen_only: bool,
    frame_stride: int,
    split_by: str,
    source_name: str,
) -> tuple[list[Track], list[Excluded]]:
    """The tracks of one (sequence, camera) folder, and the frames it leaves out, with reasons."""
    files = numbered_images(folder, digits_only=True)
    masks = numbered_images(mask_folder, digits_only=True) if mask_folder else None
    excluded: list[Excluded] = []
    d = str(folder)

    def exclude(reason: str, fids: list[int], names: list[str] | None = None, where=d):
        if fids:
            names = names if names is not None else [files.by_id[f] for f in fids]
            excluded.append(Excluded(clip_id=f"{prefix}-{fids[0]:08d}", dir=where,
                                     names=tuple(names), ids=tuple(fids),
                                     reason=reason))  # fmt: skip

    excluded.extend(files.excluded(prefix, d))
    all_ids = sorted(set(files.by_id) | set(files.duplicates))
    for key, values in per_frame.items():
        meta.check_length(key, values, seq_name, all_ids)
    for key, values in (("subject_id", subjects), ("object_id", objects)):
        meta.check_length(key, values, seq_name, all_ids)

    # Selection, per frame id, in a fixed order of reasons.
    keep: list[int] = []
    reasons: dict[str, list[int]] = {}
    for fid in sorted(files.by_id):
        if green_screen_only and not _value_is(per_frame["is_valid"], fid, True):
            reasons.setdefault(NOT_VALID, []).append(fid)
        elif green_screen_only and not _value_is(per_frame["is_train"], fid, True):
            reasons.setdefault(NOT_GREEN_SCREEN, []).append(fid)
        elif masks is not None and fid in masks.duplicates:
            reasons.setdefault(DUPLICATE_MASK_ID, []).append(fid)
        else:
            keep.append(fid)
    # A duplicated or excluded id is missing from ``keep``: a gap, which ends a run.
    runs = consecutive_runs(keep)
    for reason, fids in reasons.items():
        for run in consecutive_runs(fids):
            exclude(reason, run)

    tracks: list[Track] = []
    for run in runs:
        kept, strided = run[::frame_stride], [f for i, f in enumerate(run) if i % frame_stride]
        exclude(FRAME_STRIDE, strided)
        names = tuple(files.by_id[f] for f in kept)
        mask_names: tuple = ()
        if masks is not None:
            mask_names = tuple(masks.by_id.get(f) for f in kept)
        subject = _most_common(subjects, kept, f"{meta.path}: subject_id[{seq}]")
        obj = _most_common(objects, kept, f"{meta.path}: object_id[{seq}]")
        fp = fingerprint_of(
            [f"{n} {files.sizes.get(n, -1)}" for n in names]
            + (
                [f"m {n} {masks.sizes.get(n, -1)}" for n in mask_names if n]
                if masks is not None
                else []
            )
        )
        tracks.append(
            Track(
                track_id=f"{prefix}-{kept[0]:08d}",
                prefix=prefix,
                source=source_name,
                kind="images",
                dir=d,
                ids=tuple(kept),
                names=names,
                mask_dir=None if mask_folder is None else str(mask_folder),
                mask_names=mask_names,
                expected=len(kept),
                side=first_side(os.path.join(d, n) for n in names),
                fingerprint=fp,
                sequence=seq,
                camera=cam,
                subject=None if subject is None else str(subject),
                object=None if obj is None else str(obj),
                group=f"subject-{subject}" if split_by == "subject" else f"seq-{seq:04d}",
            )
        )
    return tracks, excluded


MAX_ID = 2**31  # sequence and camera numbers are int32 in the index


def _numbered_dirs(folder: Path, prefix: str, ignored: list[str]) -> list[tuple[int, str]]:
    """Sub-folders named ``{prefix}{number}``, by number; anything else goes to ``ignored``."""
    out = []
    for p in os.scandir(folder):
        num = p.name[len(prefix) :]
        if p.is_dir() and p.name.startswith(prefix) and is_number(num):
            if int(num) >= MAX_ID:
                raise SourceError(f"{p.path}: number {num} is too large (at most {MAX_ID - 1})")
            out.append((int(num), p.name))
        elif not p.name.startswith("."):
            ignored.append(relative(folder.parent if prefix else folder, p.path))
    return sorted(out)


def _most_common(values: list | None, fids: Sequence[int], what: str = "value"):
    """The most common non-null value of a per-frame meta list over ``fids`` (None if absent)."""
    if values is None:
        return None
    seen = [values[f] for f in fids if 0 <= f < len(values) and values[f] is not None]
    bad = next((v for v in seen if not isinstance(v, (int, float, str))), None)
    if bad is not None:
        raise SourceError(f"{what} values must be numbers or strings, not {bad!r}")
    if not seen:
        return None
    return max(sorted(set(seen), key=str), key=seen.count)
