"""The trainer end to end on small hand-written builds: resume, DDP, checkpoints, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from shardutil import make_build, read_members, resign, write_members

from train import objectives
from train.__main__ import main
from train.checkpoint import steps_saved
from train.metrics import read_metrics, steps

PY = sys.executable


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """40 train windows in uneven shards of 7, 8 val windows, 16 px."""
    root = tmp_path_factory.mktemp("trainbuild")
    return make_build(root, n_train=40, n_val=8, size=16, shard_size=7, seed=5)


def args(build: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(build), "--out", str(out), "--batch", "8", "--val-every", "5",
        "--val-size", "8", "--diag-every", "0", "--ckpt-every", "5", "--no-progress",
        "--workers", "0", *extra,
    ]  # fmt: skip


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in steps(read_metrics(out))]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_run_writes_config_metrics_and_checkpoints(build, tmp_path, capsys):
    """One JSON record per step (1-based) with the documented fields; val and diag points."""
    out = tmp_path / "run"
    code, err = run_main(args(build, out, "--max-steps", "10", "--diag-every", "5"), capsys)
    assert code == 0, err
    assert "GMACs per training sample" in err
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "flow" and config["batch"] == 8 and config["steps_per_epoch"] == 5
    assert config["sigma"] > 0 and config["frames"] == [0, 1, 2]
    records = read_metrics(out)
    per_step = steps(records)
    assert [r["step"] for r in per_step] == list(range(1, 11))
    want = {"loss", "denoise", "reg", "w_mean", "lr", "grad_norm", "param_dist", "images",
            "windows", "images_per_s", "windows_per_s", "data_wait", "epoch", "wall_s"}  # fmt: skip
    assert want <= set(per_step[-1])
    assert per_step[-1]["images"] == 10 * 8 * 3  # a window pushes K frames
    assert [r["epoch"] for r in per_step] == [0] * 5 + [1] * 5
    assert per_step[-1]["param_dist"] > per_step[0]["param_dist"] > 0
    vals = [r for r in records if r.get("kind") == "val"]
    assert [r["step"] for r in vals] == [5, 10] and all(r["val_loss"] > 0 for r in vals)
    diags = [r for r in records if r.get("kind") == "diag"]
    assert [r["step"] for r in diags] == [5, 10] and all(r["grad_var"] >= 0 for r in diags)
    assert steps_saved(out)[-1] == 10
    state = torch.load(out / "ckpt-00000010.pt", weights_only=True)
    assert state["step"] == 10 and state["loader"]["next_batch"] == 10


def test_same_seed_same_run(build, tmp_path, capsys):
    """On CPU the same seed gives the same losses, another seed others."""
    a, b, c = (tmp_path / n for n in "abc")
    for out, seed in ((a, "0"), (b, "0"), (c, "1")):
        assert run_main(args(build, out, "--max-steps", "6", "--seed", seed), capsys)[0] == 0
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


def test_sigkill_and_resume_reproduce_the_losses(build, tmp_path, capsys):
    """A run killed with SIGKILL and resumed takes exactly the steps of an uninterrupted one."""

    def train(out: Path, steps: str) -> None:  # subprocesses: the same threads for every run
        cmd = [PY, "-m", "train", *args(build, out, "--max-steps", steps, "--workers", "1")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]

    ref = tmp_path / "ref"
    train(ref, "30")
    out = tmp_path / "killed"
    cmd = [PY, "-m", "train", *args(build, out, "--max-steps", "100000", "--workers", "1")]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "ckpt-00000010.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended early"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(steps_saved(out)) < 100000
    train(out, "30")
    resumed = [r for r in read_metrics(out) if r.get("kind") == "resume"]
    assert resumed and resumed[0]["step"] >= 10
    assert losses(out) == losses(ref)


def test_resume_reads_only_the_shards_of_the_first_batch(build, monkeypatch):
    """Resuming mid-epoch opens only the segments the first new batch needs (no replay)."""
    from shards_spec import open_build
    from train import data

    stream = data.stream_for(
        open_build(build), "train", frames=(1,), image_size=16, batch=8, seed=0, workers=2
    )
    start = 3  # epoch 0, step 3: each lane skips 3 x 4 windows
    needed = 0
    for lane in stream.rank_lanes:
        offset, lo = 0, start * stream.lane_batch
        for seg in data.lane_segments(stream, 0, lane):
            n = seg.hi - seg.lo
            if offset + n > lo and offset < lo + stream.lane_batch:
                needed += 1
            offset += n
    opened = []
    real = data.raw_samples
    monkeypatch.setattr(data, "raw_samples", lambda urls: (opened.append(urls), real(urls))[1])
    parts = iter(data.LaneParts(stream, start))
    assert [next(parts)["g"] for _ in stream.rank_lanes] == [start, start]
    assert len(opened) == needed <= 2 * len(stream.rank_lanes)


@pytest.mark.slow  # torchrun, two ranks
@pytest.mark.parametrize("flip", [[], ["--hflip"]], ids=["plain", "hflip"])
def test_two_ranks_under_torchrun_match_one_process(build, tmp_path, flip):
    """DDP over 2 gloo ranks (1 loader worker each) = 1 process with 2 workers, same batch
    (--hflip: each rank flips its part of the global batch as the one process does)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = args(build, one, "--max-steps", "6", "--val-every", "0", "--diag-every", "3", *flip)
    subprocess.run([PY, "-m", "train", *common, "--workers", "2"], check=True,
                   capture_output=True)  # fmt: skip
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two_args = [a if a != str(one) else str(two) for a in common]
    res = subprocess.run([*torchrun, "-m", "train", *two_args, "--workers", "1"],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    a = torch.load(one / "ckpt-00000006.pt", weights_only=True)["model"]
    b = torch.load(two / "ckpt-00000006.pt", weights_only=True)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)
    ddp = [r for r in read_metrics(two) if r.get("kind") == "diag_ddp"]
    assert [r["step"] for r in ddp] == [3, 6] and all(r["ddp_grad_dev"] > 0 for r in ddp)


def test_checkpoint_of_another_run_is_refused(build, tmp_path, capsys):
    """Another method, model or objective setting on the same --out: one line naming it."""
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "5"), capsys)[0] == 0
    for extra, named in (
        (["--method", "adjacent"], "method 'flow' -> 'adjacent'"),
        (["--sigma", "2"], "sigma"),
        (["--lambda", "3"], "lam 1.0 -> 3.0"),
    ):
        code, err = run_main(args(build, out, "--max-steps", "8", *extra), capsys)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    code, err = run_main(args(build, out, "--max-steps", "8"), capsys)  # longer is fine
    assert code == 0, err


def test_checkpoint_of_another_build_is_refused(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "5"), capsys)[0] == 0
    other = make_build(tmp_path, n_train=40, n_val=8, size=16, shard_size=7, seed=6)
    code, err = run_main(args(other, out, "--max-steps", "8"), capsys)
    assert code == 2 and "build_id" in err


def test_corrupt_checkpoint_falls_back_to_the_previous(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "10", "--val-every", "0"), capsys)[0] == 0
    last = out / "ckpt-00000010.pt"
    last.write_bytes(last.read_bytes()[:1000])
    code, err = run_main(args(build, out, "--max-steps", "12", "--val-every", "0"), capsys)
    assert code == 0 and "ckpt-00000010.pt is unreadable" in err
    assert [r["step"] for r in read_metrics(out) if r.get("kind") == "resume"] == [5]
    assert [r["step"] for r in steps(read_metrics(out))] == list(range(1, 13))


def test_no_resume_starts_over(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "5"), capsys)[0] == 0
    code, err = run_main(args(build, out, "--max-steps", "3", "--no-resume"), capsys)
    assert code == 0 and "removed" in err
    kinds = [(r["step"], r.get("kind")) for r in read_metrics(out)]
    assert kinds == [(1, None), (2, None), (3, None), (3, "val"), (3, "finished")]


def test_non_finite_losses_are_skipped_then_stop_the_run(build, tmp_path, capsys, monkeypatch):
    """NaN steps are skipped and counted; --max-bad-steps in a row stops with one line."""
    calls = {"n": 0}
    real = objectives.METHODS["iid"]

    def sometimes_nan(model, sched, x0, msq, noise, opts):
        calls["n"] += 1
        loss, terms = real.objective(model, sched, x0, msq, noise, opts)
        return (loss * float("nan"), terms) if calls["n"] in (3, *range(8, 100)) else (loss, terms)

    monkeypatch.setitem(objectives.METHODS, "iid", objectives.Method(
        "iid", sometimes_nan, False, False, "test"))  # fmt: skip
    out = tmp_path / "run"
    argv = args(build, out, "--method", "iid", "--max-steps", "30", "--max-bad-steps", "3",
                "--val-every", "0")  # fmt: skip
    code, err = run_main(argv, capsys)
    assert code == 1 and "3 steps in a row" in err and "step 5 is intact" in err, err
    per_step = steps(read_metrics(out))
    assert per_step[2]["loss"] is None and per_step[2]["skipped_steps"] == 1
    assert per_step[-1]["skipped_steps"] == 3  # the step that stops the run is not logged
    assert torch.load(out / "ckpt-00000005.pt", weights_only=True)["step"] == 5


def _garble(build: Path, rel: str, position: int) -> None:
    members = read_members(build / rel)
    keys = list(dict.fromkeys(n.split(".")[0] for n, _ in members))
    target = f"{keys[position]}.f1.png"
    write_members(build / rel, [(n, b"garbage" if n == target else d) for n, d in members])
    resign(build, rel)


def test_a_corrupt_window_is_replaced_or_stops_the_run(build, tmp_path, capsys):
    """Past --max-bad-fraction the run stops naming the shard; below it, windows are counted."""
    bad = tmp_path / "bad"
    shutil.copytree(build, bad)
    _garble(bad, "train/train-000002.tar", 3)
    code, err = run_main(args(bad, tmp_path / "a", "--method", "iid", "--max-steps", "10"), capsys)
    assert code == 2 and "train/train-000002.tar" in err and "--max-bad-fraction" in err, err
    argv = args(bad, tmp_path / "b", "--method", "iid", "--max-steps", "10",
                "--max-bad-fraction", "0.5")  # fmt: skip
    code, err = run_main(argv, capsys)
    assert code == 0, err
    per_step = steps(read_metrics(tmp_path / "b"))
    assert max(r["bad_windows"] for r in per_step) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--batch", "7"], "must divide"),
        (["--batch", "400"], "fewer than one global batch"),
        (["--image-size", "32"], "larger than the build's 16"),
        (["--lambda", "-1"], "--lambda must be >= 0"),
        (["--method", "dispersive", "--disp-block", "x"], "--disp-block 'x'"),
    ],
)
def test_bad_options_are_one_line_errors(build, tmp_path, capsys, extra, message):
    argv = args(build, tmp_path / "run", "--max-steps", "2", "--workers", "2", *extra)
    code, err = run_main(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_not_a_build_and_missing_val_split(build, tmp_path, capsys):
    code, err = run_main(args(tmp_path, tmp_path / "run"), capsys)
    assert code == 2 and "dataset.json is missing" in err
    no_val = tmp_path / "noval"
    shutil.copytree(build, no_val)
    manifest = json.loads((no_val / "dataset.json").read_text())
    del manifest["splits"]["val"]
    (no_val / "dataset.json").write_text(json.dumps(manifest))
    code, err = run_main(args(no_val, tmp_path / "r2", "--max-steps", "2"), capsys)
    assert code == 2 and "--val-every 0" in err
    assert run_main(args(no_val, tmp_path / "r3", "--max-steps", "2", "--val-every", "0"),
                    capsys)[0] == 0  # fmt: skip


def test_help_documents_every_option_with_its_default():
    res = subprocess.run([PY, "-m", "train", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for flag in ("--shards", "--method", "--out", "--preset", "--batch", "--lambda", "--sigma",
                 "--seed", "--epochs", "--max-steps", "--ckpt-every", "--val-every",
                 "--diag-every", "--image-size", "--workers", "--resume", "--no-resume",
                 "--max-bad-fraction", "--grad-accum"):  # fmt: skip
        assert flag in text
    assert "one pass over the build's train windows" in text
    assert "(default: 0.01)" in text
