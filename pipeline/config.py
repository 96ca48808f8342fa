"""What a build is asked to do: its configuration and runtime, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import frames as fr
from pipeline.sources import SOURCES, SourceError, parse_selection


class BuildError(RuntimeError):
    """A build that cannot start or go on; the message is one line for the user."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes of the output (recorded in the manifest)."""

    src: str = "synthetic"
    root: str | None = None
    size: int = 128
    flow: str = "auto"
    flow_size: int | None = None
    flow_weights: str | None = None
    flow_precision: str = "fp32"
    flow_batch: int = 8
    raft_iters: int = 12
    keep_flow: int = 0
    keep_mask: bool = False
    window: int = 3
    split_by: str = "sequence"
    val_fraction: float = 0.05
    max_windows: int | None = None
    seed: int = 0
    shard_size: int = 1000
    mask: str = "fg"
    mask_root: str | None = None
    bg: str = "black"
    cameras: str | None = None
    sequences: str | None = None
    frame_stride: int = 1
    max_clips: int | None = None
    all_frames: bool = False
    synth_sequences: int = 8
    synth_cameras: int = 2
    synth_frames: int = 32
    synth_size: int = 224


@dataclass(frozen=True)
class Runtime:
    """How the build runs; never changes the output."""

    out: str = "shards"
    workers: int | None = None
    address: str | None = None
    overwrite: bool = False
    progress: bool = True
    flow_actors: int | None = None
    keep_work: bool = False
    drop_cache: bool = False  # remove OUT/.cache (the track cache) after a successful build


def _at_least(name: str, value, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise BuildError(f"--{name.replace('_', '-')} must be an integer >= {low}, not {value!r}")


def check_config(cfg: BuildConfig) -> None:
    """Reject bad options before any work starts: one line each."""
    if cfg.src not in SOURCES:
        expected = f"{', '.join(SOURCES[:-1])} or {SOURCES[-1]}"
        raise SourceError(f"unknown source {cfg.src!r}: expected {expected}")
    for name in ("size", "flow_size"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or v < 8 or v % 8):
            raise BuildError(
                f"--{name.replace('_', '-')} must be a positive multiple of 8, not {v}"
            )
    for name, high in (("size", 2048), ("flow_size", 2048), ("keep_flow", 1024)):
        v = getattr(cfg, name)
        if v is not None and v > high:
            raise BuildError(f"--{name.replace('_', '-')} must be at most {high}, not {v}")
    for name, low in (("window", 2), ("shard_size", 1), ("seed", 0), ("max_windows", 1),
                      ("keep_flow", 0), ("flow_batch", 1), ("raft_iters", 1),
                      ("frame_stride", 1), ("max_clips", 1), ("synth_sequences", 1),
                      ("synth_cameras", 1), ("synth_frames", 1)):  # fmt: skip
        _at_least(name, getattr(cfg, name), low)
    if not 0 <= cfg.val_fraction < 1:
        raise BuildError("--val-fraction must be in [0, 1)")
    if cfg.split_by not in ("sequence", "subject"):
        raise BuildError("--split-by must be sequence or subject")
    if cfg.flow_precision not in ("fp32", "bf16", "fp16"):
        raise BuildError("--flow-precision must be fp32, bf16 or fp16")
    if cfg.mask not in ("fg", "hand", "none"):
        raise BuildError(f"--mask must be fg, hand or none, not {cfg.mask!r}")
    if cfg.keep_mask and cfg.src in ("handco", "synthetic") and cfg.mask == "none":
        raise BuildError("--keep-mask needs masks: not with --mask none")
    if cfg.src != "video" and cfg.mask_root:
        raise BuildError("--mask-root is for --src video; HanCo masks come from --mask")
    parse_selection(cfg.cameras, "cameras")
    parse_selection(cfg.sequences, "sequences")
    fr.parse_bg(cfg.bg)


def check_runtime(rt: Runtime) -> None:
    _at_least("workers", rt.workers, 1)
    _at_least("flow_actors", rt.flow_actors, 1)
