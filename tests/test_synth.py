"""The synthetic dataset: HanCo layout, meta.json, determinism, temporal structure."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import synth

SEQ, CAM, FRAMES, SIZE = 3, 2, 12, 64
NAME = re.compile(r"^(\d{4})/cam(\d+)/(\d{8})\.jpg$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "HanCo"
    summary = synth.generate(
        root, sequences=SEQ, cameras=CAM, frames=FRAMES, size=SIZE, seed=3, progress=False
    )
    return root, summary


def _rel_names(root: Path, kind: str) -> set[str]:
    base = root / kind
    return {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()}


def _gray(root: Path, kind: str, seq: int, cam: int, frame: int) -> np.ndarray:
    img = cv2.imread(
        str(root / kind / f"{seq:04d}" / f"cam{cam}" / f"{frame:08d}.jpg"), cv2.IMREAD_GRAYSCALE
    )
    assert img is not None
    return img


def _rgb(root: Path, seq: int, cam: int, frame: int) -> np.ndarray:
    img = cv2.imread(
        str(root / "rgb" / f"{seq:04d}" / f"cam{cam}" / f"{frame:08d}.jpg"), cv2.IMREAD_UNCHANGED
    )
    assert img is not None
    return img[..., ::-1]


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_matches_handco_naming(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    assert sorted(p.name for p in root.iterdir()) == ["mask_fg", "mask_hand", "meta.json", "rgb"]
    names = _rel_names(root, "rgb")
    assert len(names) == SEQ * CAM * FRAMES == summary["images"]
    expected = {
        f"{s:04d}/cam{c}/{f:08d}.jpg" for s in range(SEQ) for c in range(CAM) for f in range(FRAMES)
    }
    assert names == expected
    for name in names:
        assert NAME.match(name), name
    assert _rel_names(root, "mask_fg") == names
    assert _rel_names(root, "mask_hand") == names
    for name in sorted(names)[:: FRAMES // 2]:
        rgb = cv2.imread(str(root / "rgb" / name), cv2.IMREAD_UNCHANGED)
        assert rgb.shape == (SIZE, SIZE, 3)
        for kind in ("mask_fg", "mask_hand"):
            mask = cv2.imread(str(root / kind / name), cv2.IMREAD_UNCHANGED)
            assert mask is not None and mask.shape[:2] == (SIZE, SIZE)
    assert summary["root"] == str(root)
    assert (summary["sequences"], summary["cameras"], summary["frames"]) == (SEQ, CAM, FRAMES)


def test_meta_json_shape(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    meta = json.loads((root / "meta.json").read_text())
    assert set(meta) == {"is_train", "subject_id", "is_valid", "object_id", "has_fit"}
    # HanCo's real format: per key a list indexed by sequence id, of lists indexed by frame id
    for key, per_seq in meta.items():
        assert isinstance(per_seq, list) and len(per_seq) == SEQ, key
        for values in per_seq:
            assert isinstance(values, list) and len(values) == FRAMES
    for s in range(SEQ):
        assert all(isinstance(v, bool) for v in meta["is_train"][s])
        assert all(isinstance(v, bool) for v in meta["is_valid"][s])
        assert all(v is True for v in meta["has_fit"][s])
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in meta["subject_id"][s])
        assert len(set(meta["subject_id"][s])) == 1
        assert all(
            v is None or (isinstance(v, int) and not isinstance(v, bool))
            for v in meta["object_id"][s]
        )
        assert sum(meta["is_valid"][s]) >= FRAMES - 2
    green = [s for s in range(SEQ) if all(meta["is_train"][s])]
    off_green = [s for s in range(SEQ) if not any(meta["is_train"][s])]
    assert sorted(green + off_green) == list(range(SEQ))
    assert off_green and green
    assert summary["green_screen_sequences"] == green
    objects = [s for s in range(SEQ) if any(v is not None for v in meta["object_id"][s])]
    assert objects == summary["object_sequences"] and objects
    assert len(objects) < SEQ


def test_object_id_null_iff_no_object(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    meta = json.loads((root / "meta.json").read_text())
    for s in range(SEQ):
        for c in range(CAM):
            for f in (0, FRAMES // 2, FRAMES - 1):
                fg = _gray(root, "mask_fg", s, c, f) > 128
                hand = _gray(root, "mask_hand", s, c, f) > 128
                object_pixels = int((fg & ~hand).sum())
                if meta["object_id"][s][f] is None:
                    assert object_pixels <= 0.02 * fg.sum(), (s, c, f)
                else:
                    assert object_pixels >= 0.04 * fg.sum(), (s, c, f)


def test_deterministic_bytes(tmp_path: Path) -> None:
    kw = dict(sequences=2, cameras=2, frames=4, size=48, progress=False)
    synth.generate(tmp_path / "a", seed=5, **kw)
    synth.generate(tmp_path / "b", seed=5, **kw)
    synth.generate(tmp_path / "c", seed=6, **kw)
    a, b, c = (_all_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["meta.json"] != c["meta.json"] or any(a[k] != c[k] for k in a)
    differing = sum(a[k] != c[k] for k in a if k.startswith("rgb/"))
    assert differing == sum(k.startswith("rgb/") for k in a)


def test_resume_and_rerun(tmp_path: Path) -> None:
    kw = dict(sequences=2, cameras=1, frames=3, size=32, seed=1, progress=False)
    root = tmp_path / "d"
    synth.generate(root, **kw)
    reference = _all_files(root)
    # a finished dataset returns without touching the files
    mtime = (root / "rgb/0000/cam0/00000000.jpg").stat().st_mtime_ns
    assert synth.generate(root, **kw)["images"] == 6
    assert (root / "rgb/0000/cam0/00000000.jpg").stat().st_mtime_ns == mtime
    # an interrupted run (no meta.json, some files missing) completes to the same bytes
    (root / "meta.json").unlink()
    (root / "rgb/0001/cam0/00000002.jpg").unlink()
    (root / "mask_hand/0000/cam0/00000001.jpg").unlink()
    (root / ".synth-params.json").write_text(
        json.dumps(
            {"sequences": 2, "cameras": 1, "frames": 3, "size": 32, "seed": 1, "quality": 95},
            sort_keys=True,
        )
    )
    synth.generate(root, **kw)
    assert _all_files(root) == reference
    # other arguments into the same folder are refused
    with pytest.raises(ValueError, match="different dataset"):
        synth.generate(root, **{**kw, "seed": 2})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        synth.generate(other, **kw)


def test_masks_nonempty_and_hand_inside_fg(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for s in range(SEQ):
        for c in range(CAM):
            for f in range(FRAMES):
                fg = _gray(root, "mask_fg", s, c, f) > 128
                hand = _gray(root, "mask_hand", s, c, f) > 128
                assert 0.03 * SIZE * SIZE < hand.sum() < 0.7 * SIZE * SIZE
                assert fg.sum() >= hand.sum()
                assert (hand & ~fg).sum() <= 3, (s, c, f)


def test_motion_has_pauses_and_fast_phases(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for s in range(SEQ):
        for c in range(CAM):
            frames = [_rgb(root, s, c, f).astype(np.float32) for f in range(FRAMES)]
            mad = np.array([np.abs(b - a).mean() for a, b in zip(frames, frames[1:], strict=False)])
            assert mad.max() < 25, (s, c, mad)  # consecutive frames stay close
            assert mad.min() < 0.6, (s, c, mad)  # a near-still pair (a pause)
            assert mad.max() > 5 * max(mad.min(), 0.1), (s, c, mad)  # and a fast phase
            far = np.abs(frames[-1] - frames[0]).mean()
            assert far > mad.min()


def test_cameras_differ(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for s in range(SEQ):
        for f in (0, FRAMES - 1):
            views = [_rgb(root, s, c, f).astype(np.float32) for c in range(CAM)]
            assert np.abs(views[0] - views[1]).mean() > 5
            masks = [_gray(root, "mask_fg", s, c, f) > 128 for c in range(CAM)]
            iou = (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()
            assert iou < 0.8


def test_green_screen_background_is_green(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    kernel = np.ones((5, 5), np.uint8)
    for s in range(SEQ):
        fractions = []
        for c in range(CAM):
            for f in (0, FRAMES - 1):
                rgb = _rgb(root, s, c, f).astype(np.int32)
                fg = cv2.dilate(_gray(root, "mask_fg", s, c, f), kernel)
                bg = fg == 0
                r, g, b = rgb[..., 0][bg], rgb[..., 1][bg], rgb[..., 2][bg]
                fractions.append(float(((g > r) & (g > b)).mean()))
        if s in summary["green_screen_sequences"]:
            assert min(fractions) > 0.97, (s, fractions)
        else:
            assert max(fractions) < 0.9, (s, fractions)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sequences": 0}, "sequences must be an integer >= 1"),
        ({"cameras": 0}, "cameras must be an integer >= 1"),
        ({"frames": -2}, "frames must be an integer >= 1"),
        ({"size": 60}, "size must be an integer >= 32 and a multiple of 8"),
        ({"size": 24}, "size must be an integer >= 32 and a multiple of 8"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"quality": 0}, "quality must be an integer in 1..100"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        synth.generate(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_arguments_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "cli"),
            "--sequences",
            "1",
            "--cameras",
            "1",
            "--frames",
            "2",
            "--size",
            "32",
            "--no-progress",
        ]
    )
    assert synth.run(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "2 frames" in line
    assert (tmp_path / "cli" / "rgb" / "0000" / "cam0" / "00000001.jpg").is_file()
    bad = parser.parse_args(["--out", str(tmp_path / "bad"), "--size", "100"])
    with pytest.raises(ValueError, match="multiple of 8"):
        synth.run(bad)
