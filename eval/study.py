"""``python -m eval study STUDY.toml --out DIR``: a grid of training runs, evaluated and reported.

A study names one build (or the ``pipeline`` commands that make it), a budget per cell in
*images processed* (a window method pushes K frames per window, so its cells take fewer steps),
the evaluation points, and a grid of cells (a method and its options), each run once per seed.
Every (cell, seed) is a ``python -m train`` run in ``DIR/runs/{cell}-s{seed}/``, evaluated at
its checkpoints by ``python -m eval watch``; then ``eval report`` writes ``DIR/report/`` and
`eval/study_results.py` writes ``DIR/results.md`` and ``DIR/results.json``.

Resumable cell by cell: ``DIR/runs/X/cell.json`` records the plan a cell was run with and
whether it finished; a finished cell with the same plan is never rerun, and an unfinished one
continues from its newest checkpoint (the trainer's resume); when the evaluation settings that
make the samples and scores changed, the cell's ``evals/`` and ``samples/`` are made again with
the new ones. Cells run one after another, or ``--jobs N`` at a time (``--devices
cuda:0,cuda:1``: one device per running cell).

A cell has one study process at a time (a lock on ``DIR/runs/X/.study-cell/``), and a cell whose
run folder a trainer still holds is reported busy, not started again. Every child process runs in
its own process group; SIGTERM or SIGINT to the study stops those groups (SIGKILL after
``STOP_GRACE_S``) before it exits. The study file is read and checked by `eval/study_file.py`;
the options this runner sets for every cell (``RESERVED``) are refused there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards_spec import SpecError, open_build
from shards_spec.atomic import atomic_write_text
from train import checkpoint, folder_lock
from train.objectives import WINDOW_METHODS
from train.options import STUDY_SET, TrainConfig

from .plots import duration
from .runs import EVALS_DIR, SAMPLES_DIR, RunError, check_device, check_out_dir, read_config
from .study_file import (
    CELL_KEYS,
    EVAL_DEFAULTS,
    EVAL_OUTPUT,
    Study,
    StudyError,
    cell_seeds,
    read_study,
    train_flags,
)

CELL_FILE = "cell.json"
CELL_LOCK = ".study-cell"  # RUN/.study-cell/.lock: held by the study process running the cell
RUNS_DIR = "runs"
STOP_GRACE_S = 10.0  # after SIGTERM, a cell's processes get this long before SIGKILL
# set by the runner for every cell; a study that sets them is refused
# the options this runner sets for every cell (train.options.STUDY_SET), with the --no- forms of
# the switches among them
RESERVED = STUDY_SET | {
    f"no_{name}" for name in STUDY_SET if isinstance(getattr(TrainConfig(), name), bool)
}


@dataclass
class Cell:
    """One grid cell at one seed: a training run and its evaluations."""

    name: str
    seed: int
    method: str
    options: dict[str, Any]  # python -m train options, without the runner's own
    run: Path
    images: int  # the cell's budget: images processed
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"


def load_study(path: Path | str, out: Path | str) -> Study:
    """Parse and check a study file (`eval/study_file.py`); the build path is relative to
    ``out``. The options the runner sets for every cell (RESERVED) are refused."""
    return read_study(path, out, reserved=RESERVED)


def ensure_build(study: Study, out: Path) -> dict[str, Any]:
    """The build's manifest, after running the study's pipeline commands if it is missing."""
    if not (study.build / "dataset.json").is_file():
        if not study.pipeline:
            raise StudyError(f"{study.build} is not a build and the study has no pipeline commands")
        for argv in study.pipeline:
            cmd = [sys.executable, "-m", "pipeline", *argv]
            print(f"study: {' '.join(cmd[1:])}  (in {out})", file=sys.stderr)
            code = CHILDREN.call(cmd, cwd=out)
            if code:
                raise StudyError(f"pipeline {argv[0]} failed (exit code {code}); see above")
    try:
        return open_build(study.build).manifest
    except (SpecError, OSError, ValueError) as exc:
        raise StudyError(f"{study.build}: {exc}") from None


def expand(study: Study, out: Path) -> list[Cell]:
    """The (cell, seed) runs, seed by seed, so a study stopped early has every cell's first seed.

    A cell with its own ``seeds`` runs those (a study may give fewer seeds to some cells).
    """
    seeds = dict.fromkeys([*study.seeds, *(s for e in study.grid for s in cell_seeds(study, e))])
    return [
        Cell(
            name=entry["name"],
            seed=seed,
            method=entry["method"],
            options={**study.train, **{k: v for k, v in entry.items() if k not in CELL_KEYS}},
            run=out / RUNS_DIR / f"{entry['name']}-s{seed}",
            images=entry.get("images", study.images),
        )
        for seed in seeds
        for entry in study.grid
        if seed in cell_seeds(study, entry)
    ]


def images_per_step(options: dict[str, Any], window: int) -> int:
    """Images one optimizer step processes: batch windows x K, or batch frames."""
    # load_study checked that every cell has a positive integer batch
    return options["batch"] * (window if options["method"] in WINDOW_METHODS else 1)


def plan(cell: Cell, study: Study, window: int) -> dict[str, Any]:
    """Steps and logging intervals that spend the cell's image budget in evenly spaced points.

    The step count is rounded up to a multiple of the evaluation points, so every point is a
    checkpoint step; the images actually processed are recorded.
    """
    ev = study.evaluation
    per = images_per_step(cell.options, window)
    points = ev["points"]
    if cell.images < per * points:
        raise StudyError(
            f"cell {cell.name}: a budget of {cell.images} images is less than one step "
            f"({per} images) per evaluation point ({points})"
        )
    every = -(-cell.images // (per * points))  # steps between evaluation points, rounded up
    steps = every * points

    def interval(n: int) -> int:
        return 0 if n <= 0 else max(1, steps // n)

    val_every = interval(ev["val_points"])
    vals = steps // val_every + 1 if val_every else 0
    return {
        "steps": steps,
        "images": steps * per,
        "images_per_step": per,
        "ckpt_every": every,
        "val_every": val_every,
        "diag_every": interval(ev["diag_points"]),
        # each validation point may save a (best) checkpoint: all stay until the cell is scored
        "keep": points + vals + 2,
    }


def _flag(key: str, value: Any) -> list[str]:
    """A study key and value as ``python -m train`` arguments, by the option's full name."""
    name = "--" + ("lambda" if key in ("lam", "lambda") else key.replace("_", "-"))
    action = train_flags().get(key)
    if isinstance(action, argparse.BooleanOptionalAction) and isinstance(value, bool):
        yes = action.option_strings[0]  # --ema-warmup; --no-ema-warmup is false
        return [yes if value == (name == yes) else "--no-" + yes[2:]]
    if value is True:
        return [name]
    if value is False or value is None:
        return []
    return [name, str(value)]


def train_argv(cell: Cell, study: Study, progress: bool, device: str | None) -> list[str]:
    """The ``python -m train`` command of a cell."""
    p = cell.plan
    argv = [sys.executable, "-m", "train", "--shards", str(study.build), "--out", str(cell.run)]
    # --epochs as large as the steps, so that the trainer's default epochs never cut a cell short
    argv += ["--seed", str(cell.seed), "--max-steps", str(p["steps"]), "--epochs", str(p["steps"])]
    for key in ("ckpt_every", "val_every", "diag_every", "keep"):
        argv += _flag(key, p[key])
    for key, value in cell.options.items():
        argv += _flag(key, value)
    if not progress:
        argv.append("--no-progress")
    if device:
        argv += ["--device", "cuda" if device.startswith("cuda") else device]
    return argv


def watch_argv(cell: Cell, study: Study, device: str | None) -> list[str]:
    """The ``python -m eval watch`` command that scores a cell's evaluation points."""
    ev = study.evaluation
    argv = [sys.executable, "-m", "eval", "watch", str(cell.run), "--all", "--once"]
    argv += ["--every", str(cell.plan["ckpt_every"]), "--n", str(ev["samples"])]
    argv += ["--steps", str(ev["ddim_steps"]), "--extractor", str(ev["extractor"])]
    argv += ["--n-ref", str(ev["n_ref"]), "--splits", ",".join(ev["splits"])]
    argv += ["--batch", str(ev["batch"]), "--eta", str(float(ev["eta"]))]
    argv.append("--clip-x0" if ev["clip_x0"] else "--no-clip-x0")
    if device:
        argv += ["--device", "cuda" if device.startswith("cuda") else device]
    return argv


def device_env(device: str | None) -> dict[str, str] | None:
    """The environment of a cell's processes: ``cuda:N`` shows them only GPU N (as cuda)."""
    if not device or not device.startswith("cuda:"):
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}


def read_cell(run: Path) -> dict[str, Any]:
    """A cell's status record ({} when it was never started or the file is damaged)."""
    try:
        record = json.loads((run / CELL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_cell(run: Path, record: dict[str, Any]) -> None:
    """Write a cell's status record atomically (the run folder made if need be)."""
    atomic_write_text(run / CELL_FILE, json.dumps(record, indent=1, sort_keys=True))


def prune(cell: Cell) -> None:
    """Delete the checkpoints that are not evaluation points, the best or the last."""
    saved = checkpoint.steps_saved(cell.run)
    if not saved:
        return
    keep = {saved[-1], checkpoint.best_step(cell.run)}
    every = cell.plan["ckpt_every"]
    for step in saved:
        if step not in keep and step % every:
            checkpoint.path_for(cell.run, step).unlink(missing_ok=True)


def _changed(cell: Cell, record: dict[str, Any]) -> str | None:
    """Why a cell's earlier run cannot be continued with the current study (None: it can)."""
    before = record.get("identity")
    if before is None:
        return None
    if before.get("options") != cell.options or before.get("seed") != cell.seed:
        return f"its options changed since it ran; delete {cell.run} to run it again"
    saved = checkpoint.steps_saved(cell.run)
    if saved and saved[-1] > cell.plan["steps"]:
        return (
            f"it already trained {saved[-1]} steps, more than the study's {cell.plan['steps']}; "
            f"delete {cell.run} to run it again"
        )
    return None


def _what_counts(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """An identity without the settings that cannot change a cell's results (``keep``)."""
    if not isinstance(identity, dict) or not isinstance(identity.get("plan"), dict):
        return identity
    plan = {k: v for k, v in identity["plan"].items() if k != "keep"}
    return {**identity, "plan": plan}


class Stopped(BaseException):
    """The study got SIGTERM or SIGINT: its processes are being stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Children:
    """The processes a study starts, each in its own process group, stopped together on a signal.

    `stop` (the signal handler) sends SIGTERM to every group; the thread waiting on a child sends
    SIGKILL to its group after STOP_GRACE_S, and to what is left of it once the child exits; then
    `Stopped` ends the study instead of recording a failed cell. Nothing new starts meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping: int | None = None
        self._since = 0.0

    def reset(self) -> None:
        self.stopping = None

    def check(self) -> None:
        """Raise `Stopped` once a signal came."""
        if self.stopping is not None:
            raise Stopped(self.stopping)

    def stop(self, signum: int, frame=None) -> None:
        """The signal handler: SIGTERM to every group (SIGKILL when a second signal comes)."""
        again = self.stopping is not None
        if not again:
            self.stopping, self._since = signum, time.monotonic()
        for proc in list(self._procs):
            _killpg(proc.pid, signal.SIGKILL if again else signal.SIGTERM)

    def call(self, argv: list[str], **kwargs) -> int:
        """Run ``argv`` in its own process group to its end; its exit code."""
        self.check()
        with self._lock:
            proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
            self._procs.add(proc)
        try:
            if self.stopping is not None:  # the signal came while it started
                _killpg(proc.pid, signal.SIGTERM)
            while True:
                try:
                    code = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if self.stopping is not None and time.monotonic() - self._since > STOP_GRACE_S:
                        _killpg(proc.pid, signal.SIGKILL)
        finally:
            if self.stopping is not None:
                _killpg(proc.pid, signal.SIGKILL)  # what the child left in its group
            with self._lock:
                self._procs.discard(proc)
        self.check()
        return code


CHILDREN = Children()


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT stop the study's processes (in the main thread; elsewhere a no-op)."""
    CHILDREN.reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM, signal.SIGINT)
    before = {sig: signal.signal(sig, CHILDREN.stop) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _trainer_idle(run: Path) -> None:
    """`FolderBusy` when a trainer (of a killed study, or started by hand) holds the run folder."""
    if run.is_dir():
        folder_lock.release(folder_lock.acquire(run, "run folder"))


def _stale_evaluation(record: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    """The EVAL_OUTPUT settings in which the cell's evaluations so far differ from the study's."""
    before = record.get("evaluation")
    if not isinstance(before, dict):
        return []
    return [k for k in EVAL_OUTPUT if before.get(k, EVAL_DEFAULTS[k]) != evaluation[k]]


def run_cell(
    cell: Cell, study: Study, progress: bool, device: str | None, say
) -> tuple[str, float]:
    """Train and evaluate one cell unless it is finished; ('done'|'skipped'|'failed ...'|
    'busy ...', seconds).

    A finished cell with the same plan is skipped; with other evaluation settings only its
    evaluation runs again (from scratch); a changed budget continues its training; changed
    options fail. A cell that another study process runs, or whose run folder a trainer holds,
    is busy: nothing is started.
    """
    CHILDREN.check()
    try:
        lock = cell.run / CELL_LOCK
        lock.mkdir(parents=True, exist_ok=True)
        with folder_lock.hold(lock, "study cell"):
            return _run_cell(cell, study, progress=progress, device=device, say=say)
    except folder_lock.FolderBusy as exc:
        return f"busy: {exc}", 0.0


def _run_cell(
    cell: Cell, study: Study, progress: bool, device: str | None, say
) -> tuple[str, float]:
    """`run_cell` once this process holds the cell."""
    record = read_cell(cell.run)
    identity = {"plan": cell.plan, "options": cell.options, "seed": cell.seed}
    evaluation = study.evaluation
    same = _what_counts(record.get("identity")) == _what_counts(identity)
    if record.get("done") and same and record.get("evaluation", evaluation) == evaluation:
        return "skipped", 0.0
    why = None if same else _changed(cell, record)
    if why:
        return f"failed: {why}", 0.0
    _trainer_idle(cell.run)
    t0 = time.perf_counter()
    if record.get("identity") is not None and not same:
        say(f"{cell.label}: the budget changed since this cell ran; its training continues")
    stale = _stale_evaluation(record, evaluation)
    if stale:
        say(f"{cell.label}: evaluation settings changed ({', '.join(stale)}); evaluating again")
        for folder in (EVALS_DIR, SAMPLES_DIR):
            shutil.rmtree(cell.run / folder, ignore_errors=True)
    write_cell(cell.run, {"done": False, "identity": identity, "evaluation": evaluation})
    stages = [("evaluate", watch_argv(cell, study, device))]
    if not (record.get("done") and same):  # otherwise only the evaluation settings changed
        stages.insert(0, ("train", train_argv(cell, study, progress, device)))
    for stage, argv in stages:
        say(f"{cell.label}: {stage} ({cell.plan['steps']} steps, {cell.plan['images']} images)")
        code = CHILDREN.call(argv, env=device_env(device))
        if stage == "train" and code == 2:
            _trainer_idle(cell.run)  # a trainer that started meanwhile: busy, not failed
        trained = (
            read_config(cell.run).get("total_steps") if stage == "train" and not code else None
        )
        if code or (stage == "train" and trained != cell.plan["steps"]):
            why = f"failed: {stage} " + (
                f"exit code {code}" if code else f"ran {trained} steps, not {cell.plan['steps']}"
            )
            failure = {"done": False, "identity": identity, "evaluation": evaluation, "error": why}
            write_cell(cell.run, failure)
            return why, time.perf_counter() - t0
    prune(cell)
    spent = time.perf_counter() - t0
    record = {"done": True, "identity": identity, "evaluation": evaluation, "seconds": spent}
    write_cell(cell.run, record)
    return "done", spent


def run_study(
    study_file: Path, out: Path, jobs: int = 1, devices: list[str] | None = None,
    progress: bool = True, report: bool = True,
) -> int:  # fmt: skip
    """Run every unfinished cell, then the report and the results; exit code 0 or 1 (128 + the
    signal when SIGTERM or SIGINT stopped it, its processes with it)."""
    try:
        check_out_dir(out)
        out.mkdir(parents=True, exist_ok=True)
    except RunError as exc:
        raise StudyError(str(exc)) from None
    except OSError as exc:
        raise StudyError(f"--out {out}: cannot make the study folder ({exc})") from None
    with stop_on_signals():
        try:
            return _run_study(
                study_file,
                out,
                jobs=jobs,
                devices=devices or [],
                progress=progress,
                report=report,
            )
        except Stopped as stop:
            name = signal.Signals(stop.signum).name
            print(f"study: stopped by {name}, the running cells' processes with it; the same "
                  "command continues", file=sys.stderr)  # fmt: skip
            return 128 + stop.signum


def _run_study(
    study_file: Path, out: Path, jobs: int, devices: list[str], progress: bool, report: bool
) -> int:
    """`run_study` in its folder, with the signal handlers set."""
    study = load_study(study_file, out)
    manifest = ensure_build(study, out)
    window = int(manifest["window"])
    cells = expand(study, out)
    for cell in cells:
        cell.plan = plan(cell, study, window)
    (out / "study.toml").write_text(study.path.read_text(encoding="utf-8"), encoding="utf-8")
    lock, state = threading.Lock(), {"done": 0, "spent": 0.0, "ran": 0}
    failed: list[str] = []
    total = len(cells)
    t_start = time.perf_counter()

    def say(text: str) -> None:
        with lock:
            print(f"study [{state['done']}/{total}] {text}", file=sys.stderr, flush=True)

    jobs = max(1, len(devices) or jobs)
    free = list(devices)

    def one(cell: Cell) -> None:
        with lock:
            device = free.pop(0) if free else None
        try:
            status, spent = run_cell(
                cell, study, progress=progress and jobs == 1, device=device, say=say
            )
        finally:
            if device:
                with lock:
                    free.append(device)
        with lock:
            state["done"] += 1
            if status == "done":
                state["spent"] += spent
                state["ran"] += 1
            elif status != "skipped":
                failed.append(f"{cell.label}: {status}")
            left = total - state["done"]
            eta = ""
            if state["ran"] and left:
                eta = f", about {duration(state['spent'] / state['ran'] * left / jobs)} left"
            took = f" in {duration(spent)}" if spent else ""
            pct = 100 * state["done"] // total
            print(f"study [{state['done']}/{total}] {cell.label}: {status}{took} ({pct}%{eta})",
                  file=sys.stderr, flush=True)  # fmt: skip

    if jobs == 1:
        for cell in cells:
            one(cell)
    else:
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, cells))
    CHILDREN.check()
    print(f"study: {total} cells in {duration(time.perf_counter() - t_start)}", file=sys.stderr)
    if report:
        write_reports(study, cells, out)
    CHILDREN.check()
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


def write_reports(study: Study, cells: list[Cell], out: Path) -> None:
    """``eval report`` over every cell that has a run folder, and the study's results."""
    from . import report, study_results

    runs = [c.run for c in cells if (c.run / "config.json").is_file()]
    if not runs:
        print("study: no cell has a run yet; no report", file=sys.stderr)
        return
    path = report.make_report(runs, out / "report")
    results = study_results.write(study, cells, out)
    print(f"study: {path}\nstudy: {results}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=Path, help="the study file (TOML)")
    p.add_argument("--out", type=Path, required=True, help="study folder (build, runs, report)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    p.add_argument(
        "--devices",
        help="one device per running cell, e.g. cuda:0,cuda:1 (each cell's processes see only "
        "its GPU, via CUDA_VISIBLE_DEVICES)",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-cell tqdm bar")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report")


def run(args: argparse.Namespace) -> int:
    devices = [d for d in (args.devices or "").split(",") if d]
    for device in devices:
        check_device(device, "--devices")
    if args.jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {args.jobs}")
    if args.report_only:  # from the run folders there are; nothing is built or trained
        study = load_study(args.study, args.out)
        write_reports(study, expand(study, args.out), args.out)
        return 0
    return run_study(
        args.study, args.out, jobs=args.jobs, devices=devices, progress=not args.no_progress
    )
