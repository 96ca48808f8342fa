"""What every source adapter produces: tracks of frames and excluded frames, before any pixel.

A *track* is one run of frames that should be consecutive in the source (a HanCo
(sequence, camera) run of consecutive frame ids, a numbered frame folder's run, or one video).
Frames that later fail to decode split a track into several clips; see :mod:`pipeline.tracks`.
The adapters live in :mod:`pipeline.handco` and :mod:`pipeline.videos`; :func:`discover` runs the
one a build's ``--src`` names.

Tracks are compact (a folder and tuples of names and ids, no object per frame): a HanCo-sized
discovery holds about 860k frames in the driver.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SOURCES = ("handco", "synthetic", "video")  # the values of --src

# Selection and naming reasons (frames left out before decoding), as in skipped.parquet.
NOT_GREEN_SCREEN = "not_green_screen"
NOT_VALID = "not_valid"
FRAME_STRIDE = "frame_stride"
MAX_CLIPS = "max_clips"
DUPLICATE_FRAME_ID = "duplicate_frame_id"
DUPLICATE_MASK_ID = "duplicate_mask_id"
NO_FRAME_NUMBER = "no_frame_number"


class SourceError(ValueError):
    """A source that cannot be read at all (missing root, bad meta.json, bad option)."""


@dataclass(frozen=True)
class Track:
    """A run of frames that should be consecutive; the unit of parallel work.

    ``kind == "images"``: ``dir/names[i]`` is the frame with id ``ids[i]``, its mask (if any)
    ``mask_dir/mask_names[i]`` (``None``: no mask file). ``kind == "video"``: ``dir`` is the
    video file; its frames are found by decoding it to the end (``expected`` is the header's
    frame count, for progress only), keeping every ``stride``-th.
    """

    track_id: str  # key-safe; also the clip id of its first run: f"{prefix}-{first id:08d}"
    prefix: str  # sample keys and clip ids are f"{prefix}-{frame_id:08d}"
    source: str
    kind: str  # "images" or "video"
    dir: str
    ids: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    mask_dir: str | None = None
    mask_names: tuple[str | None, ...] = ()
    mask_video: str | None = None  # video tracks: a mask video, or a numbered mask folder
    expected: int = 0
    stride: int = 1
    side: int = 0  # min(width, height) of its first readable frame; 0 when unknown
    fingerprint: str = ""  # names and sizes of its files: a changed input invalidates its cache
    sequence: int | None = None
    camera: int | None = None
    subject: str | None = None
    object: str | None = None
    group: str = ""  # what the train/val split keys on (sequence or subject)

    def key(self, frame_id: int) -> str:
        """Sample key of the window starting at ``frame_id`` (no dots)."""
        return f"{self.prefix}-{frame_id:08d}"

    def frame_path(self, i: int) -> str:
        return os.path.join(self.dir, self.names[i])

    def mask_path(self, i: int) -> str | None:
        if self.mask_dir is None:
            return None
        name = self.mask_names[i] if self.mask_names else self.names[i]
        return None if name is None else os.path.join(self.mask_dir, name)

    def path_of(self, frame_id: int) -> str:
        """The input file holding ``frame_id`` (the video itself for video tracks)."""
        if self.kind == "video":
            return self.dir
        i = bisect.bisect_left(self.ids, frame_id)
        if i < len(self.ids) and self.ids[i] == frame_id:
            return self.frame_path(i)
        return self.dir


@dataclass(frozen=True)
class Excluded:
    """Input frames left out before decoding, with one reason: recorded, never silently lost.

    Rows of skipped.parquet: ``source_path`` ``dir/names[i]``, ``frame_id`` ``ids[i]`` (-1 for a
    file that carries no frame number), ``clip_id`` the run the frames were in.
    """

    clip_id: str
    dir: str
    names: tuple[str, ...]
    ids: tuple[int, ...]
    reason: str

    def rows(self) -> Iterable[tuple[str, str, int, str]]:
        for name, fid in zip(self.names, self.ids, strict=True):
            yield os.path.join(self.dir, name), self.clip_id, fid, self.reason

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Discovery:
    tracks: list[Track]
    excluded: list[Excluded]
    fingerprint: str
    root: str
    notes: list[str] | None = None  # one-line warnings for the user (ignored files, ...)


def safe_name(name: str) -> str:
    """A string usable in a sample key: letters, digits, '_' and '-' only."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return cleaned or "clip"


def consecutive_runs(ids: Sequence[int]) -> list[list[int]]:
    """Sorted ids -> runs of consecutive ids (a gap starts a new run)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def parse_selection(spec: str | None, what: str = "selection") -> set[int] | None:
    """'0,2,5-7' -> {0,2,5,6,7}; None or 'all' means everything. Raises SourceError."""
    if spec is None or str(spec).strip() in ("", "all"):
        return None
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise SourceError(
                f"--{what}: {part!r} in {spec!r} is not a number or a range A-B (e.g. '0,2,4-7')"
            )
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise SourceError(f"--{what}: range {part!r} ends before it starts")
        out.update(range(a, b + 1))
    return out


_NUMBER = re.compile(r"(\d+)(?!.*\d)")


MAX_FRAME_NUMBER = 2**62  # ids are int64 in the index; a larger number is not a frame number


def is_number(name: str) -> bool:
    """ASCII digits only (``str.isdigit`` also accepts '²', which ``int`` refuses)."""
    return name.isascii() and name.isdigit()


def frame_number(stem: str, digits_only: bool = False) -> int | None:
    """The frame number in a file stem: the whole stem (HanCo), else its last run of digits."""
    if digits_only:
        n = int(stem) if is_number(stem) else None
    else:
        m = _NUMBER.search(stem)
        n = int(m.group(1)) if m else None
    return n if n is not None and n < MAX_FRAME_NUMBER else None


@dataclass
class Numbered:
    """The image files of one folder, by frame number."""

    by_id: dict[int, str]  # frame id -> file name (unique ids only)
    duplicates: dict[int, list[str]]  # frame id -> every file claiming it (two or more)
    unnumbered: list[str]  # image files with no frame number
    sizes: dict[str, int]  # file name -> bytes, for the fingerprint

    def excluded(self, prefix: str, folder: str) -> list[Excluded]:
        """Skip records of the files no frame id can be given to: unnumbered or duplicated."""
        out = []
        if self.unnumbered:
            n = len(self.unnumbered)
            out.append(Excluded(clip_id=f"{prefix}-unnumbered", dir=folder,
                                names=tuple(self.unnumbered), ids=(-1,) * n,
                                reason=NO_FRAME_NUMBER))  # fmt: skip
        for fid, names in sorted(self.duplicates.items()):
            out.append(Excluded(clip_id=f"{prefix}-{fid:08d}", dir=folder, names=tuple(names),
                                ids=(fid,) * len(names), reason=DUPLICATE_FRAME_ID))  # fmt: skip
        return out


def numbered_images(folder: str | os.PathLike, digits_only: bool = False) -> Numbered:
    """List a frame folder by frame number, never by name as text (``2.png`` before ``10.png``).

    Two files with one number (``5.jpg`` and ``00000005.jpg``) are both reported as
    duplicates, whatever the directory order, so no silent choice is made between them.
    """
    claims: dict[int, list[str]] = {}
    unnumbered: list[str] = []
    sizes: dict[str, int] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        entries = []
    for e in entries:
        name = e.name
        if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        try:  # a broken link named like a frame is kept: reading it records missing_image
            if not (e.is_file() or (e.is_symlink() and not e.is_dir())):
                continue
            sizes[name] = e.stat().st_size if e.is_file() else -1
        except OSError:
            sizes[name] = -1
        n = frame_number(os.path.splitext(name)[0], digits_only)
        if n is None:
            unnumbered.append(name)
        else:
            claims.setdefault(n, []).append(name)
    by_id = {n: names[0] for n, names in claims.items() if len(names) == 1}
    dups = {n: sorted(names) for n, names in claims.items() if len(names) > 1}
    return Numbered(by_id, dups, sorted(unnumbered), sizes)


def fingerprint_of(items: Iterable[str]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()


def image_side(path: str) -> int:
    """min(width, height) from an image header (no decode); 0 when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(min(im.size))
    except Exception:  # any decoder failure: unknown, the frame stage records the reason
        return 0


def first_side(paths: Iterable[str], tries: int = 5) -> int:
    """The side of the first of ``paths`` (at most ``tries``) whose header reads."""
    for n, p in enumerate(paths):
        if n >= tries:
            break
        side = image_side(p)
        if side:
            return side
    return 0


def default_flow_size(tracks: Sequence[Track]) -> int:
    """Flow side when --flow-size is unset, from the whole discovery (never from timing).

    The smallest cropped source side over the tracks, rounded down to RAFT's 8-px grid, so every
    pair's ``flow_msq`` is measured at one resolution and no frame is upsampled for flow.
    """
    sides = [t.side for t in tracks if t.side > 0]
    if not sides:
        return 0
    return max(8, min(sides) // 8 * 8)


def discovery_fingerprint(root: str, tracks: Sequence[Track], extra: Iterable[str] = ()) -> str:
    return fingerprint_of([*extra, *(f"{t.track_id} {t.fingerprint}" for t in tracks)])


def relative(root: str | Path, path: str | Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def synthetic_root(cfg: BuildConfig) -> Path:
    """Where ``--src synthetic`` without ``--root`` keeps its rendered set, one per set of
    synthetic options: under ``$FRAMEBRIDGE_CACHE`` (default ``~/.cache/framebridge``)."""
    base = Path(os.environ.get("FRAMEBRIDGE_CACHE", "~/.cache/framebridge")).expanduser()
    return base / (
        f"synthetic-n{cfg.synth_sequences}-c{cfg.synth_cameras}-f{cfg.synth_frames}"
        f"-s{cfg.synth_size}-seed{cfg.seed}"
    )


def discover(cfg: BuildConfig, progress: bool = True) -> Discovery:
    """The tracks and excluded frames of a build's source, listed by its adapter.

    The synthetic set is rendered first (:func:`pipeline.synth.generate`) when its folder holds
    no ``meta.json`` yet.
    """
    from pipeline.handco import discover_handco  # here: the adapters import this module
    from pipeline.videos import discover_video

    common = {
        "frame_stride": cfg.frame_stride,
        "max_clips": cfg.max_clips,
        "split_by": cfg.split_by,
    }
    if cfg.src == "video":
        if not cfg.root:
            raise SourceError("--src video needs --root PATH (a video file or a folder of videos)")
        return discover_video(cfg.root, mask_root=cfg.mask_root, keep_mask=cfg.keep_mask, **common)
    handco = {
        "mask": cfg.mask,
        "cameras": cfg.cameras,
        "sequences": cfg.sequences,
        "green_screen_only": not cfg.all_frames,
        **common,
    }
    if cfg.src == "synthetic":
        from pipeline.synth import generate

        root = Path(cfg.root) if cfg.root else synthetic_root(cfg)
        if not (root / "meta.json").is_file():
            generate(
                root,
                sequences=cfg.synth_sequences,
                cameras=cfg.synth_cameras,
                frames=cfg.synth_frames,
                size=cfg.synth_size,
                seed=cfg.seed,
                progress=progress,
            )
        return discover_handco(root, source_name="synthetic", **handco)
    root = cfg.root or os.environ.get("HANCO_ROOT") or "./data/HanCo"
    return discover_handco(root, **handco)
