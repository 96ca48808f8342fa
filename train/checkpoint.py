"""Checkpoints: atomic saves, the last few plus the best kept, loaded without unpickling.

A checkpoint is ``OUT/ckpt-{step:08d}.pt``, a dict of tensors and plain values that
``torch.load(weights_only=True)`` reads: model, EMA, optimizer, scaler, step, epoch, RNG
states, the loader position and the configuration. ``OUT/best.json`` names the step with the
lowest validation loss; that checkpoint is never pruned.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from train.options import LEGACY_DEFAULTS

CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")
BEST_NAME = "best.json"

# configuration fields a resumed run may change (how long and how it runs, not what it learns)
MAY_CHANGE = frozenset(
    {
        "out",
        "shards",
        "shard_url",
        "epochs",
        "max_steps",
        "ckpt_every",
        "val_every",
        "diag_every",
        "keep",
        "resume",
        "compile",
        "recipe",  # a name for defaults; the values it set are checked as themselves
        "max_bad_fraction",
        "max_bad_steps",
        "progress",
        "device",
        "dist_timeout",
        "total_steps",
        "workers",  # allowed, with a warning: the data order changes
        "world_size",
    }
)


class CheckpointError(ValueError):
    """A checkpoint does not belong to this run (one-line message)."""


def path_for(out: Path, step: int) -> Path:
    return Path(out) / f"ckpt-{step:08d}.pt"


def steps_saved(out: Path) -> list[int]:
    """Steps with a checkpoint file in `out`, ascending."""
    if not Path(out).is_dir():
        return []
    found = (CKPT_RE.match(p.name) for p in Path(out).iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def save(out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``ckpt-{step}.pt`` atomically, then drop all but the last `keep` and the best."""
    path = path_for(out, step)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    best = best_step(out)
    for old in steps_saved(out)[:-keep] if keep > 0 else []:
        if old != best:
            path_for(out, old).unlink(missing_ok=True)
    return path


def best_step(out: Path) -> int | None:
    file = Path(out) / BEST_NAME
    try:
        return int(json.loads(file.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_best(out: Path, step: int, val_loss: float) -> None:
    """Record `step` as the best checkpoint (atomically)."""
    file = Path(out) / BEST_NAME
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
    os.replace(tmp, file)


def load(path: Path) -> dict[str, Any]:
    """Load one checkpoint without unpickling objects (raises on a corrupt file)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"model", "ema", "optimizer", "step", "config"} - set(state)
    if missing:
        raise ValueError(f"lacks {', '.join(sorted(missing))}")
    return state


def load_latest(out: Path) -> dict[str, Any] | None:
    """The newest checkpoint of `out` that loads; a corrupt one is passed over with a warning."""
    for step in reversed(steps_saved(out)):
        path = path_for(out, step)
        try:
            return load(path)
        except Exception as exc:  # a truncated or damaged file: fall back to the one before
            print(
                f"warning: checkpoint {path} is unreadable ({exc}); trying the one before",
                file=sys.stderr,
            )
    return None


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise CheckpointError naming every field that differs and may not change on resume."""
    saved = {**LEGACY_DEFAULTS, **saved}  # a checkpoint from before a field existed
    keys = (set(saved) | set(current)) - MAY_CHANGE
    diff = sorted(k for k in keys if saved.get(k) != current.get(k))
    if diff:
        parts = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise CheckpointError(
            f"the checkpoint in this --out is of another run ({parts}); "
            "use another --out or --no-resume"
        )
