"""From options to a ready run: the build checked, the stream, model, fixed sets and checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards_spec import Build, open_build
from train import checkpoint, data, diagnostics
from train.diffusion import Schedule
from train.distributed import World, broadcast_float
from train.metrics import METRICS_NAME
from train.objectives import Method, Options, auto_sigma_div, get_method
from train.options import TrainConfig, check, resolve_defaults
from train.unet import PRESETS, UNet, build_unet, model_cost

CONFIG_NAME = "config.json"


@dataclass
class Run:
    cfg: TrainConfig
    world: World
    out: Path
    method: Method
    opts: Options
    frames: tuple[int, ...]
    stream: data.Stream
    workers: int
    total_steps: int
    sched: Schedule
    model: UNet
    state: dict[str, Any] | None
    val: diagnostics.FixedSet | None
    probe: diagnostics.FixedSet | None
    resolved: dict[str, Any]
    best_val: float = float("inf")


def build_id(build: Build) -> str:
    """A short hash of what the build holds (its source and every shard's checksum)."""
    m = build.manifest
    blob = json.dumps([m["source"].get("fingerprint"), m["splits"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(cfg: TrainConfig, world: World) -> Run:
    cfg = resolve_defaults(cfg)
    check(cfg)
    method = get_method(cfg.method)
    build = open_build(cfg.shards)
    K = build.window
    if method.window and K < 2:
        raise data.DataError(f"{build.path}: windows of {K} frame; {method.name} needs 2 or more")
    frames = tuple(range(K)) if method.window else (K // 2,)
    image_size = cfg.image_size or build.image_size
    if image_size > build.image_size:
        raise ValueError(
            f"--image-size {image_size} is larger than the build's {build.image_size}: "
            "frames are only downsampled"
        )
    if cfg.batch % (world.size * cfg.grad_accum):
        raise ValueError(
            f"--batch {cfg.batch} must divide into {world.size} ranks x --grad-accum "
            f"{cfg.grad_accum}"
        )
    dev = world.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    workers = cfg.workers if cfg.workers is not None else (4 if dev.type == "cuda" else 1)
    stream = data.stream_for(
        build,
        "train",
        frames,
        image_size,
        cfg.batch,
        cfg.seed,
        world.rank,
        world.size,
        workers,
        cfg.shard_url,
    )
    S = stream.steps_per_epoch
    total = cfg.epochs * S if cfg.max_steps is None else min(cfg.epochs * S, cfg.max_steps)
    sigma = cfg.sigma if cfg.sigma is not None else float(build.manifest["flow"]["sigma"])
    sched = Schedule(kind=cfg.schedule, prediction=cfg.prediction).to(dev)
    probe = None
    if cfg.diag_every or (method.name == "divergence" and cfg.sigma_div is None):
        f, m, _ = data.fixed_windows(
            build, "train", cfg.probe_size, frames, image_size, cfg.shard_url
        )
        probe = diagnostics.probe_set(f, m, method, sched.T, dev)
    sigma_div = cfg.sigma_div
    if method.name == "divergence" and sigma_div is None:
        gen = torch.Generator(dev).manual_seed(diagnostics.FIXED_SEED + 2)
        sigma_div = broadcast_float(world, auto_sigma_div(sched, probe.x0, cfg.delta, gen))
    cfg = dataclasses.replace(cfg, image_size=image_size, sigma=sigma, sigma_div=sigma_div)
    opts = Options(
        cfg.lam, sigma, cfg.delta, sigma_div or 1.0, cfg.disp_weight, 0.5, cfg.disp_block
    )
    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.preset, image_size)
    if method.name == "dispersive" and cfg.disp_block not in model.block_names():
        raise ValueError(
            f"--disp-block {cfg.disp_block!r}: use one of {', '.join(model.block_names())}"
        )
    macs, params = model_cost(model, image_size)
    model.to(dev)
    resolved = {
        **cfg.to_json(),
        "workers": workers,
        "world_size": world.size,
        "build_id": build_id(build),
        "build_window": K,
        "frames": list(frames),
        "unet": dataclasses.asdict(PRESETS[cfg.preset]),
        "steps_per_epoch": S,
        "total_steps": total,
        "params": params,
        "macs_per_image": macs,
        "macs_per_sample": macs * len(frames),
    }
    out = Path(cfg.out)
    state = _resume_state(cfg, world, out, resolved)
    val = None
    if cfg.val_every:
        if "val" not in build.splits:
            raise data.DataError(f"{build.path} has no 'val' split: pass --val-every 0")
        if world.main:
            f, m, _ = data.fixed_windows(
                build, "val", cfg.val_size, (K // 2,), image_size, cfg.shard_url
            )
            val = diagnostics.validation_set(f, m[:, :0], sched.T, dev)
    if world.main:
        _announce(cfg, method, resolved, stream, out)
    run = Run(
        cfg,
        world,
        out,
        method,
        opts,
        frames,
        stream,
        workers,
        total,
        sched,
        model,
        state,
        val,
        probe,
        resolved,
    )
    best = checkpoint.best_step(out)
    if best is not None and state is not None:
        run.best_val = float(json.loads((out / checkpoint.BEST_NAME).read_text())["val_loss"])
    return run


def _resume_state(cfg: TrainConfig, world: World, out: Path, resolved: dict) -> dict | None:
    saved = checkpoint.steps_saved(out)
    if saved and not cfg.resume:
        if world.main:
            for step in saved:
                checkpoint.path_for(out, step).unlink()
            for name in (METRICS_NAME, checkpoint.BEST_NAME):
                (out / name).unlink(missing_ok=True)
            print(
                f"--no-resume: removed {len(saved)} checkpoints and the metrics of {out}",
                file=sys.stderr,
            )
        saved = []
    state = checkpoint.load_latest(out) if saved else None
    if state is not None:
        checkpoint.check_compatible(state["config"], resolved)
        for key in ("workers", "world_size"):
            if state["config"].get(key) != resolved[key] and world.main:
                print(
                    f"warning: {key} changed since the checkpoint "
                    f"({state['config'].get(key)} -> {resolved[key]}); the data order from "
                    "here on differs from an uninterrupted run",
                    file=sys.stderr,
                )
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{CONFIG_NAME}.tmp"
        tmp.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / CONFIG_NAME)
    return state


def _announce(cfg, method, resolved, stream, out) -> None:
    k, macs = len(resolved["frames"]), resolved["macs_per_image"]
    print(
        f"model {cfg.preset} at {cfg.image_size}px: {resolved['params'] / 1e6:.2f}M parameters, "
        f"{macs / 1e9:.3f} GMACs per image; {method.name} pushes {k} frame"
        f"{'s' if k > 1 else ''} per sample: {macs * k / 1e9:.3f} GMACs per training sample "
        "(forward)",
        file=sys.stderr,
    )
    print(
        f"{stream.total} train windows, global batch {cfg.batch}, {stream.steps_per_epoch} "
        f"steps per epoch, {resolved['total_steps']} steps; run folder {out}",
        file=sys.stderr,
    )
