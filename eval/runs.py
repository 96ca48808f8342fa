"""A training run folder as evaluation sees it: its configuration, checkpoints and model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train import checkpoint
from train.diffusion import SCHEDULES, Schedule
from train.options import LEGACY_DEFAULTS
from train.unet import PRESETS, UNet, build_unet

EVALS_DIR = "evals"  # RUN/evals/{step:08d}-{split}-{extractor}.json, one per evaluation


class RunError(ValueError):
    """A run folder or checkpoint that cannot be evaluated (one-line message)."""


@dataclass
class Loaded:
    """A checkpoint's model and where in training it was taken."""

    model: UNet
    config: dict[str, Any]
    step: int
    epoch: int
    images: int  # images processed by then (all ranks)
    wall_s: float  # training wall-clock by then (evaluation time never counts)
    path: Path

    @property
    def schedule(self) -> Schedule:
        """The noise schedule the run trained with (linear for runs made before --schedule)."""
        return schedule_of(self.config)


def schedule_of(config: dict[str, Any]) -> Schedule:
    """The noise schedule a run's config.json names (RunError for an unknown one)."""
    kind = config.get("schedule", LEGACY_DEFAULTS["schedule"])
    if kind not in SCHEDULES:
        raise RunError(f"config.json: unknown schedule {kind!r} (known: {', '.join(SCHEDULES)})")
    return Schedule(kind=kind)


def read_config(run: Path | str) -> dict[str, Any]:
    """RUN/config.json (RunError when the folder is not a training run)."""
    file = Path(run) / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise RunError(f"{run} is not a training run: {file.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{file}: unreadable ({exc})") from None


def checkpoint_path(run: Path | str, which: str | int = "last") -> Path:
    """The checkpoint `which` names: ``last``, ``best`` or a step number."""
    run = Path(run)
    saved = checkpoint.steps_saved(run)
    if not saved:
        raise RunError(f"{run} has no checkpoint (ckpt-*.pt)")
    if which == "last":
        step = saved[-1]
    elif which == "best":
        step = checkpoint.best_step(run)
        if step is None or step not in saved:
            raise RunError(f"{run} has no best checkpoint (no validation point was saved)")
    else:
        try:
            step = int(which)
        except ValueError:
            raise RunError(f"--ckpt {which!r}: use last, best or a step number") from None
        if step not in saved:
            have = ", ".join(str(s) for s in saved)
            raise RunError(f"{run} has no checkpoint of step {step} (saved: {have})")
    return checkpoint.path_for(run, step)


def load(run: Path | str, which: str | int = "last", ema: bool = True, device="cpu") -> Loaded:
    """The model of a checkpoint (EMA weights unless `ema` is False), in eval mode."""
    run = Path(run)
    config = read_config(run)
    path = checkpoint_path(run, which)
    try:
        state = checkpoint.load(path)
    except Exception as exc:
        raise RunError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    saved = state["config"]
    for key in ("preset", "image_size", "unet"):
        if json.loads(json.dumps(saved.get(key))) != config.get(key):  # tuples as in JSON
            raise RunError(
                f"{path} is of another model ({key} {saved.get(key)!r}, config.json has "
                f"{config.get(key)!r})"
            )
    if config.get("preset") not in PRESETS:
        raise RunError(f"{run}/config.json: unknown preset {config.get('preset')!r}")
    model = build_unet(config["preset"], int(config["image_size"]))
    try:
        model.load_state_dict(state["ema" if ema else "model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RunError(f"{path} does not fit the {config['preset']} UNet ({first})") from None
    return Loaded(
        model=model.to(device).eval(),
        config=config,
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        images=int(state["images"]),
        wall_s=float(state["wall_s"]),
        path=path,
    )
