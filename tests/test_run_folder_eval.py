"""Run folders that tell the truth, the evaluation side: one writer per sample folder and study
cell, settings that are applied or refused, typos that are errors, outputs checked before the
work, evaluations of malformed or repeated runs, watch that ends, a study that stops its children.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from shardutil import make_build

from eval import features, study, watch
from eval.__main__ import main as eval_main
from eval.runs import RunError, read_config
from train.__main__ import main as train_main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = ["--n", "2", "--steps", "2", "--device", "cpu", "--no-progress"]
_POPEN = subprocess.Popen  # the real one, for the lock holders of tests that forbid processes
WATCH = ["--n", "4", "--steps", "2", "--extractor", "offline", "--n-ref", "4", "--batch", "4",
         "--splits", "val", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("rfe"), n_train=24, n_val=8, size=16, seed=2)


@pytest.fixture(scope="module")
def trained(build) -> Iterator[Path]:
    """A 4-step tiny iid run (config total_steps 4) with checkpoints at steps 2 and 4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = build.parent / "run"
    code = train_main(["--shards", str(build), "--out", str(run), "--method", "iid", "--batch",
                       "4", "--max-steps", "4", "--ckpt-every", "2", "--val-every", "0",
                       "--diag-every", "0", "--no-progress", "--workers", "0"])  # fmt: skip
    assert code == 0
    yield run
    torch.set_num_threads(threads)


def copy_run(run: Path, where: Path) -> Path:
    """The run's config, metrics and checkpoints (no evaluations or samples) at ``where``."""
    shutil.copytree(run, where, ignore=shutil.ignore_patterns("evals", "samples", ".lock"))
    return where


def one_line_exit_2(argv: list[str], capsys) -> str:
    """Run ``python -m eval`` in-process; assert exit 2 and one stderr line; return it."""
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def holder(tmp_path) -> Iterator:
    """``holder(folder)``: another process that holds ``folder``'s lock until the test ends."""
    procs = []

    def hold(folder: Path, what: str = "folder") -> subprocess.Popen:
        code = ("import sys, time\nfrom train.folder_lock import hold\n"
                "with hold(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n"
                "    time.sleep(120)\n")  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        proc = _POPEN([sys.executable, "-c", code, str(folder), what], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


# --- 3: one writer per sample folder and per study cell ------------------------------------------


def test_sample_folder_in_use_is_refused_naming_the_holder(trained, tmp_path, holder, capsys):
    out = tmp_path / "s"
    proc = holder(out, "sample folder")
    err = one_line_exit_2(["sample", "--run", str(trained), "--out", str(out), *SAMPLE], capsys)
    assert f"PID {proc.pid}" in err and str(out) in err
    assert not list(out.glob("*.png")) and not (out / "sample.json").exists()


STUDY = """
name = "rfe"
[build]
path = "{build}"
[budget]
images = {images}
[evaluation]
val_points = 0
diag_points = 0
points = 2
samples = 4
ddim_steps = 2
n_ref = 4
batch = 4
splits = ["val"]
[train]
preset = "tiny"
workers = {workers}
val_size = 4
probe_size = 4
[[cell]]
name = "a"
method = "iid"
batch = 4
[[cell]]
name = "b"
method = "iid"
batch = 8
"""


def write_study(folder: Path, build: Path, images: int = 16, workers: int = 0, cells: int = 2):
    text = STUDY.format(build=build, images=images, workers=workers)
    if cells == 1:
        text = text[: text.index('[[cell]]\nname = "b"')]
    path = folder / "study.toml"
    path.write_text(text)
    return path


@pytest.fixture
def no_processes(monkeypatch):
    """Fail the test if the study starts any process."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(study.subprocess, "Popen", refuse)
    monkeypatch.setattr(study.subprocess, "call", refuse)


def _cells(path: Path, out: Path) -> list[study.Cell]:
    loaded = study.load_study(path, out)
    cells = study.expand(loaded, out)
    for cell in cells:
        cell.plan = study.plan(cell, loaded, window=3)
    return loaded, cells


def test_a_busy_study_cell_starts_no_second_trainer(build, tmp_path, holder, no_processes, capsys):
    """A cell another study process runs, or whose run folder a trainer (of a killed study)
    still holds, is reported busy in one line; nothing is started."""
    path = write_study(tmp_path, build)
    loaded, (a, b) = _cells(path, tmp_path / "out")
    cell_holder = holder(a.run / study.CELL_LOCK, "study cell")
    trainer = holder(b.run, "run folder")
    status, _ = study.run_cell(a, loaded, False, None, print)
    assert status.startswith("busy: ") and f"PID {cell_holder.pid}" in status
    status, _ = study.run_cell(b, loaded, False, None, print)
    assert status.startswith("busy: ") and f"PID {trainer.pid}" in status
    assert not (b.run / "cell.json").exists()
    capsys.readouterr()
    assert eval_main(["study", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 2 and all(": busy: " in x and "in use by PID" in x for x in errors)


# --- 5: changed evaluation settings are applied ----------------------------------------------------


def test_changed_evaluation_settings_evaluate_again(trained, build, tmp_path):
    """New samples / ddim_steps in the study file: the cell's evaluations are made again with
    them (before, the cell printed "evaluate" and kept the files of the old settings)."""
    path, out = write_study(tmp_path, build, cells=1), tmp_path / "out"
    loaded, (cell,) = _cells(path, out)  # 4 steps, checkpoints at 2 and 4: the trained run
    copy_run(trained, cell.run)
    old = {**loaded.evaluation}
    identity = {"plan": cell.plan, "options": cell.options, "seed": cell.seed}
    study.write_cell(cell.run, {"done": True, "identity": identity, "evaluation": old})
    (cell.run / "evals").mkdir()
    for step in (2, 4):  # what the old settings made
        ev = {"step": step, "split": "val", "extractor": "offline", "fid": 1.0, "n_samples": 4,
              "sampler": {"steps": 2}}  # fmt: skip
        (cell.run / "evals" / f"{step:08d}-val-offline.json").write_text(json.dumps(ev))
    path.write_text(path.read_text().replace("samples = 4", "samples = 6")
                    .replace("ddim_steps = 2", "ddim_steps = 3"))  # fmt: skip
    assert study.run_study(path, out, progress=False, report=False) == 0
    for step in (2, 4):
        after = json.loads((cell.run / "evals" / f"{step:08d}-val-offline.json").read_text())
        assert after["n_samples"] == 6 and after["sampler"]["steps"] == 3
        record = json.loads((cell.run / "samples" / f"{step:08d}" / "sample.json").read_text())
        assert record["n"] == 6 and record["steps"] == 3 and record["complete"] is True
    record = json.loads((cell.run / "cell.json").read_text())
    assert record["done"] and record["evaluation"]["samples"] == 6
    assert json.loads((cell.run / "config.json").read_text()) == read_config(trained)  # no training


# --- 6: typos in study files are errors naming the nearest valid name ------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace("[evaluation]", "[evalution]"),
         "unknown table 'evalution'; did you mean 'evaluation'"),
        (lambda s: "budgt = 5\n" + s, "unknown key 'budgt'; did you mean 'budget'"),
        (lambda s: s.replace("images = 16", "images = 16\nimagse = 3"), "did you mean 'images'"),
        (lambda s: s.replace('preset = "tiny"', 'preset = "tiny"\nwarm = 3'),
         "[train]: unknown key 'warm'; did you mean 'warmup'"),
        (lambda s: s.replace("batch = 8", "batch = 8\nlamda = 0.5"),
         "unknown key 'lamda'; did you mean 'lambda'"),
        (lambda s: s.replace("batch = 8", "batch = 8\nema_warmup = 'no'"),
         "ema_warmup must be true or false"),
        (lambda s: s.replace("batch = 8", "batch = 8\nlr = nan"), "lr must be a finite number"),
        (lambda s: s.replace("batch = 8", "batch = 8\nlr = inf"), "lr must be a finite number"),
        (lambda s: s.replace("batch = 8", "batch = 8\nschedule = 'cosin'"), "schedule must be one"),
        (lambda s: s.replace('path = "', 'pth = "x"\npath = "'), "did you mean 'path'"),
    ],
)  # fmt: skip
def test_study_file_typos_are_errors(build, tmp_path, capsys, edit, message):
    path = write_study(tmp_path, build)
    path.write_text(edit(path.read_text()))
    with pytest.raises(study.StudyError) as err:
        study.load_study(path, tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)
    one_line_exit_2(["study", str(path), "--out", str(tmp_path / "out")], capsys)


def test_options_pass_to_train_by_their_full_names(build, tmp_path):
    path = write_study(tmp_path, build)
    path.write_text(path.read_text().replace("batch = 8", "batch = 8\nwarmup = 3\n"
                                             "ema_warmup = false\ncompile = false"))  # fmt: skip
    loaded, (a, b) = _cells(path, tmp_path)
    argv = study.train_argv(b, loaded, progress=False, device=None)
    assert argv[argv.index("--warmup") + 1] == "3"
    assert "--no-ema-warmup" in argv and "--compile" not in argv
    assert "--no-ema-warmup" not in study.train_argv(a, loaded, progress=False, device=None)


# --- 7 and 16: values that make no sense are one line, exit 2 --------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["watch", "{run}", "--once", "--eta", "nan"], "--eta"),
        (["watch", "{run}", "--once", "--eta", "inf"], "--eta"),
        (["watch", "{run}", "--poll", "nan"], "--poll"),
        (["watch", "{run}", "--poll", "inf"], "--poll"),
        (["watch", "{run}", "--poll", "-1"], "--poll"),
        (["watch", "{run}", "--once", "--device", "tpu"], "--device 'tpu'"),
        (["sample", "--run", "{run}", "--out", "{tmp}/s", "--n", "2", "--device", "tpu"],
         "--device 'tpu'"),
        (["sample", "--run", "{run}", "--out", "{tmp}/s", "--n", "2", "--eta", "inf"], "--eta"),
        (["fid", "--samples", "{tmp}", "--shards", "{build}", "--split", "val", "--device", "tpu"],
         "--device 'tpu'"),
        (["study", "{tmp}/study.toml", "--out", "{tmp}/o", "--devices", "cpu,tpu"],
         "--devices 'tpu'"),
    ],
)  # fmt: skip
def test_bad_option_values_are_one_line_errors(trained, build, tmp_path, capsys, argv, message):
    write_study(tmp_path, build)
    values = {"run": trained, "tmp": tmp_path, "build": build}
    err = one_line_exit_2([a.format(**values) for a in argv], capsys)
    assert message in err
    assert not (trained / "evals").exists() and not (tmp_path / "s").exists()


def test_a_config_that_is_not_an_object_is_one_line(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="not a JSON object"):
        read_config(run)
    err = one_line_exit_2(["sample", "--run", str(run), "--out", str(tmp_path / "s"), *SAMPLE],
                          capsys)  # fmt: skip
    assert "config.json" in err
    assert "config.json" in one_line_exit_2(["watch", str(run), "--once", *WATCH], capsys)
    assert "config.json" in one_line_exit_2(["report", str(run), "--out", str(tmp_path)], capsys)


class _NotInception(torch.nn.Module):
    """Valid TorchScript with a ``layers`` attribute, but 10-d features."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)[:, :10]


class _NoLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("module", [_NotInception, _NoLayers])
def test_a_torchscript_file_that_is_not_inception_is_refused(tmp_path, module):
    file = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(module()).save(str(file))
    with pytest.raises(features.FeatureError) as err:
        features.inception_extractor(file)
    text = str(err.value)
    assert text.startswith(str(file)) and "2048" in text and "\n" not in text


# --- 8: eval sample never adopts files it did not write -------------------------------------------


def test_sample_refuses_a_folder_of_foreign_files(trained, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "000001.png").write_bytes(b"someone else's image")
    err = one_line_exit_2(["sample", "--run", str(trained), "--out", str(out), *SAMPLE], capsys)
    assert "000001.png" in err and "sample.json" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock", "000001.png"]
    assert (out / "000001.png").read_bytes() == b"someone else's image"
    (out / "000001.png").unlink()  # only the lock of the refused call left: a fresh folder
    assert eval_main(["sample", "--run", str(trained), "--out", str(out), *SAMPLE]) == 0


def test_sample_records_what_the_folder_holds(trained, tmp_path):
    out = tmp_path / "s"
    argv = ["sample", "--run", str(trained), "--out", str(out), *SAMPLE]
    assert eval_main([*argv, "--n", "4"]) == 0
    record = json.loads((out / "sample.json").read_text())
    assert record["n"] == 4 and record["complete"] is True and record["written"] == 4
    for i in (2, 3):  # as a killed call of --n 4 leaves it
        (out / f"{i:06d}.png").unlink()
    assert eval_main(argv) == 0  # --n 2: nothing to do
    record = json.loads((out / "sample.json").read_text())
    assert record["n"] == 4 and record["complete"] is False and record["written"] == 2


def test_scoring_counts_only_the_images_a_sample_record_names(tmp_path, capsys):
    """Stray PNGs in a folder eval sample wrote are left out with a warning; a folder without
    a record (someone's own PNGs) is taken whole."""
    import cv2
    import numpy as np

    from eval.metrics import sample_files

    folder = tmp_path / "s"
    folder.mkdir()
    names = [f"{i:06d}.png" for i in range(4)] + ["000009.png", "extra.png"]
    for name in names:
        cv2.imwrite(str(folder / name), np.zeros((8, 8, 3), np.uint8))
    assert len(sample_files(folder)[0]) == 6  # no record yet: every PNG
    (folder / "sample.json").write_text(json.dumps({"n": 4, "complete": True}))
    files, size = sample_files(folder)
    assert [f.name for f in files] == names[:4] and size == (8, 8)
    err = capsys.readouterr().err
    assert "2 PNG(s) not written by eval sample left out (000009.png, extra.png)" in err


def test_sample_refuses_a_folder_of_a_run_that_started_over(trained, build, tmp_path, capsys):
    """The same folder, step and settings, but the run was trained again from step 0."""
    run, out = copy_run(trained, tmp_path / "run"), tmp_path / "s"
    argv = ["sample", "--run", str(run), "--out", str(out), *SAMPLE]
    assert eval_main([*argv, "--n", "2"]) == 0
    again = ["--shards", str(build), "--out", str(run), "--method", "iid", "--batch", "4",
             "--max-steps", "4", "--ckpt-every", "2", "--val-every", "0", "--diag-every", "0",
             "--no-progress", "--workers", "0", "--no-resume", "--lr", "1e-3"]  # fmt: skip
    assert train_main(again) == 0
    capsys.readouterr()
    err = one_line_exit_2([*argv, "--n", "4"], capsys)
    assert "run_id" in err and sorted(p.name for p in out.glob("*.png")) == [
        "000000.png",
        "000001.png",
    ]


@pytest.mark.parametrize("n", ["many", None, {}, 1e400, -3, 2.5])
def test_a_sample_record_whose_n_is_not_a_count_is_one_line(trained, tmp_path, capsys, n):
    out = tmp_path / "s"
    argv = ["sample", "--run", str(trained), "--out", str(out), *SAMPLE]
    assert eval_main([*argv, "--n", "2"]) == 0
    record = json.loads((out / "sample.json").read_text())
    (out / "sample.json").write_text(json.dumps({**record, "n": n}))
    capsys.readouterr()
    assert "is not a count" in one_line_exit_2([*argv, "--n", "3"], capsys)


# --- 10 and 15: eval report on repeated runs and malformed evaluations -----------------------------


def fake_run(root: Path, name: str, evals: dict[str, object]) -> Path:
    """A run folder as train and watch leave it (no checkpoints), with the given eval files."""
    run = root / name
    (run / "evals").mkdir(parents=True)
    config = {"method": "flow", "batch": 4, "seed": 0, "preset": "tiny", "image_size": 16,
              "frames": [0, 1, 2], "steps_per_epoch": 10, "out": str(run)}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    steps = [{"step": s, "epoch": 0, "images": 12 * s, "wall_s": s, "loss": 0.1} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    for file, ev in evals.items():
        text = ev if isinstance(ev, str) else json.dumps(ev)
        (run / "evals" / file).write_text(text)
    return run


def _ev(step, fid=10.0, **extra) -> dict:
    return {"step": step, "split": "val", "extractor": "offline", "fid": fid, "epoch": 0,
            "images": 12, "wall_s": 1.0, "n_samples": 8, "n_ref": 8, **extra}  # fmt: skip


def test_report_counts_a_run_given_twice_once(tmp_path, capsys):
    run = fake_run(tmp_path, "r", {"00000002-val-offline.json": _ev(2)})
    (tmp_path / "link").symlink_to(run)
    again = tmp_path / "r" / ".." / "r"
    assert eval_main(["report", str(run), str(tmp_path / "link"), str(again), "--out",
                      str(tmp_path / "rep")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("counted once") == 2 and str(tmp_path / "link") in err
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "1 runs in 1 variants" in text and "| 1 (0) |" in text


def test_report_skips_malformed_evaluations_with_a_warning(tmp_path, capsys):
    run = fake_run(tmp_path, "r", {
        "00000002-val-offline.json": _ev(2, fid=12.5),
        "00000004-val-offline.json": _ev("4"),
        "00000006-val-offline.json": _ev(6, fid="3.0"),
        "00000008-val-offline.json": _ev(8, n_samples=[8]),
        "00000010-val-offline.json": "[1, 2]",
        "00000012-val-offline.json": _ev(True),
        "00000014-val-offline.json": '{"step": 14, "fid": ',  # torn: does not parse
    })  # fmt: skip
    assert eval_main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")]
    assert len(warnings) == 6
    assert any("00000014-val-offline.json: does not parse; skipped" in w for w in warnings)
    for step in (4, 6, 8, 10, 12, 14):
        assert any(f"{step:08d}-val-offline.json" in w for w in warnings)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "12.50" in text and "00000004-val-offline.json has step '4'" in text


# --- 11: watch ends when nothing more can come -----------------------------------------------------


@pytest.fixture
def no_waiting(monkeypatch):
    def refuse(seconds):
        raise AssertionError(f"watch waited {seconds} s for a checkpoint that cannot come")

    monkeypatch.setattr(watch.time, "sleep", refuse)


def test_watch_every_beyond_the_last_step_exits(trained, tmp_path, no_waiting):
    run = copy_run(trained, tmp_path / "run")  # total_steps 4, checkpoints 2 and 4
    assert eval_main(["watch", str(run), "--all", "--every", "3", *WATCH]) == 0
    assert not (run / "evals").exists()


def test_watch_exits_on_the_finished_record(trained, tmp_path, no_waiting):
    run = copy_run(trained, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "total_steps": 10}))
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "finished", "step": 4}) + "\n")
    assert eval_main(["watch", str(run), "--all", "--every", "4", *WATCH]) == 0
    assert sorted(p.name for p in (run / "evals").iterdir()) == ["00000004-val-offline.json"]
    with open(run / "metrics.jsonl", "a") as f:  # resumed for a longer run: not finished
        f.write(json.dumps({"kind": "resume", "step": 4}) + "\n")
    assert not watch.finished(run, {"total_steps": 10})
    assert watch.finished(run, {"total_steps": 4})


def test_watch_fails_when_nothing_can_be_evaluated(trained, tmp_path, no_waiting, capsys):
    run = copy_run(trained, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "prediction": "x0"}))
    assert "unknown prediction 'x0'" in one_line_exit_2(
        ["watch", str(run), "--all", *WATCH], capsys
    )
    (run / "config.json").write_text(json.dumps(config))
    for step in (2, 4):  # every checkpoint damaged: warned about, and not a success
        (run / f"ckpt-{step:08d}.pt").write_bytes(b"not a checkpoint")
    assert eval_main(["watch", str(run), "--all", *WATCH]) == 1
    assert capsys.readouterr().err.count("not evaluated") == 2


def test_watch_finds_an_old_runs_relative_build(trained, build, tmp_path, monkeypatch, capsys):
    """config.json of an old run names its build relative to where it was trained."""
    project = tmp_path / "project"
    shutil.copytree(build, project / "shards")
    run = copy_run(trained, project / "runs" / "r")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "shards": "shards"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert watch.find_build(run, "shards") == str(project / "shards")
    assert watch.find_build(run, str(build)) == str(build)
    (run / "config.json").write_text(json.dumps({**config, "shards": "gone"}))
    err = one_line_exit_2(["watch", str(run), "--once", *WATCH], capsys)
    assert "'gone'" in err and str(project / "gone") in err and str(elsewhere / "gone") not in err
    assert not (run / "samples").exists()


# --- 13: outputs are checked before the work -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--run", "{run}", "--out", "{file}", *SAMPLE], "is a file"),
        (["sample", "--run", "{run}", "--out", "{file}/sub", *SAMPLE], "is below a file"),
        (["report", "{run}", "--out", "{file}"], "is a file"),
        (["report", "{run}", "--out", "{file}/sub"], "is below a file"),
        (["fid", "--samples", "{tmp}", "--shards", "{build}", "--split", "val", "--extractor",
          "offline", "--out", "{tmp}/dir"], "is a folder"),
        (["fid", "--samples", "{tmp}", "--shards", "{build}", "--split", "val", "--extractor",
          "offline", "--out", "{file}/r.json"], "is below a file"),
        (["generation", "{tmp}", "--shards", "{build}", "--out", "{tmp}/dir"], "is a folder"),
        (["generation", "{tmp}", "--shards", "{build}", "--grid", "{file}/g.png"], "below a file"),
    ],
)  # fmt: skip
def test_outputs_that_cannot_be_written_are_refused_first(
    trained, build, tmp_path, capsys, monkeypatch, argv, message
):
    from eval import generation, metrics

    def no_work(*args, **kwargs):
        raise AssertionError("the work ran before the output was checked")

    monkeypatch.setattr(metrics, "evaluate", no_work)
    monkeypatch.setattr(generation, "load_folder", no_work)
    (tmp_path / "file").write_text("a file")
    (tmp_path / "dir").mkdir()
    values = {"run": trained, "tmp": tmp_path, "build": build, "file": tmp_path / "file"}
    err = one_line_exit_2([a.format(**values) for a in argv], capsys)
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # no .dir.tmp


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_output_folder_that_is_not_writable_is_refused(trained, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = one_line_exit_2(["sample", "--run", str(trained), "--out", str(locked / "s"), *SAMPLE],
                          capsys)  # fmt: skip
    assert "not writable" in err


# --- 12: a stopped study stops its processes -------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, start time) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(pid: int) -> dict[int, str]:
    """The living descendants of ``pid``: pid -> start time."""
    table, found, todo = _proc_table(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, state, start) in table.items():
            if ppid == parent and child not in found and state != "Z":
                found[child] = start
                todo.append(child)
    return found


def _alive(procs: dict[int, str]) -> list[int]:
    """Those of ``procs`` (pid -> start time) still running (the same process, not a zombie)."""
    table = _proc_table()
    same = {p for p, start in procs.items() if p in table and table[p][2] == start}
    return sorted(p for p in same if table[p][1] != "Z")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_to_a_study_stops_its_trainer_and_workers(build, tmp_path):
    """Before, the trainer and its workers went on training after the study was gone (and a
    rerun started a second trainer on the cell)."""
    sig = signal.SIGTERM
    path = write_study(tmp_path, build, images=4_000_000, workers=1, cells=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "eval", "study", str(path), "--out", str(tmp_path / "out"),
           "--no-progress"]  # fmt: skip
    log = open(tmp_path / "study.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: dict[int, str] = {}
    metrics = tmp_path / "out" / "runs" / "a-s0" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until it trains: its loader workers are up
            seen.update(_descendants(proc.pid))
            if metrics.is_file() and '"loss"' in metrics.read_text():
                break
            assert proc.poll() is None, (tmp_path / "study.log").read_text()[-2000:]
            time.sleep(0.2)
        seen.update(_descendants(proc.pid))
        trainers = [p for p in seen if " -m train " in _cmdline(p)]
        assert trainers and len(seen) >= 2, {p: _cmdline(p)[:80] for p in seen}
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        deadline = time.monotonic() + 20
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(seen), [_cmdline(p) for p in _alive(seen)]
        assert (
            code == 128 + sig and f"stopped by {sig.name}" in (tmp_path / "study.log").read_text()
        )
    finally:
        for pid in _alive(seen):  # only what this test started
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigint_stops_a_child_and_what_it_started(tmp_path):
    """The study's handler (SIGINT here, as Ctrl-C sends it): the child's whole process group
    stops, its own child too, and the study ends with Stopped instead of a failed cell."""
    code = ("import os, subprocess, sys, time\n"
            "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(os.getpid(), kid.pid, flush=True)\ntime.sleep(60)\n")  # fmt: skip
    pids = tmp_path / "pids"
    ours: dict[int, str] = {}

    def interrupt():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pids.read_text().strip():
            time.sleep(0.05)
        table = _proc_table()
        ours.update({p: table[p][2] for p in map(int, pids.read_text().split()) if p in table})
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # ignored when the session runs in the background
    try:
        with study.stop_on_signals(), open(pids, "w") as out:
            threading.Thread(target=interrupt, daemon=True).start()
            with pytest.raises(study.Stopped) as stopped:
                study.CHILDREN.call([sys.executable, "-c", code], stdout=out)
        assert stopped.value.signum == signal.SIGINT and len(ours) >= 2
        deadline = time.monotonic() + 10
        while _alive(ours) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(ours)
        assert signal.getsignal(signal.SIGINT) is before  # restored
    finally:
        for pid in _alive(ours):
            os.kill(pid, signal.SIGKILL)
