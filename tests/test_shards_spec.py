"""Round trip, determinism and safety of the shard format."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from shardutil import edit_shard, make_build, make_samples

import shards_spec
from shards_spec import SPEC_VERSION, SpecError, open_build, validate
from shards_spec.format import (
    FLOW_MAG_SINCE,
    INDEX_SCHEMA,
    INDEX_SCHEMA_1_0,
    frame_member,
    has_flow_mag,
    index_schema,
    load_schema,
    mask_member,
    sample_schema,
    shard_path,
)
from shards_spec.reader import load_npy
from shards_spec.validate import main as validate_main
from shards_spec.writer import (
    encode_npy,
    encode_png,
    sha256_file,
    write_index,
    write_manifest,
    write_shard,
)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return make_build(tmp_path_factory.mktemp("b"), with_flow=True, with_masks=True)


def test_public_api():
    assert shards_spec.SPEC_VERSION == SPEC_VERSION == "1.1" == FLOW_MAG_SINCE
    assert shards_spec.open_build is open_build and shards_spec.validate is validate
    assert shard_path("train", 3) == "train/train-000003.tar"
    assert frame_member(2) == "f2.png" and mask_member(0) == "mask0.png"
    assert load_schema("dataset")["type"] == "object"
    assert "frame_ids" in load_schema("sample")["required"]
    assert "flow_mag" in load_schema("sample")["properties"]
    assert "flow_mag" not in load_schema("sample")["required"]  # a 1.0 sample has none


@pytest.mark.parametrize(
    ("version", "has"),
    [("1.0", False), ("1.00", False), ("1.1", True), ("1.2", True), ("1.10", True)],
)
def test_has_flow_mag_and_the_schemas_agree(build, version, has):
    """has_flow_mag, the index columns, the sample schema and dataset.schema.json's if/else
    give one answer per version."""
    import jsonschema

    manifest = {**json.loads((build / "dataset.json").read_text()), "spec_version": version}
    assert has_flow_mag(manifest) is has
    assert index_schema(manifest) == (INDEX_SCHEMA if has else INDEX_SCHEMA_1_0)
    assert ("flow_mag" in sample_schema(manifest)["required"]) is has
    without = {**manifest, "flow": {k: v for k, v in manifest["flow"].items() if k != "mag_stats"}}
    errors = list(jsonschema.Draft202012Validator(load_schema("dataset")).iter_errors(without))
    assert bool(errors) is has
    if has:
        assert "'mag_stats' is a required property" in errors[0].message
    assert not list(jsonschema.Draft202012Validator(load_schema("dataset")).iter_errors(manifest))


def test_has_flow_mag_needs_a_version():
    with pytest.raises(SpecError, match="no spec_version"):
        has_flow_mag({})
    with pytest.raises(SpecError, match="bad spec_version"):
        has_flow_mag({"spec_version": "one"})
    for bad in ("1.1\n", " 1.1", "1.1.0"):  # `$` alone would let the newline through
        with pytest.raises(SpecError, match="bad spec_version"):
            has_flow_mag({"spec_version": bad})
    assert INDEX_SCHEMA_1_0.names == [n for n in INDEX_SCHEMA.names if n != "flow_mag"]
    names = INDEX_SCHEMA.names
    assert names[names.index("flow_msq") + 1] == "flow_mag"


def test_round_trip(build):
    expected = {s["key"]: s for s in make_samples(with_flow=True, with_masks=True)}
    b = open_build(build)
    assert b.window == 3 and b.splits == ["train", "val"]
    assert (b.count("train"), b.count("val")) == (6, 3)
    assert b.urls("train") == [
        str(build / "train/train-000000.tar"),
        str(build / "train/train-000001.tar"),
    ]
    seen = []
    for split in b.splits:
        for s in b.samples(split):
            want = expected[s["key"]]
            assert want["split"] == split
            for got, ref in zip(s["frames"], want["frames"], strict=True):
                assert got.dtype == np.uint8 and np.array_equal(got, ref)
            for got, ref in zip(s["masks"], want["masks"], strict=True):
                assert got.shape == (32, 32) and np.array_equal(got, ref)
            assert s["flow"].dtype == np.float16 and np.array_equal(s["flow"], want["flow"])
            assert {k: v for k, v in s["meta"].items() if k != "weight"} == want["meta"]
            assert len(s["meta"]["flow_mag"]) == 2
            assert s["meta"]["weight"] == pytest.approx(
                np.exp(-np.array(want["meta"]["flow_msq"]) / b.manifest["flow"]["sigma"])
            )
            seen.append(s["key"])
    table = b.index()
    assert table.schema.equals(INDEX_SCHEMA)
    assert has_flow_mag(b.manifest) and b.manifest["flow"]["mag_stats"]["count"] == 12
    assert table.column("key").to_pylist() == seen
    assert table.column("position").to_pylist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert validate(build) == []


def test_shuffle_is_seeded_permutation(build):
    b = open_build(build)
    order = [s["key"] for s in b.samples("train")]
    a = [s["key"] for s in b.samples("train", shuffle=True, seed=3, bufsize=4)]
    c = [s["key"] for s in b.samples("train", shuffle=True, seed=3, bufsize=4)]
    assert a == c and sorted(a) == sorted(order)


def test_webdataset_pipeline_is_raw(build):
    raw = list(open_build(build).webdataset("val"))
    assert len(raw) == 3 and isinstance(raw[0]["f0.png"], bytes)
    assert json.loads(raw[0]["json"])["split"] == "val"


def test_build_is_byte_reproducible(tmp_path):
    a = make_build(tmp_path, name="a", with_flow=True)
    b = make_build(tmp_path, name="b", with_flow=True)
    files = ["dataset.json", "index.parquet", "skipped.parquet", *open_build(a).urls("train")]
    for f in files:
        rel = (a / f).relative_to(a)
        assert sha256_file(a / rel) == sha256_file(b / rel), rel


def test_write_shard_deterministic(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    sample = {"__key__": "k-1", "f0.png": encode_png(img), "json": {"b": 1, "a": [1, 2]}}
    one = write_shard(tmp_path / "one.tar", [sample])
    two = write_shard(tmp_path / "two.tar", [dict(sample)])
    assert one["sha256"] == two["sha256"] and one["samples"] == 1
    assert (
        one["path"] == str(tmp_path / "one.tar")
        and one["bytes"] == (tmp_path / "one.tar").stat().st_size
    )
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


@pytest.mark.parametrize("ext", ["pickle", "pkl", "pyd", "pt", "pth", "state.pth"])
def test_writer_refuses_pickle_like(tmp_path, ext):
    with pytest.raises(SpecError, match="pickle"):
        write_shard(tmp_path / "x.tar", [{"__key__": "k", ext: b"x"}])
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize("ext", ["_private", "a/b.png", "", "x..png"])
def test_writer_refuses_bad_extension(tmp_path, ext):
    with pytest.raises(SpecError, match="bad member extension"):
        write_shard(tmp_path / "x.tar", [{"__key__": "k", ext: b"x"}])


def test_writer_refuses_dotted_key(tmp_path):
    with pytest.raises(SpecError, match="no dots"):
        write_shard(tmp_path / "x.tar", [{"__key__": "a.b", "json": b"{}"}])


def test_reader_refuses_pickle_member(tmp_path):
    root = make_build(tmp_path, n_val=0)
    rel = "train/train-000000.tar"
    payload = pickle.dumps({"x": 1})
    edit_shard(root, rel, lambda m: m[:1] + [(m[0][0].split(".")[0] + ".pkl", payload)] + m[1:])
    with pytest.raises(SpecError, match="pickle-like member .*pkl"):
        list(open_build(root).samples("train"))
    with pytest.raises(SpecError, match="pickle-like"):
        list(open_build(root).webdataset("train"))


def test_npy_never_unpickles():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SpecError, match="plain .npy"):
        load_npy(buf.getvalue())
    with pytest.raises(SpecError):
        encode_npy(np.array([None], dtype=object))


def _set_version(root, version):
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["spec_version"] = version
    (root / "dataset.json").write_text(json.dumps(manifest))


def test_reader_refuses_unknown_major(tmp_path):
    root = make_build(tmp_path)
    _set_version(root, "2.0")
    with pytest.raises(SpecError, match=r"unsupported shard format version 2\.0"):
        open_build(root)
    assert any("unsupported shard format version" in p for p in validate(root))


def test_reader_accepts_newer_minor(tmp_path):
    root = make_build(tmp_path)
    _set_version(root, "1.7")
    assert open_build(root).count("train") == 6


def test_a_1_0_build_reads_and_validates(tmp_path):
    """A 1.0 build (no flow_mag anywhere) is read and validated as 1.0."""
    root = make_build(tmp_path, with_flow=True, with_masks=True, spec_version="1.0")
    b = open_build(root)
    assert b.manifest["spec_version"] == "1.0" and not has_flow_mag(b.manifest)
    assert "mag_stats" not in b.manifest["flow"]
    assert b.index().schema.equals(INDEX_SCHEMA_1_0)
    samples = [s for split in b.splits for s in b.samples(split)]
    assert len(samples) == 9 and all("flow_mag" not in s["meta"] for s in samples)
    assert validate(root) == []
    # the same build stamped 1.1 lacks what 1.1 requires
    _set_version(root, "1.1")
    assert any("'mag_stats' is a required property" in p for p in validate(root))


def test_missing_or_bad_manifest(tmp_path):
    with pytest.raises(SpecError, match="dataset.json is missing"):
        open_build(tmp_path)
    (tmp_path / "dataset.json").write_text("{")
    with pytest.raises(SpecError, match="not valid JSON"):
        open_build(tmp_path)


def test_write_manifest_validates_first(build, tmp_path):
    manifest = json.loads((build / "dataset.json").read_text())
    manifest["window"] = 1
    with pytest.raises(SpecError, match="dataset.json window: 1 is less than the minimum of 2"):
        write_manifest(tmp_path / "dataset.json", manifest)
    assert not (tmp_path / "dataset.json").exists()


def test_write_index_rejects_bad_rows(tmp_path):
    with pytest.raises(SpecError, match="lacks column"):
        write_index(tmp_path / "index.parquet", [{"key": "a"}])


def test_unknown_split(build):
    with pytest.raises(SpecError, match="unknown split 'test'"):
        open_build(build).urls("test")


def test_validate_main(build, capsys):
    assert validate_main([str(build)]) == 0
    assert capsys.readouterr().out.strip() == "valid: 9 samples in 3 shards"


def test_spec_example_runs(build):
    from importlib import resources

    text = resources.files("shards_spec").joinpath("SPEC.md").read_text()
    assert text.startswith("# Shard format 1.1")
    assert "## 11. Change log" in text and "flow_mag" in text
    code = text.split("```python\n")[-1].split("```")[0]
    scope: dict = {}
    exec(compile(code, "SPEC.md", "exec"), scope)
    triplets = list(scope["interpolation_triplets"](build))
    assert len(triplets) == 6 and triplets[0][0].shape == (32, 32, 3)
    pairs = list(scope["still_pairs"](build, max_flow_msq=1e9))
    assert len(pairs) == 12
    sigma = open_build(build).manifest["flow"]["sigma"]
    calm = scope["calm_windows"](build, max_flow_msq=sigma)
    index = open_build(build).index().to_pylist()
    assert calm == [r["key"] for r in index if max(r["flow_msq"]) <= sigma]
    assert 0 < len(calm) < len(index)
