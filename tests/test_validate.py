"""The validator reports each kind of damage as a problem line (never an exception)."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardutil import edit_shard, make_build

from shards_spec import validate
from shards_spec.format import INDEX_SCHEMA_1_0
from shards_spec.validate import main as validate_main
from shards_spec.writer import encode_png, write_index, write_manifest

SHARD = "train/train-000000.tar"
KEY = "0000-cam0-00000000"


@pytest.fixture
def root(tmp_path):
    path = make_build(tmp_path, with_flow=True)
    assert validate(path) == []
    return path


def _has(problems: list[str], *parts: str) -> bool:
    return any(all(p in line for p in parts) for line in problems)


def test_truncated_tar(root):
    path = root / SHARD
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    problems = validate(root)
    assert _has(problems, SHARD, "truncated tar")
    assert _has(problems, SHARD, "sha256 mismatch")


def test_flipped_byte(root):
    path = root / SHARD
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01  # inside the first PNG's data
    path.write_bytes(bytes(data))
    problems = validate(root)
    assert _has(problems, SHARD, "sha256 mismatch")


def test_missing_member(root):
    edit_shard(root, SHARD, lambda ms: [m for m in ms if m[0] != f"{KEY}.f1.png"])
    assert f"{SHARD} sample {KEY}: missing member f1.png" in validate(root)


def test_extra_pickle_member(root):
    payload = pickle.dumps([1, 2, 3])
    edit_shard(root, SHARD, lambda ms: ms[:2] + [(f"{KEY}.pickle", payload)] + ms[2:])
    problems = validate(root)
    assert f"{SHARD} sample {KEY}: pickle-like member {KEY}.pickle is forbidden" in problems


def test_unknown_extra_member(root):
    edit_shard(root, SHARD, lambda ms: ms[:2] + [(f"{KEY}.depth.png", b"x")] + ms[2:])
    assert _has(validate(root), KEY, "unexpected member", "depth.png")


def test_wrong_image_shape(root):
    small = encode_png(np.zeros((16, 16, 3), np.uint8))
    edit_shard(root, SHARD, lambda ms: [(n, small if n == f"{KEY}.f0.png" else d) for n, d in ms])
    problems = validate(root)
    line = f"{SHARD} sample {KEY}: f0.png has shape (16, 16, 3) uint8, expected (32, 32, 3) uint8"
    assert line in problems
    assert line in validate(root, decode=False)


def test_grey_frame_is_wrong_shape(root):
    grey = encode_png(np.zeros((32, 32), np.uint8))
    edit_shard(root, SHARD, lambda ms: [(n, grey if n == f"{KEY}.f2.png" else d) for n, d in ms])
    assert _has(validate(root), KEY, "f2.png has shape (32, 32)")


def test_wrong_flow_shape(root):
    def edit(ms):
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 2, 4, 4), np.float32))
        return [(n, buf.getvalue() if n == f"{KEY}.flow.npy" else d) for n, d in ms]

    edit_shard(root, SHARD, edit)
    assert _has(
        validate(root), KEY, "flow.npy is float32(2, 2, 4, 4), expected float16(2, 2, h, w)"
    )


def test_flow_shape_differs_between_samples(root):
    def edit(ms):
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 2, 4, 4), np.float16))
        return [(n, buf.getvalue() if n == f"{KEY}.flow.npy" else d) for n, d in ms]

    edit_shard(root, SHARD, edit)
    assert _has(validate(root), "flow.npy has shape (2, 2, 8, 8), other samples (2, 2, 4, 4)")


def test_json_split_and_schema(root):
    def edit(ms):
        out = []
        for n, d in ms:
            if n == f"{KEY}.json":
                meta = json.loads(d)
                meta["split"] = "val"
                d = json.dumps(meta).encode()
            elif n.endswith(".json"):
                meta = json.loads(d)
                del meta["clip_id"]
                d = json.dumps(meta).encode()
            out.append((n, d))
        return out

    edit_shard(root, SHARD, edit)
    problems = validate(root)
    assert _has(problems, KEY, "json split 'val' differs from shard split 'train'")
    assert _has(problems, "'clip_id' is a required property")


def test_index_row_without_sample(root):
    rows = pq.read_table(root / "index.parquet").to_pylist()
    ghost = dict(rows[-1], key="9999-cam0-00000000", position=7)
    write_index(root / "index.parquet", [*rows, ghost])
    problems = validate(root)
    assert _has(
        problems, "index.parquet", "no sample 9999-cam0-00000000 at val/val-000000.tar position 7"
    )
    assert _has(problems, "index.parquet", "4 rows for split val, manifest says 3")


def test_index_disagrees_with_json(root):
    rows = pq.read_table(root / "index.parquet").to_pylist()
    rows[0]["frame_ids"] = [5, 6, 7]
    rows[0]["weight"] = [0.5, 0.5]
    write_index(root / "index.parquet", rows)
    problems = validate(root)
    assert f"index.parquet: row 0 ({KEY}): frame_ids differs from sample json" in problems
    assert f"index.parquet: row 0 ({KEY}): weight differs from sample json" in problems


def test_sample_without_index_row(root):
    rows = pq.read_table(root / "index.parquet").to_pylist()
    write_index(root / "index.parquet", rows[1:])
    assert _has(validate(root), f"index.parquet: no row for sample {KEY}")


def test_index_order(root):
    rows = pq.read_table(root / "index.parquet").to_pylist()
    val_first = [r for r in rows if r["split"] == "val"] + [
        r for r in rows if r["split"] == "train"
    ]
    write_index(root / "index.parquet", val_first)
    assert validate(root) == []  # split order is free, grouping is not
    write_index(root / "index.parquet", [rows[1], rows[0], *rows[2:]])
    assert _has(validate(root), "index.parquet: rows are not grouped by split")


def test_shard_not_in_manifest(root):
    shutil.copy(root / SHARD, root / "train/train-000009.tar")
    assert "train/train-000009.tar: shard not in manifest" in validate(root)


def test_missing_shard_file(root):
    (root / "val/val-000000.tar").unlink()
    problems = validate(root)
    assert "val/val-000000.tar: shard file missing" in problems


def test_sample_count_mismatch(root):
    edit_shard(root, SHARD, lambda ms: [m for m in ms if not m[0].startswith(KEY)])
    assert _has(validate(root), SHARD, "holds 3 samples, manifest says 4")


def test_missing_manifest(tmp_path):
    assert _has(validate(tmp_path), "dataset.json: missing")


def test_main_reports_problems(root, capsys):
    (root / "val/val-000000.tar").unlink()
    assert validate_main([str(root)]) == 1
    assert "val/val-000000.tar: shard file missing" in capsys.readouterr().out


# ------------------------------------------------------------------ flow_mag (spec 1.1)


def _edit_json(root, edit, key=KEY):
    """Rewrite the json member of sample ``key`` of SHARD with ``edit(meta)`` (raw text kept
    as json.dumps writes it, NaN included)."""

    def members(ms):
        out = []
        for n, d in ms:
            if n == f"{key}.json":
                meta = json.loads(d)
                edit(meta)
                d = json.dumps(meta).encode()
            out.append((n, d))
        return out

    edit_shard(root, SHARD, members)


def test_flow_mag_missing_in_a_1_1_build(root):
    _edit_json(root, lambda m: m.pop("flow_mag"))
    assert _has(validate(root), KEY, "json (top level): 'flow_mag' is a required property")


def test_flow_mag_negative(root):
    _edit_json(root, lambda m: m["flow_mag"].__setitem__(0, -0.5))
    assert _has(validate(root), KEY, "json flow_mag/0", "less than the minimum of 0")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_flow_mag_not_finite(root, bad):
    _edit_json(root, lambda m: m["flow_mag"].__setitem__(1, bad))
    assert _has(validate(root), KEY, "flow_mag", "non-finite values")


def test_flow_mag_wrong_length(root):
    _edit_json(root, lambda m: m["flow_mag"].append(0.1))
    assert _has(validate(root), KEY, "flow_mag has 3 entries, expected 2")


def test_flow_mag_larger_than_jensen_allows(root):
    def edit(meta):
        meta["flow_mag"][1] = 1.01 * float(np.sqrt(meta["flow_msq"][1])) + 1e-3

    _edit_json(root, edit)
    problems = validate(root)
    assert _has(problems, KEY, "pair 1: flow_mag^2", "exceeds flow_msq")
    assert not _has(problems, KEY, "pair 0: flow_mag^2")


def test_flow_mag_equal_to_sqrt_msq_is_fine(root):
    """A uniform field has mean |F| == sqrt(mean |F|^2): not a finding."""
    rows = pq.read_table(root / "index.parquet").to_pylist()
    assert rows[0]["key"] == KEY
    rows[0]["flow_mag"] = [float(np.sqrt(x)) for x in rows[0]["flow_msq"]]
    _edit_json(root, lambda m: m.__setitem__("flow_mag", rows[0]["flow_mag"]))
    write_index(root / "index.parquet", rows)
    assert validate(root) == []


def test_index_flow_mag_disagrees_with_json(root):
    rows = pq.read_table(root / "index.parquet").to_pylist()
    rows[0]["flow_mag"] = [g + 0.25 for g in rows[0]["flow_mag"]]
    write_index(root / "index.parquet", rows)
    assert validate(root) == [f"index.parquet: row 0 ({KEY}): flow_mag differs from sample json"]


def test_index_without_flow_mag_column_in_a_1_1_build(root):
    rows = pq.read_table(root / "index.parquet").to_pylist()
    write_index(root / "index.parquet", rows, INDEX_SCHEMA_1_0)
    assert "index.parquet: column flow_mag missing" in validate(root)


def test_reading_a_missing_index_column_names_it(root):
    """Reading a column the index lacks was pyarrow's "No match for FieldRef" error."""
    from shards_spec import open_build
    from shards_spec.format import SpecError

    rows = pq.read_table(root / "index.parquet").to_pylist()
    write_index(root / "index.parquet", rows, INDEX_SCHEMA_1_0)
    build = open_build(root)
    with pytest.raises(SpecError, match="no column flow_mag, which spec 1.1 requires; `pipeline"):
        build.index(["split", "flow_mag"])
    with pytest.raises(SpecError, match="no column flow_mag, which spec 1.1 requires"):
        next(build.index_batches(["flow_mag"]))
    with pytest.raises(SpecError, match=r"no column nope \(it has .*flow_msq"):
        build.index(["nope"])
    assert build.index(["split"]).num_rows == len(rows)


def test_mag_stats_missing_or_counting_other_pairs(root):
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["flow"]["mag_stats"]["count"] += 1
    write_manifest(root / "dataset.json", manifest)
    assert _has(validate(root), "flow.mag_stats counts 13 pairs, flow.stats 12")
    del manifest["flow"]["mag_stats"]
    (root / "dataset.json").write_text(json.dumps(manifest))
    assert _has(validate(root), "dataset.json flow: 'mag_stats' is a required property")


def test_a_1_0_build_is_valid_without_flow_mag(tmp_path):
    old = make_build(tmp_path, with_flow=True, spec_version="1.0")
    assert validate(old) == []
    # and 1.0 damage is still found
    rows = pq.read_table(old / "index.parquet").to_pylist()
    rows[0]["weight"] = [0.5, 0.5]
    write_index(old / "index.parquet", rows, INDEX_SCHEMA_1_0)
    assert validate(old) == [f"index.parquet: row 0 ({KEY}): weight differs from sample json"]


@pytest.mark.parametrize("column", ["flow_mag", "flow_msq"])
@pytest.mark.parametrize("cell", ["row", "item"])
def test_index_list_cell_with_nulls_is_a_finding(root, column, cell):
    """A nullable index column (written by another tool) with a null list or a null element
    was a TypeError traceback out of validate()."""
    import pyarrow as pa

    from shards_spec.format import INDEX_SCHEMA

    rows = pq.read_table(root / "index.parquet").to_pylist()
    if cell == "row":
        rows[0][column] = None
    else:
        rows[0][column][0] = None
    nullable = pa.schema([f.with_nullable(True) for f in INDEX_SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=nullable), root / "index.parquet")
    assert _has(validate(root), f"row 0 ({KEY}): {column} has null values")


@pytest.mark.parametrize("name", ["stats", "mag_stats"])
@pytest.mark.parametrize(
    "damage, finding",
    [
        (lambda st: st.update(max=None), "max not a finite number >= 0"),
        (lambda st: st["percentiles"].update(p50=-1.0), "p50 not a finite number >= 0"),
        (lambda st: st.update(mean=st["max"] * 2 + 1), "is outside [min, max]"),
        (lambda st: st["percentiles"].update(p25=st["max"] + 1), "not in increasing order"),
        (lambda st: st.update(count=0), "counts 0 pairs but has values"),
    ],
)
def test_flow_stats_values_are_checked(root, name, damage, finding):
    """flow.stats and flow.mag_stats were checked for their shape only: a null or negative
    statistic, or one out of order, passed and later broke `pipeline inspect`."""
    manifest = json.loads((root / "dataset.json").read_text())
    damage(manifest["flow"][name])
    write_manifest(root / "dataset.json", manifest)
    assert _has(validate(root), f"dataset.json: flow.{name}", finding)


def test_flow_stats_of_equal_values_pass(root):
    """A mean one ulp above max (float sums of equal values) is not a finding."""
    manifest = json.loads((root / "dataset.json").read_text())
    st = manifest["flow"]["stats"]
    v = 0.1
    st.update(min=v, max=v, mean=float(np.nextafter(v, 1.0)))
    st["percentiles"] = {k: v for k in st["percentiles"]}
    write_manifest(root / "dataset.json", manifest)
    assert not _has(validate(root), "flow.stats")
