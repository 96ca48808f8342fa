"""Named training recipes: sets of defaults that `python -m train --recipe NAME` starts from.

A recipe is a table of option values (the names of `TrainConfig`'s fields), a table of those
that apply to ``--method flow`` only (the other methods refuse them), and, per kind of method
(``windows``: seq, adjacent, flow, divergence; ``frames``: iid, dispersive), its global batch,
epochs and steps. Recipes compose: ``--recipe a,b`` applies ``a``, then ``b`` (a later recipe's
option wins; batch, epochs and steps come from the last recipe of the list that names them).
Options given on the command line win over every recipe's. The ``--recipe`` string is recorded
in ``config.json`` as given; every value the recipes set is recorded there too, as if typed.

How each recipe was chosen, with the runs tried and what they gave, is in ``docs/recipes.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    help: str
    options: dict[str, Any] = field(default_factory=dict)
    flow: dict[str, Any] = field(default_factory=dict)  # for --method flow only
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
    "public-code": Recipe(
        help="the method as the paper's public code (SehunChang/video_Diffusion) runs it: "
        "lambda 0.1 and the cosine schedule, and for --method flow w = 1 / (1 + m) with m the "
        "pair's mean flow magnitude (--weighting inverse --flow-stat mag; needs a build of "
        "spec 1.1); x0 is clipped when sampling, eval sample's default (--clip-x0). Compose "
        "it: --recipe cpu-short,public-code (docs/recipes.md)",
        options={"lam": 0.1, "schedule": "cosine"},
        flow={"weighting": "inverse", "flow_stat": "mag"},
    ),
}


def recipe_names(spec: str | None) -> list[str]:
    """The recipe names of a ``--recipe`` value, in the order given (``"cpu-short,public-code"``)."""
    return [] if spec is None else [name.strip() for name in spec.split(",")]


def unknown_recipe(spec: str | None) -> str | None:
    """The first name of a ``--recipe`` value that is not a recipe (None: all are)."""
    return next((name for name in recipe_names(spec) if name not in RECIPES), None)


def recipe_options(spec: str | None, method: str) -> dict[str, Any]:
    """The option values the recipes of `spec` set for `method`, later recipes winning
    (unknown names are left out: `train.options.check` refuses them)."""
    out: dict[str, Any] = {}
    for name in recipe_names(spec):
        recipe = RECIPES.get(name)
        if recipe is not None:
            out.update(recipe.options)
            if method == "flow":
                out.update(recipe.flow)
    return out


def recipe_per_kind(spec: str | None, attr: str) -> dict[str, int] | None:
    """``batch``, ``epochs`` or ``max_steps`` of the last recipe of `spec` that names it."""
    found = None
    for name in recipe_names(spec):
        value = getattr(RECIPES.get(name), attr, None)
        found = value if value else found
    return found
