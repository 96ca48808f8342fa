"""`python -m eval generation`: samples against noise and real held-out frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shardutil import make_build

from eval import generation as gen
from eval.__main__ import main
from eval.sample import write_png


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("genbuild")
    return make_build(root, n_train=40, n_val=24, size=32, shard_size=16, seed=3)


def folder_of(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        write_png(folder, i, image)
    return folder


def test_measures():
    black = np.zeros((2, 4, 4, 3), np.uint8)
    assert gen.near_black(black) == 1.0
    half = black.copy()
    half[:, :2] = 200
    assert gen.near_black(half) == 0.5
    assert gen.near_black(np.full((1, 2, 2, 3), gen.NEAR_BLACK, np.uint8)) == 1.0
    train = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    assert gen.nearest_distance(train, train) == 0.0
    one = train[:1].astype(int)
    one[0, 0, 0, 0] = 255 - one[0, 0, 0, 0]  # one channel of one pixel moved
    d = abs(255 - 2 * int(train[0, 0, 0, 0])) / 255
    assert gen.nearest_distance(one.astype(np.uint8), train) == pytest.approx(d, abs=1e-6)
    noise = gen.noise_images(3, 8)
    assert noise.shape == (3, 8, 8, 3) and noise.dtype == np.uint8
    assert (noise == gen.noise_images(3, 8)).all()  # seeded


def test_real_frames_score_as_real_and_noise_as_noise(build, tmp_path):
    real = gen.real_frames(gen.open_split(build, "val"), "val", 24, 16)
    assert real.shape == (24, 16, 16, 3)
    result = gen.compare({"copy": real, "junk": gen.noise_images(24, 16, seed=9)}, build)
    sets = result["sets"]
    assert result["n"] == 24 and result["size"] == 16 and result["n_train"] == 40
    assert sets["copy"]["fd"] == pytest.approx(sets["real held-out"]["fd"], abs=1e-3)
    assert sets["copy"]["gap_closed"] == pytest.approx(1.0, abs=1e-3)
    assert sets["noise"]["gap_closed"] == 0.0
    assert abs(sets["junk"]["gap_closed"]) < 0.2  # other noise scores as noise
    assert sets["real held-out"]["fd"] < sets["noise"]["fd"]
    assert "Frechet distance (offline extractor, not FID)" in gen.table(result)


def test_command(build, tmp_path, capsys):
    rng = np.random.default_rng(1)
    a = folder_of(rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8), tmp_path / "a")
    b = folder_of(np.zeros((20, 16, 16, 3), np.uint8), tmp_path / "b")
    out, grid = tmp_path / "g.json", tmp_path / "grid.png"
    argv = ["generation", f"first={a}", str(b), "--shards", str(build), "--out", str(out)]
    assert main([*argv, "--grid", str(grid)]) == 0
    text = capsys.readouterr().out
    assert "| first |" in text and "| b |" in text and "| noise |" in text
    result = json.loads(out.read_text())
    assert result["n"] == 20  # the smallest set, below the 24 held-out frames
    assert result["sets"]["b"]["near_black"] == 1.0
    assert grid.stat().st_size > 1000


def test_bad_input_is_one_line(build, tmp_path, capsys):
    a = folder_of(np.zeros((4, 16, 16, 3), np.uint8), tmp_path / "a")
    b = folder_of(np.zeros((4, 8, 8, 3), np.uint8), tmp_path / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, said in (
        ([str(a), str(b)], "different sizes"),
        ([str(empty)], "at least 2"),
        ([f"x={a}", f"x={b}"], "named 'x'"),
        ([str(a), "--heldout-split", "test"], "no split 'test'"),
    ):
        assert main(["generation", *argv, "--shards", str(build)]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
