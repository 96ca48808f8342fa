"""From options to a ready run: the build checked, the stream, model, fixed sets and checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards_spec import Build, open_build
from shards_spec.atomic import atomic_write_text
from shards_spec.format import FLOW_MAG_SINCE, MANIFEST_NAME, has_flow_mag
from train import checkpoint, data, diagnostics, folder_lock
from train.diffusion import Schedule
from train.distributed import World, broadcast_float
from train.metrics import METRICS_NAME, read_metrics
from train.objectives import FLOW_STATS, Method, Options, auto_sigma_div, get_method
from train.options import TrainConfig, check, resolve_defaults
from train.unet import PRESETS, UNet, build_unet, layout_refusal, model_cost

CONFIG_NAME = "config.json"
# folders `eval watch` writes into a run folder from its checkpoints; a fresh start removes them
DERIVED_DIRS = ("evals", "samples")


@dataclass(kw_only=True)
class Run:
    """Everything the training loop needs, prepared from the options by `prepare`."""

    cfg: TrainConfig  # the options, resolved (batch, epochs, sigma, image size filled in)
    world: World  # this process's rank, the world size and the device
    out: Path  # the run folder
    method: Method  # the objective and what it reads of a window
    opts: Options  # the objective's knobs
    frames: tuple[int, ...]  # the frames of each window the method trains on
    stream: data.Stream  # this rank's train windows
    total_steps: int
    sched: Schedule
    model: UNet
    state: dict[str, Any] | None  # the checkpoint resumed from (None: a fresh start)
    val: diagnostics.FixedSet | None  # rank 0's fixed validation frames (None: not validating)
    probe: diagnostics.FixedSet | None  # fixed windows of the gradient-variance probe
    resolved: dict[str, Any]  # what config.json records: the options and the derived values
    best_val: float = float("inf")
    finished: bool = False  # the run had reached its last step already (nothing to do)


def build_id(build: Build) -> str:
    """A short hash of what the build holds (its source and every shard's checksum)."""
    m = build.manifest
    blob = json.dumps([m["source"].get("fingerprint"), m["splits"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(cfg: TrainConfig, world: World, stack: contextlib.ExitStack) -> Run:
    """Check the options, the build and the run folder; load the checkpoint to resume from.

    Rank 0 locks the run folder on `stack` (held until the caller closes it).
    """
    cfg = resolve_defaults(cfg)
    check(cfg)
    out = Path(cfg.out)
    if world.main:
        check_out(out, Path(cfg.shards))
    cfg = dataclasses.replace(cfg, shards=os.path.abspath(cfg.shards))
    method = get_method(cfg.method)
    build = open_build(cfg.shards)
    K = build.window
    if method.window and K < 2:
        raise data.DataError(f"{build.path}: windows of {K} frame; {method.name} needs 2 or more")
    frames = tuple(range(K)) if method.window else (K // 2,)
    flow_key = FLOW_STATS[cfg.flow_stat]
    if cfg.flow_stat == "mag":
        require_flow_mag(build)
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
    if cfg.val_every and "val" not in build.splits:
        raise data.DataError(f"{build.path} has no 'val' split: pass --val-every 0")
    dev = world.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    workers = cfg.workers if cfg.workers is not None else (4 if dev.type == "cuda" else 1)
    stream = data.stream_for(
        build,
        "train",
        frames=frames,
        image_size=image_size,
        batch=cfg.batch,
        seed=cfg.seed,
        rank=world.rank,
        world=world.size,
        workers=workers,
        url_template=cfg.shard_url,
        verify=cfg.verify_shards,
        flow_key=flow_key,
    )
    S = stream.steps_per_epoch
    total = cfg.epochs * S if cfg.max_steps is None else min(cfg.epochs * S, cfg.max_steps)
    sigma, flow_scale = flow_parameters(cfg, build)
    sched = Schedule(kind=cfg.schedule, prediction=cfg.prediction).to(dev)
    probe = None
    if cfg.diag_every or (method.name == "divergence" and cfg.sigma_div is None):
        f, m, _ = data.fixed_windows(
            build,
            "train",
            cfg.probe_size,
            frames,
            image_size,
            cfg.shard_url,
            cfg.verify_shards,
            flow_key,
        )
        probe = diagnostics.probe_set(f, m, method, sched.T, dev)
    sigma_div = cfg.sigma_div
    if method.name == "divergence" and sigma_div is None:
        gen = torch.Generator(dev).manual_seed(diagnostics.FIXED_SEED + 2)
        sigma_div = broadcast_float(world, auto_sigma_div(sched, probe.x0, cfg.delta, gen))
    cfg = dataclasses.replace(
        cfg, image_size=image_size, sigma=sigma, flow_scale=flow_scale, sigma_div=sigma_div
    )
    opts = Options(
        lam=cfg.lam,
        weighting=cfg.weighting,
        sigma=sigma if sigma is not None else 1.0,  # None: inverse weights, which do not read it
        flow_scale=flow_scale if flow_scale is not None else 1.0,  # only inverse reads it
        delta=cfg.delta,
        sigma_div=sigma_div or 1.0,  # only divergence reads it, and it always has one
        disp_weight=cfg.disp_weight,
        disp_block=cfg.disp_block,
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
    if world.main:
        stack.callback(folder_lock.release, _lock(out))
    state, finished = _resume_state(cfg, world, out, resolved)
    val = None
    if cfg.val_every and not finished and world.main:
        f, m, _ = data.fixed_windows(
            build,
            "val",
            cfg.val_size,
            (K // 2,),
            image_size,
            cfg.shard_url,
            cfg.verify_shards,
            flow_key,
        )
        val = diagnostics.validation_set(f, m[:, :0], sched.T, dev)
    if world.main and not finished:
        _announce(cfg, method, resolved, stream, out)
    run = Run(
        cfg=cfg,
        world=world,
        out=out,
        method=method,
        opts=opts,
        frames=frames,
        stream=stream,
        total_steps=total,
        sched=sched,
        model=model,
        state=state,
        val=val,
        probe=probe,
        resolved=resolved,
        finished=finished,
    )
    best = checkpoint.best_step(out)
    if best is not None and state is not None:
        run.best_val = float(json.loads((out / checkpoint.BEST_NAME).read_text())["val_loss"])
    return run


def require_flow_mag(build: Build) -> None:
    """ValueError (one line) unless the build's windows carry flow_mag (spec 1.1 and later)."""
    if not has_flow_mag(build.manifest):
        raise ValueError(
            f"--flow-stat mag needs the windows' flow_mag (spec {FLOW_MAG_SINCE} and later), and "
            f"{build.path} is a spec {build.manifest['spec_version']} build without it: rebuild "
            "it with this version (`pipeline build` with the same options; its track cache is "
            "reused, stage 1 recomputed once per track because older caches lack the magnitude)"
        )


def median_flow_stat(build: Build, stat: str) -> float:
    """The manifest's median train value of the flow statistic `stat` (msq: its sigma; mag:
    its mag_stats p50); ValueError (one line) when that is not a positive number."""
    flow = build.manifest["flow"]
    if stat == "msq":
        return float(flow["sigma"])
    value = (flow.get("mag_stats") or {}).get("percentiles", {}).get("p50")
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"{build.path}: the manifest's median train flow_mag (flow.mag_stats p50) is "
            f"{value!r}, not a positive number: pass --sigma or --flow-scale NUMBER"
        )
    return float(value)


def flow_parameters(cfg: TrainConfig, build: Build) -> tuple[float | None, float | None]:
    """sigma and flow_scale as config.json records them: sigma for exp weights (--sigma, or the
    median of the chosen flow statistic), flow_scale for inverse ones (--flow-scale, 1 by
    default, or that median for ``median``); the other is None."""
    if cfg.weighting == "inverse":
        scale = 1.0 if cfg.flow_scale is None else cfg.flow_scale
        return None, median_flow_stat(build, cfg.flow_stat) if scale == "median" else float(scale)
    sigma = cfg.sigma if cfg.sigma is not None else median_flow_stat(build, cfg.flow_stat)
    return sigma, None


def check_out(out: Path, shards: Path) -> None:
    """Raise ValueError (one line) unless `out` can be a run folder: a folder (or none yet)
    with no file above it, writable, and outside the build."""
    where = Path(os.path.abspath(out))
    try:
        if where.exists() and not where.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        existing = next(p for p in [where, *where.parents] if p.exists())
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot look there ({exc.strerror or exc})") from None
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no folder can be made below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {existing} (no permission)")
    real, build = Path(os.path.realpath(where)), Path(os.path.realpath(shards))
    if (build / MANIFEST_NAME).is_file() and (real == build or build in real.parents):
        raise ValueError(f"--out {out} is inside the build {shards}: put the run folder outside it")
    for name in (CONFIG_NAME, METRICS_NAME, checkpoint.BEST_NAME):  # what the run writes there
        file = where / name
        if file.exists() and not file.is_file():
            raise ValueError(
                f"--out {out}: {name} there is not a file (a folder?): move it away or use "
                "another --out"
            )


def _lock(out: Path) -> int:
    """Make the run folder and lock it for this process (FolderBusy names the holder)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        return folder_lock.acquire(out, "run folder")
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _resume_state(
    cfg: TrainConfig, world: World, out: Path, resolved: dict
) -> tuple[dict | None, bool]:
    """The checkpoint to resume from (None: a fresh start) and whether the run is finished.

    Writes config.json (rank 0), unless the run had finished already. A fresh start removes
    what an earlier run left in `out`, and the run gets a new ``run_id``.
    """
    if world.main:
        checkpoint.remove_temporaries(out)
    state = checkpoint.load_latest(out) if cfg.resume else None
    finished = False
    if state is None:
        if world.main:
            _start_afresh(out, cfg.resume)
        resolved["run_id"] = uuid.uuid4().hex
    else:
        existing = _saved_config(out) if world.main else {}
        why = layout_refusal(cfg.preset, state["config"].get("unet"))
        if state["config"].get("preset") == cfg.preset and why:
            raise checkpoint.CheckpointError(
                f"the checkpoint in {out} is of another model: {why}; use another --out or "
                "--no-resume"
            )
        checkpoint.check_compatible(state["config"], resolved)
        step, total = int(state["step"]), resolved["total_steps"]
        if step > total:
            raise ValueError(
                f"the checkpoint in {out} is at step {step}, past this command's last step "
                f"{total}: pass a --max-steps (or --epochs) of {step} or more to go on, or "
                "--no-resume to start over"
            )
        finished = step == total and world.main and _finished_at(out) == step
        resolved["run_id"] = (
            state["config"].get("run_id") or existing.get("run_id") or uuid.uuid4().hex
        )
        for key in ("workers", "world_size"):
            if state["config"].get(key) != resolved[key] and world.main and not finished:
                print(
                    f"warning: {key} changed since the checkpoint "
                    f"({state['config'].get(key)} -> {resolved[key]}); the data order from "
                    "here on differs from an uninterrupted run",
                    file=sys.stderr,
                )
    finished = bool(broadcast_float(world, float(finished)))  # rank 0 read the metrics
    if world.main and not finished:
        atomic_write_text(out / CONFIG_NAME, json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    return state, finished


def _start_afresh(out: Path, resume: bool) -> None:
    """Remove the checkpoints of `out` and all made from them: best.json, the metrics and
    (in a folder that held a run) the evaluations and samples of `eval watch`."""
    saved = checkpoint.steps_saved(out)
    removed = [f"{len(saved)} checkpoint{'s' if len(saved) != 1 else ''}"] if saved else []
    for step in saved:
        checkpoint.path_for(out, step).unlink(missing_ok=True)
    for name in (checkpoint.BEST_NAME, METRICS_NAME):
        if (out / name).exists():
            (out / name).unlink()
            removed.append(name)
    if (out / CONFIG_NAME).exists():
        for name in DERIVED_DIRS:
            path = out / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                continue
            removed.append(f"{name}/")
    if removed:
        why = "no checkpoint loads" if saved else "no checkpoint yet"
        why = why if resume else "--no-resume"
        print(
            f"{why}: starting {out} over from step 0; removed {', '.join(removed)}",
            file=sys.stderr,
        )


def _saved_config(out: Path) -> dict:
    """The run folder's config.json ({} when there is none); ValueError when it is not a
    JSON object."""
    file = out / CONFIG_NAME
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not JSON"
        raise ValueError(f"{file} is unreadable ({why}): repair or remove it") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{file} is not a JSON object (a {type(config).__name__}): repair or remove it"
        )
    return config


def _finished_at(out: Path) -> int | None:
    """The step of the run's ``finished`` record, if it is the last record of its metrics."""
    try:
        records = read_metrics(out)
    except FileNotFoundError:
        return None
    if records and records[-1].get("kind") == "finished":
        return int(records[-1]["step"])
    return None


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
