"""A run folder that tells the truth: restarts, a torn or garbled metrics file, one trainer per
folder, fresh starts, finished runs, signals, a full disk and bad options, on a tiny build."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from shardutil import make_build, read_members, resign, write_members

from shards_spec.writer import sha256_file
from train import checkpoint
from train.__main__ import main
from train.checkpoint import CheckpointError, steps_saved
from train.metrics import MetricsWarning, read_metrics, steps
from train.options import check, parse, parser, resolve_defaults

PY = sys.executable


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """40 train windows in uneven shards of 7, 8 val windows, 16 px."""
    root = tmp_path_factory.mktemp("runfolderbuild")
    return make_build(root, n_train=40, n_val=8, size=16, shard_size=7, seed=5)


def args(build: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(build), "--out", str(out), "--method", "iid", "--batch", "8",
        "--val-every", "0", "--val-size", "8", "--diag-every", "0", "--ckpt-every", "5",
        "--no-progress", "--workers", "0", *extra,
    ]  # fmt: skip


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def step_numbers(out: Path) -> list[int]:
    return [r["step"] for r in steps(read_metrics(out))]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def after_announce(err: str) -> str:
    """What the trainer said after its two lines about the model and the run."""
    lines = err.strip().splitlines()
    last = max((i for i, line in enumerate(lines) if "; run folder " in line), default=-1)
    return "\n".join(lines[last + 1 :])


def config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


# processes started by a test: its own process group, watched through /proc


def _default_sigint() -> None:
    # a test session started in the background (nohup, `&`) passes SIGINT on ignored, and a
    # process that inherits an ignored SIGINT rightly keeps ignoring it: give ours the default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_default_sigint, **kw)


def group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(d.name))
    return found


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done = (out / "metrics.jsonl").read_text().count('"loss"')
        except FileNotFoundError:
            done = 0
        if done >= n:
            return
        assert proc.poll() is None, "the run ended early"
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.05)


def wait_gone(pgid: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return group(pgid)


def kill_group(proc: subprocess.Popen) -> None:
    if group(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# 1, 12: a restart before the first checkpoint; the loader dies with a killed trainer


def test_a_restart_before_the_first_checkpoint_starts_the_metrics_afresh(build, tmp_path, capsys):
    """SIGKILL of the trainer alone after 6 steps (no checkpoint yet): its fork server and loader
    worker go with it, and the same run again logs steps 1..20 once."""
    out = tmp_path / "run"
    cmd = [PY, "-m", "train", *args(build, out, "--max-steps", "100000", "--ckpt-every",
                                   "1000", "--workers", "1")]  # fmt: skip
    proc = start(cmd, stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(proc, out, 6)
        assert steps_saved(out) == []
        assert len(group(proc.pid)) >= 3  # trainer, fork server, worker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_gone(proc.pid) == [], "the loader outlived the trainer"
    finally:
        kill_group(proc)
    code, err = run_main(args(build, out, "--max-steps", "20"), capsys)
    assert code == 0, err
    assert "no checkpoint yet: starting" in err and "removed metrics.jsonl" in err
    assert step_numbers(out) == list(range(1, 21))
    assert not [r for r in read_metrics(out) if r.get("kind") == "resume"]


def test_every_checkpoint_damaged_starts_over_with_fresh_metrics(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "10"), capsys)[0] == 0
    for step in steps_saved(out):
        path = checkpoint.path_for(out, step)
        path.write_bytes(path.read_bytes()[:1000])
    code, err = run_main(args(build, out, "--max-steps", "12"), capsys)
    assert code == 0, err
    assert step_numbers(out) == list(range(1, 13))
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2 and all("is unreadable" in w for w in warned), err
    assert "no checkpoint loads: starting" in err and "removed 2 checkpoints" in err
    assert steps_saved(out) == [5, 10, 12]
    assert torch.load(checkpoint.path_for(out, 10), weights_only=True)["step"] == 10


def test_no_resume_without_a_checkpoint_still_starts_afresh(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "4"), capsys)[0] == 0
    for step in steps_saved(out):  # killed before its first checkpoint
        checkpoint.path_for(out, step).unlink()
    code, err = run_main(args(build, out, "--max-steps", "3", "--no-resume"), capsys)
    assert code == 0, err
    assert step_numbers(out) == [1, 2, 3]
    assert "--no-resume: starting" in err and "removed metrics.jsonl" in err


# 4: a fresh start removes what was derived from the old checkpoints; run_id


def test_a_fresh_start_removes_evals_and_samples_and_gets_a_new_run_id(build, tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = run_main(args(build, out, "--max-steps", "5", "--val-every", "5"), capsys)
    assert code == 0 and (out / "best.json").exists()
    first = config(out).get("run_id")
    (out / "evals").mkdir()
    (out / "evals" / "00000005-val-offline.json").write_text("{}")
    (out / "samples" / "00000005").mkdir(parents=True)
    (out / "samples" / "00000005" / "000000.png").write_bytes(b"png")
    code, err = run_main(args(build, out, "--max-steps", "3", "--no-resume"), capsys)
    assert code == 0, err
    assert not (out / "evals").exists() and not (out / "samples").exists()
    assert not (out / "best.json").exists() and steps_saved(out) == [3]
    assert "removed 1 checkpoint, best.json, metrics.jsonl, evals/, samples/" in err
    second = config(out).get("run_id")
    assert first and second and len(second) == 32 and second != first
    code, err = run_main(args(build, out, "--max-steps", "6"), capsys)  # a resume keeps it
    assert code == 0, err
    assert config(out)["run_id"] == second
    assert torch.load(checkpoint.path_for(out, 6), weights_only=True)["config"]["run_id"] == second


# 2, 15: metrics.jsonl after a power loss, and garbage in it


def test_a_torn_last_line_does_not_swallow_the_resume_record(build, tmp_path, capsys):
    """Power lost at step 7 (checkpoint of step 5): the torn line is left out with a warning
    and the resumed steps 6 and 7 are not counted twice."""
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "7"), capsys)[0] == 0
    checkpoint.path_for(out, 7).unlink()  # lost with the power
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if '"loss"' in line)
    assert json.loads(lines[last])["step"] == 7
    metrics.write_text("\n".join(lines[: last + 1])[:-40])  # half of step 7's line, no more
    code, err = run_main(args(build, out, "--max-steps", "10"), capsys)
    assert code == 0, err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_metrics(out)
    assert [r["step"] for r in steps(records)] == list(range(1, 11))
    assert [r["step"] for r in records if r.get("kind") == "resume"] == [5]
    said = [str(w.message) for w in caught if issubclass(w.category, MetricsWarning)]
    assert len(said) == 1 and "metrics.jsonl line 7: not JSON" in said[0]
    assert "torn line" in err


def test_garbage_lines_are_skipped_with_a_warning_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        b'{"step": 1, "loss": 0.5}',
        b"null",
        b"[1, 2]",
        b'{"kind": "resume"}',
        b"\xff\xfe not utf-8",
        b'{"step": "x", "loss": 1}',
        b'{"step": true}',
        b'{"step": 2, "loss": 0.4}',
        b'{"kind": "resume", "step": 1}',
        b'{"step": 2, "loss": 0.3}',
        b'{"kind": "finished", "step": 2}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_metrics(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, MetricsWarning)]
    assert [m.split(":")[0] for m in messages] == [f"{path} line {n}" for n in range(2, 8)]
    assert all(m.endswith("; skipped") for m in messages)
    assert [(r["step"], r.get("kind"), r.get("loss")) for r in records] == [
        (1, None, 0.5), (1, "resume", None), (2, None, 0.3), (2, "finished", None),
    ]  # fmt: skip


# 3: one trainer per run folder


def test_a_second_trainer_on_the_same_out_is_refused(build, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [PY, "-m", "train", *args(build, out, "--max-steps", "100000", "--ckpt-every",
                                   "1000")]  # fmt: skip
    proc = start(cmd, stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(proc, out, 1)
        code, err = run_main(args(build, out, "--max-steps", "10"), capsys)
        line = one_line(err)
        assert code == 2 and f"in use by PID {proc.pid}" in line, err
        assert proc.poll() is None and (out / "metrics.jsonl").exists()
    finally:
        kill_group(proc)


# 7: NaN and infinity


def test_every_float_option_refuses_nan_and_infinity():
    floats = [a for a in parser()._actions if a.type is float]
    assert {"--lambda", "--sigma", "--clip", "--lr", "--ema"} <= {a.option_strings[0]
                                                                  for a in floats}  # fmt: skip
    for action in floats:
        flag = action.option_strings[0]
        for value in ("nan", "inf", "-inf"):
            cfg = resolve_defaults(parse(["--max-steps", "2", f"{flag}={value}"]))
            with pytest.raises(ValueError, match=f"^{flag} must be a finite number"):
                check(cfg)


@pytest.mark.parametrize("extra", [["--lambda", "nan"], ["--sigma", "nan"], ["--clip", "nan"]])
def test_nan_options_are_one_line_errors(build, tmp_path, capsys, extra):
    code, err = run_main(args(build, tmp_path / "run", "--max-steps", "2", *extra), capsys)
    assert code == 2 and "must be a finite number, got nan" in one_line(err)
    assert not (tmp_path / "run").exists()


# 9: bad windows are counted per epoch, across a resume


def _garble(build: Path, rel: str, position: int) -> None:
    members = read_members(build / rel)
    keys = list(dict.fromkeys(n.split(".")[0] for n, _ in members))
    target = f"{keys[position]}.f1.png"
    write_members(build / rel, [(n, b"garbage" if n == target else d) for n, d in members])
    resign(build, rel)


def test_bad_windows_of_an_epoch_count_across_a_resume(build, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(build, bad)
    _garble(bad, "train/train-000000.tar", 0)
    _garble(bad, "train/train-000003.tar", 0)
    ref = tmp_path / "ref"
    argv = args(bad, ref, "--max-steps", "5", "--max-bad-fraction", "0.5")
    assert run_main(argv, capsys)[0] == 0
    counts = [r["bad_windows"] for r in steps(read_metrics(ref))]
    first, second = counts.index(1) + 1, counts.index(2) + 1  # the steps that met them
    assert first < second <= 5
    out = tmp_path / "run"
    limit = ["--max-bad-fraction", "0.03"]  # 1.2 of the epoch's 40 windows
    code, err = run_main(args(bad, out, "--max-steps", str(first), *limit), capsys)
    assert code == 0, err
    assert torch.load(checkpoint.path_for(out, first), weights_only=True)["epoch_bad"] == 1
    code, err = run_main(args(bad, out, "--max-steps", "5", *limit), capsys)
    assert code == 2 and "2 of this epoch's 40 windows" in err, err


# 11: a finished run: its record, a rerun, a shorter --max-steps


def test_a_finished_run_is_recorded_and_left_alone(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "6"), capsys)[0] == 0
    assert read_metrics(out)[-1] == {"kind": "finished", "step": 6}
    assert config(out)["total_steps"] == 6
    before = {n: (out / n).read_bytes() for n in ("metrics.jsonl", "config.json")}
    code, err = run_main(args(build, out, "--max-steps", "6"), capsys)
    assert code == 0 and "finished at step 6 already" in one_line(err)
    code, err = run_main(args(build, out, "--max-steps", "4"), capsys)
    assert code == 2 and "at step 6, past this command's last step 4" in one_line(err)
    assert {n: (out / n).read_bytes() for n in before} == before
    code, err = run_main(args(build, out, "--max-steps", "8"), capsys)
    assert code == 0, err
    records = read_metrics(out)
    assert [r["step"] for r in records if r.get("kind") == "finished"] == [8]
    assert [r["step"] for r in steps(records)] == list(range(1, 9))
    assert config(out)["total_steps"] == 8


# 12: signals stop the whole run


def _mapped(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("command", [["-m", "train"], ["-m", "eval", "report"]])
def test_ctrl_c_while_torch_imports_is_one_line(build, tmp_path, command):
    """A Ctrl-C to the group while the command still imports torch (seconds, before it has
    parsed its options) ends it as one later would: exit 130, ``stopped by SIGINT``."""
    out = tmp_path / "run"
    tail = args(build, out) if command[-1] == "train" else [str(tmp_path / "no-run")]
    proc = start([PY, *command, *tail], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _mapped(proc.pid, "libtorch") and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the command ended before it loaded torch"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
        assert err.strip().splitlines()[-1] == "stopped by SIGINT"
        assert "Traceback" not in err
    finally:
        kill_group(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_loader_workers_and_the_fork_server(build, tmp_path, sig):
    out = tmp_path / "run"
    cmd = [PY, "-m", "train", *args(build, out, "--max-steps", "100000", "--ckpt-every",
                                   "1000", "--workers", "1")]  # fmt: skip
    proc = start(cmd, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(proc, out, 3)
        assert len(group(proc.pid)) >= 3  # trainer, fork server, worker
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        assert wait_gone(proc.pid) == [], "processes of the run outlived it"
        assert proc.returncode == 128 + sig, err[-2000:]
        assert err.strip().splitlines()[-1] == f"stopped by {signal.Signals(sig).name}"
        assert "Traceback" not in err
    finally:
        kill_group(proc)


# 13: an --out that cannot be a run folder


def _bad_out(build: Path, tmp_path: Path, kind: str) -> Path:
    if kind == "file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f"
    if kind == "below a file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f" / "run"
    if kind == "the build":
        return build
    if kind == "inside the build":
        return build / "runs" / "a"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    # root writes anywhere a permission allows; /proc refuses a new folder even to root
    return Path("/proc/framebridge-run") if os.geteuid() == 0 else ro / "run"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("file", "is a file, not a folder"),
        ("below a file", "is a file, so no folder can be made below it"),
        ("the build", "is inside the build"),
        ("inside the build", "is inside the build"),
        ("not writable", "cannot write"),
    ],
)
def test_an_out_that_cannot_be_a_run_folder_is_refused(build, tmp_path, capsys, kind, message):
    out = _bad_out(build, tmp_path, kind)
    before = sorted(p.name for p in build.iterdir())
    code, err = run_main(args(build, out, "--max-steps", "2"), capsys)
    assert code == 2 and message in one_line(err)
    assert sorted(p.name for p in build.iterdir()) == before


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json", "best.json"])
def test_a_run_file_that_is_a_folder_is_refused_before_anything_is_deleted(
    build, tmp_path, capsys, name
):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "3"), capsys)[0] == 0
    shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    (out / name).mkdir()
    kept = sorted(p.name for p in out.iterdir())
    for extra in ((), ("--no-resume",)):
        code, err = run_main(args(build, out, "--max-steps", "6", *extra), capsys)
        assert code == 2 and f"{name} there is not a file" in one_line(err)
        assert sorted(p.name for p in out.iterdir()) == kept


# 14: a full disk during a checkpoint save


class _FillsUp:
    """A file on a disk with `room` bytes left."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_a_full_disk_during_a_save_is_one_line_and_resumes_after(
    build, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"

    def full_disk_open(file, mode="r", *a, **kw):
        f = open(file, mode, *a, **kw)  # noqa: SIM115
        return _FillsUp(f, 100_000) if "ckpt-00000010" in str(file) else f

    monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    code, err = run_main(args(build, out, "--max-steps", "12"), capsys)
    said = err.strip().splitlines()  # the announcement, an epoch summary and the error
    assert code == 2 and said[-1].startswith("error: disk full writing "), err
    assert "free some space" in said[-1] and "unexpected pos" not in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    assert steps_saved(out) == [5]
    monkeypatch.undo()  # space freed
    code, err = run_main(args(build, out, "--max-steps", "12"), capsys)
    assert code == 0, err
    assert step_numbers(out) == list(range(1, 13))
    assert [r["step"] for r in read_metrics(out) if r.get("kind") == "resume"] == [5]


# 16: an unknown device; a config.json that is not an object


def test_an_unknown_device_is_one_line(build, tmp_path, capsys):
    code, err = run_main(args(build, tmp_path / "run", "--device", "tpu"), capsys)
    assert code == 2 and "unknown device 'tpu'" in one_line(err)


def test_a_config_that_is_not_an_object_is_refused_on_resume(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "5"), capsys)[0] == 0
    (out / "config.json").write_text("[1, 2]\n")
    code, err = run_main(args(build, out, "--max-steps", "7"), capsys)
    assert code == 2 and "config.json is not a JSON object (a list)" in one_line(err)
    assert (out / "config.json").read_text() == "[1, 2]\n"


# (a) a pickled checkpoint; (b) the build's absolute path; (c) --verify-shards


def test_a_pickled_checkpoint_is_refused_in_one_line(build, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(args(build, out, "--max-steps", "5"), capsys)[0] == 0
    pickled = checkpoint.path_for(out, 9)
    torch.save({"model": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(pickled)
    message = str(caught.value)
    assert "holds a pickled object (argparse.Namespace)" in message and "\n" not in message
    code, err = run_main(args(build, out, "--max-steps", "7"), capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "ckpt-00000009.pt" in line]
    assert len(warned) == 1 and warned[0].endswith("is refused; trying the one before")
    assert "weights_only" not in err
    assert [r["step"] for r in read_metrics(out) if r.get("kind") == "resume"] == [5]


def test_the_config_names_the_build_by_its_absolute_path(build, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(build.parent)
    out = tmp_path / "run"
    argv = args(Path(build.name), out, "--max-steps", "1")
    assert run_main(argv, capsys)[0] == 0
    assert config(out)["shards"] == str(build)


def _rewrite(root: Path, rel: str) -> None:
    """The same members in a tar of other bytes, the manifest left as it was."""
    before = sha256_file(root / rel)
    write_members(root / rel, read_members(root / rel))
    assert sha256_file(root / rel) != before


def test_verify_shards_checks_each_shard_against_the_manifest(build, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(build, changed)
    _rewrite(changed, "train/train-000002.tar")
    code, err = run_main(args(changed, tmp_path / "a", "--max-steps", "5"), capsys)
    assert code == 0, err  # off by default: the shard reads fine
    argv = args(changed, tmp_path / "b", "--max-steps", "5", "--verify-shards")
    code, err = run_main(argv, capsys)
    line = one_line(after_announce(err))
    assert code == 2 and "train/train-000002.tar: sha256" in line and "manifest" in line, err
    _rewrite(changed, "val/val-000000.tar")  # read for the fixed validation set
    argv = args(changed, tmp_path / "c", "--max-steps", "5", "--verify-shards", "--val-every", "5")
    code, err = run_main(argv, capsys)
    assert code == 2 and "val/val-000000.tar: sha256" in one_line(err), err
    code, err = run_main(args(build, tmp_path / "d", "--max-steps", "5", "--verify-shards"), capsys)
    assert code == 0, err


def test_train_options_are_taken_by_their_full_names_only(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--warm", "3"])  # not --warmup
    assert e.value.code == 2 and "--warm" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["link", "dangling link", "folder"])
def test_a_lock_file_that_is_not_a_plain_file_is_refused_and_nothing_is_written_through_it(
    tmp_path, kind
):
    from train.folder_lock import FolderBusy, acquire

    folder, target = tmp_path / "run", tmp_path / "elsewhere.txt"
    folder.mkdir()
    if kind == "folder":
        (folder / ".lock").mkdir()
    else:
        if kind == "link":
            target.write_text("keep me")
        (folder / ".lock").symlink_to(target)
    with pytest.raises(FolderBusy, match="is not a plain file"):
        acquire(folder, "run folder")
    assert (target.read_text() == "keep me") if kind == "link" else not target.exists()


@pytest.mark.parametrize("split", ["val", "train"])
def test_a_missing_shard_of_a_fixed_set_is_one_line(build, tmp_path, capsys, split):
    copy = tmp_path / "b"
    shutil.copytree(build, copy)
    first = sorted((copy / split).glob("*.tar"))[0]
    first.unlink()
    every = ("--val-every", "2") if split == "val" else ("--diag-every", "2", "--probe-size", "4")
    code, err = run_main(args(copy, tmp_path / "run", "--max-steps", "3", *every), capsys)
    assert code == 2 and first.name in one_line(err) and "Traceback" not in err


def test_resume_of_a_former_layout_is_refused_naming_the_version(tmp_path, monkeypatch):
    """A checkpoint whose preset had another layout in an earlier version (unet.FORMER_LAYOUTS):
    one line naming the version, before any other comparison."""
    from dataclasses import asdict

    from train import setup, unet
    from train.distributed import World
    from train.options import TrainConfig

    former = unet.UNetConfig(**{**asdict(unet.PRESETS["tiny"]), "channels": 16, "groups": 4})
    monkeypatch.setitem(unet.FORMER_LAYOUTS, "tiny", (("0.0", former),))
    out = tmp_path / "run"
    out.mkdir()
    config = {"preset": "tiny", "unet": asdict(former)}  # tuples, as a checkpoint holds them
    state = {"model": {}, "ema": {}, "optimizer": {}, "step": 3, "epoch": 0, "images": 3}
    checkpoint.save(out, 3, {**state, "wall_s": 1.0, "config": config}, keep=1)
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))
    resolved = {"preset": "tiny", "unet": json.loads(json.dumps(asdict(unet.PRESETS["tiny"])))}
    with pytest.raises(CheckpointError, match="layout of framebridge 0.0") as info:
        setup._resume_state(TrainConfig(out=str(out), preset="tiny"), world, out, resolved)
    assert "\n" not in str(info.value) and "--no-resume" in str(info.value)
    # a layout no version had: refused in one line too, showing both
    monkeypatch.setitem(unet.FORMER_LAYOUTS, "tiny", ())
    with pytest.raises(CheckpointError, match="is not this version's") as info:
        setup._resume_state(TrainConfig(out=str(out), preset="tiny"), world, out, resolved)
    assert "'channels': 16" in str(info.value) and "\n" not in str(info.value)
