"""Every input frame ends in a window or in skipped.parquet, once, under every plan option.

And the manifest's sigma and flow stats are those of the distinct adjacent pairs of the train
split's windows, as SPEC section 6 says, recomputed here from the index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.build import BuildConfig, Runtime, build
from pipeline.plan import DROPPED_BY_MAX_WINDOWS, SHORT_CLIP
from shards_spec.format import distinct_pair_values, flow_stats

OPTIONS = {
    "default": {},
    "max_windows": {"max_windows": 12},
    "frame_stride": {"frame_stride": 2},
    "max_clips": {"max_clips": 3},
    "window4": {"window": 4},
}


@pytest.fixture(scope="module")
def root(synth_root, tmp_path_factory) -> Path:
    """The synthetic set with two corrupt frames: track 0 keeps a 2-frame clip (shorter than
    any window), track 1 a 3-frame clip (shorter than K=4)."""
    from pipeline.handco import discover_handco

    copy = tmp_path_factory.mktemp("acct") / "data"
    shutil.copytree(synth_root, copy)
    tracks = discover_handco(copy).tracks
    for t, i in ((tracks[0], 2), (tracks[1], 10)):
        Path(t.frame_path(i)).write_bytes(b"not a jpeg")
    return copy


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def built(request, root, tmp_path_factory) -> tuple[str, Path, dict]:
    name = request.param
    cfg = BuildConfig(src="synthetic", root=str(root), size=32, flow="dis", shard_size=7,
                      val_fraction=0.3, **OPTIONS[name])  # fmt: skip
    out = tmp_path_factory.mktemp(name) / "shards"
    summary = build(cfg, Runtime(out=str(out), workers=2, progress=False))
    return name, out, summary


def _frame(path: str) -> tuple[int, int, int]:
    """(sequence, camera, frame id) of rgb/SEQ/camC/FRAME.jpg."""
    p = Path(path)
    return int(p.parent.parent.name), int(p.parent.name[3:]), int(p.stem)


def _runs_clip_ids(frames: set[tuple[int, int, int]]) -> dict[tuple[int, int, int], str]:
    """Index-style clip id of each kept frame: the first frame of its run of consecutive ids."""
    out = {}
    for seq, cam, fid in sorted(frames):
        prev = out.get((seq, cam, fid - 1))
        out[(seq, cam, fid)] = prev or f"{seq:04d}-cam{cam}-{fid:08d}"
    return out


def test_every_input_frame_is_in_a_window_or_skipped_once(built, root):
    name, out, summary = built
    index = pq.read_table(out / "index.parquet").to_pylist()
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    inputs = {_frame(str(p)) for p in root.glob("rgb/*/cam*/*.jpg")}
    windowed = {(r["sequence"], r["camera"], f) for r in index for f in r["frame_ids"]}
    by_clip = {(r["clip_id"], f) for r in index for f in r["frame_ids"]}
    assert len(by_clip) == len(windowed)  # a frame is in one clip only
    recorded = [_frame(r["source_path"]) for r in skipped]
    assert len(set(recorded)) == len(recorded), "a frame is recorded twice"
    assert len(inputs) == len(by_clip) + len(skipped)
    assert windowed | set(recorded) == inputs and not windowed & set(recorded)
    assert not by_clip & {(r["clip_id"], r["frame_id"]) for r in skipped}
    assert summary["frames_input"] == len(inputs)
    reasons = {r["reason"] for r in skipped}
    expected = {
        "max_windows": DROPPED_BY_MAX_WINDOWS,
        "frame_stride": "frame_stride",
        "max_clips": "max_clips",
        "window4": SHORT_CLIP,
        "default": SHORT_CLIP,
    }
    assert expected[name] in reasons and "corrupt_image" in reasons, reasons
    if name == "window4":
        short = [r for r in skipped if r["reason"] == SHORT_CLIP]
        assert len(short) == 2 + 3


def test_clip_rows_use_the_index_clip_id(built):
    name, out, _ = built
    if name == "frame_stride":
        pytest.skip("with --frame-stride 2, consecutive kept ids are 2 apart")
    index = pq.read_table(out / "index.parquet").to_pylist()
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    in_clips = [r for r in skipped if r["reason"] in (SHORT_CLIP, DROPPED_BY_MAX_WINDOWS)]
    kept = {(r["sequence"], r["camera"], f): r["clip_id"] for r in index for f in r["frame_ids"]}
    for r in in_clips:
        kept[_frame(r["source_path"])] = r["clip_id"]
    expected = _runs_clip_ids(set(kept))
    assert kept == expected
    if name == "max_windows":
        dropped = [r for r in in_clips if r["reason"] == DROPPED_BY_MAX_WINDOWS]
        index_clips = {r["clip_id"] for r in index}
        # some dropped frames share a clip with kept windows: the very same id
        assert dropped and {r["clip_id"] for r in dropped} & index_clips


def test_sigma_and_stats_are_those_of_the_train_windows_pairs(built):
    name, out, _ = built
    manifest = json.loads((out / "dataset.json").read_text())
    index = pq.read_table(out / "index.parquet").to_pylist()
    values = distinct_pair_values(r for r in index if r["split"] == "train")
    assert values
    stats = manifest["flow"]["stats"]
    want = flow_stats(values)
    assert stats["count"] == want["count"] == len(values)
    for field in ("mean", "min", "max"):
        assert stats[field] == pytest.approx(want[field], rel=1e-12)
    assert stats["percentiles"] == pytest.approx(want["percentiles"], rel=1e-12)
    sigma = manifest["flow"]["sigma"]
    assert sigma == pytest.approx(float(np.median(values)), rel=1e-12)
    for r in index[:50]:
        assert r["weight"] == pytest.approx([float(np.exp(-m / sigma)) for m in r["flow_msq"]])
    if name == "max_windows":
        assert manifest["counts"]["windows_dropped_by_max_windows"] > 0
        assert sum(r["split"] == "train" for r in index) == 12


def test_mag_stats_are_those_of_the_same_pairs(built):
    """flow.mag_stats summarises flow_mag over exactly the pairs flow.stats summarises."""
    _, out, _ = built
    manifest = json.loads((out / "dataset.json").read_text())
    index = pq.read_table(out / "index.parquet").to_pylist()
    train = [r for r in index if r["split"] == "train"]
    mags = distinct_pair_values(train, "flow_mag")
    want = flow_stats(mags)
    got = manifest["flow"]["mag_stats"]
    assert got["count"] == want["count"] == manifest["flow"]["stats"]["count"] == len(mags)
    for field in ("mean", "min", "max"):
        assert got[field] == pytest.approx(want[field], rel=1e-12)
    assert got["percentiles"] == pytest.approx(want["percentiles"], rel=1e-12)
    assert 0 < got["percentiles"]["p50"] <= got["max"]
