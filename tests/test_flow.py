"""Flow backends: flow_msq and flow_mag against known fields, RAFT on CPU, weights errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline import flow as fl
from shards_spec.format import flow_weight


def textured(size: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.random((size // 4, size // 4, 3)).astype(np.float32)
    img = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def shifted(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, img.shape[1::-1], borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize(("dx", "dy"), [(2.0, 1.0), (0.0, 3.0), (-1.5, 0.5)])
def test_dis_flow_msq_of_a_known_translation(dx, dy):
    a = textured()
    b = shifted(a, dx, dy)
    field = fl.OpenCVFlow("dis").pairs([a, b])[0]
    inner = field[16:-16, 16:-16]  # borders are ambiguous for any estimator
    assert fl.flow_msq(inner) == pytest.approx(dx * dx + dy * dy, rel=0.1, abs=0.1)
    assert np.median(inner[..., 0]) == pytest.approx(dx, abs=0.15)
    assert np.median(inner[..., 1]) == pytest.approx(dy, abs=0.15)


def test_still_pair_has_zero_msq_and_weight_one():
    a = textured()
    field = fl.OpenCVFlow("farneback").pairs([a, a])[0]
    assert fl.flow_msq(field) < 1e-3
    assert flow_weight(0.0, 5.0) == 1.0
    assert flow_weight(5.0, 5.0) == pytest.approx(np.exp(-1))


def test_flow_msq_units_and_downsampling():
    field = np.zeros((64, 64, 2), np.float32)
    field[..., 0] = 4.0
    assert fl.flow_msq(field) == 16.0
    small = fl.downsample_flow(field, 16)
    assert small.shape == (2, 16, 16) and small.dtype == np.float16
    assert float(small[0].mean()) == pytest.approx(1.0)  # 4 px at 64 -> 1 px at 16


def test_flow_mag_of_known_fields():
    field = np.zeros((64, 48, 2), np.float32)
    field[..., 0], field[..., 1] = 3.0, 4.0  # |F| = 5 everywhere
    assert fl.flow_mag(field) == pytest.approx(5.0, rel=1e-6)
    assert fl.flow_msq(field) == pytest.approx(25.0, rel=1e-6)  # uniform: mag^2 == msq
    # half the pixels still, half moving by (0, -2): mean |F| 1, mean |F|^2 2
    half = np.zeros((32, 32, 2), np.float32)
    half[:16, :, 1] = -2.0
    assert fl.pair_values(half) == pytest.approx((2.0, 1.0), rel=1e-6)
    # (2, H, W) is read channel-first, the same field
    assert fl.flow_mag(np.ascontiguousarray(half.transpose(2, 0, 1))) == pytest.approx(1.0)
    assert fl.flow_mag(np.zeros((0, 0, 2), np.float32)) == 0.0
    with pytest.raises(ValueError, match="field"):
        fl.flow_mag(np.zeros((3, 5, 5), np.float32))


def test_flow_mag_matches_float64_reference_and_jensen():
    rng = np.random.default_rng(2)
    field = (rng.standard_normal((96, 80, 2)) * 5).astype(np.float32)
    ref = float(np.mean(np.hypot(field[..., 0].astype(np.float64), field[..., 1])))
    assert fl.flow_mag(field) == pytest.approx(ref, rel=1e-6)
    assert fl.flow_mag(field) ** 2 < fl.flow_msq(field)  # not uniform: strictly below


@pytest.mark.parametrize(("dx", "dy"), [(2.0, 1.0), (-1.5, 0.5)])
def test_dis_flow_mag_of_a_known_translation(dx, dy):
    a = textured()
    field = fl.OpenCVFlow("dis").pairs([a, shifted(a, dx, dy)])[0]
    inner = field[16:-16, 16:-16]
    assert fl.flow_mag(inner) == pytest.approx(np.hypot(dx, dy), rel=0.1, abs=0.1)


def test_raft_small_runs_on_cpu_with_random_weights():
    cfg = fl.RaftConfig("raft-small", weights="none", batch=2, iters=2)
    with pytest.warns(UserWarning, match="random weights"):
        raft = fl.RaftFlow(cfg, device="cpu")
    frames = [textured(64, s) for s in range(3)]
    out = raft.pairs(frames)
    assert len(out) == 2 and out[0].shape == (64, 64, 2)
    assert all(np.isfinite(f).all() for f in out)


def test_missing_raft_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(fl.FlowError) as err:
        fl.resolve_raft_weights(fl.RaftConfig("raft-large"))
    msg = str(err.value)
    assert fl.RAFT_WEIGHT_FILES["raft-large"] in msg and str(tmp_path) in msg
    assert "\n" not in msg


def test_auto_backend_picks_raft_only_with_a_gpu():
    assert fl.resolve_backend("auto", 0) == "dis"
    assert fl.resolve_backend("auto", 1) == "raft-large"
    with pytest.raises(fl.FlowError):
        fl.resolve_backend("lucas-kanade", 0)


def test_flow_msq_float32_matches_float64_reference():
    rng = np.random.default_rng(1)
    field = (rng.standard_normal((96, 80, 2)) * 7).astype(np.float32)
    ref = float(np.mean(np.sum(field.astype(np.float64) ** 2, axis=-1)))
    assert fl.flow_msq(field) == pytest.approx(ref, rel=1e-5)
    assert fl.flow_msq(np.ascontiguousarray(field.transpose(2, 0, 1))) == pytest.approx(ref, 1e-5)


@pytest.mark.parametrize("chunk", [2, 3, 7, 64])
def test_chunked_remote_flow_equals_streaming_cpu_flow(synth_root, tmp_path, chunk):
    """A clip sent to a flow actor in bounded chunks: every pair once, in order, same values."""
    from pipeline import frames as fr
    from pipeline.handco import discover_handco
    from pipeline.tracks import ChunkedPairs, CpuPairs, TrackOptions, process_track

    track = discover_handco(synth_root, sequences="0", cameras="0").tracks[0]
    # a damaged frame in the middle splits the track into two clips
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    names = list(track.names)
    names[5] = str(broken)
    import dataclasses

    track = dataclasses.replace(track, names=tuple(names))
    opts = TrackOptions(fr.FrameSpec(32, 32), keep_flow=8)
    dis = fl.OpenCVFlow("dis")
    calls: list[int] = []

    def submit(frames):
        calls.append(len(frames))
        assert len(frames) <= chunk
        return dis.pairs(frames)

    def fetch(fields):
        values = [fl.pair_values(f) for f in fields]
        return (
            [m for m, _ in values],
            [g for _, g in values],
            [fl.downsample_flow(f, 8) for f in fields],
        )

    cpu = process_track(tmp_path / "cpu", track, opts, CpuPairs(fl.OpenCVFlow("dis"), 8))
    remote = process_track(tmp_path / "remote", track, opts, ChunkedPairs(submit, fetch, chunk))
    assert len(cpu["clips"]) == 2 and cpu["skipped"][0][2] == "empty_file"
    assert [len(c) for c in remote["pair_msq"]] == [len(c) for c in cpu["pair_msq"]]
    flat = [m for c in cpu["pair_msq"] for m in c]
    assert [m for c in remote["pair_msq"] for m in c] == pytest.approx(flat, rel=1e-6)
    assert [len(c) for c in remote["pair_mag"]] == [len(c) for c in cpu["pair_msq"]]
    mags = [g for c in cpu["pair_mag"] for g in c]
    assert [g for c in remote["pair_mag"] for g in c] == pytest.approx(mags, rel=1e-6)
    assert all(g >= 0 and g * g <= m * (1 + 1e-5) for g, m in zip(mags, flat, strict=True))
    assert any(g > 0 for g in mags)
    n_pairs = sum(len(c) for c in cpu["pair_msq"])
    assert sum(n - 1 for n in calls) == n_pairs  # chunks overlap by one frame: no pair twice
    a = np.load(tmp_path / "cpu" / track.track_id / "flow.npy")
    b = np.load(tmp_path / "remote" / track.track_id / "flow.npy")
    assert a.shape == b.shape == (n_pairs, 2, 8, 8)
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-3)
