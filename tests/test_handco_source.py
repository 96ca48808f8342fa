"""HanCo as it is on disk: the real meta.json, bad meta.json, damaged and duplicated files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.build import BuildConfig, Runtime, build
from pipeline.cli import main as cli_main
from pipeline.handco import discover_handco
from pipeline.sources import SourceError
from shards_spec import validate

SIZE = 64


def _write_handco(root: Path, seqs: dict[int, int], cams: int = 1, meta: object = "real") -> None:
    """A tiny HanCo tree: rgb/, mask_fg/ (JPEG), meta.json in HanCo's own format.

    ``seqs`` maps sequence id -> frame count; ids missing from it leave gaps in the lists.
    Frame content encodes (seq, cam, frame) so a test can check what a window holds.
    """
    for sid, n in seqs.items():
        for c in range(cams):
            for d in ("rgb", "mask_fg"):
                (root / d / f"{sid:04d}" / f"cam{c}").mkdir(parents=True, exist_ok=True)
            for f in range(n):
                img = np.full((SIZE, SIZE, 3), 20, np.uint8)
                img[8:56, 8:56] = (40 + 5 * f, 30 + sid, 100 + 20 * c)
                name = f"{sid:04d}/cam{c}/{f:08d}.jpg"
                cv2.imwrite(str(root / "rgb" / name), img)
                mask = np.zeros((SIZE, SIZE), np.uint8)
                mask[4:60, 4:60] = 255
                cv2.imwrite(str(root / "mask_fg" / name), mask)
    if meta == "real":
        n_seq = max(seqs) + 1
        lengths = [seqs.get(s, 0) for s in range(n_seq)]
        meta = {
            "is_train": [[True] * n for n in lengths],
            "subject_id": [[s % 3] * n for s, n in enumerate(lengths)],
            "is_valid": [[True] * n for n in lengths],
            "object_id": [[None] * n for n in lengths],
            "has_fit": [[True] * n for n in lengths],
        }
    if meta is not None:
        (root / "meta.json").write_text(json.dumps(meta))


def _meta(root: Path) -> dict:
    return json.loads((root / "meta.json").read_text())


def test_real_meta_format_is_read(tmp_path):
    _write_handco(tmp_path, {0: 6, 2: 5})
    meta = _meta(tmp_path)
    meta["is_train"][2][1] = False  # one non-green-screen frame: a gap
    meta["subject_id"][2] = [7] * 5
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    disc = discover_handco(tmp_path, split_by="subject")
    runs = {t.track_id: list(t.ids) for t in disc.tracks}
    assert runs == {
        "0000-cam0-00000000": [0, 1, 2, 3, 4, 5],
        "0002-cam0-00000000": [0],
        "0002-cam0-00000002": [2, 3, 4],
    }
    assert {t.subject for t in disc.tracks if t.sequence == 2} == {"7"}
    assert {t.group for t in disc.tracks if t.sequence == 2} == {"subject-7"}
    rows = [r for e in disc.excluded for r in e.rows()]
    assert [(r[2], r[3]) for r in rows] == [(1, "not_green_screen")]
    assert rows[0][0].endswith("0002/cam0/00000001.jpg")


def test_dict_form_keyed_by_sequence_name_is_accepted(tmp_path):
    _write_handco(tmp_path, {0: 4, 1: 4})
    meta = _meta(tmp_path)
    as_dict = {k: {f"{s:04d}": v for s, v in enumerate(vals)} for k, vals in meta.items()}
    as_dict["is_train"]["0001"] = [False] * 4
    (tmp_path / "meta.json").write_text(json.dumps(as_dict))
    disc = discover_handco(tmp_path)
    assert [t.sequence for t in disc.tracks] == [0]
    assert sum(len(e) for e in disc.excluded) == 4


@pytest.mark.parametrize(
    "meta, message",
    [
        ([[True]], "expected a JSON object"),
        ({"is_train": [[True] * 4]}, "key 'subject_id' is missing"),
        ("{not json", "not readable JSON"),
        ("short", "has 3 frames but rgb/0000 holds frame 00000003"),
        ("few_sequences", "has 1 sequences but rgb/0001 exists"),
        ("scalar", "is_valid must be a list with one entry per sequence"),
    ],
)
def test_bad_meta_json_is_one_line_before_ray(tmp_path, capsys, meta, message):
    _write_handco(tmp_path, {0: 4, 1: 4})
    real = _meta(tmp_path)
    if meta == "short":
        real["is_train"][0] = [True] * 3
        meta = real
    elif meta == "few_sequences":
        real["is_valid"] = real["is_valid"][:1]
        meta = real
    elif meta == "scalar":
        real["is_valid"] = True
        meta = real
    text = meta if isinstance(meta, str) else json.dumps(meta)
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(SourceError, match="meta.json") as e:
        discover_handco(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)
    rc = cli_main(["build", "--src", "handco", "--root", str(tmp_path), "--out",
                   str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before any work


def test_missing_meta_json_says_is_train_is_unknown(tmp_path):
    _write_handco(tmp_path, {0: 4}, meta=None)
    with pytest.raises(SourceError, match="is_train .* is unknown.*--all-frames"):
        discover_handco(tmp_path)
    disc = discover_handco(tmp_path, green_screen_only=False)
    assert [list(t.ids) for t in disc.tracks] == [[0, 1, 2, 3]]


def test_duplicate_frame_ids_are_recorded_never_chosen(tmp_path):
    _write_handco(tmp_path, {0: 8})
    cam = tmp_path / "rgb" / "0000" / "cam0"
    shutil.copy(cam / "00000003.jpg", cam / "3.jpg")
    (cam / "notes.jpg").write_bytes(b"x")
    disc = discover_handco(tmp_path)
    assert [list(t.ids) for t in disc.tracks] == [[0, 1, 2], [4, 5, 6, 7]]
    rows = sorted((r[0].rsplit("/", 1)[1], r[2], r[3]) for e in disc.excluded for r in e.rows())
    assert rows == [
        ("00000003.jpg", 3, "duplicate_frame_id"),
        ("3.jpg", 3, "duplicate_frame_id"),
        ("notes.jpg", -1, "no_frame_number"),
    ]


def test_zero_byte_and_damaged_files_are_skips_not_crashes(tmp_path):
    _write_handco(tmp_path, {0: 12, 1: 12}, cams=2)
    (tmp_path / "rgb" / "0000" / "cam0" / "00000004.jpg").write_bytes(b"")
    (tmp_path / "mask_fg" / "0000" / "cam1" / "00000007.jpg").write_bytes(b"")
    (tmp_path / "rgb" / "0001" / "cam0" / "00000002.jpg").write_bytes(b"\x00" * 300)
    big = np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8)
    big[:] = 90
    cv2.imwrite(str(tmp_path / "rgb" / "0001" / "cam1" / "00000009.jpg"), big)
    out = tmp_path / "o"
    cfg = BuildConfig(src="handco", root=str(tmp_path), size=32, flow="dis", val_fraction=0.0)
    summary = build(cfg, Runtime(out=str(out), workers=2, progress=False))
    assert validate(out) == []
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    got = {(Path(r["source_path"]).parent.parent.name, Path(r["source_path"]).parent.name,
            r["frame_id"], r["reason"]) for r in skipped}  # fmt: skip
    assert ("0000", "cam0", 4, "empty_file") in got
    assert ("0000", "cam1", 7, "empty_mask_file") in got
    assert ("0001", "cam0", 2, "corrupt_image") in got
    # a frame of another size in a track: skipped (the mask no longer fits it either)
    assert any(g[:3] == ("0001", "cam1", 9) for g in got)
    assert summary["frames_input"] == 48
    index = pq.read_table(out / "index.parquet").to_pylist()
    in_windows = {(r["clip_id"], f) for r in index for f in r["frame_ids"]}
    assert len(in_windows) + len(skipped) == 48


def test_build_on_real_format_keeps_labels_true(tmp_path):
    """Each window's frame_ids label the frames it holds (content encodes the frame id)."""
    _write_handco(tmp_path, {0: 9, 3: 7})
    out = tmp_path / "o"
    cfg = BuildConfig(src="handco", root=str(tmp_path), size=64, flow="dis", val_fraction=0.0,
                      mask="none")  # fmt: skip
    summary = build(cfg, Runtime(out=str(out), workers=2, progress=False))
    assert summary["windows"] == (9 - 2) + (7 - 2)
    from shards_spec import open_build

    for s in open_build(out).samples("train"):
        for fid, frame in zip(s["meta"]["frame_ids"], s["frames"], strict=True):
            level = int(np.median(frame[20:44, 20:44, 2]))  # written as BGR
            assert abs(level - (40 + 5 * fid)) <= 3, (s["key"], fid, level)


def test_default_flow_size_comes_from_the_whole_discovery(tmp_path):
    """Mixed source sizes: one flow resolution for every pair, whatever finishes first."""
    from pipeline.sources import default_flow_size

    _write_handco(tmp_path, {0: 4, 1: 4})
    small = np.full((44, 52, 3), 60, np.uint8)  # cropped side 44 -> 40 on RAFT's 8-px grid
    for f in range(4):
        cv2.imwrite(str(tmp_path / "rgb" / "0001" / "cam0" / f"{f:08d}.jpg"), small)
    disc = discover_handco(tmp_path)
    assert sorted(t.side for t in disc.tracks) == [44, SIZE]
    assert default_flow_size(disc.tracks) == 40
    assert default_flow_size(list(reversed(disc.tracks))) == 40


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}])
def test_meta_values_of_the_wrong_type_are_one_line(tmp_path, value):
    _write_handco(tmp_path, {0: 4})
    meta = _meta(tmp_path)
    meta["subject_id"][0] = [value] * 4
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SourceError, match=r"meta.json: subject_id\[0\] values must be numbers"):
        discover_handco(tmp_path)


def test_odd_folder_names_are_reported_not_fatal(tmp_path, capsys):
    _write_handco(tmp_path, {0: 4})
    (tmp_path / "rgb" / "0000" / "camX").mkdir()
    (tmp_path / "rgb" / "²").mkdir()  # isdigit() is true, int() refuses it
    (tmp_path / "rgb" / "notes.txt").write_text("x")
    disc = discover_handco(tmp_path)
    assert [t.track_id for t in disc.tracks] == ["0000-cam0-00000000"]
    assert disc.notes and all(n in disc.notes[0] for n in ("0000/camX", "²", "notes.txt"))
    (tmp_path / "rgb" / "99999999999").mkdir()
    with pytest.raises(SourceError, match="99999999999 is too large"):
        discover_handco(tmp_path)


def test_broken_link_named_like_a_frame_is_a_recorded_skip(tmp_path):
    _write_handco(tmp_path, {0: 4})
    (tmp_path / "rgb" / "0000" / "cam0" / "00000004.jpg").symlink_to(tmp_path / "gone.jpg")
    meta = _meta(tmp_path)
    for k in meta:
        meta[k][0].append(meta[k][0][0])
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    disc = discover_handco(tmp_path)
    assert [t.ids for t in disc.tracks] == [(0, 1, 2, 3, 4)]
    from pipeline import frames as fr

    assert fr.read_image(disc.tracks[0].frame_path(4)) == (None, "missing_image")
