"""pipeline inspect and pipeline subset on a small hand-written build."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image
from shardutil import make_build

from pipeline import inspect_build as inspect_mod
from pipeline import subset as subset_mod
from pipeline.inspect_build import format_inspect, inspect_build
from pipeline.subset import WhereError, parse_where, subset_build
from shards_spec import open_build, validate
from shards_spec.writer import sha256_file


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_build(tmp_path_factory.mktemp("src"), n_train=10, n_val=4, with_flow=True)


def _raw_by_key(path) -> dict[str, dict]:
    build = open_build(path)
    out = {}
    for split in build.splits:
        for raw in build.webdataset(split):
            out[raw["__key__"]] = {k: v for k, v in raw.items() if not k.startswith("__")}
    return out


def test_inspect_writes_pngs_and_counts(src, tmp_path):
    out = tmp_path / "look.png"
    report = inspect_build(src, str(out), n=5, seed=1)
    assert report["counts"] == {"train": 10, "val": 4}
    assert report["index_rows"] == report["counts"]
    assert report["shards"] == {"train": 3, "val": 1}
    assert report["grid_png"] == str(out) and report["hist_png"] == str(
        tmp_path / "look_flow_hist.png"
    )
    grid = np.asarray(Image.open(out))
    tile, band = inspect_mod.TILE_MIN, inspect_mod.BAND
    assert grid.shape == (5 * (tile + 2 * band), 3 * tile, 3)
    assert Image.open(report["hist_png"]).format == "PNG"
    assert len(report["shown"]) == 5 and len(set(report["shown"])) == 5
    assert {s: sum(c) for s, c in report["hist"]["counts"].items()} == {"train": 20, "val": 8}
    assert len(report["hist"]["bins"]) == inspect_mod.HIST_BINS + 1
    assert inspect_build(src, str(tmp_path / "again.png"), n=5, seed=1)["shown"] == report["shown"]
    text = format_inspect(report)
    assert "train: 10 windows in 3 shards" in text and "val: 4 windows" in text


def test_inspect_default_path_keeps_build_valid(tmp_path):
    root = make_build(tmp_path)
    report = inspect_build(root, n=100)
    assert report["grid_png"] == str(root / "inspect.png") and (root / "inspect.png").is_file()
    assert (root / "inspect_flow_hist.png").is_file() and len(report["shown"]) == 9
    assert validate(root) == []


def test_subset_where_keeps_exactly_matching_rows(src, tmp_path):
    sigma = open_build(src).manifest["flow"]["sigma"]
    rows = open_build(src).index().to_pylist()
    want = [r["key"] for r in rows if all(d < sigma for d in r["flow_msq"])]
    assert 0 < len(want) < len(rows)
    summary = subset_build(src, tmp_path / "sub", where=f"flow_msq < {sigma!r}", shard_size=3)
    sub = open_build(tmp_path / "sub")
    got = sub.index().column("key").to_pylist()
    assert got == want and summary["samples"] == len(want)
    assert validate(tmp_path / "sub") == []
    source_raw, sub_raw = _raw_by_key(src), _raw_by_key(tmp_path / "sub")
    assert set(sub_raw) == set(want)
    for key, members in sub_raw.items():
        assert members == source_raw[key]  # bytes copied, not re-encoded
    config = sub.manifest["build_config"]
    assert config["where"] == f"flow_msq < {sigma!r}" and config["subset_of"]["path"] == str(src)
    assert sub.manifest["flow"]["sigma"] == sigma
    assert sub.manifest["flow"]["stats"]["count"] == 2 * sum(
        r["split"] == "train" for r in sub.index().to_pylist()
    )


def test_subset_n_is_seeded_and_reproducible(src, tmp_path):
    a = subset_build(src, tmp_path / "a", n=5, seed=7, shard_size=2)
    b = subset_build(src, tmp_path / "b", n=5, seed=7, shard_size=2)
    subset_build(src, tmp_path / "c", n=5, seed=8, shard_size=2)
    assert a["samples"] == b["samples"] == 5 and a["shards"] == b["shards"]
    keys = [open_build(tmp_path / d).index().column("key").to_pylist() for d in "abc"]
    assert keys[0] == keys[1] and keys[0] != keys[2]
    source_order = open_build(src).index().column("key").to_pylist()
    assert keys[0] == [k for k in source_order if k in keys[0]]  # index order kept
    build_a = open_build(tmp_path / "a")
    for split in build_a.splits:
        for url in build_a.urls(split):
            rel = url[len(str(tmp_path / "a")) + 1 :]
            assert sha256_file(url) == sha256_file(tmp_path / "b" / rel)
    for name in ("index.parquet", "dataset.json"):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)
    assert validate(tmp_path / "a") == [] and validate(tmp_path / "c") == []


def test_subset_split_and_where_conjunction(src, tmp_path):
    summary = subset_build(
        src, tmp_path / "v", split="val", where="camera == 1 and source == 'synthetic'"
    )
    rows = open_build(tmp_path / "v").index().to_pylist()
    assert summary["splits"] == {"val": 2} and all(r["camera"] == 1 for r in rows)
    assert open_build(tmp_path / "v").manifest["flow"]["stats"]["count"] == 0
    assert validate(tmp_path / "v") == []


def test_subset_refuses_non_empty_out(src, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        subset_build(src, out, n=2)
    with pytest.raises(ValueError, match="not a build"):
        subset_build(src, out, n=2, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    built = tmp_path / "built"
    subset_build(src, built, n=6, shard_size=2)
    with pytest.raises(ValueError, match="--overwrite"):
        subset_build(src, built, n=2)
    subset_build(src, built, n=2, overwrite=True)
    assert open_build(built).index().num_rows == 2 and validate(built) == []


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("speed < 1", "unknown column 'speed'"),
        ("flow_msq < 'x'", "numeric"),
        ("flow_msq < 1 or weight > 0", "expected 'and'"),
        ("__import__('os').system('true')", "cannot parse"),
    ],
)
def test_where_errors(where, message):
    with pytest.raises(WhereError, match=message):
        parse_where(where)


def test_cli_hooks(src, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    subset_mod.add_arguments(sub.add_parser("subset"))
    inspect_mod.add_arguments(sub.add_parser("inspect"))
    args = parser.parse_args(
        ["subset", str(src), "--out", str(tmp_path / "s"), "--n", "3", "--shard-size", "2"]
    )
    assert subset_mod.run(args) == 0
    assert "3 of 14 samples" in capsys.readouterr().out
    args = parser.parse_args(
        ["inspect", str(tmp_path / "s"), "--out", str(tmp_path / "g.png"), "--n", "2"]
    )
    assert inspect_mod.run(args) == 0
    assert "grid:" in capsys.readouterr().out and (tmp_path / "g.png").is_file()
