"""Video files and frame folders: every input frame once, in a window or in the skip record.

Most tests read sources directly (``iter_video``, ``discover_video``, ``tracks._inputs``,
``process_track``); a few run a whole build. Test videos are written with OpenCV; frames carry
their number in their pixels (:func:`_label_frame`) so a frame under a wrong id is caught.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from buildutil import SHARED_DATA

from pipeline import frames as fr
from pipeline import tracks
from pipeline.build import BuildConfig, Runtime, build
from pipeline.flow import OpenCVFlow
from pipeline.sources import SourceError
from pipeline.videos import discover_video
from shards_spec import open_build, validate

MEGAMIND = SHARED_DATA / "Megamind.avi"
needs_megamind = pytest.mark.skipif(
    not MEGAMIND.is_file(), reason="shared test video ../shared/data/Megamind.avi not present"
)
KEY_SAFE = re.compile(r"[A-Za-z0-9_-]+")

# ------------------------------------------------------------------ helpers


def _label_frame(i: int, w: int = 80, h: int = 64) -> np.ndarray:
    """An RGB frame whose centre square holds ``i`` (0-255) as two flat gray halves."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = 8 + 16 * (i // 16)
    img[:, w // 2 :] = 8 + 16 * (i % 16)
    return img


def _read_label(img: np.ndarray) -> int:
    """The number :func:`_label_frame` put in a frame (after any crop/resize/JPEG)."""
    sq = fr.center_crop(img)
    s = sq.shape[0]
    hi, lo = (float(sq[s // 2, x].mean()) for x in (s // 8, 7 * s // 8))
    return int(round((hi - 8) / 16)) * 16 + int(round((lo - 8) / 16))


def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _write_video(path: Path, frames, fourcc: str = "MJPG", fps: float = 10) -> None:
    frames = list(frames)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} {path.suffix}"
    for f in frames:
        writer.write(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2BGR))
    writer.release()


def _labelled_mjpeg(path: Path, n: int, broken=(), fps: float = 10) -> None:
    _write_video(path, (_label_frame(i) for i in range(n)), fps=fps)
    _break_mjpeg(path, broken)


def _break_mjpeg(path: Path, broken) -> None:
    """Zero the JPEG data of frames ``broken`` of an MJPG AVI (each then fails to grab)."""
    if not broken:
        return
    data = bytearray(path.read_bytes())
    starts = [m.start() for m in re.finditer(b"00dc", data)]
    chunks = [s for s in starts if data[s + 8 : s + 10] == b"\xff\xd8"]
    for b in broken:
        s = chunks[b]
        size = int.from_bytes(data[s + 4 : s + 8], "little")
        data[s + 8 : s + 8 + size] = bytes(size)
    path.write_bytes(bytes(data))


def _set_avi_frame_count(path: Path, count: int) -> None:
    """Rewrite the frame count an AVI header promises (avih and the video strh)."""
    data = bytearray(path.read_bytes())
    a, s = data.find(b"avih"), data.find(b"strh")
    struct.pack_into("<I", data, a + 8 + 16, count)  # avih dwTotalFrames
    struct.pack_into("<I", data, s + 8 + 32, count)  # strh dwLength
    path.write_bytes(bytes(data))


def _header_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return n


def _only_track(root: Path, **kw):
    disc = discover_video(root, **kw)
    assert len(disc.tracks) == 1, disc.tracks
    return disc.tracks[0]


def _inputs(track) -> list[tuple]:
    """(frame_id, rgb, reason, mask, mask_reason) of every input frame of a track."""
    return [(fid, rgb, reason, mask, mreason) for fid, _, rgb, reason, mask, mreason in
            tracks._inputs(track)]  # fmt: skip


def _assert_every_id_once(ids: list[int], end: int) -> None:
    assert ids == list(range(end)), f"ids not 0..{end - 1} once each, in order: {ids}"


def _process(track, tmp_path: Path, keep_mask: bool = False) -> dict:
    """Stage 1 of a build for one track, without Ray."""
    opts = tracks.TrackOptions(spec=fr.FrameSpec(32, 32), keep_mask=keep_mask)
    return tracks.process_track(tmp_path / "cache", track, opts,
                                tracks.CpuPairs(OpenCVFlow("dis"), 0))  # fmt: skip


# ------------------------------------------------------------------ iter_video


@pytest.mark.parametrize(
    ("n", "broken"),
    [(12, (5,)), (12, (0,)), (12, (5, 6, 7)), (40, tuple(range(10, 30))), (12, (3, 8))],
)
def test_a_failed_grab_is_retried_and_no_frame_is_lost_or_repeated(tmp_path, n, broken):
    path = tmp_path / "pan.avi"
    _labelled_mjpeg(path, n, broken)
    got = list(fr.iter_video(str(path)))
    _assert_every_id_once([fid for fid, _, _ in got], n)
    for fid, rgb, reason in got:
        if fid in broken:
            assert rgb is None and reason == fr.UNREADABLE_VIDEO_FRAME, fid
        else:
            assert reason is None and _read_label(rgb) == fid, (fid, reason)


def test_stride_after_a_failed_grab_keeps_ids_and_reasons(tmp_path):
    path = tmp_path / "pan.avi"
    _labelled_mjpeg(path, 14, broken=(5, 6))
    got = list(fr.iter_video(str(path), stride=3))
    _assert_every_id_once([fid for fid, _, _ in got], 14)
    for fid, rgb, reason in got:
        if fid in (5, 6):
            assert reason == fr.UNREADABLE_VIDEO_FRAME and rgb is None
        elif fid % 3:
            assert reason == "frame_stride" and rgb is None
        else:
            assert reason is None and _read_label(rgb) == fid


def test_a_long_break_ends_the_stream_and_the_rest_is_recorded(tmp_path):
    path = tmp_path / "pan.avi"
    n, first = 60, 10
    _labelled_mjpeg(path, n, broken=range(first, first + fr.MAX_GRAB_FAILURES + 8))
    assert [fid for fid, _, _ in fr.iter_video(str(path))] == list(range(first))
    got = _inputs(_only_track(path))
    _assert_every_id_once([g[0] for g in got], n)
    assert {g[2] for g in got[first:]} == {fr.VIDEO_STREAM_ENDED}
    assert all(g[2] is None and _read_label(g[1]) == g[0] for g in got[:first])


def test_a_broken_last_frame_is_recorded_as_stream_ended(tmp_path):
    path = tmp_path / "pan.avi"
    _labelled_mjpeg(path, 12, broken=(11,))
    got = _inputs(_only_track(path))
    _assert_every_id_once([g[0] for g in got], 12)
    assert [g[2] for g in got] == [None] * 11 + [fr.VIDEO_STREAM_ENDED]


class _ScriptedCapture:
    """A cv2.VideoCapture stand-in: each grab follows ``script`` (ms, None: fail, 'raise')."""

    def __init__(self, script, fps=10.0, count=0):
        self.script, self.fps, self.count = list(script), fps, count
        self.pos = -1
        self.ms = 0.0
        self.grabbed: int | None = None

    def isOpened(self):  # noqa: N802 (OpenCV's name)
        return True

    def grab(self):
        self.pos += 1
        step = self.script[self.pos] if self.pos < len(self.script) else None
        if step == "raise":
            raise cv2.error("decoder blew up")
        if step is None:
            self.ms, self.grabbed = 0.0, None
            return False
        self.ms, self.grabbed = float(step), self.pos
        return True

    def retrieve(self):
        return True, np.full((4, 4, 3), self.grabbed, np.uint8)  # pixel = position in script

    def get(self, prop):
        return {cv2.CAP_PROP_FPS: self.fps, cv2.CAP_PROP_FRAME_COUNT: self.count,
                cv2.CAP_PROP_POS_MSEC: self.ms}.get(prop, 0.0)  # fmt: skip

    def release(self):
        pass


@pytest.mark.parametrize(
    ("script", "fps", "count", "expected"),
    [
        # no failure: ids count grabs, whatever the timestamps say (a decoder delay looks like
        # a jump: MPEG-1 in AVI reports 0 ms, then 80 ms at 25 fps)
        ([0, 0, 0, 500], 10, 0, [(0, 0), (1, 1), (2, 2), (3, 3)]),
        ([0, 80, 120, 160], 25, 4, [(0, 0), (1, 1), (2, 2), (3, 3)]),
        # a failure, then frames 3 and 4 (by timestamp): id 2 is unreadable
        ([0, 100, None, 300, 400], 10, 5, [(0, 0), (1, 1), (2, None), (3, 3), (4, 4)]),
        # a failure, then the decoder gives an earlier frame again (the duplicates)
        ([0, 100, 200, None, 100, 200, 300], 10, 7, [(0, 0), (1, 1), (2, 2)]),
        # ... or the same timestamp again
        ([0, 100, None, 100, 200], 10, 5, [(0, 0), (1, 1)]),
        # a failure and no frame rate: nothing after it is provably new
        ([0, 100, None, 300], 0, 4, [(0, 0), (1, 1)]),
        ([0, 100, None, 300], float("nan"), 4, [(0, 0), (1, 1)]),
        # a failure whose timestamp claims a jump far beyond the header and the failures
        ([0, 100, None, 1e9], 10, 4, [(0, 0), (1, 1)]),
        # the first frame fails: the next one's id comes from its timestamp
        ([None, 100, 200], 10, 3, [(0, None), (1, 1), (2, 2)]),
        # a grab that raises is a failed grab
        ([0, "raise", 200, 300], 10, 4, [(0, 0), (1, None), (2, 2), (3, 3)]),
        # a timestamp that rounds to the next frame still gets the next id, never an old one
        ([0, 100, None, 140], 10, 4, [(0, 0), (1, 1), (2, 3)]),
    ],
)
def test_frames_after_a_failure_are_used_only_when_provably_new(
    monkeypatch, script, fps, count, expected
):
    monkeypatch.setattr(fr.cv2, "VideoCapture", lambda _: _ScriptedCapture(script, fps, count))
    got = [(fid, None if rgb is None else int(rgb[0, 0, 0])) for fid, rgb, _ in
           fr.iter_video("scripted.avi")]  # fmt: skip
    assert got == expected


def test_too_many_failures_in_a_row_end_the_stream(monkeypatch):
    script = [0, 100] + [None] * fr.MAX_GRAB_FAILURES + [(2 + fr.MAX_GRAB_FAILURES) * 100]
    monkeypatch.setattr(fr.cv2, "VideoCapture", lambda _: _ScriptedCapture(script, 10, 100))
    assert [fid for fid, _, _ in fr.iter_video("scripted.avi")] == [0, 1]


# ------------------------------------------------------------------ real video, broken partway


def _megamind_frames(n: int, side: tuple[int, int] = (160, 120)) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(MEGAMIND))
    out = []
    while len(out) < n and cap.grab():
        ok, img = cap.retrieve()
        assert ok
        out.append(cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), side, cv2.INTER_AREA))
    cap.release()
    return out


def _corrupt(data: bytes, how: str) -> bytes:
    d = bytearray(data)
    n = len(d)
    if how == "zero-middle":
        d[int(n * 0.45) : int(n * 0.55)] = bytes(int(n * 0.55) - int(n * 0.45))
    elif how == "garbage-middle":
        rng = np.random.default_rng(1)
        d[int(n * 0.3) : int(n * 0.4)] = rng.integers(0, 256, int(n * 0.4) - int(n * 0.3),
                                                      np.uint8).tobytes()  # fmt: skip
    elif how == "truncated":
        d = d[: int(n * 0.6)]
    elif how == "chunk-headers":
        chunks = [m.start() for m in re.finditer(b"00dc", d)]
        for c in chunks[100:140:3]:
            d[c : c + 8] = b"XXXX\xff\xff\xff\x7f"
    return bytes(d)


@needs_megamind
@pytest.mark.parametrize("how", ["zero-middle", "garbage-middle", "truncated", "chunk-headers"])
def test_real_video_broken_partway_never_repeats_a_frame(tmp_path, how):
    """Megamind.avi with a damaged middle: each frame at most once, in order, every id once."""
    reference = {_digest(rgb): fid for fid, rgb, _ in fr.iter_video(str(MEGAMIND))}
    assert len(reference) == 270  # every frame of the intact video is distinct
    path = tmp_path / "Megamind.avi"
    path.write_bytes(_corrupt(MEGAMIND.read_bytes(), how))
    track = _only_track(path)
    got = _inputs(track)
    decoded = [(fid, rgb) for fid, rgb, reason, _, _ in got if reason is None]
    _assert_every_id_once([g[0] for g in got], max(track.expected, len(got)))
    assert decoded and (len(decoded) < 270 or how != "truncated")
    digests = [_digest(rgb) for _, rgb in decoded]
    assert len(set(digests)) == len(digests), "a frame was yielded twice"
    # frames that match the intact video come in their original order: never an earlier one
    order = [reference[d] for d in digests if d in reference]
    assert order == sorted(order) and len(order) == len(set(order))
    reasons = Counter(g[2] for g in got)
    assert set(reasons) <= {None, fr.UNREADABLE_VIDEO_FRAME, fr.VIDEO_STREAM_ENDED}


@needs_megamind
def test_real_frames_with_broken_frames_keep_their_ids(tmp_path):
    """Real content in an MJPG AVI, frames 20-23 broken, then 40 on (longer than the retries)."""
    frames = _megamind_frames(90)
    intact = tmp_path / "intact.avi"
    _write_video(intact, frames, fps=24)
    reference = [rgb for _, rgb, _ in fr.iter_video(str(intact))]
    assert len(reference) == 90
    path = tmp_path / "broken.avi"
    shutil.copy(intact, path)
    _break_mjpeg(path, [20, 21, 22, 23, *range(40, 90)])
    got = _inputs(_only_track(path))
    _assert_every_id_once([g[0] for g in got], 90)
    for fid, rgb, reason, _, _ in got:
        if 20 <= fid <= 23:
            assert reason == fr.UNREADABLE_VIDEO_FRAME
        elif fid >= 40:
            assert reason == fr.VIDEO_STREAM_ENDED
        else:
            assert reason is None and np.array_equal(rgb, reference[fid]), fid


# ------------------------------------------------------------------ header frame counts


def test_mpeg1_header_count_is_not_trusted(tmp_path):
    path = tmp_path / "clip.mpg"
    _write_video(path, (_label_frame(i) for i in range(23)), fourcc="PIM1", fps=25)
    track = _only_track(path)
    assert track.expected == max(0, _header_count(path))  # whatever OpenCV reports
    got = _inputs(track)
    _assert_every_id_once([g[0] for g in got], max(23, track.expected))
    decoded = [(fid, rgb) for fid, rgb, reason, _, _ in got if reason is None]
    assert [fid for fid, _ in decoded] == list(range(23))  # every frame used
    assert all(_read_label(rgb) == fid for fid, rgb in decoded)


@pytest.mark.parametrize("count", [0, 12, 30])
def test_container_frame_count_too_small_or_too_large(tmp_path, count):
    path = tmp_path / "pan.avi"
    _labelled_mjpeg(path, 20)
    _set_avi_frame_count(path, count)
    assert _header_count(path) == count
    got = _inputs(_only_track(path))
    _assert_every_id_once([g[0] for g in got], max(20, count))
    assert all(g[2] is None and _read_label(g[1]) == g[0] for g in got[:20])
    assert [g[2] for g in got[20:]] == [fr.VIDEO_STREAM_ENDED] * (count - 20)


# ------------------------------------------------------------------ masks of videos


def _strip_mask(i: int, w: int = 80, h: int = 64) -> np.ndarray:
    """A mask whose white part is 8 + 2*i columns wide (and always covers the label points)."""
    m = np.full((h, w, 3), 255, np.uint8)
    m[: h // 4, 8 + 2 * i :] = 0
    return m


def _strip_width(mask: np.ndarray) -> int:
    return int((mask[mask.shape[0] // 8] > 0).sum())


@pytest.mark.parametrize(("broken", "mask_broken"), [((4, 5), ()), ((), (3,)), ((2,), (2, 6))])
def test_mask_video_stays_aligned_by_frame_id(tmp_path, broken, mask_broken):
    (tmp_path / "v").mkdir()
    (tmp_path / "m").mkdir()
    video, mvideo = tmp_path / "v" / "pan.avi", tmp_path / "m" / "pan.avi"
    _labelled_mjpeg(video, 12, broken)
    _write_video(mvideo, (_strip_mask(i) for i in range(10)))  # two masks short
    _break_mjpeg(mvideo, mask_broken)
    track = _only_track(tmp_path / "v", mask_root=str(tmp_path / "m"))
    assert track.mask_video == str(mvideo)
    got = _inputs(track)
    _assert_every_id_once([g[0] for g in got], 12)
    for fid, rgb, reason, mask, mreason in got:
        if fid in broken:
            assert reason == fr.UNREADABLE_VIDEO_FRAME
        elif fid in mask_broken:
            assert reason is None and mreason == fr.CORRUPT_MASK
        elif fid >= 10:
            assert reason is None and mreason == fr.MISSING_MASK
        else:
            assert reason is None and mreason is None and _read_label(rgb) == fid
            assert abs(_strip_width(mask) - (8 + 2 * fid)) <= 1, fid


# ------------------------------------------------------------------ frame folders


def _write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img)
    assert ok
    path.write_bytes(buf.tobytes())


def _tracks_by_dir(disc) -> dict[str, list[tuple[int, ...]]]:
    out: dict[str, list[tuple[int, ...]]] = {}
    for t in disc.tracks:
        out.setdefault(Path(t.dir).name, []).append(t.ids)
    return out


def test_frame_folders_are_ordered_and_split_by_number(tmp_path):
    root = tmp_path / "frames"
    for i in range(14):
        _write_png(root / "plain" / f"{i}.png", _label_frame(i, 32, 32))  # unpadded
        if i not in (6, 7):
            _write_png(root / "gap" / f"{i:04d}.png", _label_frame(i, 32, 32))
        _write_png(root / "dup" / f"{i}.png", _label_frame(i, 32, 32))
        _write_png(root / "named" / f"take2_frame_{i:04d}.png", _label_frame(i, 32, 32))
    _write_png(root / "dup" / "0005.png", _label_frame(99, 32, 32))
    _write_png(root / "named" / "cover.png", _label_frame(0, 32, 32))
    disc = discover_video(root)
    runs = _tracks_by_dir(disc)
    assert runs["plain"] == [tuple(range(14))]
    assert runs["gap"] == [tuple(range(6)), tuple(range(8, 14))]
    assert runs["dup"] == [tuple(range(5)), tuple(range(6, 14))]
    assert runs["named"] == [tuple(range(14))]
    plain = next(t for t in disc.tracks if t.dir.endswith("plain"))
    assert plain.names == tuple(f"{i}.png" for i in range(14))
    excluded = {(e.reason, Path(e.dir).name): (e.names, e.ids) for e in disc.excluded}
    assert excluded[("duplicate_frame_id", "dup")] == (("0005.png", "5.png"), (5, 5))
    assert excluded[("no_frame_number", "named")] == (("cover.png",), (-1,))
    assert len(disc.excluded) == 2
    assert all(KEY_SAFE.fullmatch(t.track_id) for t in disc.tracks)


def test_frame_folder_masks_are_matched_by_number(tmp_path):
    root, mroot = tmp_path / "frames", tmp_path / "masks"
    for i in range(6):
        _write_png(root / "seq" / f"frame_{i}.png", _label_frame(i, 32, 32))
        if i != 4:
            _write_png(mroot / "seq" / f"mask-{i:05d}.png", _strip_mask(i, 32, 32)[..., 0])
    track = _only_track(root, mask_root=str(mroot))
    assert track.ids == tuple(range(6))
    assert track.mask_names == tuple(None if i == 4 else f"mask-{i:05d}.png" for i in range(6))
    for fid, rgb, reason, mask, mreason in _inputs(track):
        assert reason is None and _read_label(rgb) == fid
        if fid == 4:
            assert mreason == fr.MISSING_MASK
        else:
            assert mreason is None and _strip_width(mask) == 8 + 2 * fid


def test_bad_frames_in_a_folder_are_skipped_not_fatal(tmp_path):
    root, mroot = tmp_path / "frames", tmp_path / "masks"
    for i in range(12):
        img = _label_frame(i, 40, 40) if i == 6 else _label_frame(i, 32, 32)
        _write_png(root / "seq" / f"{i:03d}.png", img)
        _write_png(mroot / "seq" / f"{i:03d}.png", np.full((32, 32), 255, np.uint8))
    (root / "seq" / "002.png").write_bytes(b"")
    (mroot / "seq" / "009.png").write_bytes(b"")
    track = _only_track(root, mask_root=str(mroot))
    meta = _process(track, tmp_path)
    assert sorted((fid, reason) for _, fid, reason in meta["skipped"]) == [
        (2, fr.EMPTY_FILE),
        (6, fr.FRAME_SIZE),
        (9, fr.EMPTY_MASK_FILE),
    ]
    kept = [f[0] for f in meta["frames"]]
    assert kept == [0, 1, 3, 4, 5, 7, 8, 10, 11] and meta["n_input"] == 12
    clips = [[meta["frames"][k][0] for k in range(a, b)] for a, b in meta["clips"]]
    assert clips == [[0, 1], [3, 4, 5], [7, 8], [10, 11]]  # a skipped frame ends its clip


# ------------------------------------------------------------------ discovery


def test_nested_videos_are_found_with_key_safe_names(tmp_path):
    root = tmp_path / "videos"
    (root / "a b" / "c.d").mkdir(parents=True)
    (root / ".hidden").mkdir()
    _labelled_mjpeg(root / "a b" / "c.d" / "pan 1.avi", 4)
    _labelled_mjpeg(root / "top.avi", 4)
    _labelled_mjpeg(root / ".hidden" / "x.avi", 4)
    (root / "a b" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))
    (root / "a b" / "notes.txt").write_text("not a video")
    disc = discover_video(root)
    assert sorted(t.track_id for t in disc.tracks) == ["a_b_c_d_pan_1-00000000", "top-00000000"]
    assert all(KEY_SAFE.fullmatch(t.track_id) and t.kind == "video" for t in disc.tracks)
    assert [(e.reason, e.names, e.ids) for e in disc.excluded] == [
        ("unreadable_video", ("a b/broken.mp4",), (-1,))
    ]
    assert any("broken.mp4" in n for n in disc.notes)


def test_a_video_file_that_cannot_be_opened_alone_is_an_error(tmp_path):
    path = tmp_path / "broken.avi"
    path.write_bytes(b"RIFF" + bytes(100))
    with pytest.raises(SourceError):
        discover_video(path)


def test_mask_root_covering_some_videos(tmp_path):
    root, mroot = tmp_path / "videos", tmp_path / "masks"
    (root / "sub").mkdir(parents=True)
    mroot.mkdir()
    for name in ("a.avi", "sub/b.avi"):
        _labelled_mjpeg(root / name, 4)
    _write_video(mroot / "a.avi", (_strip_mask(i) for i in range(4)))
    with pytest.raises(SourceError) as err:
        discover_video(root, mask_root=str(mroot), keep_mask=True)
    msg = str(err.value)
    assert "\n" not in msg and "sub/b.avi" in msg and "--keep-mask" in msg
    disc = discover_video(root, mask_root=str(mroot))
    masks = {t.track_id: t.mask_video for t in disc.tracks}
    assert masks == {"a-00000000": str(mroot / "a.avi"), "sub_b-00000000": None}
    assert len(disc.notes) == 1 and "sub/b.avi" in disc.notes[0]


# ------------------------------------------------------------------ builds


def _check_build(out: Path, summary: dict, label: bool = True) -> tuple[list, list]:
    """Checks every video/frame-folder build must pass; returns (index rows, skipped rows)."""
    assert validate(out) == []
    index = pq.read_table(out / "index.parquet").to_pylist()
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    keys = [r["key"] for r in index]
    assert len(keys) == len(set(keys))
    in_windows: dict[tuple[str, int], str] = {}  # (clip, frame id) -> content digest
    b = open_build(out)
    for split in b.splits:
        for s in b.samples(split):
            ids = s["meta"]["frame_ids"]
            assert ids == list(range(ids[0], ids[0] + len(ids)))
            for fid, img in zip(ids, s["frames"], strict=True):
                if label:
                    assert _read_label(img) == fid, (s["key"], ids)
                d = _digest(img)
                assert in_windows.setdefault((s["meta"]["clip_id"], fid), d) == d
    # no frame under two ids of one clip; no file twice in the skip record; none in both
    by_clip: dict[str, list[str]] = {}
    for (clip, _), d in in_windows.items():
        by_clip.setdefault(clip, []).append(d)
    assert all(len(ds) == len(set(ds)) for ds in by_clip.values())
    rows = [(r["clip_id"], r["frame_id"], r["source_path"]) for r in skipped]
    assert len(rows) == len(set(rows))
    used = {(_prefix(c), f) for c, f in in_windows}
    assert not used & {(_prefix(r["clip_id"]), r["frame_id"]) for r in skipped}
    assert summary["frames_input"] == len(in_windows) + len(skipped)
    return index, skipped


def _prefix(clip_id: str) -> str:
    return clip_id.rsplit("-", 1)[0]


def _ids_of(prefix: str, index, skipped) -> list[int]:
    """Every frame id of one input, from its windows and its skip rows."""
    ids = {f for r in index if _prefix(r["clip_id"]) == prefix for f in r["frame_ids"]}
    return sorted(ids | {r["frame_id"] for r in skipped if _prefix(r["clip_id"]) == prefix})


def test_video_build_accounts_for_every_frame(tmp_path):
    root = tmp_path / "videos"
    (root / "a b").mkdir(parents=True)
    _labelled_mjpeg(root / "a b" / "pan.avi", 16, broken=(5, 6))
    _labelled_mjpeg(root / "count0.avi", 10)
    _set_avi_frame_count(root / "count0.avi", 0)
    _labelled_mjpeg(root / "long.avi", 10)
    _set_avi_frame_count(root / "long.avi", 14)
    _write_video(root / "clip.mpg", (_label_frame(i) for i in range(23)), "PIM1", 25)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))
    out = tmp_path / "shards"
    cfg = BuildConfig(src="video", root=str(root), size=32, flow="dis", val_fraction=0.0,
                      shard_size=8)  # fmt: skip
    summary = build(cfg, Runtime(out=str(out), workers=1, progress=False))
    index, skipped = _check_build(out, summary)
    assert _ids_of("a_b_pan", index, skipped) == list(range(16))
    assert _ids_of("count0", index, skipped) == list(range(10))
    assert _ids_of("long", index, skipped) == list(range(14))
    assert _ids_of("clip", index, skipped) == list(range(23))
    reasons = Counter((_prefix(r["clip_id"]), r["reason"]) for r in skipped)
    assert reasons[("a_b_pan", "unreadable_video_frame")] == 2
    assert reasons[("long", "video_stream_ended")] == 4
    assert reasons[("broken", "unreadable_video")] == 1
    assert not any(r["reason"] == "video_stream_ended" and not r["clip_id"].startswith("long")
                   for r in skipped)  # fmt: skip
    assert {r["clip_id"] for r in index if r["clip_id"].startswith("a_b_pan")} == {
        "a_b_pan-00000000",
        "a_b_pan-00000007",
    }


@needs_megamind
def test_real_video_broken_partway_builds_without_duplicates(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    frames = _megamind_frames(60)
    _write_video(root / "mm.avi", frames, fps=24)
    _break_mjpeg(root / "mm.avi", [12, 13, *range(30, 60)])
    (root / "Megamind.avi").write_bytes(_corrupt(MEGAMIND.read_bytes(), "zero-middle"))
    out = tmp_path / "shards"
    cfg = BuildConfig(src="video", root=str(root), size=32, flow_size=32, flow="dis",
                      val_fraction=0.0, shard_size=64)  # fmt: skip
    summary = build(cfg, Runtime(out=str(out), workers=1, progress=False))
    index, skipped = _check_build(out, summary, label=False)
    assert _ids_of("mm", index, skipped) == list(range(60))
    assert _ids_of("Megamind", index, skipped) == list(range(270))
    mm = Counter(r["reason"] for r in skipped if r["clip_id"].startswith("mm"))
    assert mm == {"unreadable_video_frame": 2, "video_stream_ended": 30}


def test_frame_folder_build_windows_hold_their_frames(tmp_path):
    root, mroot = tmp_path / "frames", tmp_path / "masks"
    for i in range(14):
        if i not in (6, 7):
            _write_png(root / "seq" / f"{i}.png", _label_frame(i, 32, 32))
            _write_png(mroot / "seq" / f"m{i:04d}.png", _strip_mask(i, 32, 32)[..., 0])
    _write_png(root / "seq" / "0005.png", _label_frame(77, 32, 32))  # a duplicate of 5
    _write_png(root / "seq" / "thumbnail.png", _label_frame(0, 32, 32))
    (root / "seq" / "12.png").write_bytes(b"")
    out = tmp_path / "shards"
    cfg = BuildConfig(src="video", root=str(root), mask_root=str(mroot), keep_mask=True,
                      size=32, flow="dis", val_fraction=0.0)  # fmt: skip
    summary = build(cfg, Runtime(out=str(out), workers=1, progress=False))
    index, skipped = _check_build(out, summary)
    windows = sorted(tuple(r["frame_ids"]) for r in index)
    assert windows == [(0, 1, 2), (1, 2, 3), (2, 3, 4), (8, 9, 10), (9, 10, 11)]
    assert sorted((r["frame_id"], r["reason"]) for r in skipped) == [
        (-1, "no_frame_number"),
        (5, "duplicate_frame_id"),
        (5, "duplicate_frame_id"),
        (12, "empty_file"),
        (13, "clip_shorter_than_window"),
    ]
    for s in open_build(out).samples("train"):
        for fid, m in zip(s["meta"]["frame_ids"], s["masks"], strict=True):
            assert _strip_width(m) == 8 + 2 * fid  # the mask of that frame number


def test_mpeg1_in_avi_keeps_sequential_ids(tmp_path):
    """MPEG-1 in AVI reports a decoder delay as a timestamp jump: ids must not follow it."""
    path = tmp_path / "c.avi"
    _write_video(path, (_label_frame(i) for i in range(15)), fourcc="PIM1", fps=25)
    got = [(fid, reason) for fid, _, reason in fr.iter_video(str(path))]
    assert [g[0] for g in got] == list(range(15)) and {g[1] for g in got} == {None}
    labels = [_read_label(rgb) for _, rgb, _ in fr.iter_video(str(path))]
    assert labels == list(range(15))


def test_two_inputs_with_one_clip_name_are_refused_up_front(tmp_path):
    same = tmp_path / "same"
    same.mkdir()
    _labelled_mjpeg(same / "x.avi", 6)
    _write_folder(same / "x", range(3, 9))
    with pytest.raises(SourceError, match="map to the same clip name 'x'"):
        discover_video(same)
    safe = tmp_path / "safe"
    _write_folder(safe / "a b", range(0, 6))
    _write_folder(safe / "a_b", range(3, 9))
    with pytest.raises(SourceError, match="'a b' and 'a_b' .* same clip name 'a_b'"):
        discover_video(safe)


def test_frames_directly_in_the_root_are_a_frame_folder(tmp_path):
    root = tmp_path / "shots"
    _write_folder(root, range(5))
    _write_folder(root / "sub", range(4))
    disc = discover_video(root)
    assert sorted((t.track_id, t.ids) for t in disc.tracks) == [
        ("shots-00000000", (0, 1, 2, 3, 4)),
        ("sub-00000000", (0, 1, 2, 3)),
    ]
    only = tmp_path / "only"
    _write_folder(only, range(3))
    assert [t.ids for t in discover_video(only).tracks] == [(0, 1, 2)]


def test_broken_links_named_like_inputs_are_recorded(tmp_path):
    root = tmp_path / "v"
    _write_folder(root / "f", range(4))
    (root / "f" / "4.png").symlink_to(tmp_path / "gone.png")
    (root / "lost.mp4").symlink_to(tmp_path / "gone.mp4")
    disc = discover_video(root)
    assert [t.ids for t in disc.tracks] == [(0, 1, 2, 3, 4)]  # frame 4 fails to read later
    assert [(e.reason, e.names) for e in disc.excluded] == [("unreadable_video", ("lost.mp4",))]
    meta = tracks.process_track(tmp_path / "c", disc.tracks[0], tracks.TrackOptions(
        fr.FrameSpec(32, 32)), tracks.CpuPairs(OpenCVFlow("dis"), 0))  # fmt: skip
    assert [(r[1], r[2]) for r in meta["skipped"]] == [(4, "missing_image")]


def _write_folder(folder: Path, ids) -> None:
    for i in ids:
        _write_png(folder / f"{i}.png", _label_frame(i, 32, 32))
