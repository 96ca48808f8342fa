"""Checkpoints: atomic saves, the last few plus the best kept, loaded without unpickling.

A checkpoint is ``OUT/ckpt-{step:08d}.pt``, a dict of tensors and plain values that
``torch.load(weights_only=True)`` reads: model, EMA, optimizer, step, epoch, the epoch's
bad-window count, the loader position and the configuration. ``OUT/best.json`` names the step
with the lowest validation loss; that checkpoint is never pruned.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from shards_spec.atomic import atomic_output, atomic_write_text
from shards_spec.cli import disk_full
from train.options import LEGACY_DEFAULTS, RESUMABLE

CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")
# the temporary files of atomic writes (shards_spec.atomic: ".NAME.RANDOM.tmp"; ".NAME.tmp" of
# older versions) of what the trainer writes in a run folder
TMP_RE = re.compile(r"^\.(ckpt-\d{8}\.pt|best\.json|config\.json)(\.\w+)?\.tmp$")
BEST_NAME = "best.json"


class CheckpointError(ValueError):
    """A checkpoint does not belong to this run or cannot be used (one-line message)."""


def path_for(out: Path, step: int) -> Path:
    return Path(out) / f"ckpt-{step:08d}.pt"


def steps_saved(out: Path) -> list[int]:
    """Steps with a checkpoint file in `out`, ascending."""
    if not Path(out).is_dir():
        return []
    found = (CKPT_RE.match(p.name) for p in Path(out).iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def save(out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``ckpt-{step}.pt`` atomically, then drop all but the last `keep` and the best.

    A failed write leaves no temporary file; a full disk raises CheckpointError (one line).
    """
    path = path_for(out, step)
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)  # to a file object: the archive's inner name is not the temp's
    except BaseException as exc:
        if disk_full(exc):
            raise CheckpointError(
                f"disk full writing {path}: free some space and run the same command again to "
                "resume from the last checkpoint"
            ) from None
        raise
    best = best_step(out)
    for old in steps_saved(out)[:-keep] if keep > 0 else []:
        if old != best:
            path_for(out, old).unlink(missing_ok=True)
    return path


def remove_temporaries(out: Path) -> None:
    """Drop the temporary files of writes cut short (a kill during a save)."""
    if Path(out).is_dir():
        for p in Path(out).iterdir():
            if TMP_RE.match(p.name):
                p.unlink(missing_ok=True)


def best_step(out: Path) -> int | None:
    file = Path(out) / BEST_NAME
    try:
        return int(json.loads(file.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_best(out: Path, step: int, val_loss: float) -> None:
    """Record `step` as the best checkpoint (atomically)."""
    atomic_write_text(
        Path(out) / BEST_NAME, json.dumps({"step": step, "val_loss": val_loss}) + "\n"
    )


def load(path: Path) -> dict[str, Any]:
    """Load one checkpoint without unpickling objects.

    Raises CheckpointError (one line) for a file that is not a checkpoint of this trainer
    (damaged, truncated, or holding pickled objects) and OSError when it cannot be read.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        what = f"a pickled object ({found.group(1)})" if found else "data other than tensors"
        raise CheckpointError(
            f"checkpoint {path} holds {what}; checkpoints are loaded without unpickling, so it "
            "is refused"
        ) from None
    except Exception as exc:  # a truncated or damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable ({_first_sentence(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is unreadable (a {type(state).__name__})")
    missing = {"model", "ema", "optimizer", "step", "config"} - set(state)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (it lacks {', '.join(sorted(missing))})"
        )
    return state


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(". ")[0].rstrip(".")


def load_latest(out: Path) -> dict[str, Any] | None:
    """The newest checkpoint of `out` that loads; a damaged one is passed over with a warning.

    A checkpoint that cannot be read at all (permissions, I/O) raises CheckpointError instead:
    the files may be fine, so nothing is passed over.
    """
    for step in reversed(steps_saved(out)):
        path = path_for(out, step)
        try:
            return load(path)
        except CheckpointError as exc:
            print(f"warning: {exc}; trying the one before", file=sys.stderr)
        except OSError as exc:
            raise CheckpointError(
                f"cannot read {path} ({exc.strerror or exc}): fix its permissions or the disk, "
                "then run the same command again"
            ) from None
    return None


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise CheckpointError naming every field that differs and may not change on resume."""
    saved = {**LEGACY_DEFAULTS, **saved}  # a checkpoint from before a field existed
    keys = (set(saved) | set(current)) - RESUMABLE
    diff = sorted(k for k in keys if saved.get(k) != current.get(k))
    if diff:
        parts = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"the checkpoint in this --out is of another run ({parts}); "
            "use another --out or --no-resume"
        )
