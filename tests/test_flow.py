"""Flow backends: flow_msq against a known translation, RAFT on CPU, weights errors."""

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
