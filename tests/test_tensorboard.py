"""TensorBoard event files of a run: the trainer's --tensorboard (across an interrupted and a
resumed run), eval watch's distances and sample grids, and `eval tensorboard` for runs made
without the flag, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from shardutil import make_build

from eval.__main__ import main as eval_main
from train import diagnostics
from train.__main__ import main as train_main
from train.metrics import TB_MISSING, event_files, read_metrics, scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402

WATCH = ["--all", "--once", "--n", "8", "--steps", "3", "--extractor", "offline", "--n-ref",
         "8", "--batch", "8", "--device", "cpu"]  # fmt: skip
TAGS = ("train/loss", "train/lr", "train/grad_norm", "train/param_dist", "train/images_per_s",
        "train/data_wait", "val/val_loss", "val/val_loss_ema", "diag/grad_var")  # fmt: skip


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tb")
    yield make_build(root, n_train=24, n_val=8, size=16, shard_size=6, seed=3)
    torch.set_num_threads(threads)


def train_args(build: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--shards", str(build), "--out", str(out), "--method", "flow", "--batch", "4",
        "--max-steps", str(steps), "--ckpt-every", "5", "--val-every", "5", "--val-size", "4",
        "--diag-every", "5", "--probe-size", "4", "--no-progress", "--workers", "0", *extra,
    ]  # fmt: skip


def read_tb(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """Scalars (tag: [(step, value)]) and images (tag: [step]) of an event-file folder."""
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    tags = acc.Tags()
    values = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    return values, {t: [e.step for e in acc.Images(t)] for t in tags["images"]}


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl holds (through read_metrics), per tag."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run):
        for tag, value in scalars(record).items():
            out.setdefault(tag, []).append((record["step"], value))
    return out


def assert_same(tb: dict, want: dict) -> None:
    """One point per record and tag, at the record's step, with its value (float32)."""
    assert sorted(tb) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.fixture(scope="module")
def interrupted(build, tmp_path_factory) -> Iterator[tuple[Path, list[int]]]:
    """A --tensorboard run stopped by SIGINT during step 7 (its checkpoint at 5), resumed to
    step 10; and the train/loss steps its event files held when it stopped."""
    run = tmp_path_factory.mktemp("tbrun") / "flow"
    real = diagnostics.parameter_distance
    calls, seen = [], []

    def stop_at_step_7(model, init):
        calls.append(1)
        if len(calls) == 7:
            seen.extend(s for s, _ in read_tb(run / "tb" / "train")[0]["train/loss"])
            raise KeyboardInterrupt
        return real(model, init)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diagnostics, "parameter_distance", stop_at_step_7)
        assert train_main(train_args(build, run, 10, "--tensorboard")) == 130
    assert [r["step"] for r in read_metrics(run) if "kind" not in r][-1] == 6
    assert train_main(train_args(build, run, 10, "--tensorboard")) == 0
    yield run, seen


def test_resumed_run_has_one_point_per_step(interrupted):
    """Steps 1..10 once each, step 6 of the stopped run replaced by the resumed one's."""
    run, seen = interrupted
    assert seen[:5] == [1, 2, 3, 4, 5]  # on disk from the checkpoint at step 5 on
    assert json.loads((run / "config.json").read_text())["tensorboard"] is True
    assert len(event_files(run / "tb" / "train")) == 2
    tb, _ = read_tb(run / "tb" / "train")
    assert_same(tb, expected(run))
    assert [s for s, _ in tb["train/loss"]] == list(range(1, 11))
    assert [s for s, _ in tb["val/val_loss_ema"]] == [5, 10]
    assert [s for s, _ in tb["diag/grad_var"]] == [5, 10]
    for tag in TAGS:
        assert tag in tb, tag
    assert any(t.startswith("train/") and t not in TAGS for t in tb)  # the flow loss terms


def test_watch_adds_distances_and_grids_once(interrupted, tmp_path):
    """eval watch writes RUN/tb/eval when RUN/tb exists; a rerun adds nothing; the converter
    gives the same train and eval events as the live ones."""
    run, _ = interrupted
    assert eval_main(["watch", str(run), *WATCH]) == 0
    tb, images = read_tb(run / "tb" / "eval")
    names = ("frechet_distance", "kernel_distance", "precision", "recall")
    for split in ("train", "val"):
        for name in names:
            assert [s for s, _ in tb[f"offline/{split}/{name}"]] == [5, 10]
        record = json.loads((run / "evals" / f"00000010-{split}-offline.json").read_text())
        assert tb[f"offline/{split}/frechet_distance"][1][1] == pytest.approx(record["fid"])
    assert images == {"samples": [5, 10]}
    assert eval_main(["watch", str(run), *WATCH]) == 0
    assert read_tb(run / "tb" / "eval") == (tb, images)

    out = tmp_path / "converted"
    assert eval_main(["tensorboard", str(run), "--out", str(out)]) == 0
    converted, _ = read_tb(out / run.name / "train")
    assert_same(converted, expected(run))
    assert read_tb(out / run.name / "eval") == (tb, images)


def test_flag_on_resume_and_converter(build, tmp_path, capsys):
    """A run started without --tensorboard and resumed with it has every step in RUN/tb;
    `eval tensorboard` writes the same, twice without repeating a point; a start from step 0
    removes the stale events."""
    run = tmp_path / "iid"
    assert train_main(train_args(build, run, 5)) == 0
    assert not (run / "tb").exists()
    assert train_main(train_args(build, run, 10, "--tensorboard")) == 0
    assert "writing the" in capsys.readouterr().err  # the steps before the flag, from the file
    tb, _ = read_tb(run / "tb" / "train")
    assert_same(tb, expected(run))
    assert [s for s, _ in tb["train/loss"]] == list(range(1, 11))

    for _ in range(2):
        assert eval_main(["tensorboard", str(run), "--no-progress"]) == 0
        assert len(event_files(run / "tb" / "train")) == 1
        assert_same(read_tb(run / "tb" / "train")[0], expected(run))
    err = capsys.readouterr().err
    assert f"-> {run / 'tb'}" in err
    assert not [p for p in run.iterdir() if p.name.startswith(".tb")]  # no temporary left

    assert train_main(train_args(build, run, 2, "--no-resume")) == 0
    assert not event_files(run / "tb" / "train")


def _without_tensorboard(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)


def test_missing_tensorboard_is_one_line(build, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _without_tensorboard(monkeypatch)
    assert train_main(train_args(build, run, 2, "--tensorboard")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {TB_MISSING}"]
    assert "pip install 'framebridge[tensorboard]'" in lines[0]
    assert not run.exists()  # said before anything was made
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert eval_main(["tensorboard", str(run)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {TB_MISSING}"]


def test_converter_bad_input_is_one_line(tmp_path, capsys):
    assert eval_main(["tensorboard", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a training run" in err[0]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert eval_main(["tensorboard", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metrics.jsonl" in err[0]
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    twin = tmp_path / "other" / "run"
    shutil.copytree(run, twin)
    assert eval_main(["tensorboard", str(run), str(twin), "--out", str(tmp_path / "o")]) == 2
    assert "same folder name" in capsys.readouterr().err
