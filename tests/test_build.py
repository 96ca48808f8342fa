"""End-to-end builds of the synthetic set: validity, accounting, determinism, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from buildutil import tree_bytes

from pipeline.build import BuildConfig, BuildError, Runtime, build
from pipeline.cli import main as cli_main
from shards_spec import open_build, validate
from shards_spec.format import INDEX_SCHEMA_1_0, has_flow_mag
from shards_spec.writer import parquet_bytes, sha256_file, write_manifest

REPO = Path(__file__).resolve().parents[1]


def cli_command(root: Path, out: Path) -> list[str]:
    """`pipeline build` with the same configuration as :func:`small_config`, one worker."""
    return [sys.executable, "-m", "pipeline", "build", "--src", "synthetic", "--root", str(root),
            "--size", "32", "--shard-size", "7", "--flow", "dis", "--val-fraction", "0.3",
            "--workers", "1", "--out", str(out), "--no-progress"]  # fmt: skip


def small_config(root: Path, **kw) -> BuildConfig:
    base = dict(
        src="synthetic", root=str(root), size=32, shard_size=7, flow="dis", val_fraction=0.3
    )
    return BuildConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(synth_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("b") / "shards"
    summary = build(small_config(synth_root), Runtime(out=str(out), workers=2, progress=False))
    return out, summary


def test_build_validates_and_reads_back(built):
    out, summary = built
    assert validate(out) == []
    assert cli_main(["validate", str(out)]) == 0
    b = open_build(out)
    assert set(b.splits) == {"train", "val"}
    assert b.count("train") + b.count("val") == summary["windows"] > 0
    sample = next(b.samples("train"))
    assert len(sample["frames"]) == 3 and sample["frames"][0].shape == (32, 32, 3)
    m = sample["meta"]
    assert m["frame_ids"] == sorted(m["frame_ids"]) and m["frame_ids"][2] - m["frame_ids"][0] == 2
    assert sample["key"] == f"{m['sequence']:04d}-cam{m['camera']}-{m['frame_ids'][0]:08d}"
    manifest = b.manifest
    assert manifest["flow"]["sigma"] == pytest.approx(
        manifest["flow"]["stats"]["percentiles"]["p50"]
    )


def test_every_input_frame_is_written_or_skipped(built, synth_root):
    out, summary = built
    index = pq.read_table(out / "index.parquet").to_pylist()
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    written = {(r["sequence"], r["camera"], f) for r in index for f in r["frame_ids"]}
    recorded = set()
    for r in skipped:
        p = Path(r["source_path"])
        recorded.add((int(p.parent.parent.name), int(p.parent.name[3:]), r["frame_id"]))
    inputs = {
        (int(p.parent.parent.name), int(p.parent.name[3:]), int(p.stem))
        for p in (synth_root / "rgb").rglob("*.jpg")
    }
    assert written | recorded == inputs
    assert not written & recorded
    meta = json.loads((synth_root / "meta.json").read_text())
    cameras = 2
    excluded = sum(
        (not ok) or (not green)
        for seq in range(len(meta["is_train"]))
        for ok, green in zip(meta["is_valid"][seq], meta["is_train"][seq], strict=True)
    )
    by_reason = summary["skipped_by_reason"]
    assert by_reason["not_green_screen"] + by_reason.get("not_valid", 0) == cameras * excluded
    assert by_reason["not_green_screen"] > 0


def test_windows_of_one_clip_spread_over_shards(built):
    out, _ = built
    index = pq.read_table(out / "index.parquet").to_pylist()
    shards_per_clip = {}
    for r in index:
        shards_per_clip.setdefault(r["clip_id"], set()).add(r["shard"])
    assert max(len(s) for s in shards_per_clip.values()) > 1


def test_one_and_two_workers_give_identical_bytes(built, synth_root, tmp_path):
    out, _ = built
    out1 = tmp_path / "w1"
    build(small_config(synth_root), Runtime(out=str(out1), workers=1, progress=False))
    assert tree_bytes(out1) == tree_bytes(out)


def test_rerun_is_a_no_op_and_other_config_is_refused(built, synth_root):
    out, summary = built
    before = tree_bytes(out)
    again = build(small_config(synth_root), Runtime(out=str(out), workers=2, progress=False))
    assert again["windows"] == summary["windows"]
    assert tree_bytes(out) == before
    with pytest.raises(BuildError, match="different configuration.*size"):
        build(small_config(synth_root, size=64), Runtime(out=str(out), progress=False))


def test_sigkill_mid_build_then_resume_is_byte_identical(built, synth_root, tmp_path):
    out, _ = built
    out2 = tmp_path / "killed"
    cmd = cli_command(synth_root, out2)
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    tracks = out2 / ".cache"
    deadline = time.time() + 120
    while (
        proc.poll() is None and time.time() < deadline and len(list(tracks.glob("*/meta.json"))) < 2
    ):
        time.sleep(0.05)
    done_before_kill = len(list(tracks.glob("*/meta.json")))
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert done_before_kill >= 2, "build finished no track before the kill"
    assert not (out2 / "dataset.json").exists()
    subprocess.run(cmd, cwd=REPO, check=True, timeout=300)
    assert tree_bytes(out2) == tree_bytes(out)
    assert validate(out2) == []


def _ray_task_pids(name: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(f"ray::{name}".encode()):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_sigkill_of_a_worker_is_retried_and_output_unchanged(built, synth_root, tmp_path):
    out, _ = built
    out3 = tmp_path / "worker-killed"
    cmd = cli_command(synth_root, out3)
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 120
    while killed is None and proc.poll() is None and time.time() < deadline:
        pids = _ray_task_pids("_track_task")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert killed is not None, "no track task seen running"
    assert proc.returncode == 0, err[-2000:]
    assert tree_bytes(out3) == tree_bytes(out)


def test_missing_root_fails_fast_with_one_line(tmp_path, capsys):
    t = time.perf_counter()
    rc = cli_main(["build", "--src", "handco", "--root", str(tmp_path / "nope"),
                   "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "no HanCo dataset" in err and "rgb" in err
    assert time.perf_counter() - t < 10  # no Ray start, no work
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--src", "webcam"], "unknown source"),
        (["--src", "video"], "--root"),
        (["--src", "synthetic", "--size", "30"], "multiple of 8"),
    ],
)
def test_bad_options_fail_fast(argv, message, tmp_path, capsys):
    assert cli_main(["build", *argv, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_empty_dataset_fails_fast(tmp_path, capsys):
    (tmp_path / "rgb").mkdir()
    assert cli_main(["build", "--src", "handco", "--root", str(tmp_path), "--out",
                     str(tmp_path / "o")]) == 2  # fmt: skip
    assert "is_train (which frames are green-screen) is unknown" in capsys.readouterr().err
    assert cli_main(["build", "--src", "handco", "--root", str(tmp_path), "--all-frames",
                     "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "empty dataset" in capsys.readouterr().err


def test_overwrite_replaces_a_build_of_another_config(synth_root, tmp_path):
    out = tmp_path / "o"
    build(small_config(synth_root, sequences="0"), Runtime(out=str(out), progress=False))
    (out / "notes.txt").write_text("a user's file")
    with pytest.raises(BuildError, match="not empty"):
        build(small_config(synth_root, size=64), Runtime(out=str(tmp_path / "o" / "train")))
    build(small_config(synth_root, sequences="0", size=64),
          Runtime(out=str(out), overwrite=True, progress=False))  # fmt: skip
    assert open_build(out).image_size == 64 and validate(out) == []
    assert (out / "notes.txt").read_text() == "a user's file"


# ------------------------------------------------------------------ flow_mag (spec 1.1)


def test_windows_carry_flow_mag(built):
    out, _ = built
    b = open_build(out)
    assert has_flow_mag(b.manifest) and b.manifest["spec_version"] == "1.1"
    k = b.window
    rows = {r["key"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    mags = []
    for r in rows.values():
        assert len(r["flow_mag"]) == k - 1
        for g, m in zip(r["flow_mag"], r["flow_msq"], strict=True):
            assert g >= 0 and g * g <= m * (1 + 1e-5) + 1e-9  # mean(|F|)^2 <= mean(|F|^2)
            mags.append(g)
    assert max(mags) > 0 and len(set(mags)) > 1
    seen = 0
    for split in b.splits:
        for s in b.samples(split):
            meta = s["meta"]
            assert meta["flow_mag"] == rows[s["key"]]["flow_mag"]  # JSON and index agree
            seen += 1
    assert seen == len(rows)
    flow = b.manifest["flow"]
    assert flow["mag_stats"]["count"] == flow["stats"]["count"] > 0
    assert set(flow["mag_stats"]) == set(flow["stats"])


def _as_1_0(src: Path, dst: Path) -> Path:
    """A copy of build ``src`` as the 1.0 code left it: no flow_mag in the samples' JSON or the
    index, no flow.mag_stats, spec_version 1.0, and a track cache without pair_mag."""
    from shardutil import edit_shard

    shutil.copytree(src, dst)

    def strip(members):
        out = []
        for name, data in members:
            if name.endswith(".json"):
                meta = json.loads(data)
                del meta["flow_mag"]
                data = json.dumps(meta, sort_keys=True).encode()
            out.append((name, data))
        return out

    manifest = json.loads((dst / "dataset.json").read_text())
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            edit_shard(dst, entry["path"], strip, sign=False)
            entry["bytes"] = (dst / entry["path"]).stat().st_size
            entry["sha256"] = sha256_file(dst / entry["path"])
    index = pq.read_table(dst / "index.parquet").drop_columns(["flow_mag"])
    assert index.schema.equals(INDEX_SCHEMA_1_0)
    (dst / "index.parquet").write_bytes(parquet_bytes(index))
    manifest["spec_version"] = "1.0"
    del manifest["flow"]["mag_stats"]
    write_manifest(dst / "dataset.json", manifest)
    for meta_file in (dst / ".cache").glob("*/meta.json"):
        meta = json.loads(meta_file.read_text())
        del meta["pair_mag"]
        meta_file.write_text(json.dumps(meta))
    return dst


def test_a_1_0_build_reads_validates_inspects_and_subsets(built, tmp_path):
    from pipeline.inspect_build import inspect_build
    from pipeline.subset import subset_build

    out, _ = built
    old = _as_1_0(out, tmp_path / "old")
    assert validate(old) == []
    b = open_build(old)
    assert not has_flow_mag(b.manifest)
    assert all("flow_mag" not in s["meta"] for s in b.samples("train"))
    report = inspect_build(old, str(tmp_path / "look.png"), n=4)
    assert report["mag_hist"] is None and len(report["shown"]) == 4
    subset_build(old, tmp_path / "sub", n=5, seed=1, shard_size=2)
    sub = open_build(tmp_path / "sub")
    assert sub.manifest["spec_version"] == "1.0" and validate(tmp_path / "sub") == []


def test_a_build_without_a_spec_version_is_refused_by_name(built, synth_root, tmp_path):
    out, _ = built
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / "dataset.json").read_text())
    del manifest["spec_version"]
    (old / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="records no shard spec version; this code writes 1.1"):
        build(small_config(synth_root), Runtime(out=str(old), progress=False))


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / ".cache").glob("*/meta.json")}


def test_rebuilding_a_1_0_build_recomputes_its_old_cache_once(built, synth_root, tmp_path):
    """Every track of a cache without pair_mag runs stage 1 again; then the cache is reused."""
    out, _ = built
    old = _as_1_0(out, tmp_path / "old")
    before = _mtimes(old)
    assert before
    with pytest.raises(BuildError, match=r"shard spec 1\.0.*--overwrite"):
        build(small_config(synth_root), Runtime(out=str(old), progress=False))
    assert open_build(old).manifest["spec_version"] == "1.0"  # refused: left as it was
    build(small_config(synth_root), Runtime(out=str(old), overwrite=True, progress=False))
    assert tree_bytes(old) == tree_bytes(out)  # the bytes of a fresh 1.1 build
    after = _mtimes(old)
    assert set(after) == set(before) and all(after[t] != before[t] for t in before)
    for meta_file in (old / ".cache").glob("*/meta.json"):
        meta = json.loads(meta_file.read_text())
        assert [len(c) for c in meta["pair_mag"]] == [len(c) for c in meta["pair_msq"]]
    # an output-only change (another seed) reuses every track
    build(small_config(synth_root, seed=1), Runtime(out=str(old), overwrite=True, progress=False))
    assert _mtimes(old) == after and validate(old) == []


def test_a_cache_entry_without_pair_mag_is_a_miss(synth_root, tmp_path, monkeypatch):
    from pipeline import flow as fl
    from pipeline import frames as fr
    from pipeline import tracks
    from pipeline.handco import discover_handco

    track = discover_handco(synth_root, sequences="0", cameras="0").tracks[0]
    opts = tracks.TrackOptions(fr.FrameSpec(32, 32))
    meta = tracks.process_track(tmp_path, track, opts, tracks.CpuPairs(fl.OpenCVFlow("dis"), 0))
    assert tracks.load_meta(tmp_path, track, opts) == meta
    assert [len(c) for c in meta["pair_mag"]] == [len(c) for c in meta["pair_msq"]]
    meta_file = tracks.track_dir(tmp_path, track) / tracks.META
    without = {k: v for k, v in meta.items() if k != "pair_mag"}
    meta_file.write_text(json.dumps(without))
    assert tracks.load_meta(tmp_path, track, opts) is None  # recomputed, never reused
    # an entry keyed under the previous cache format (2) is a miss too, pair_mag or not
    monkeypatch.setattr(tracks, "CACHE_VERSION", 2)
    old_key = opts.cache_key(track)
    monkeypatch.undo()
    assert old_key != meta["cache_key"]
    meta_file.write_text(json.dumps({**meta, "cache_key": old_key}))
    assert tracks.load_meta(tmp_path, track, opts) is None


def _one_track_cache(synth_root, tmp_path):
    from pipeline import flow as fl
    from pipeline import frames as fr
    from pipeline import tracks
    from pipeline.handco import discover_handco

    track = discover_handco(synth_root, sequences="0", cameras="0").tracks[0]
    opts = tracks.TrackOptions(fr.FrameSpec(32, 32))
    meta = tracks.process_track(tmp_path, track, opts, tracks.CpuPairs(fl.OpenCVFlow("dis"), 0))
    return tracks, track, opts, meta


@pytest.mark.parametrize(
    "damage",
    [
        "drop_value",
        "extra_value",
        "drop_clip",
        "extra_clip",
        "strings",
        "null",
        "null_clip",
        "null_item",
        "negative",
        "nan",
        "bool",
        "flat",
        "dict",
        "above_jensen",
        "msq_drop_value",
        "clip_out_of_range",
    ],
)
def test_a_cache_entry_with_malformed_pair_values_is_a_miss(synth_root, tmp_path, damage):
    """pair_mag (or pair_msq) of the wrong length or with non-numbers is recomputed: the plan
    lays every track's pairs out by the lengths of pair_msq, so a short pair_mag left
    np.empty garbage in other windows' flow_mag (a valid-looking build), a long one or a null
    clip stopped the build with a broadcast error or a traceback."""
    tracks, track, opts, meta = _one_track_cache(synth_root, tmp_path)
    assert tracks.load_meta(tmp_path, track, opts) == meta
    mag = meta["pair_mag"]
    assert len(mag) == 1 and len(mag[0]) > 2
    bad = json.loads(json.dumps(meta))
    edits = {
        "drop_value": lambda m: m["pair_mag"][0].pop(),
        "extra_value": lambda m: m["pair_mag"][0].append(0.5),
        "drop_clip": lambda m: m["pair_mag"].pop(),
        "extra_clip": lambda m: m["pair_mag"].append([0.1, 0.2]),
        "strings": lambda m: m.__setitem__("pair_mag", [[str(v) for v in mag[0]]]),
        "null": lambda m: m.__setitem__("pair_mag", None),
        "null_clip": lambda m: m.__setitem__("pair_mag", [None]),
        "null_item": lambda m: m["pair_mag"][0].__setitem__(0, None),
        "negative": lambda m: m["pair_mag"][0].__setitem__(0, -0.5),
        "nan": lambda m: m["pair_mag"][0].__setitem__(0, float("nan")),
        "bool": lambda m: m["pair_mag"][0].__setitem__(0, True),
        "flat": lambda m: m.__setitem__("pair_mag", list(mag[0])),
        "dict": lambda m: m.__setitem__("pair_mag", {"0": mag[0]}),
        "above_jensen": lambda m: m["pair_mag"][0].__setitem__(
            0, 1.01 * m["pair_msq"][0][0] ** 0.5 + 1e-3
        ),
        "msq_drop_value": lambda m: m["pair_msq"][0].pop(),
        "clip_out_of_range": lambda m: m["clips"][0].__setitem__(1, len(m["frames"]) + 1),
    }
    edits[damage](bad)
    meta_file = tracks.track_dir(tmp_path, track) / tracks.META
    meta_file.write_text(json.dumps(bad))
    assert tracks.load_meta(tmp_path, track, opts) is None  # recomputed, never built on


def test_a_short_cached_pair_mag_rebuilds_to_fresh_bytes(built, synth_root, tmp_path):
    """End to end: one track's pair_mag one value short is processed again, not laid out."""
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta_file = sorted((copy / ".cache").glob("*/meta.json"))[0]
    meta = json.loads(meta_file.read_text())
    clip = next(i for i, c in enumerate(meta["pair_mag"]) if c)
    meta["pair_mag"][clip].pop()
    meta_file.write_text(json.dumps(meta))
    build(small_config(synth_root, shard_size=5), Runtime(out=str(copy), overwrite=True,
                                                         progress=False))  # fmt: skip
    assert validate(copy) == []
    build(small_config(synth_root), Runtime(out=str(copy), overwrite=True, progress=False))
    assert tree_bytes(copy) == tree_bytes(out)
