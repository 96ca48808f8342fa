"""Builds from damaged inputs, the RAFT actor path and the real-video source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from buildutil import SHARED_DATA

from pipeline.build import BuildConfig, Runtime, build
from shards_spec import open_build, validate


def _green_frames(root: Path) -> list[tuple[str, int]]:
    """(sequence, frame) pairs that are green-screen and valid, in order."""
    meta = json.loads((root / "meta.json").read_text())
    return [
        (f"{seq:04d}", f)
        for seq in range(len(meta["is_train"]))
        for f, (green, ok) in enumerate(
            zip(meta["is_train"][seq], meta["is_valid"][seq], strict=True)
        )
        if green and ok
    ]


def test_bad_inputs_are_skipped_with_reasons(synth_root, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(synth_root, root)
    good = _green_frames(root)
    picks = [good[i] for i in (2, 5, 8, 11, 14)]
    name = "{}/{}/cam0/{:08d}.jpg"
    (seq, f) = picks[0]
    p = root / name.format("rgb", seq, f)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # truncated JPEG
    (seq, f) = picks[1]
    (root / name.format("rgb", seq, f)).write_bytes(b"\xff\xd8not a jpeg at all\xff\xd9")
    (seq, f) = picks[2]
    (root / name.format("mask_fg", seq, f)).unlink()  # missing mask
    (seq, f) = picks[3]
    cv2.imwrite(str(root / name.format("mask_fg", seq, f)), np.zeros((96, 96), np.uint8))
    (seq, f) = picks[4]
    cv2.imwrite(str(root / name.format("mask_fg", seq, f)), np.full((48, 48), 255, np.uint8))

    out = tmp_path / "shards"
    cfg = BuildConfig(src="handco", root=str(root), size=32, flow="dis", cameras="0",
                      val_fraction=0.0)  # fmt: skip
    summary = build(cfg, Runtime(out=str(out), workers=2, progress=False))
    reasons = summary["skipped_by_reason"]
    for reason in ("truncated_jpeg", "corrupt_image", "missing_mask", "empty_mask",
                   "mask_size_mismatch"):  # fmt: skip
        assert reasons.get(reason) == 1, (reason, reasons)
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    damaged = {(r["reason"], r["frame_id"]) for r in skipped}
    assert ("truncated_jpeg", picks[0][1]) in damaged
    assert validate(out) == []
    # a damaged frame ends its clip: no window holds it, none spans it
    index = pq.read_table(out / "index.parquet").to_pylist()
    for seq, f in picks:
        for r in index:
            if r["sequence"] == int(seq):
                assert not r["frame_ids"][0] <= f <= r["frame_ids"][-1]
    # and every frame of camera 0 is either in a window or in the skip record
    written = {(r["sequence"], fid) for r in index for fid in r["frame_ids"]}
    recorded = {(int(Path(r["source_path"]).parts[-3]), r["frame_id"]) for r in skipped}
    inputs = {(int(p.parent.parent.name), int(p.stem)) for p in (root / "rgb").glob("*/cam0/*.jpg")}
    assert written | recorded == inputs


def test_raft_actor_path_on_cpu(synth_root, tmp_path):
    out = tmp_path / "raft"
    cfg = BuildConfig(src="synthetic", root=str(synth_root), size=32, flow="raft-small",
                      flow_weights="none", raft_iters=2, flow_batch=4, sequences="0",
                      cameras="0", val_fraction=0.0, keep_flow=8)  # fmt: skip
    summary = build(cfg, Runtime(out=str(out), workers=2, progress=False))
    assert summary["flow_backend"] == "raft-small" and summary["windows"] > 0
    assert validate(out) == []
    b = open_build(out)
    assert b.manifest["flow"]["random_weights"] is True
    s = next(b.samples("train"))
    assert s["flow"].shape == (2, 2, 8, 8) and s["flow"].dtype == np.float16
    # the actor's flow_mag, beside flow_msq: K-1 values, mean(|F|)^2 <= mean(|F|^2)
    rows = b.index(["flow_msq", "flow_mag"]).to_pylist()
    for r in rows:
        assert len(r["flow_mag"]) == 2
        assert all(
            g >= 0 and g * g <= m * (1 + 1e-5)
            for g, m in zip(r["flow_mag"], r["flow_msq"], strict=True)
        )
    assert max(g for r in rows for g in r["flow_mag"]) > 0
    flow = b.manifest["flow"]
    assert flow["mag_stats"]["count"] == flow["stats"]["count"] > 0


def test_missing_raft_weights_fail_before_work(synth_root, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rc = main(["build", "--src", "synthetic", "--root", str(synth_root), "--flow", "raft-large",
               "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert rc == 2
    assert "raft_large_C_T_SKHT_V2-ff5fadd5.pth" in capsys.readouterr().err
    assert not (tmp_path / "o" / "train").exists()


@pytest.mark.skipif(
    not (SHARED_DATA / "Megamind.avi").is_file(), reason="../shared/data/Megamind.avi not present"
)
def test_real_video_builds_valid_shards(tmp_path):
    video_dir = tmp_path / "videos"
    video_dir.mkdir()
    (video_dir / "Megamind.avi").symlink_to(SHARED_DATA / "Megamind.avi")
    out = tmp_path / "shards"
    cfg = BuildConfig(src="video", root=str(video_dir), size=64, flow_size=128, flow="dis",
                      frame_stride=3, shard_size=32)  # fmt: skip
    summary = build(cfg, Runtime(out=str(out), workers=2, progress=False))
    assert validate(out) == []
    assert summary["frames_input"] == 270  # every frame: 90 used, 180 recorded as frame_stride
    assert summary["skipped_by_reason"] == {"frame_stride": 180}
    b = open_build(out)
    s = next(b.samples("train"))
    assert s["frames"][0].shape == (64, 64, 3)
    assert s["meta"]["source"] == "video" and s["key"].startswith("Megamind-")
    assert s["meta"]["frame_ids"][1] - s["meta"]["frame_ids"][0] == 3
    assert b.manifest["flow_size"] == 128 and b.manifest["flow"]["stats"]["max"] > 0


def _mjpeg_with_a_broken_frame(path: Path, n: int, broken: int) -> None:
    """An MJPG AVI whose frame ``broken`` holds no JPEG data (an unreadable frame)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 64))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    texture = (rng.random((64, 120, 3)) * 255).astype(np.uint8)
    for i in range(n):
        writer.write(np.ascontiguousarray(texture[:, i * 2 : i * 2 + 80]))
    writer.release()
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 8) if data[i : i + 4] == b"00dc"]
    frame_chunks = [s for s in starts if data[s + 8 : s + 10] == b"\xff\xd8"]
    assert len(frame_chunks) == n
    s = frame_chunks[broken]
    size = int.from_bytes(data[s + 4 : s + 8], "little")
    data[s + 8 : s + 8 + size] = bytes(size)
    path.write_bytes(bytes(data))


def test_unreadable_video_frame_is_skipped_and_splits_the_clip(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _mjpeg_with_a_broken_frame(videos / "pan.avi", n=12, broken=5)
    out = tmp_path / "shards"
    cfg = BuildConfig(src="video", root=str(videos), size=32, flow="dis", shard_size=4)
    summary = build(cfg, Runtime(out=str(out), workers=1, progress=False))
    assert summary["skipped_by_reason"] == {"unreadable_video_frame": 1}
    assert validate(out) == []
    index = pq.read_table(out / "index.parquet").to_pylist()
    windows = sorted(tuple(r["frame_ids"]) for r in index)
    assert windows == [(0, 1, 2), (1, 2, 3), (2, 3, 4)] + [(i, i + 1, i + 2) for i in range(6, 10)]
    assert {r["clip_id"] for r in index} == {"pan-00000000", "pan-00000006"}
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert [(r["frame_id"], r["reason"]) for r in skipped] == [(5, "unreadable_video_frame")]
