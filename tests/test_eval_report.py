"""`python -m eval report` on hand-written run folders (no training): tables, budgets, plots."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shardutil import make_build

from eval.report import ReportError, add_arguments, make_report, run, variant_key
from train.__main__ import main as train_main

SPE = 10  # steps per epoch of every fixture run


def _write_metrics(run: Path, seed: int, last: int, wall: float, images: int, resume=False):
    """Step records 1..last, val every 5 steps, diag every 10; optionally a resume at 20."""

    def block(first: int, stop: int, bogus: bool = False) -> list[dict]:
        recs = []
        for s in range(first, stop + 1):
            where = {"step": s, "epoch": (s - 1) // SPE, "images": s * images, "wall_s": s * wall}
            grad = 999.0 if bogus else 1.0 / s**0.5 + 0.01 * seed
            recs.append(
                {
                    **where,
                    "loss": 0.1,
                    "denoise": 0.1,
                    "reg": 0.0,
                    "w_mean": 1.0,
                    "lr": 1e-4,
                    "grad_norm": grad,
                    "param_dist": 0.01 * s,
                }
            )
            if s % 5 == 0:  # a dropped (pre-resume) val point is 0.0001: must never show
                ema = 0.0001 if bogus else 1.0 / s + 0.01 * seed
                recs.append({**where, "kind": "val", "val_loss": ema, "val_loss_ema": ema})
            if s % 10 == 0:
                recs.append(
                    {
                        **where,
                        "kind": "diag",
                        "grad_var": 0.1 / s,
                        "grad_mean_sq": 0.1,
                        "grad_sample_sq": 0.2,
                    }
                )
        return recs

    if resume:  # steps 21..25 were written after the step-20 checkpoint, then the run resumed
        recs = block(1, 20) + block(21, 25, bogus=True) + [{"kind": "resume", "step": 20}]
        recs += block(21, last)
    else:
        recs = block(1, last)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _write_evals(run: Path, cfg: dict, wall: float, images: int, fids: dict) -> None:
    """fids: {(split, extractor): {step: value}} -> RUN/evals/{step:08d}-{split}-{ext}.json."""
    (run / "evals").mkdir()
    for (split, ext), values in fids.items():
        for step, fid in values.items():
            ev = {
                "run": str(run),
                "method": cfg["method"],
                "step": step,
                "epoch": (step - 1) // SPE,
                "images": step * images,
                "wall_s": step * wall,
                "split": split,
                "extractor": ext,
                "metric_name": "fid",
                "n_samples": 64,
                "n_ref": 64,
                "fid": fid,
                "kid": 0.01,
                "kid_std": 0.001,
                "precision": 0.5,
                "recall": 0.25 + step / 1000,
                "density": 0.9,
                "coverage": 0.7,
                "samples": str(run / "samples" / f"{step:08d}"),
            }
            (run / "evals" / f"{step:08d}-{split}-{ext}.json").write_text(json.dumps(ev))


def _write_samples(run: Path, step: int, n: int) -> None:
    folder = run / "samples" / f"{step:08d}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(step)
    for i in range(n):
        img = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def make_run(
    root: Path,
    name: str,
    method: str,
    batch: int,
    seed: int,
    lam: float = 1.0,
    *,
    last: int = 30,
    wall: float = 1.0,
    fids: dict | None = None,
    resume=False,
    samples: dict | None = None,
    metrics: bool = True,
) -> Path:
    """A run folder as train and `eval watch` leave it."""
    run = root / name
    run.mkdir()
    frames = [1] if method in ("iid", "dispersive") else [0, 1, 2]
    cfg = {
        "method": method,
        "batch": batch,
        "seed": seed,
        "preset": "tiny",
        "image_size": 32,
        "frames": frames,
        "lam": lam,
        "sigma": 0.5,
        "steps_per_epoch": SPE,
        "epochs": 3,
        "out": str(run),
        "workers": 1,
        "shards": "shards",
        "build_id": "b1",
    }
    (run / "config.json").write_text(json.dumps(cfg))
    images = len(frames) * batch
    if metrics:
        _write_metrics(run, seed, last, wall, images, resume)
    else:
        (run / "metrics.jsonl").write_text("")
    if fids:
        _write_evals(run, cfg, wall, images, fids)
    for step, n in (samples or {}).items():
        _write_samples(run, step, n)
    return run


INC_A = {
    ("val", "inception"): {10: 12.0, 20: 10.0, 30: 11.0},
    ("train", "inception"): {10: 5.0, 20: 4.0, 30: 4.5},
    ("val", "offline"): {20: 77.77},
    ("train", "offline"): {20: 66.66},
}
INC_B = {
    ("val", "inception"): {10: 13.0, 20: 11.5, 30: 11.0},
    ("train", "inception"): {10: 5.5, 20: 4.6, 30: 4.2},
}
INC_D = {("val", "inception"): {10: 14.0, 20: 12.0}, ("train", "inception"): {10: 6.0, 20: 5.0}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": make_run(
            root, "flow-s0", "flow", 4, 0, fids=INC_A, resume=True, samples={10: 4, 30: 20}
        ),
        "b": make_run(root, "flow-s1", "flow", 4, 1, wall=1.2, fids=INC_B),
        "d": make_run(root, "flow-lam01", "flow", 4, 0, lam=0.1, last=20, fids=INC_D),
        "c": make_run(root, "iid-384", "iid", 12, 0),  # 12 = K (3) x 4: the step-matched control
        "e": make_run(root, "seq-empty", "seq", 4, 0, metrics=False),
    }


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return make_report([runs[k] for k in "abdce"], out)


def _section(text: str, start: str) -> str:
    """From the heading `start` up to the next level-2 heading."""
    tail = text[text.index(start) :]
    nxt = tail.find("\n## ", 1)
    return tail if nxt < 0 else tail[:nxt]


def _row(section: str, label: str) -> list[str]:
    line = next(x for x in section.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_table1_best_and_seed_aggregation(report):
    text = report.read_text()
    inc = _section(text, "## Table 1 — FID (inception extractor)")
    assert "| variant | seeds | FID train | FID val | best at (step, epoch) |" in inc
    row = _row(inc, "flow λ=1")
    assert row[1] == "2 (0, 1)"
    # best val: seed 0 at step 20 (10.0; train 4.0), seed 1 at step 30 (11.0; train 4.2)
    assert row[2:5] == ["4.10 ± 0.14", "10.50 ± 0.71", "s0: step 20 (2 ep); s1: step 30 (3 ep)"]
    assert _row(inc, "flow λ=0.1")[2:5] == ["5.00", "12.00", "step 20 (2 ep)"]


def test_equal_budget_columns_name_the_points(report):
    inc = _section(report.read_text(), "## Table 1 — FID (inception extractor)")
    for head in ("val @ 2 ep", "val @ 240 img", "val @ 20 s", "point used @ 2 ep"):
        assert head in inc
    row = _row(inc, "flow λ=1")
    # epochs (budget 2, the shorter λ=0.1 run's end): both seeds at step 20
    assert row[5:8] == ["4.30 ± 0.42", "10.75 ± 1.06", "s0: step 20 (2 ep); s1: step 20 (2 ep)"]
    assert row[8:11] == [
        "4.30 ± 0.42",
        "10.75 ± 1.06",
        "s0: step 20 (240 img); s1: step 20 (240 img)",
    ]
    # wall-clock 20 s: seed 1 runs 1.2 s a step, so its last point at or below is step 10 (12 s)
    assert row[11:14] == ["4.75 ± 1.06", "11.50 ± 2.12", "s0: step 20 (20 s); s1: step 10 (12 s)"]


def test_step_matched_row_and_missing_fid(report, runs):
    inc = _section(report.read_text(), "## Table 1 — FID (inception extractor)")
    row = _row(inc, "iid (step-matched)")
    assert row[2:4] == ["—", "—"] and set(row[5:]) == {"—"}
    assert f"`{runs['c']}` (iid (step-matched), seed 0): no FID points" in inc
    assert f"`{runs['e']}`" in inc and "seq" in inc


def test_offline_numbers_stay_in_their_own_table(report):
    text = report.read_text()
    inc = _section(text, "## Table 1 — FID (inception extractor)")
    off = _section(text, "## Table 1 — Frechet distance (offline extractor, not FID)")
    assert "77.77" not in inc and "66.66" not in inc
    assert _row(off, "flow λ=1")[2:4] == ["66.66 (n=1)", "77.77 (n=1)"]
    assert "| variant | seeds | offline Frechet distance train |" in off


def test_prdc_and_validation_loss(report):
    text = report.read_text()
    prdc = _section(text, "### Precision / recall / density / coverage — FID")
    assert _row(prdc, "flow λ=0.1")[3:5] == ["0.500", "0.270"]
    val = _section(text, "## Validation loss (EMA)")
    # iid: val loss 1/step; whole run ends at 30; at the 2-epoch budget, step 20
    row = _row(val, "iid (step-matched)")
    assert row[2] == "0.03333 / 0.03333" and row[3:5] == ["0.05000 / 0.05000", "step 20 (2 ep)"]
    assert "0.0001" not in val  # the records the resume dropped
    assert _row(val, "seq")[2] == "— / —"


def test_plots_exist_and_are_linked(report):
    text = report.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    expected = {
        f"fid-{e}-{a}.png" for e in ("inception", "offline") for a in ("epochs", "images", "wall")
    }
    expected |= {f"val-loss-{a}.png" for a in ("epochs", "images", "wall")}
    expected |= {"optimisation.png", "grad-var.png"}
    assert expected <= set(linked)
    assert any(name.startswith("samples-") for name in linked)
    for name in linked:
        data = (report.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert "first 16 of 20 samples at step 30" in text
    assert "*Not plotted: no samples/<step>/*.png" in text  # variants without samples


def test_run_without_evals_shows_missing(runs, tmp_path):
    """Missing points are said; the figures an earlier report left in the folder that this
    one does not draw are removed, and files that are not the report's are kept; a folder
    without an earlier report.md keeps all its files."""
    stale = ("fid-inception-epochs.png", "samples-03-flow-lam-10.png", "grad-var.png")
    foreign = tmp_path / "not-a-report"
    foreign.mkdir()
    (foreign / stale[1]).write_bytes(b"a user's own file")
    make_report([runs["c"]], foreign)
    assert (foreign / stale[1]).read_bytes() == b"a user's own file"
    out = tmp_path / "rep"
    out.mkdir()
    for name in (*stale, "notes.txt", "my-figure.png", "report.md"):
        (out / name).write_bytes(b"earlier")
    (out / "samples-00-old.png").mkdir()  # a folder named like a figure: kept, no crash
    text = make_report([runs["c"]], out).read_text()
    assert "| iid | 1 (0) | — | — |" in text and "no FID points" in text
    assert "*Not plotted: no FID (inception extractor) points in any run.*" in text
    assert not any((out / name).exists() for name in stale[:2])
    assert (out / "grad-var.png").read_bytes() != b"earlier"  # redrawn from the run's records
    assert (out / "notes.txt").is_file() and (out / "my-figure.png").is_file()
    assert (out / "samples-00-old.png").is_dir()
    assert (out / "val-loss-epochs.png").stat().st_size > 0


def test_a_stale_figure_that_cannot_be_removed_is_a_warning(tmp_path, capsys, monkeypatch):
    """An OSError removing one stale figure is one line on stderr; the others still go."""
    from eval import plots

    for name in ("report.md", "fid-a.png", "fid-b.png"):
        (tmp_path / name).write_bytes(b"earlier")
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == "fid-a.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    plots.drop_stale(tmp_path, "fid-*.png", drawn=set(), marker="report.md")
    err = capsys.readouterr().err
    assert "could not remove the stale figure" in err and "fid-a.png" in err
    assert err.count("\n") == 1
    assert (tmp_path / "fid-a.png").is_file() and not (tmp_path / "fid-b.png").exists()


def test_extractor_option_and_empty_metrics(runs, tmp_path):
    text = make_report([runs["a"], runs["e"]], tmp_path, extractor="offline").read_text()
    assert "Table 1 — FID" not in text and "Frechet distance (offline" in text
    assert "metrics.jsonl is empty" in text


def test_not_a_run_is_one_line_error(runs, tmp_path, capsys):
    bogus = tmp_path / "not-a-run"
    bogus.mkdir()
    with pytest.raises(ReportError, match="not-a-run") as err:
        make_report([runs["a"], bogus], tmp_path / "out")
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(bogus), "--out", str(tmp_path / "o")])) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_folder_in_the_way_of_a_figure_is_one_line(runs, tmp_path, capsys):
    """A folder where the report writes a figure: one line naming it, exit 2, no traceback."""
    from eval.__main__ import main as eval_main

    out = tmp_path / "rep"
    (out / "val-loss-epochs.png").mkdir(parents=True)
    assert eval_main(["report", str(runs["c"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(rf"error: {out}/val-loss-epochs\.png: Is a directory$", err, re.M), err


def test_two_seeds_of_one_command_are_one_variant(tmp_path):
    """Every config.json field that differs between seeds (seed, out, run_id) is not a variant."""
    build = make_build(tmp_path / "b", n_train=16, n_val=8, size=16, seed=2)
    configs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        argv = ["--shards", str(build), "--out", str(out), "--batch", "8", "--max-steps", "1",
                "--val-every", "0", "--diag-every", "0", "--no-progress", "--workers", "0",
                "--seed", str(seed)]  # fmt: skip
        assert train_main(argv) == 0
        configs.append(json.loads((out / "config.json").read_text()))
    assert configs[0]["run_id"] != configs[1]["run_id"]
    assert variant_key(configs[0]) == variant_key(configs[1])
    # a config.json written before an option existed is the variant of its old value
    old = {k: v for k, v in configs[0].items() if k not in ("weighting", "flow_stat", "hflip")}
    assert variant_key(old) == variant_key(configs[1])
    assert variant_key({**old, "hflip": True}) != variant_key(configs[1])
