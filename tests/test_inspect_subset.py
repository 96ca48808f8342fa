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
from shards_spec.format import distinct_pair_values, flow_stats
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
    assert grid.shape == (5 * (tile + 3 * band), 3 * tile, 3)  # a second label line: flow_mag
    assert Image.open(report["hist_png"]).format == "PNG"
    assert Image.open(report["hist_png"]).size[0] == 1200  # two panels: flow_msq, flow_mag
    assert {s: sum(c) for s, c in report["mag_hist"]["counts"].items()} == {"train": 20, "val": 8}
    assert report["mag_stats"] == open_build(src).manifest["flow"]["mag_stats"]
    assert len(report["shown"]) == 5 and len(set(report["shown"])) == 5
    assert {s: sum(c) for s, c in report["hist"]["counts"].items()} == {"train": 20, "val": 8}
    assert len(report["hist"]["bins"]) == inspect_mod.HIST_BINS + 1
    assert inspect_build(src, str(tmp_path / "again.png"), n=5, seed=1)["shown"] == report["shown"]
    text = format_inspect(report)
    assert "train: 10 windows in 3 shards" in text and "val: 4 windows" in text
    assert "flow_mag p5" in text


def test_grid_shows_flow_mag_under_each_pair():
    meta = {"weight": [1.0, 1.0], "flow_msq": [3.0, 7.0], "flow_mag": [1.5, 2.5]}
    sample = {"key": "k", "frames": [np.zeros((8, 8, 3), np.uint8)] * 3, "meta": meta}
    tile, band = inspect_mod.TILE_MIN, inspect_mod.BAND
    grid = inspect_mod._grid([sample], 3, 8, mag=True)
    mag_band = grid[band + tile + band :]
    assert mag_band.shape[0] == band and (mag_band > 32).any()  # text drawn in the second line
    assert not (inspect_mod._grid([sample], 3, 8)[band + tile + band :]).size  # 1.0: one line


def test_inspect_survives_nulls_in_stats_and_flow_mag(src, tmp_path):
    """A damaged manifest (null statistics) or index (null flow_mag cells) was a TypeError or
    ValueError traceback; inspect now shows "n/a" and leaves the null pairs out of the
    histogram, and validate names the damage."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards_spec.format import INDEX_SCHEMA
    from shards_spec.writer import write_manifest

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    manifest = json.loads((bad / "dataset.json").read_text())
    manifest["flow"]["mag_stats"]["percentiles"]["p50"] = None
    manifest["flow"]["stats"]["max"] = None
    write_manifest(bad / "dataset.json", manifest)
    rows = pq.read_table(bad / "index.parquet").to_pylist()
    rows[0]["flow_mag"][0] = None
    nullable = pa.schema([f.with_nullable(True) for f in INDEX_SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=nullable), bad / "index.parquet")
    report = inspect_build(bad, str(tmp_path / "look.png"), n=3)
    text = format_inspect(report)
    assert "p50 n/a" in text and "max n/a" in text
    assert sum(sum(c) for c in report["mag_hist"]["counts"].values()) == 27  # 28 pairs, 1 null
    problems = validate(bad)
    assert any("flow.stats: max not a finite number" in p for p in problems)
    assert any("flow.mag_stats: p50 not a finite number" in p for p in problems)


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """A spec 1.0 build: no flow_mag in the JSON or the index, no mag_stats."""
    return make_build(
        tmp_path_factory.mktemp("old"), n_train=10, n_val=4, with_flow=True, spec_version="1.0"
    )


def test_a_1_0_build_inspects_and_subsets_as_1_0(old, tmp_path):
    report = inspect_build(old, str(tmp_path / "look.png"), n=3)
    grid = np.asarray(Image.open(tmp_path / "look.png"))
    tile, band = inspect_mod.TILE_MIN, inspect_mod.BAND
    assert grid.shape == (3 * (tile + 2 * band), 3 * tile, 3)
    assert report["mag_hist"] is None and report["mag_stats"] is None
    assert "flow_mag" not in format_inspect(report)
    summary = subset_build(old, tmp_path / "sub", n=6, where="flow_msq < 100", shard_size=4)
    sub = open_build(tmp_path / "sub")
    assert summary["samples"] == 6 and summary["mag_stats"] is None
    assert sub.manifest["spec_version"] == "1.0" and "mag_stats" not in sub.manifest["flow"]
    assert "flow_mag" not in sub.index().schema.names
    assert validate(tmp_path / "sub") == []
    with pytest.raises(WhereError, match="flow_mag is not in this build's index"):
        subset_build(old, tmp_path / "sub2", where="flow_mag < 1")


def test_subset_where_flow_mag_and_mag_stats(src, tmp_path):
    rows = open_build(src).index().to_pylist()
    cut = float(np.median([g for r in rows for g in r["flow_mag"]]))
    want = [r["key"] for r in rows if all(g < cut for g in r["flow_mag"])]
    assert 0 < len(want) < len(rows)
    subset_build(src, tmp_path / "m", where=f"flow_mag < {cut!r}", shard_size=3)
    sub = open_build(tmp_path / "m")
    assert sub.index().column("key").to_pylist() == want
    assert sub.manifest["spec_version"] == "1.1" and validate(tmp_path / "m") == []
    train = [r for r in sub.index().to_pylist() if r["split"] == "train"]
    assert sub.manifest["flow"]["mag_stats"] == flow_stats(distinct_pair_values(train, "flow_mag"))
    assert sub.manifest["flow"]["mag_stats"]["count"] == sub.manifest["flow"]["stats"]["count"]


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
