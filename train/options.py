"""The trainer's options: one dataclass, its command line, and the values resolved from a build."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from shards_spec.cli import add_debug_flag
from train.diffusion import DEFAULT_PREDICTION, DEFAULT_SCHEDULE, PREDICTIONS, SCHEDULES
from train.objectives import FLOW_STATS, METHODS, WEIGHTINGS, WINDOW_METHODS
from train.recipes import RECIPES, recipe_options, recipe_per_kind, unknown_recipe

# the paper's settings: baselines 256 frames for 500 epochs, window methods 128 windows for 300
PAPER_BATCH = {"windows": 128, "frames": 256}
PAPER_EPOCHS = {"windows": 300, "frames": 500}
# the value of a field a run made before the field existed ran with (resume and evaluation read
# an old config.json through this)
LEGACY_DEFAULTS = {
    "schedule": "linear",
    "prediction": "eps",
    "ema_warmup": False,
    "recipe": None,
    "precision": "auto",
    "weighting": "exp",
    "flow_stat": "msq",
    "flow_scale": None,
    "hflip": False,
}
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("cuda", "cpu")


# Every value a run records in config.json belongs to some of three classes, stated once here
# (on each TrainConfig field as metadata, and in RESOLVED for the values a run derives) and read
# by the lists below:
#   resumable: a resumed run may give it another value (how long and how it runs, not what it
#              learns); any other value must match the checkpoint's
#   variant:   runs that differ in it are different variants in a report (what is learnt and
#              from which data); seeds, outputs, run length and machinery are not
#   study:     set by the study runner for every cell; a study file may not set it


def _field(default=None, *, resumable: bool = False, variant: bool = True, study: bool = False):
    meta = {"resumable": resumable, "variant": variant, "study": study}
    return dataclasses.field(default=default, metadata=meta)


# how long it runs, where, and what it logs: never a variant, and may change on resume
_MACHINERY = {"resumable": True, "variant": False}


@dataclass
class TrainConfig:
    shards: str = _field("shards", **_MACHINERY, study=True)
    method: str = _field("flow")
    out: str = _field("runs/flow", **_MACHINERY, study=True)
    preset: str = _field("tiny")
    batch: int | None = _field()  # global: windows (window methods) or frames (iid, dispersive)
    grad_accum: int = _field(1, variant=False)
    lam: float = _field(1.0)
    weighting: str = _field("exp")  # flow: exp(-m / sigma) or 1 / (1 + m / flow_scale)
    flow_stat: str = _field("msq")  # flow: m is the pair's flow_msq or flow_mag
    sigma: float | None = _field()
    flow_scale: float | str | None = _field()  # a number or "median"; resolved to a number
    delta: int = _field(5)
    sigma_div: float | None = _field()
    disp_weight: float = _field(0.5)
    disp_block: str = _field("mid")
    seed: int = _field(0, variant=False, study=True)
    epochs: int | None = _field(**_MACHINERY, study=True)
    max_steps: int | None = _field(**_MACHINERY, study=True)
    lr: float = _field(1e-4)
    warmup: int = _field(0)
    clip: float = _field(1.0)
    ema: float = _field(0.9995)
    ema_warmup: bool = _field(True)
    schedule: str = _field(DEFAULT_SCHEDULE)
    prediction: str = _field(DEFAULT_PREDICTION)
    precision: str = _field("auto")
    # a name for defaults: the values it set are checked (and make variants) as themselves
    recipe: str | None = _field(**_MACHINERY)
    ckpt_every: int = _field(1000, **_MACHINERY, study=True)
    keep: int = _field(3, **_MACHINERY, study=True)
    val_every: int = _field(500, **_MACHINERY, study=True)
    val_size: int = _field(256, variant=False)
    diag_every: int = _field(1000, **_MACHINERY, study=True)
    probe_size: int = _field(16, variant=False)
    image_size: int | None = _field()
    hflip: bool = _field(False)  # each window flipped (all its frames) with probability 0.5
    workers: int | None = _field(**_MACHINERY)  # allowed on resume, with a warning: data order
    shard_url: str | None = _field(**_MACHINERY)
    verify_shards: bool = _field(False, **_MACHINERY)
    resume: bool = _field(True, **_MACHINERY, study=True)
    compile: bool = _field(False, **_MACHINERY)
    max_bad_fraction: float = _field(0.01, **_MACHINERY)
    max_bad_steps: int = _field(10, **_MACHINERY)
    progress: bool = _field(True, **_MACHINERY, study=True)
    tensorboard: bool = _field(False, **_MACHINERY)  # an output: RUN/tb mirrors metrics.jsonl
    device: str | None = _field(**_MACHINERY, study=True)
    dist_timeout: float = _field(600.0, **_MACHINERY)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_MUST_MATCH = {"resumable": False, "variant": False}  # what the run is, not a variant of it
_WHAT_IT_LEARNS = {"resumable": False, "variant": True}
# the values a run derives and records beside its options in config.json (train/setup.py)
RESOLVED = {
    "workers": _MACHINERY,  # the loader workers it ran with (the option may be None)
    "world_size": _MACHINERY,  # allowed on resume, with a warning: the data order changes
    "total_steps": _MACHINERY,
    "run_id": _MACHINERY,  # kept on resume; a checkpoint from before it existed has none
    "build_id": _WHAT_IT_LEARNS,
    "build_window": _WHAT_IT_LEARNS,
    "frames": _WHAT_IT_LEARNS,
    "unet": _MUST_MATCH,  # the preset's layout
    "steps_per_epoch": _MUST_MATCH,
    "params": _MUST_MATCH,
    "macs_per_image": _MUST_MATCH,
    "macs_per_sample": _MUST_MATCH,
}


def _keys(cls: str, value: bool = True) -> frozenset[str]:
    """The config.json keys whose class ``cls`` (resumable, variant, study) is ``value``."""
    fields = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    return frozenset(k for k, meta in {**fields, **RESOLVED}.items() if meta.get(cls) == value)


# config.json keys a resumed run may change (train/checkpoint.py compares all others)
RESUMABLE = _keys("resumable")
# config.json keys that do not make another variant (eval report groups runs by all others)
NOT_VARIANT = _keys("variant", False)
# options the study runner sets for every cell (eval/study.py)
STUDY_SET = _keys("study")


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m train",
        allow_abbrev=False,  # an option is taken only by its full name (a typo is an error)
        description=(
            "Train an image diffusion model on a build's windows (DDPM; the UNet predicts the "
            "noise or v). "
            "One process: python -m train ...; several GPUs or nodes: torchrun ... -m train "
            "... (rank and world from the environment; NCCL on CUDA, gloo on CPU). An epoch is "
            "one pass over the build's train windows: steps per epoch = windows // global "
            "batch, for every method (iid takes each window's centre frame, so each frame is "
            "seen about once per epoch); the windows left over differ from epoch to epoch."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    methods = "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
    recipes = "; ".join(f"{name}: {r.help}" for name, r in RECIPES.items())
    run = p.add_argument_group("run")
    run.add_argument(
        "--recipe",
        help="a named set of defaults, or several separated by commas, applied in order (a "
        "later recipe's value wins; options given on the command line win over all): "
        f"--recipe cpu-short,public-code. {recipes}",
    )
    run.add_argument("--shards", default=d.shards, help="the build (folder with dataset.json)")
    run.add_argument("--method", default=d.method, help=f"objective. {methods}")
    run.add_argument(
        "--out",
        default=d.out,
        help="run folder: config, metrics, checkpoints; outside the build, and one trainer at "
        "a time (a second is refused while the first holds OUT/.lock)",
    )
    run.add_argument(
        "--preset",
        default=d.preset,
        help="UNet size: tiny (CPU tests), small, base (paper scale, 128 px on a GPU)",
    )
    run.add_argument("--seed", type=int, default=d.seed, help="same seed, same run (on CPU)")
    run.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=d.resume,
        help="continue from the newest checkpoint in --out that loads; --no-resume starts "
        "over from step 0, as a run without a loadable checkpoint does: the checkpoints, "
        "best.json, metrics and eval watch's evals/ and samples/ in --out are deleted and the "
        "run gets a new run_id",
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument(
        "--batch",
        type=int,
        help="global batch over all ranks: windows for window methods (default 128) and frames "
        "for iid and dispersive (default 256), the paper's. The step-matched control is iid "
        "with K x the window batch",
    )
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    opt.add_argument(
        "--epochs",
        type=int,
        help="default: the paper's, 300 for window methods and 500 for iid and dispersive",
    )
    opt.add_argument("--max-steps", type=int, help="stop after this many steps (caps --epochs)")
    opt.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (the paper's)")
    opt.add_argument("--warmup", type=int, default=d.warmup, help="linear lr warmup steps")
    opt.add_argument("--clip", type=float, default=d.clip, help="gradient norm clip (0: off)")
    opt.add_argument("--ema", type=float, default=d.ema, help="EMA decay (the paper's)")
    opt.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=d.ema_warmup,
        help="EMA decay min(--ema, (1 + n) / (10 + n)) at step n (diffusers' EMAModel), so "
        "that the EMA of a short run follows the weights instead of the initialisation",
    )
    opt.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="noise schedule: linear betas 1e-4..0.02 (DDPM, the paper's) or cosine (iDDPM); "
        "sampling reads it from the run",
    )
    opt.add_argument(
        "--prediction",
        choices=PREDICTIONS,
        default=d.prediction,
        help="what the UNet outputs: eps, the noise (the paper's), or v = sqrt(abar) eps - "
        "sqrt(1 - abar) x0 (Salimans & Ho), whose x0 stays bounded at high noise; the "
        "regulariser compares predicted noise either way; sampling reads it from the run",
    )
    opt.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="autocast of the training forward pass: auto is bf16 on CUDA and fp32 on CPU; "
        "bf16 on a CPU with bfloat16 instructions (AVX512-BF16, AMX) is about 1.8x as fast "
        "(weights, optimizer and EMA stay float32)",
    )
    opt.add_argument(
        "--compile", action="store_true", help="torch.compile the model (CUDA; slow to start)"
    )
    obj = p.add_argument_group("objective")
    obj.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=d.lam,
        help="weight of the temporal regulariser (adjacent, flow, divergence)",
    )
    obj.add_argument(
        "--weighting",
        choices=list(WEIGHTINGS),
        default=d.weighting,
        help="flow: the weight of a pair from its flow statistic m (--flow-stat): exp is "
        "w = exp(-m / sigma) (the paper's text), inverse is w = 1 / (1 + m / --flow-scale) "
        "(the public code's, with m the mean flow magnitude and scale 1)",
    )
    obj.add_argument(
        "--flow-stat",
        choices=list(FLOW_STATS),
        default=d.flow_stat,
        help="flow: m is the pair's mean squared flow magnitude flow_msq (the paper's text) or "
        "its mean magnitude flow_mag (the public code's; builds of spec 1.1 or later)",
    )
    obj.add_argument(
        "--sigma",
        type=float,
        help="flow, --weighting exp: w = exp(-m / sigma) with this sigma (default: the "
        "manifest's median train m: its sigma for flow_msq, its mag_stats p50 for flow_mag)",
    )
    obj.add_argument(
        "--flow-scale",
        type=_flow_scale,
        help="flow, --weighting inverse: w = 1 / (1 + m / scale) with this positive scale, or "
        "'median': the manifest's median train m (the normalised variant) (default: 1); "
        "config.json records the number",
    )
    obj.add_argument("--delta", type=int, default=d.delta, help="divergence: finite step Delta")
    obj.add_argument(
        "--sigma-div",
        type=float,
        help="divergence: w = exp(-|Ddot| / sigma_div) (default: the median |Ddot| of the probe "
        "windows at random t, so a typical pair gets w = 0.37, like the flow sigma rule)",
    )
    obj.add_argument(
        "--disp-weight", type=float, default=d.disp_weight, help="dispersive: loss weight"
    )
    obj.add_argument(
        "--disp-block", default=d.disp_block, help="dispersive: UNet block (down0.., mid, up0..)"
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--image-size",
        type=int,
        help="train at this side, area-downsampled on load (default: the build's)",
    )
    data.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=d.hflip,
        help="flip each window horizontally (all its frames alike; a frame of iid and "
        "dispersive is its own window) with probability 0.5, the coin drawn from the seed, the "
        "step and the window's place in the global batch (exact resume, any world size); "
        "flow statistics are unchanged by a flip; never the validation or probe sets",
    )
    data.add_argument(
        "--workers",
        type=int,
        help="loader worker processes (default 4 on CUDA, 1 on CPU; 0 loads in the training "
        "process). Exact resume needs the same value",
    )
    data.add_argument(
        "--shard-url",
        help="read shards from here instead of the build folder: a prefix, or a webdataset "
        "URL with {path} (e.g. 'pipe:curl -s https://host/build/{path}')",
    )
    data.add_argument(
        "--verify-shards",
        action="store_true",
        help="hash each shard file (sha256) when it is first opened and stop when it differs "
        "from the manifest's checksum (local shards; reads each shard once more per worker)",
    )
    data.add_argument(
        "--max-bad-fraction",
        type=float,
        default=d.max_bad_fraction,
        help="stop when more than this fraction of an epoch's windows failed to decode",
    )
    log = p.add_argument_group("checkpoints and logging")
    log.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps per checkpoint")
    log.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept, plus the best")
    log.add_argument(
        "--val-every",
        type=int,
        default=d.val_every,
        help="steps per validation loss on a fixed val set with fixed t and eps (0: off)",
    )
    log.add_argument("--val-size", type=int, default=d.val_size, help="frames in the fixed val set")
    log.add_argument(
        "--diag-every",
        type=int,
        default=d.diag_every,
        help="steps per gradient-variance estimate (per-sample gradients, torch.func; 0: off)",
    )
    log.add_argument(
        "--probe-size", type=int, default=d.probe_size, help="windows in the fixed probe batch"
    )
    log.add_argument(
        "--max-bad-steps",
        type=int,
        default=d.max_bad_steps,
        help="stop after this many NaN/inf losses in a row (each is skipped)",
    )
    log.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    log.add_argument(
        "--tensorboard",
        action="store_true",
        help="rank 0 also writes the metrics.jsonl scalars as TensorBoard event files to "
        "OUT/tb/train (tensorboard --logdir OUT/tb; needs framebridge[tensorboard]); may be "
        "turned on or off on resume, the curves go on without repeats",
    )
    log.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    log.add_argument(
        "--dist-timeout",
        type=float,
        default=d.dist_timeout,
        help="seconds a rank waits for the others before the job stops (a node died); "
        "torchrun --max-restarts then resumes it from the last checkpoint",
    )
    return p


def parse(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a TrainConfig; a ``--recipe``'s values are the defaults under it."""
    return parse_command(argv)[0]


def parse_command(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """`parse`, and whether ``--debug`` (tracebacks, not a training option) was given."""
    p = parser()
    add_debug_flag(p)
    first = p.parse_args(argv)
    if first.recipe is not None:  # method: a recipe's flow-only values are for flow only
        p.set_defaults(**recipe_options(first.recipe, first.method))
    given = vars(p.parse_args(argv))
    debug = given.pop("debug")
    return TrainConfig(**given), debug


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the method-dependent defaults (batch, epochs, steps) in a copy of `cfg`.

    Without a recipe they are the paper's; a recipe names its own per kind of method (of
    several, the last that names them).
    """
    kind = "windows" if cfg.method in WINDOW_METHODS else "frames"
    batch = recipe_per_kind(cfg.recipe, "batch") or PAPER_BATCH
    epochs = recipe_per_kind(cfg.recipe, "epochs") or PAPER_EPOCHS
    steps = recipe_per_kind(cfg.recipe, "max_steps") or {}
    return dataclasses.replace(
        cfg,
        batch=cfg.batch if cfg.batch is not None else batch[kind],
        epochs=cfg.epochs if cfg.epochs is not None else epochs[kind],
        max_steps=cfg.max_steps if cfg.max_steps is not None else steps.get(kind),
    )


def check(cfg: TrainConfig) -> None:
    """Raise ValueError (one line) for values out of range (NaN and infinity included)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{_flag(f.name)} must be a finite number, got {value}")
    if cfg.device is not None and cfg.device not in DEVICES:
        raise ValueError(f"unknown device {cfg.device!r}: use one of {', '.join(DEVICES)}")
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}: use one of {', '.join(METHODS)}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    if cfg.prediction not in PREDICTIONS:
        raise ValueError(
            f"unknown prediction {cfg.prediction!r}: use one of {', '.join(PREDICTIONS)}"
        )
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    bad = unknown_recipe(cfg.recipe)
    if bad is not None:
        raise ValueError(
            f"unknown recipe {bad!r} in --recipe {cfg.recipe!r}: use one of "
            f"{', '.join(RECIPES)}, or several separated by commas"
        )
    _check_weighting(cfg)
    positive = {
        "batch": cfg.batch,
        "grad_accum": cfg.grad_accum,
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "ckpt_every": cfg.ckpt_every,
        "keep": cfg.keep,
        "val_size": cfg.val_size,
        "probe_size": cfg.probe_size,
        "max_bad_steps": cfg.max_bad_steps,
        "dist_timeout": cfg.dist_timeout,
    }
    for name in ("max_steps", "image_size", "sigma", "sigma_div", "delta"):
        if getattr(cfg, name) is not None:
            positive[name] = getattr(cfg, name)
    for name, value in positive.items():
        if value is None or value <= 0:
            raise ValueError(f"{_flag(name)} must be positive, got {value}")
    for name in ("lam", "warmup", "clip", "val_every", "diag_every", "disp_weight", "seed"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema < 1:
        raise ValueError(f"--ema must be in [0, 1), got {cfg.ema}")
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    if cfg.workers is not None and cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.workers}")


def _check_weighting(cfg: TrainConfig) -> None:
    """Raise ValueError (one line) for flow-weighting options that do not go together."""
    if cfg.weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {cfg.weighting!r}: use one of {', '.join(WEIGHTINGS)}")
    if cfg.flow_stat not in FLOW_STATS:
        raise ValueError(f"unknown flow stat {cfg.flow_stat!r}: use one of {', '.join(FLOW_STATS)}")
    if cfg.method != "flow":
        given = [
            f"{flag} {value}"
            for flag, value, default in (
                ("--weighting", cfg.weighting, "exp"),
                ("--flow-stat", cfg.flow_stat, "msq"),
                ("--flow-scale", cfg.flow_scale, None),
            )
            if value != default
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)}: for --method flow only (the flow weights), not {cfg.method}"
            )
    if cfg.weighting == "inverse" and cfg.sigma is not None:
        raise ValueError(
            "--sigma is exp's (w = exp(-m / sigma)); --weighting inverse takes --flow-scale"
        )
    if cfg.weighting == "exp" and cfg.flow_scale is not None:
        raise ValueError(
            "--flow-scale is inverse's (w = 1 / (1 + m / scale)); --weighting exp takes --sigma"
        )
    scale = cfg.flow_scale
    if scale is not None and scale != "median":
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ValueError(f"--flow-scale must be a positive number or 'median', got {scale!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"--flow-scale must be a positive number or 'median', got {scale}")


def _flow_scale(text: str) -> float | str:
    """--flow-scale as a number when it reads as one (argparse type); `check` refuses the
    rest but the word median, in one line."""
    try:
        return float(text)
    except ValueError:
        return text


def _flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--lambda" if name == "lam" else f"--{name.replace('_', '-')}"
