"""Named training recipes: sets of defaults that `python -m train --recipe NAME` starts from.

A recipe is a table of option values (the names of `TrainConfig`'s fields) and, per kind of
method (``windows``: seq, adjacent, flow, divergence; ``frames``: iid, dispersive), its global
batch, epochs and steps. Options given on the command line win over a recipe's. The recipe's
name is recorded in ``config.json``; every value it set is recorded there too, as if typed.

How each recipe was chosen, with the runs tried and what they gave, is in ``docs/recipes.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    help: str
    options: dict[str, Any] = field(default_factory=dict)
    batch: dict[str, int] | None = None  # per kind: "windows", "frames"
    epochs: dict[str, int] | None = None
    max_steps: dict[str, int] | None = None


RECIPES: dict[str, Recipe] = {
    "cpu-short": Recipe(
        help="a run on 2 CPU cores that draws hands on black in about 5 minutes: tiny UNet at "
        "32 px predicting v, bf16 autocast, lr 2e-3 with 100 warmup steps, cosine schedule, "
        "EMA 0.995 with warmup, 48 images per step (16 windows or 48 frames), 700 steps; "
        "sample it with --eta 1 (docs/recipes.md)",
        options={
            "preset": "tiny",
            "image_size": 32,
            "lr": 2e-3,
            "warmup": 100,
            "schedule": "cosine",
            "prediction": "v",
            "ema": 0.995,
            "ema_warmup": True,
            "precision": "bf16",
        },
        batch={"windows": 16, "frames": 48},
        epochs={"windows": 10_000, "frames": 10_000},  # the steps decide
        max_steps={"windows": 700, "frames": 700},
    ),
}
