"""``python -m eval watch RUN``: evaluate a run's checkpoints as they land, for the FID curves.

For each new checkpoint: sample ``--n`` images into ``RUN/samples/{step:08d}/`` (resumable),
compare them with each split's reference frames, and write one JSON per (step, split,
extractor) to ``RUN/evals/`` with where the checkpoint was in training (step, epoch, images
processed, training wall-clock: evaluation time never counts as training time). It runs beside
training (another GPU: ``--device cuda:1``) or after it (``--all``), and stops once the run is
finished (a ``{"kind": "finished"}`` record in metrics.jsonl, or a checkpoint at config.json's
``total_steps``) and the checkpoints it was asked for are evaluated, or at once with ``--once``.
The build is ``--shards``, else the run's own (an old run's relative path is looked for from the
current folder and from the run folder's parents). The trainer knows nothing of it.

When ``RUN/tb`` exists (the run trained with ``--tensorboard``), or with ``--tensorboard``, each
checkpoint's distances and a grid of its first samples also go to ``RUN/tb/eval`` as TensorBoard
events (see `eval.tensorboard`); ``--no-tensorboard`` never writes them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from shards_spec.format import MANIFEST_NAME
from train import checkpoint
from train.diffusion import Schedule
from train.metrics import METRICS_NAME, read_metrics

from . import metrics, sample
from .features import EXTRACTORS
from .runs import (
    EVALS_DIR,
    SAMPLES_DIR,
    RunError,
    check_device,
    check_finite,
    load,
    read_config,
    schedule_of,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the training run folder")
    p.add_argument("--shards", help="the build to compare with (default: the run's --shards)")
    p.add_argument("--n", type=int, default=5000, help="samples per checkpoint")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps (the paper's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    sample.add_clip_argument(p)
    p.add_argument("--splits", default="train,val", help="reference splits, comma-separated")
    p.add_argument("--n-ref", type=int, default=metrics.DEFAULT_N_REF, help="reference frames")
    p.add_argument("--extractor", default="inception", choices=EXTRACTORS)
    p.add_argument("--inception-weights", help="path of inception-2015-12-05.pt")
    p.add_argument("--every", type=int, default=0, help="only steps that are multiples of this")
    p.add_argument("--all", action="store_true", help="also the checkpoints already there")
    p.add_argument("--once", action="store_true", help="evaluate what is there, then exit")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between looks")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write each checkpoint's distances and sample grid to RUN/tb/eval (needs "
        "framebridge[tensorboard]); default: when RUN/tb exists (the run trained with "
        "--tensorboard)",
    )


def eval_path(run: Path, step: int, split: str, extractor: str) -> Path:
    return Path(run) / EVALS_DIR / f"{step:08d}-{split}-{extractor}.json"


def check_args(args: argparse.Namespace) -> None:
    """One-line RunError for option values out of range."""
    for flag, value, low in (("--n", args.n, 2), ("--n-ref", args.n_ref, 2), ("--batch", args.batch, 1),
                             ("--every", args.every, 0), ("--seed", args.seed, 0)):  # fmt: skip
        if value < low:
            raise RunError(f"{flag} must be >= {low}, got {value}")
    T = Schedule().T
    if not 1 <= args.steps <= T:
        raise RunError(f"--steps must be in 1..{T}, got {args.steps}")
    check_finite("--eta", args.eta)
    check_finite("--poll", args.poll, strict=True)
    check_device(args.device)
    if getattr(args, "tensorboard", None):
        from .tensorboard import check_available

        check_available()


def find_build(run: Path, shards: str | None) -> str:
    """The build a run trained on: as config.json stores it, or (an old run's relative path)
    from the current folder or one of the run folder's parents; RunError naming what was tried."""
    if not shards:
        raise RunError(f"{run}/config.json names no build (shards): give --shards")
    stored = Path(shards)
    tried = [stored]
    if not stored.is_absolute():
        tried += [above / stored for above in Path(run).resolve().parents]
    for where in tried:
        if (where / MANIFEST_NAME).is_file():
            return str(where)
    shown = ", ".join(str(t) for t in dict.fromkeys(tried))
    raise RunError(f"the run's build {shards!r} is not found (tried {shown}): give --shards")


def finished(run: Path, config: dict[str, Any]) -> bool:
    """Whether the run can bring no more checkpoints: its last record of ``finished`` and
    ``resume`` is a ``finished``, or its last checkpoint is at config.json's ``total_steps``."""
    saved = checkpoint.steps_saved(run)
    total = config.get("total_steps")
    if saved and isinstance(total, int) and saved[-1] >= total:
        return True
    try:
        with warnings.catch_warnings():  # a damaged line: the report names it, not every poll
            warnings.simplefilter("ignore")
            records = read_metrics(run) if (run / METRICS_NAME).is_file() else []
    except (OSError, ValueError, TypeError, AttributeError, KeyError):  # a damaged file
        return False
    kinds = [r.get("kind") for r in records if isinstance(r, dict)]
    ends = [k for k in kinds if k in ("finished", "resume")]
    return bool(ends) and ends[-1] == "finished"


def run(args: argparse.Namespace) -> int:
    """Watch until the run is finished and its checkpoints are evaluated (or once); returns 0,
    or 1 when it tried checkpoints and could evaluate none of them."""
    check_args(args)
    run_dir = Path(args.run)
    config = read_config(run_dir)
    schedule_of(config)  # what every checkpoint needs: fail once, not once per checkpoint
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunError(f"{run_dir} is not writable: watch writes evals/ and samples/ there")
    shards = args.shards or find_build(run_dir, config.get("shards"))
    splits = [s for s in args.splits.split(",") if s]
    if not splits:
        raise RunError("--splits names no split")
    seen = set() if (args.all or args.once) else set(checkpoint.steps_saved(run_dir))
    if seen:
        print(f"watching {run_dir}: {len(seen)} checkpoints already there are left out "
              "(--all includes them)", file=sys.stderr)  # fmt: skip
    evaluated, failed = 0, 0
    while True:
        done = finished(run_dir, config)  # before the listing: then it holds every checkpoint
        for step in checkpoint.steps_saved(run_dir):
            if step in seen or (args.every and step % args.every):
                continue
            seen.add(step)
            try:
                evaluate_step(run_dir, step, shards=shards, splits=splits, args=args)
                evaluated += 1
            except RunError as exc:  # pruned by the trainer meanwhile, or damaged
                failed += 1
                print(f"warning: step {step} not evaluated: {exc}", file=sys.stderr)
        if args.once or done:
            return 1 if failed and not evaluated else 0
        time.sleep(args.poll)
        config = read_config(run_dir)  # a resumed run may have a new length


def evaluate_step(run: Path, step: int, shards: str, splits: list[str], args) -> list[Path]:
    """Sample one checkpoint and write its evaluation JSONs (those missing)."""
    todo = [s for s in splits if not eval_path(run, step, s, args.extractor).exists()]
    if not todo:
        return []
    loaded = load(run, step, device="cpu")  # where in training it was; checks the file
    folder = run / SAMPLES_DIR / f"{step:08d}"
    argv = ["--run", str(run), "--ckpt", str(step), "--n", str(args.n), "--steps",
            str(args.steps), "--out", str(folder), "--seed", str(args.seed), "--batch",
            str(args.batch), "--eta", str(args.eta),
            "--clip-x0" if args.clip_x0 else "--no-clip-x0"]  # fmt: skip
    if args.device:
        argv += ["--device", args.device]
    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    first = not any((run / EVALS_DIR).glob(f"{step:08d}-*.json"))  # no grid written yet
    t0 = time.perf_counter()
    sample.run(parser.parse_args(argv))
    written, records = [], []
    for split in todo:
        result = metrics.evaluate(
            folder, shards, split, n_ref=args.n_ref, extractor=args.extractor,
            inception_weights=args.inception_weights, batch=args.batch,
            device=args.device or "cpu",
        )  # fmt: skip
        record = {
            **result,
            "run": str(run),
            "method": loaded.config.get("method"),
            "step": loaded.step,
            "epoch": loaded.epoch,
            "images": loaded.images,
            "wall_s": loaded.wall_s,
            "sampler": {
                "steps": args.steps,
                "eta": float(args.eta),
                "ema": True,
                "seed": args.seed,
                "clip_x0": bool(args.clip_x0),
            },
            "eval_wall_s": time.perf_counter() - t0,
        }
        path = eval_path(run, step, split, args.extractor)
        metrics.write_json(path, record)
        written.append(path)
        records.append(record)
        print(f"step {step} {split}: {result['metric_name']} {result['fid']:.3f}",
              file=sys.stderr)  # fmt: skip
    _tensorboard(run, step, records=records, samples=folder if first else None, args=args)
    return written


def _tensorboard(run: Path, step: int, records: list, samples: Path | None, args) -> None:
    """The checkpoint's events in RUN/tb/eval, after its JSONs (an interrupted write leaves a
    point out, never twice; ``eval tensorboard RUN`` writes them all again)."""
    from . import tensorboard

    if not records or not tensorboard.watch_enabled(run, getattr(args, "tensorboard", None)):
        return
    try:
        tensorboard.check_available()
    except RunError as exc:  # RUN/tb exists, the package is not here: say so once
        print(f"warning: {exc}; RUN/tb/eval is not written", file=sys.stderr)
        args.tensorboard = False
        return
    tensorboard.write_evaluations(run, step, records, samples)
