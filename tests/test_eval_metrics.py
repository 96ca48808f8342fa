"""eval.metrics / eval.features: FID, KID, P/R/D/C with the offline extractor (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid.fid import kernel_distance
from PIL import Image
from shardutil import make_build

from eval import features, metrics
from eval.__main__ import main
from shards_spec import open_build, reader

N_TRAIN = 24
METRIC_KEYS = ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own reference cache folder."""
    monkeypatch.setenv("FRAMEBRIDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """24 train and 3 val windows of K = 3 random 32 px frames."""
    return make_build(tmp_path_factory.mktemp("eval"), n_train=N_TRAIN, n_val=3, size=32)


@pytest.fixture(scope="module")
def centres(build) -> list[np.ndarray]:
    """The centre frame (K//2 = 1) of every train window, in shard order."""
    return [s["frames"][1] for s in open_build(build).samples("train")]


def write_pngs(folder: Path, images) -> Path:
    """Save images as folder/000000.png, 000001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


def brighten(image: np.ndarray) -> np.ndarray:
    """A shifted distribution: halve the contrast and lift the brightness."""
    return np.clip(image.astype(np.float32) * 0.5 + 100, 0, 255).astype(np.uint8)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def test_same_images_give_zero(build, centres, tmp_path):
    result = metrics.evaluate(
        write_pngs(tmp_path / "same", centres), build, "train", extractor="offline"
    )
    assert abs(result["fid"]) < 1e-3
    assert abs(result["kid"]) < 0.05
    assert result["precision"] == result["recall"] == 1.0
    assert result["density"] == pytest.approx(1.0) and result["coverage"] == 1.0
    assert result["n_samples"] == result["n_ref"] == N_TRAIN
    assert result["extractor"] == "offline"
    assert result["metric_name"] == "Frechet distance (offline extractor, not FID)"
    assert "centre frame f1.png" in result["reference"] and "all 24 windows" in result["reference"]


def test_first_n_ref_centre_frames(build, centres, tmp_path):
    samples = write_pngs(tmp_path / "first", centres[:10])
    result = metrics.evaluate(samples, build, "train", n_ref=10, extractor="offline")
    assert result["n_ref"] == 10 and abs(result["fid"]) < 1e-3
    assert "the first 10 windows" in result["reference"]
    other = metrics.evaluate(samples, build, "train", n_ref=N_TRAIN, extractor="offline")
    assert other["fid"] > 100 * abs(result["fid"])


def test_shifted_distributions_are_far(build, centres, tmp_path):
    same = metrics.evaluate(
        write_pngs(tmp_path / "same", centres), build, "train", extractor="offline"
    )
    bright = metrics.evaluate(
        write_pngs(tmp_path / "bright", [brighten(c) for c in centres]),
        build,
        "train",
        extractor="offline",
    )
    rng = np.random.default_rng(5)
    smooth = [np.full((32, 32, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(N_TRAIN)]
    flat = metrics.evaluate(
        write_pngs(tmp_path / "flat", smooth), build, "train", extractor="offline"
    )
    for far in (bright, flat):
        assert far["fid"] > 1.0 and far["fid"] > 1000 * abs(same["fid"])
        assert far["kid"] > 20 * abs(same["kid"])
        assert far["kid_std"] >= 0
        for key in ("precision", "recall", "coverage"):
            assert 0.0 <= far[key] <= 1.0
        assert far["density"] >= 0.0
        assert far["precision"] < 1.0


def test_reference_cache_hit_and_keys(build, centres, tmp_path, monkeypatch):
    samples = write_pngs(tmp_path / "same", centres)
    first = metrics.evaluate(samples, build, "train", n_ref=20, extractor="offline")
    assert first["reference_cache"]["hit"] is False
    assert Path(first["reference_cache"]["path"]).parent == tmp_path / "cache" / "fid_refs"

    def boom(*args, **kwargs):
        raise RuntimeError("shards decoded")

    monkeypatch.setattr(reader, "raw_samples", boom)
    monkeypatch.setattr(reader, "decode_png", boom)
    monkeypatch.setattr(open_build(build).__class__, "samples", boom)
    again = metrics.evaluate(samples, build, "train", n_ref=20, extractor="offline")
    assert again["reference_cache"]["hit"] is True
    assert {k: again[k] for k in METRIC_KEYS} == {k: first[k] for k in METRIC_KEYS}
    with pytest.raises(RuntimeError, match="shards decoded"):
        metrics.evaluate(samples, build, "train", n_ref=19, extractor="offline")

    entry = open_build(build).manifest["splits"]["train"]
    key = metrics.cache_key(entry, "train", 20, "offline", features.OFFLINE_VERSION)
    assert key != metrics.cache_key(entry, "train", 19, "offline", features.OFFLINE_VERSION)
    assert key != metrics.cache_key(entry, "train", 20, "inception", features.OFFLINE_VERSION)
    assert key != metrics.cache_key(entry, "train", 20, "offline", "offline-v2")
    changed = json.loads(json.dumps(entry))
    changed["shards"][0]["sha256"] = "0" * 64
    assert key != metrics.cache_key(changed, "train", 20, "offline", features.OFFLINE_VERSION)


def test_offline_extractor_is_deterministic():
    a, b = features.offline_extractor(), features.offline_extractor()
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(5)]
    fa = features.extract(images, a, batch=2, progress=False)
    fb = features.extract(images, b, batch=2, progress=False)
    assert fa.shape == (5, 256) and fa.dtype == np.float32
    assert np.array_equal(fa, fb)
    assert features.offline_extractor(seed=1).version != a.version
    assert not np.allclose(
        features.extract(images, features.offline_extractor(1), 5, None, progress=False), fa
    )


def test_kid_mean_is_clean_fids_and_std_over_subsets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    y = (rng.normal(size=(50, 16)) + 0.3).astype(np.float32)
    mean, std = metrics.kid(x, y, num_subsets=20, max_subset_size=30, seed=7)
    np.random.seed(7)
    assert mean == pytest.approx(kernel_distance(x, y, num_subsets=20, max_subset_size=30))
    assert std > 0
    state = np.random.get_state()
    metrics.kid(x, y, num_subsets=3)
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_missing_inception_file(build, centres, tmp_path, monkeypatch):
    samples = write_pngs(tmp_path / "same", centres[:4])
    with pytest.raises(metrics.MetricsError) as exc:
        metrics.evaluate(samples, build, "train", inception_weights=tmp_path / "nope.pt")
    assert "inception-2015-12-05.pt" in one_line(exc)
    monkeypatch.setattr(features, "CLEANFID_CACHE_DIR", str(tmp_path / "cf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(metrics.MetricsError) as exc:
        metrics.evaluate(samples, build, "train", extractor="inception")
    text = one_line(exc)
    assert "inception-2015-12-05.pt" in text and features.INCEPTION_URL in text
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in text
    assert not (tmp_path / "cache").exists()


def test_bad_sample_folders(build, centres, tmp_path):
    def error(folder) -> str:
        with pytest.raises(metrics.MetricsError) as exc:
            metrics.evaluate(folder, build, "train", extractor="offline")
        return one_line(exc)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "at least 2" in error(empty)
    assert "at least 2" in error(write_pngs(tmp_path / "one", centres[:1]))
    assert "does not exist" in error(tmp_path / "missing")
    mixed = write_pngs(tmp_path / "mixed", centres[:3])
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(mixed / "000003.png")
    assert "mixed sizes" in error(mixed)
    junk = write_pngs(tmp_path / "junk", centres[:3])
    (junk / "000001.png").write_text("not an image")
    assert "000001.png" in error(junk) and "not a readable PNG" in error(junk)
    truncated = write_pngs(tmp_path / "truncated", centres[:3])
    data = (truncated / "000002.png").read_bytes()
    (truncated / "000002.png").write_bytes(data[: len(data) // 2])
    assert "000002.png" in error(truncated)
    assert not (tmp_path / "cache").exists()


def test_missing_split(build, centres, tmp_path):
    samples = write_pngs(tmp_path / "same", centres[:4])
    with pytest.raises(metrics.MetricsError) as exc:
        metrics.evaluate(samples, build, "test", extractor="offline")
    text = one_line(exc)
    assert "'test'" in text and "train, val" in text


def test_cli_prints_json_last(build, centres, tmp_path, capsys):
    samples = write_pngs(tmp_path / "same", centres)
    out = tmp_path / "result.json"
    args = ["fid", "--samples", str(samples), "--shards", str(build), "--split", "val"]
    assert main([*args, "--extractor", "offline", "--n-ref", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["extractor"] == "offline" and result["split"] == "val"
    assert result["metric_name"] == "Frechet distance (offline extractor, not FID)"
    assert result["n_ref"] == 3 and result["n_samples"] == N_TRAIN
    assert result["precision"] is None  # 3 reference frames: too few for k = 5
    assert set(METRIC_KEYS) <= set(result) and result["samples"] == str(samples)
    assert json.loads(out.read_text()) == result
    assert "[offline] Frechet distance (not FID)" in captured.err and "FID:" not in captured.err

    bad = tmp_path / "bad.json"
    assert main([*args[:-1], "test", "--extractor", "offline", "--out", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not bad.exists()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1


class _StubLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048].contiguous()


class _StubInception(torch.nn.Module):
    """Stands in for the TorchScript Inception: same ``layers`` attribute, 2048-d output."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _StubLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_inception_loads_from_local_file_only(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.jit.script(_StubInception()).save(str(folder / features.INCEPTION_FILE))
    renamed = tmp_path / "other-name.pt"
    renamed.write_bytes((folder / features.INCEPTION_FILE).read_bytes())
    image = np.full((32, 32, 3), 200, np.uint8)
    for where in (folder, folder / features.INCEPTION_FILE, renamed):
        ext = features.inception_extractor(where)
        assert ext.name == "inception" and ext.dim == 2048
        feats = features.extract([image, image], ext, batch=2, progress=False)
        assert feats.shape == (2, 2048)
        assert np.allclose(feats, (200 - 128) / 128, atol=1e-4)  # clean-fid's normalisation
    assert metrics.metric_name("inception").startswith("FID")
    assert "not FID" in metrics.metric_name("offline")
