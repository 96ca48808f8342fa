"""The track cache (reuse across plan-only options, retry after restored inputs), option
checks before any work, and the private local Ray instance."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.build import BuildConfig, BuildError, Runtime, build
from pipeline.cli import main as cli_main
from pipeline.cli import one_line
from shards_spec import validate

REPO = Path(__file__).resolve().parents[1]


def _cfg(root: Path, **kw) -> BuildConfig:
    base = dict(src="synthetic", root=str(root), size=32, flow="dis", val_fraction=0.3,
                sequences="0-1", shard_size=16)  # fmt: skip
    return BuildConfig(**{**base, **kw})


def _cache_stamps(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / ".cache").glob("*/meta.json")}


def test_plan_only_options_reuse_the_track_cache(synth_root, tmp_path):
    out = tmp_path / "o"
    build(_cfg(synth_root), Runtime(out=str(out), workers=2, progress=False))
    first = _cache_stamps(out)
    assert first and not (out / ".work").exists()
    # seed, window, shard size, val fraction: the same frames and flow, a new plan
    s = build(_cfg(synth_root, seed=5, window=4, shard_size=5, val_fraction=0.5),
              Runtime(out=str(out), workers=2, overwrite=True, progress=False))  # fmt: skip
    assert validate(out) == [] and s["windows"] > 0
    assert _cache_stamps(out) == first  # nothing recomputed
    # an option that changes the frames recomputes every track
    build(_cfg(synth_root, size=40), Runtime(out=str(out), workers=2, overwrite=True,
                                             progress=False))  # fmt: skip
    again = _cache_stamps(out)
    assert set(again) == set(first) and all(again[k] != first[k] for k in first)
    build(_cfg(synth_root, size=40), Runtime(out=str(out), drop_cache=True, overwrite=True,
                                             workers=2, progress=False))  # fmt: skip
    assert not (out / ".cache").exists() and validate(out) == []


def test_restored_masks_are_used_on_the_next_run(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    masks = root / "mask_fg"
    shutil.move(masks, tmp_path / "masks-away")
    out = tmp_path / "o"
    cfg = _cfg(root, src="handco")
    with pytest.raises(BuildError, match="no window"):  # every frame: missing_mask
        build(cfg, Runtime(out=str(out), workers=2, progress=False))
    shutil.move(tmp_path / "masks-away", masks)
    summary = build(cfg, Runtime(out=str(out), workers=2, progress=False))  # same command
    assert "missing_mask" not in summary["skipped_by_reason"]
    assert summary["windows"] > 0 and validate(out) == []
    # a finished build of source data that changed since is refused without --overwrite
    victim = next((root / "rgb").glob("0000/cam0/*.jpg"))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(BuildError, match="other source data"):
        build(cfg, Runtime(out=str(out), workers=2, progress=False))
    before = _cache_stamps(out)
    build(cfg, Runtime(out=str(out), workers=2, overwrite=True, progress=False))
    after = _cache_stamps(out)
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed == ["0000-cam0-00000000"]  # only the track whose file changed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--max-windows", "-1"], "--max-windows must be an integer >= 1"),
        (["--keep-flow", "-1"], "--keep-flow must be an integer >= 0"),
        (["--flow-batch", "0"], "--flow-batch must be an integer >= 1"),
        (["--workers", "-1"], "--workers must be an integer >= 1"),
        (["--max-clips", "0"], "--max-clips must be an integer >= 1"),
        (["--max-clips", "-1"], "--max-clips must be an integer >= 1"),
        (["--frame-stride", "0"], "--frame-stride must be an integer >= 1"),
        (["--cameras", "1-"], "--cameras: '1-' in '1-' is not a number or a range"),
        (["--sequences", "3-1"], "--sequences: range '3-1' ends before it starts"),
        (["--size", "30"], "--size must be a positive multiple of 8"),
        (["--size", "100000"], "--size must be at most 2048"),
        (["--keep-flow", "100000"], "--keep-flow must be at most 1024"),
        (["--flow-actors", "0"], "--flow-actors must be an integer >= 1"),
    ],
)
def test_bad_options_are_one_line_before_any_work(synth_root, tmp_path, capsys, args, message):
    out = tmp_path / "o"
    rc = cli_main(["build", "--src", "synthetic", "--root", str(synth_root), "--out", str(out),
                   "--no-progress", *args])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(synth_root, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    rc = cli_main(["build", "--src", "synthetic", "--root", str(synth_root), "--out", str(out)])
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_too_many_flow_actors_fail_instead_of_hanging(synth_root, tmp_path):
    cfg = _cfg(synth_root, flow="raft-small", flow_weights="none", raft_iters=1)
    with pytest.raises(BuildError, match="--flow-actors 9: the Ray cluster can place at most 1"):
        build(cfg, Runtime(out=str(tmp_path / "o"), workers=2, flow_actors=9, progress=False))


def test_disk_full_and_task_errors_read_as_one_line():
    import errno

    import ray.exceptions

    full = OSError(errno.ENOSPC, "No space left on device", "/data/o/train/train-000001.tar")
    wrapped = ray.exceptions.RayTaskError("_shard_task", "Traceback ...\nlots\nof lines", full)
    line = one_line(wrapped.as_instanceof_cause())
    assert line.startswith("disk full writing /data/o/train/train-000001.tar")
    assert "run the same command again to resume" in line
    boom = ray.exceptions.RayTaskError("_track_task", "Traceback\n...", KeyError("frames"))
    assert one_line(boom.as_instanceof_cause()) == "KeyError: 'frames'"


def test_local_ray_is_private_and_ignores_a_stale_cluster_file(synth_root, tmp_path):
    """A stale ray_current_cluster (a cluster that is gone) does not capture a local build."""
    ray_tmp = tempfile.mkdtemp(prefix="fbr", dir="/tmp")  # short: Ray's socket paths are long
    try:
        Path(ray_tmp, "ray_current_cluster").write_text("127.0.0.1:1\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = ray_tmp
        code = (
            "import ray, sys\n"
            "from pipeline.raycluster import ray_session\n"
            "with ray_session(workers=1) as res:\n"
            "    nodes = ray.nodes()\n"
            "    print(len(nodes), nodes[0]['NodeManagerAddress'], res['cpus'])\n"
        )
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=180)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split() == ["1", "127.0.0.1", "1.0"]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_transient_read_error_is_not_cached_for_good(synth_root, tmp_path, monkeypatch):
    import errno

    from pipeline import frames as fr
    from pipeline.flow import OpenCVFlow
    from pipeline.handco import discover_handco
    from pipeline.tracks import CpuPairs, TrackOptions, load_meta, process_track

    track = discover_handco(synth_root, sequences="0", cameras="0").tracks[0]
    victim = track.frame_path(3)
    real = Path.read_bytes

    def flaky(self):
        if str(self) == victim:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self)

    opts = TrackOptions(fr.FrameSpec(32, 32))
    monkeypatch.setattr(Path, "read_bytes", flaky)
    meta = process_track(tmp_path, track, opts, CpuPairs(OpenCVFlow("dis"), 0))
    assert [r[2] for r in meta["skipped"]] == ["read_error"] and meta["retry"]
    assert load_meta(tmp_path, track, opts) is None  # the next run processes it again
    monkeypatch.setattr(Path, "read_bytes", real)
    meta = process_track(tmp_path, track, opts, CpuPairs(OpenCVFlow("dis"), 0))
    assert meta["skipped"] == [] and load_meta(tmp_path, track, opts) == meta
