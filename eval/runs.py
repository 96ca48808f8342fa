"""A training run folder as evaluation sees it: its configuration, checkpoints and model."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards_spec.atomic import is_leftover
from train import checkpoint
from train.diffusion import PREDICTIONS, SCHEDULES, Schedule
from train.options import LEGACY_DEFAULTS
from train.unet import PRESETS, UNet, build_unet, layout_refusal

EVALS_DIR = "evals"  # RUN/evals/{step:08d}-{split}-{extractor}.json, one per evaluation
SAMPLES_DIR = "samples"  # RUN/samples/{step:08d}/: eval watch's samples of a checkpoint


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
        """The noise schedule the run trained with and what its network predicts (linear and
        eps for runs made before --schedule and --prediction)."""
        return schedule_of(self.config)


def schedule_of(config: dict[str, Any]) -> Schedule:
    """The noise schedule and prediction a run's config.json names (RunError for unknown ones)."""
    kind = config.get("schedule", LEGACY_DEFAULTS["schedule"])
    if kind not in SCHEDULES:
        raise RunError(f"config.json: unknown schedule {kind!r} (known: {', '.join(SCHEDULES)})")
    prediction = config.get("prediction", LEGACY_DEFAULTS["prediction"])
    if prediction not in PREDICTIONS:
        raise RunError(
            f"config.json: unknown prediction {prediction!r} (known: {', '.join(PREDICTIONS)})"
        )
    return Schedule(kind=kind, prediction=prediction)


def read_config(run: Path | str) -> dict[str, Any]:
    """RUN/config.json (RunError when the folder is not a training run)."""
    file = Path(run) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise RunError(f"{run} is not a training run: {file.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{file}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise RunError(f"{file}: not a JSON object (a {type(config).__name__}): not a run's config")
    return config


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
    for key in ("preset", "image_size", "unet", "schedule", "prediction"):
        legacy = LEGACY_DEFAULTS.get(key)  # a run from before the field existed
        ours = json.loads(json.dumps(saved.get(key, legacy)))  # tuples as in JSON
        if ours != config.get(key, legacy):
            raise RunError(
                f"{path} is of another model ({key} {ours!r}, config.json has "
                f"{config.get(key, legacy)!r})"
            )
    if config.get("preset") not in PRESETS:
        raise RunError(f"{run}/config.json: unknown preset {config.get('preset')!r}")
    why = layout_refusal(config["preset"], config.get("unet"))
    if why:
        raise RunError(f"{run}: {why}")
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


# --- checks of command-line values, shared by the eval commands ----------------------------------


def check_finite(flag: str, value: float, low: float = 0.0, strict: bool = False) -> None:
    """RunError unless ``value`` is a finite number >= ``low`` (> ``low`` when ``strict``)."""
    if not math.isfinite(value) or value < low or (strict and value == low):
        relation = ">" if strict else ">="
        raise RunError(f"{flag} must be a finite number {relation} {low:g}, got {value}")


_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str | None, flag: str = "--device", auto: bool = False) -> None:
    """RunError for a device that is not cpu, cuda or cuda:N, or a CUDA device this host lacks."""
    if device is None or (auto and device == "auto"):
        return
    if not _DEVICE_RE.fullmatch(device):
        also = ", auto" if auto else ""
        raise RunError(f"{flag} {device!r}: use cpu, cuda or cuda:N{also}")
    if device == "cpu":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= count:
        raise RunError(f"{flag} {device}: this host has {count} visible CUDA device(s)")


def _check_folder(folder: Path, flag: str, given: Path) -> None:
    """RunError unless ``folder`` is, or can be made as, a folder this process can write."""
    above = next(p for p in [folder, *folder.parents] if p.exists() or p.is_symlink())
    if not above.is_dir():
        what = "is a file, not a folder" if above == given else f"is below a file ({above})"
        raise RunError(f"{flag} {given} {what}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise RunError(f"{flag} {given}: {above} is not writable")


def atomic_leftover(name: str, targets: Iterable[str]) -> bool:
    """Whether ``name`` is what an interrupted `shards_spec.atomic` write of one of ``targets``
    left beside it (`shards_spec.atomic.is_leftover`)."""
    return any(is_leftover(name, target) for target in targets)


def foreign_files(
    folder: Path, allowed: frozenset[str] | set[str], leftovers_of: Iterable[str] = ()
) -> str | None:
    """The files of ``folder`` outside ``allowed``, named for a message ("a.png and 2 more"),
    or None when there are none. What an interrupted atomic write of one of ``leftovers_of``
    left behind (`atomic_leftover`) is not foreign."""
    leftovers_of = tuple(leftovers_of)
    foreign = sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in allowed and not atomic_leftover(p.name, leftovers_of)
    )
    if not foreign:
        return None
    return foreign[0] + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output folder that exists or can be made, and is writable (RunError otherwise)."""
    path = Path(path)
    _check_folder(path, flag, path)
    return path


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output file whose folder exists or can be made, and is writable; not a folder."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{flag} {path} is a folder: give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise RunError(f"{flag} {path} is not writable")
    _check_folder(path.parent, flag, path)
    return path
