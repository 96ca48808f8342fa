"""`python -m eval watch` and `report` end to end on two tiny trained runs (offline extractor)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from shardutil import make_build

from eval.__main__ import main as eval_main
from train.__main__ import main as train_main

WATCH = ["--all", "--once", "--n", "8", "--steps", "3", "--extractor", "offline", "--n-ref",
         "8", "--batch", "8", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    """A build and two 4-step runs (flow and the step-matched iid), checkpoints at 2 and 4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("watch")
    build = make_build(root, n_train=24, n_val=8, size=16, shard_size=6, seed=2)
    out = []
    for method, batch in (("flow", "4"), ("iid", "12")):
        run = root / method
        code = train_main(["--shards", str(build), "--out", str(run), "--method", method,
                           "--batch", batch, "--max-steps", "4", "--ckpt-every", "2",
                           "--val-every", "2", "--val-size", "4", "--diag-every", "2",
                           "--no-progress", "--workers", "0"])  # fmt: skip
        assert code == 0
        out.append(run)
    yield build, out[0], out[1]
    torch.set_num_threads(threads)


def test_watch_scores_every_checkpoint_once(runs, capsys):
    """One JSON per (step, split) with where in training the checkpoint was; a rerun is a no-op."""
    _, flow, _ = runs
    assert eval_main(["watch", str(flow), *WATCH]) == 0
    files = sorted(p.name for p in (flow / "evals").iterdir())
    assert files == [f"{s:08d}-{split}-offline.json" for s in (2, 4) for split in ("train", "val")]
    state = torch.load(flow / "ckpt-00000004.pt", weights_only=True)
    record = json.loads((flow / "evals" / "00000004-val-offline.json").read_text())
    assert record["step"] == 4 and record["epoch"] == state["epoch"]
    assert record["images"] == state["images"] == 4 * 4 * 3
    assert record["wall_s"] == pytest.approx(state["wall_s"])
    assert record["extractor"] == "offline" and "not FID" in record["metric_name"]
    assert record["n_samples"] == 8 and record["fid"] >= 0
    assert len(list((flow / "samples" / "00000004").glob("*.png"))) == 8
    before = {p: p.stat().st_mtime_ns for p in (flow / "evals").iterdir()}
    assert eval_main(["watch", str(flow), *WATCH]) == 0
    assert {p: p.stat().st_mtime_ns for p in (flow / "evals").iterdir()} == before


def test_watch_skips_a_damaged_checkpoint_with_a_warning(runs, tmp_path, capsys):
    import shutil

    _, flow, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(flow, copy, ignore=shutil.ignore_patterns("evals", "samples"))
    (copy / "ckpt-00000002.pt").write_bytes(b"not a checkpoint")
    assert eval_main(["watch", str(copy), *WATCH]) == 0
    assert "step 2 not evaluated" in capsys.readouterr().err
    assert sorted(p.name[:8] for p in (copy / "evals").iterdir()) == ["00000004"] * 2


def test_report_from_two_trained_runs(runs, tmp_path):
    """The report has Table 1 with both variants and every plot, measured from real runs."""
    _, flow, iid = runs
    for run in (flow, iid):
        assert eval_main(["watch", str(run), *WATCH]) == 0
    out = tmp_path / "report"
    assert eval_main(["report", str(flow), str(iid), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Table 1" in text and "| flow |" in text and "iid (step-matched)" in text
    for name in ("fid-offline-epochs.png", "fid-offline-images.png", "fid-offline-wall.png",
                 "val-loss-epochs.png", "val-loss-images.png", "val-loss-wall.png",
                 "optimisation.png", "grad-var.png"):  # fmt: skip
        assert (out / name).stat().st_size > 1000 and f"]({name})" in text
    assert len(list(out.glob("samples-*.png"))) == 2


def test_watch_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert eval_main(["watch", str(tmp_path), *WATCH]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a training run" in err[0]
