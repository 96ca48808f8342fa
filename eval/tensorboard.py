"""``python -m eval tensorboard RUN... [--out DIR]``: a run's records as TensorBoard event files.

A run folder's TensorBoard view is ``RUN/tb/`` (``tensorboard --logdir RUN/tb``, or the folder
above several runs):

- ``RUN/tb/train/``: the scalars of metrics.jsonl, as `train.metrics.read_metrics` reads them
  (``train/loss`` and each loss term, ``train/lr``, ``train/grad_norm``, ``train/param_dist``,
  ``train/images_per_s``, ``train/data_wait``, ..., ``val/val_loss`` and ``val/val_loss_ema``,
  ``diag/grad_var`` ...), at the training step. ``python -m train --tensorboard`` writes them as
  it goes.
- ``RUN/tb/eval/``: each evaluation's distances as ``EXTRACTOR/SPLIT/NAME`` (``inception/val/fid``,
  ``offline/val/frechet_distance``: the offline extractor's number is not an FID; precision,
  recall, density, coverage, the kernel distance) and a grid of the checkpoint's first samples
  (``samples``), at the checkpoint's step. ``eval watch`` adds them for each checkpoint it
  evaluates when ``RUN/tb`` exists (a run trained with ``--tensorboard``), or with
  ``--tensorboard``.

This command writes both from what the run folder holds (metrics.jsonl, evals/*.json,
samples/STEP/), for runs made without ``--tensorboard``: into a new folder that then replaces
``RUN/tb`` (``--out DIR``: ``DIR/NAME``, NAME the run folder's name), so running it again
never repeats a point. The default ``RUN/tb`` is written under the run folder's lock: not while
a trainer runs there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards_spec.atomic import replace_folder
from train import folder_lock
from train.metrics import (
    METRICS_NAME,
    TB_DIR,
    TB_EVAL,
    TB_TRAIN,
    EventWriter,
    TensorBoardMissing,
    read_metrics,
    require_tensorboard,
    scalars,
    write_train_events,
)

from .runs import EVALS_DIR, SAMPLES_DIR, RunError, read_config

GRID_MAX = 64  # samples in a checkpoint's grid image
GRID_PAD = 2  # pixels between them
PROGRESS_MIN = 2000  # records and evaluations from which the converter shows a progress bar
# an evaluation's numbers and their names per extractor (the offline one is not FID or KID)
EVAL_NAMES = {
    "inception": {"fid": "fid", "kid": "kid", "kid_std": "kid_std"},
    "offline": {
        "fid": "frechet_distance",
        "kid": "kernel_distance",
        "kid_std": "kernel_distance_std",
    },
}
SHARED_NAMES = ("precision", "recall", "density", "coverage")


def check_available() -> None:
    """RunError (one line, exit 2) unless tensorboard can be imported."""
    try:
        require_tensorboard()
    except TensorBoardMissing as exc:
        raise RunError(str(exc)) from None


def eval_scalars(record: dict[str, Any]) -> dict[str, float]:
    """An evaluation record's scalars: ``EXTRACTOR/SPLIT/NAME`` (None values have none)."""
    ext, split = record.get("extractor"), record.get("split")
    if not isinstance(ext, str) or not isinstance(split, str):
        return {}
    names = {**EVAL_NAMES.get(ext, {"fid": "frechet_distance"}), **{k: k for k in SHARED_NAMES}}
    out = {}
    for key, name in names.items():
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{ext}/{split}/{name}"] = float(value)
    return out


def sample_grid(folder: Path, limit: int = GRID_MAX) -> tuple[bytes, tuple[int, int]] | None:
    """The first ``limit`` sample PNGs of ``folder`` (by name, those of the first one's size) as
    one PNG grid and its (width, height); None when there are none."""
    import cv2
    import numpy as np

    images = []
    for path in sorted(Path(folder).glob("*.png")):
        if path.name.startswith("."):
            continue
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None or (images and image.shape != images[0].shape):
            continue
        images.append(image)
        if len(images) == limit:
            break
    if not images:
        return None
    h, w, _ = images[0].shape
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = np.full(
        (rows * (h + GRID_PAD) + GRID_PAD, cols * (w + GRID_PAD) + GRID_PAD, 3), 255, np.uint8
    )
    for i, image in enumerate(images):
        y, x = GRID_PAD + (i // cols) * (h + GRID_PAD), GRID_PAD + (i % cols) * (w + GRID_PAD)
        grid[y : y + h, x : x + w] = image
    ok, data = cv2.imencode(".png", grid)
    if not ok:
        return None
    return data.tobytes(), (grid.shape[1], grid.shape[0])


def watch_enabled(run: Path, flag: bool | None) -> bool:
    """Whether ``eval watch`` writes to ``RUN/tb/eval``: ``--tensorboard`` (True), never with
    ``--no-tensorboard`` (False), else (None) when ``RUN/tb`` exists."""
    return bool(flag) if flag is not None else (Path(run) / TB_DIR).is_dir()


def write_evaluations(
    run: Path, step: int, records: list[dict[str, Any]], samples: Path | None
) -> None:
    """``eval watch``'s events of one checkpoint: each record's scalars and, with ``samples``,
    the checkpoint's sample grid, in a new event file of ``RUN/tb/eval`` (closed at once)."""
    grid = sample_grid(samples) if samples is not None else None
    writer = EventWriter(Path(run) / TB_DIR / TB_EVAL)
    try:
        for record in records:
            writer.scalars(step, eval_scalars(record))
        if grid is not None:
            writer.image("samples", step, *grid)
    finally:
        writer.close()


# the converter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="training run folders")
    p.add_argument(
        "--out",
        help="write DIR/NAME for each run (NAME: the run folder's name) instead of RUN/tb",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    """Convert each run; one line per run on stderr; returns 0."""
    check_available()
    runs = [Path(r) for r in args.runs]
    for r in runs:
        read_config(r)  # every RUN is a run before anything is written
        if not (r / METRICS_NAME).is_file():
            raise RunError(f"{r} has no {METRICS_NAME}: nothing to convert")
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} is a file, not a folder")
        names = [r.resolve().name for r in runs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RunError(f"runs with the same folder name ({', '.join(twice)}) under one --out")
        dests = [out / n for n in names]
    else:
        dests = [r / TB_DIR for r in runs]
    for r, dest in zip(runs, dests, strict=True):
        counts = convert(r, dest, progress=not args.no_progress, lock=args.out is None)
        print(
            f"{r}: {counts['points']} points of {counts['records']} records, "
            f"{counts['evals']} evaluations, {counts['grids']} sample grids -> {dest}",
            file=sys.stderr,
        )
    return 0


def convert(run: Path, dest: Path, progress: bool = True, lock: bool = True) -> dict[str, int]:
    """Write ``dest/train`` and ``dest/eval`` from the run folder, replacing ``dest``.

    With ``lock`` (``dest`` in the run folder) the run folder's lock is held meanwhile, so a
    trainer there is refused, and this refused while one runs.
    """
    run, dest = Path(run), Path(dest)
    if lock:
        try:
            fd = folder_lock.acquire(run, "run folder")
        except folder_lock.FolderBusy as exc:
            raise RunError(f"{exc} (or give --out)") from None
        except OSError as exc:
            raise RunError(f"{run}: cannot lock it ({exc.strerror or exc})") from None
    try:
        return _convert(run, dest, progress)
    finally:
        if lock:
            folder_lock.release(fd)


def _convert(run: Path, dest: Path, progress: bool) -> dict[str, int]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_metrics(run)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    evals = _evaluations(run)
    grids = _sample_folders(run)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.new-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        total = len(records) + len(evals) + len(grids)
        bar = tqdm(
            total=total,
            desc=f"tensorboard {run.name}",
            unit="record",
            disable=not progress or total < PROGRESS_MIN,
        )
        try:
            train = EventWriter(tmp / TB_TRAIN, flush_secs=120)
            try:
                write_train_events(records, train, bar)
            finally:
                train.close()
            evals_out = EventWriter(tmp / TB_EVAL, flush_secs=120)
            try:
                for record in evals:
                    evals_out.scalars(record["step"], eval_scalars(record))
                    bar.update(1)
                for step, folder in grids:
                    grid = sample_grid(folder)
                    if grid is not None:
                        evals_out.image("samples", step, *grid)
                    bar.update(1)
            finally:
                evals_out.close()
        finally:
            bar.close()
        _replace(tmp, dest)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise RunError(f"cannot write {dest}{where}: {exc.strerror or exc}") from None
    points = sum(len(scalars(r)) for r in records)
    return {"points": points, "records": len(records), "evals": len(evals), "grids": len(grids)}


def _evaluations(run: Path) -> list[dict[str, Any]]:
    """The run's readable evaluation records (the others named in a warning line)."""
    from .report import malformed

    out = []
    for file in sorted((run / EVALS_DIR).glob("*.json")):
        if file.name.startswith("."):
            continue  # an evaluation being written
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError):
            print(f"warning: {file}: unreadable; skipped", file=sys.stderr)
            continue
        why = malformed(record)
        if why is not None:
            print(f"warning: {file}: {why}; skipped", file=sys.stderr)
            continue
        out.append(record)
    return out


def _sample_folders(run: Path) -> list[tuple[int, Path]]:
    """``samples/STEP/`` folders (eval watch's), by step."""
    folder = run / SAMPLES_DIR
    if not folder.is_dir():
        return []
    return sorted((int(p.name), p) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _replace(tmp: Path, dest: Path) -> None:
    """Put the folder ``tmp`` where ``dest`` is (its old contents removed after); a ``dest``
    that is a file is refused, and ``tmp`` removed."""
    if dest.exists() and not dest.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"{dest} is a file, not a folder of event files")
    replace_folder(tmp, dest)
