"""`python -m eval study`: a two-cell, few-step grid; cells resume, finished ones are skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from shardutil import make_build

from eval import study as study_mod
from eval.__main__ import main as eval_main

REPO = Path(__file__).resolve().parent.parent

STUDY = """
name = "two-cells"
[build]
path = "{build}"
[budget]
images = {images}
[evaluation]
val_points = 2
diag_points = 1
points = 2
samples = 8
ddim_steps = 3
n_ref = 8
batch = 8
[train]
preset = "tiny"
workers = 0
val_size = 4
probe_size = 4
seeds = [0]
[[cell]]
name = "flow"
method = "flow"
batch = 4
lambda = 1.0
[[cell]]
name = "iid"
method = "iid"
batch = 12
[questions]
baseline = "iid"
method = "flow"
lambdas = ["flow"]
readings = ["flow"]
"""


def write_study(folder: Path, build: Path, images: int = 96) -> Path:
    path = folder / "study.toml"
    path.write_text(STUDY.format(build=build, images=images))
    return path


def run_study(study: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "eval", "study", str(study), "--out", str(out), "--no-progress"]
    return subprocess.run(
        [*cmd, *extra], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("study"), n_train=24, n_val=8, size=16, seed=3)


def test_two_cell_study_runs_resumes_and_skips(build, tmp_path):
    """Both cells train the same image budget and are evaluated; a rerun skips them; a cell
    whose training was cut short continues from its checkpoint; the report lists both."""
    study, out = write_study(tmp_path, build), tmp_path / "out"
    study.write_text(study.read_text() + 'split = "train"\n')  # the answers read train's scores
    first = run_study(study, out)
    assert first.returncode == 0, first.stderr[-2000:]
    flow, iid = out / "runs" / "flow-s0", out / "runs" / "iid-s0"
    for run, steps in ((flow, 8), (iid, 8)):  # 96 images: 8 steps of 4 windows x 3 or 12 frames
        cell = json.loads((run / "cell.json").read_text())
        assert cell["done"] is True and cell["identity"]["plan"]["steps"] == steps
        assert cell["identity"]["plan"]["images"] == 96
        assert sorted(p.name for p in (run / "evals").iterdir()) == [
            f"{s:08d}-{split}-offline.json" for s in (4, 8) for split in ("train", "val")
        ]
    results = (out / "results.md").read_text()
    report = (out / "report" / "report.md").read_text()
    assert "| flow |" in results and "| iid |" in results
    assert str(flow) in report and str(iid) in report
    assert "Q1, Q2" in results and "x (" in results  # a speed-up ratio was computed
    assert "### offline Frechet distance (train) of samples: against `iid`" in results
    assert "## Q6: the two readings" in results and "exp on flow_msq (sigma " in results
    assert "## Q7: diversity" in results
    for name in ("flow", "iid"):  # a grid of each cell's last samples, shown in results.md
        assert (out / f"study-samples-{name}.png").stat().st_size > 0
        assert f"![{name}](study-samples-{name}.png)" in results
    values = json.loads((out / "results.json").read_text())
    assert values["readings"]["flow"]["reading"].startswith("exp on flow_msq")
    assert set(values["diversity"]) == {"flow", "iid"}
    assert len(values["diversity"]["iid"]["coverage"]) == 1
    assert values["speedup_fd"]["iid"]["flow"]["images"]  # FD speed-ups against the baseline
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == {"flow-s0", "iid-s0"}
    assert [v["step"] for v in curves["flow-s0"]["val"]] == [4, 8]
    assert curves["flow-s0"]["steps"][-1]["step"] == 8 and len(curves["iid-s0"]["evals"]) == 4

    mtimes = {p: p.stat().st_mtime_ns for p in (flow / "evals").iterdir()}
    (out / "study-samples-a-removed-cell.png").write_bytes(b"an earlier grid")
    second = run_study(study, out)
    assert second.returncode == 0
    assert second.stderr.count(": skipped") == 2
    assert not (out / "study-samples-a-removed-cell.png").exists()  # results show what is there
    assert (out / "study-samples-flow.png").is_file()
    assert {p: p.stat().st_mtime_ns for p in (flow / "evals").iterdir()} == mtimes

    # an interrupted cell: not done, its last checkpoint and evaluations gone
    cell = json.loads((iid / "cell.json").read_text())
    cell["done"] = False
    (iid / "cell.json").write_text(json.dumps(cell))
    for p in [*iid.glob("ckpt-00000008.pt"), *(iid / "evals").glob("00000008-*")]:
        p.unlink()
    third = run_study(study, out)
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stderr.count(": skipped") == 1
    records = [json.loads(line) for line in (iid / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in records if r.get("kind") == "resume"]
    assert resume and resume[-1]["step"] == 4  # continued from its checkpoint, not from scratch
    assert (iid / "evals" / "00000008-val-offline.json").is_file()
    assert json.loads((iid / "cell.json").read_text())["done"] is True


def test_cell_without_evaluations_is_marked_missing(build, tmp_path):
    """A cell whose evaluation failed is reported as missing, and the study exits 1 (two cells
    at once: --jobs 2)."""
    study, out = write_study(tmp_path, build, images=48), tmp_path / "out"
    text = study.read_text().replace("n_ref = 8", 'n_ref = 8\nsplits = ["nosuchsplit"]')
    study.write_text(text)
    result = run_study(study, out, "--jobs", "2")
    assert result.returncode == 1
    assert "error: flow seed 0: failed: evaluate" in result.stderr
    results = (out / "results.md").read_text()
    assert "without evaluation points (missing): flow seed 0, iid seed 0" in results
    assert "| flow | flow | 1/1 |" in results and results.count("| missing |") == 2
    report = (out / "report" / "report.md").read_text()
    assert "no offline Frechet distance points" in report or "no FID points" in report


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace("[budget]\nimages = 96", "[budget]"), "missing 'images'"),
        (lambda s: s.replace("batch = 12", "batch = 12\nmax_steps = 3"), "set by the study runner"),
        (lambda s: s.replace('name = "iid"', 'name = "flow"'), "repeated"),
        (lambda s: s.replace("samples = 8", "samples = 8\nbogus = 1"), "unknown key 'bogus'"),
        (lambda s: s + "\n[[[", "not a readable TOML file"),
        (lambda s: s.replace("seeds = [0]", "seeds = [0, 0]"), "distinct"),
        (lambda s: s.replace("seeds = [0]", "seeds = 3"), "seeds must be a list"),
        (lambda s: s.replace("batch = 12", "batch = 12\nmax-steps = 3"), "set by the study"),
        (lambda s: s.replace('method = "iid"', 'method = "IID"'), "unknown method 'IID'"),
        (lambda s: s.replace("batch = 12", 'batch = "12"'), "batch to a positive integer"),
        (lambda s: s.replace('baseline = "iid"', 'baseline = "idd"'), "'idd' is not the name"),
        (lambda s: s.replace('lambdas = ["flow"]', 'lambdas = "flow"'), "must be a list"),
        (
            lambda s: s.replace('baseline = "iid"', 'basline = "iid"'),
            "'basline'; did you mean 'baseline'",
        ),
        (lambda s: s.replace("n_ref = 8", 'n_ref = 8\nsplits = "val"'), "splits must be"),
        (lambda s: s.replace("points = 2", "points = 0"), "points must be a positive"),
        (lambda s: s.replace("samples = 8", "samples = 1"), "samples must be at least 2"),
        (lambda s: "train = 3\n" + s.replace("[train]\n", ""), "[train] must be a table"),
    ],
)
def test_bad_study_files_are_one_line_errors(build, tmp_path, capsys, edit, message):
    study = write_study(tmp_path, build)
    study.write_text(edit(study.read_text()))
    assert eval_main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_plan_spends_the_image_budget_in_whole_evaluation_intervals(build, tmp_path):
    study = study_mod.load_study(write_study(tmp_path, build, images=100), tmp_path)
    cells = study_mod.expand(study, tmp_path)
    plans = {c.name: study_mod.plan(c, study, window=3) for c in cells}
    # flow: 12 images per step -> ceil(100 / 12 / 2) = 5 steps per point, 10 steps, 120 images
    assert plans["flow"]["steps"] == 10 and plans["flow"]["images"] == 120
    assert plans["flow"]["ckpt_every"] == 5 and plans["flow"]["val_every"] == 5
    assert plans["iid"]["steps"] == 10 and plans["iid"]["images_per_step"] == 12
    cells[0].plan = plans["flow"]
    argv = study_mod.train_argv(cells[0], study, progress=False, device=None)
    assert argv[argv.index("--lambda") + 1] == "1.0" and "--no-progress" in argv


@pytest.mark.parametrize(
    "name",
    [
        "cpu-mini",
        "handco-paper",
        "gpu-64px",
        "cpu-converged",
        "cpu-converged-pilot",
        "cpu-converged-lambda",
    ],
)
def test_shipped_studies_parse_and_plan(tmp_path, name):
    """The shipped study files parse; every cell's plan spends its budget (the paper's epochs)."""
    study = study_mod.load_study(REPO / "studies" / f"{name}.toml", tmp_path)
    cells = study_mod.expand(study, tmp_path)
    assert len(cells) == sum(len(entry.get("seeds", study.seeds)) for entry in study.grid)
    names = {c.name for c in cells}
    assert set(study.questions.pop("lambdas", [])) <= names
    assert set(study.questions.pop("readings", [])) <= names
    assert study.questions.pop("split", "val") in study.evaluation["splits"]
    assert set(study.questions.values()) <= names
    for cell in cells:
        plan = study_mod.plan(cell, study, window=3)
        assert cell.images <= plan["images"] < cell.images + plan["images_per_step"] * 10
    if name == "handco-paper":  # 300 epochs of 25k windows; 500 of 25k frames for iid
        by = {c.name: study_mod.plan(c, study, window=3) for c in cells}
        assert by["flow"]["steps"] == pytest.approx(300 * 25_000 / 128, rel=0.01)
        assert by["iid"]["steps"] == pytest.approx(500 * 25_000 / 256, rel=0.01)
        assert by["iid-matched"]["steps"] == by["flow"]["steps"]


def test_a_cell_may_run_its_own_seeds(build, tmp_path):
    """A cell's ``seeds`` replace the study's for that cell; runs stay ordered seed by seed."""
    study = write_study(tmp_path, build)
    text = study.read_text().replace("seeds = [0]", "seeds = [0, 1]")
    study.write_text(text.replace('name = "flow"\n', 'name = "flow"\nseeds = [1, 2]\n'))
    loaded = study_mod.load_study(study, tmp_path)
    cells = [(c.name, c.seed) for c in study_mod.expand(loaded, tmp_path)]
    assert cells == [("iid", 0), ("flow", 1), ("iid", 1), ("flow", 2)]
    assert all("seeds" not in c.options for c in study_mod.expand(loaded, tmp_path))
    study.write_text(text.replace('name = "flow"\n', 'name = "flow"\nseeds = [1, 1]\n'))
    with pytest.raises(study_mod.StudyError, match="'flow': seeds must be a list of distinct"):
        study_mod.load_study(study, tmp_path)


def test_a_cell_whose_options_changed_is_refused_not_mixed(build, tmp_path):
    """Changed options after a cell ran: the cell fails with what to delete; a changed budget
    that is smaller than what was trained is refused too."""
    study = study_mod.load_study(write_study(tmp_path, build), tmp_path)
    cell = study_mod.expand(study, tmp_path)[0]
    cell.plan = study_mod.plan(cell, study, window=3)
    identity = {"plan": cell.plan, "options": {**cell.options, "lam": 10.0}, "seed": 0}
    study_mod.write_cell(cell.run, {"done": True, "identity": identity})
    status, _ = study_mod.run_cell(cell, study, False, None, print)
    assert status.startswith("failed: its options changed") and str(cell.run) in status
    (cell.run / "ckpt-00000099.pt").write_bytes(b"")
    identity = {"plan": {**cell.plan, "steps": 4}, "options": cell.options, "seed": 0}
    study_mod.write_cell(cell.run, {"done": True, "identity": identity})
    status, _ = study_mod.run_cell(cell, study, False, None, print)
    assert "already trained 99 steps" in status


def test_budget_too_small_for_the_points_is_refused(build, tmp_path):
    study = study_mod.load_study(write_study(tmp_path, build, images=20), tmp_path)
    cell = study_mod.expand(study, tmp_path)[0]
    with pytest.raises(study_mod.StudyError, match="less than one step"):
        study_mod.plan(cell, study, window=3)


def test_a_cell_on_a_device_sees_only_its_gpu(build, tmp_path):
    study = study_mod.load_study(write_study(tmp_path, build), tmp_path)
    cell = study_mod.expand(study, tmp_path)[0]
    cell.plan = study_mod.plan(cell, study, window=3)
    assert study_mod.device_env("cuda:3")["CUDA_VISIBLE_DEVICES"] == "3"
    assert study_mod.device_env(None) is None and study_mod.device_env("cpu") is None
    train = study_mod.train_argv(cell, study, progress=False, device="cuda:3")
    watch = study_mod.watch_argv(cell, study, device="cuda:3")
    assert train[train.index("--device") + 1] == watch[watch.index("--device") + 1] == "cuda"


def test_out_that_is_a_file_is_a_one_line_error(build, tmp_path, capsys):
    study = write_study(tmp_path, build)
    (tmp_path / "taken").write_text("")
    assert eval_main(["study", str(study), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "\n" not in err
