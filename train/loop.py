"""The training loop: setup, loop, evaluate and checkpoint (in the style of nanoGPT's train.py).

Everything the loop needs is prepared in `train.setup`; objectives, loader, model and schedule
live in their own modules. Noise and dropout are seeded from ``(seed, rank, step)``, so a run
resumed from a checkpoint takes exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from train import checkpoint, data, diagnostics, distributed
from train.metrics import MetricsLog, require_tensorboard
from train.objectives import Noise, draw_noise
from train.options import check, resolve_defaults
from train.setup import Run, prepare

# DDP on CPU: a 1x1 conv's gradient has equivalent but differently written strides (harmless)
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must see (one-line message)."""


@dataclass
class Parts:
    model: torch.nn.Module  # the module itself (checkpoints, EMA, diagnostics)
    ddp: torch.nn.Module  # DDP-wrapped under torchrun, else the model
    net: torch.nn.Module  # what the objectives call (compiled with --compile)
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    init: list[torch.Tensor]  # initial parameters, for the distance travelled
    log: MetricsLog


@dataclass
class Counters:
    step: int = 0
    images: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss
    bad_in_row: int = 0
    epoch: int = 0
    epoch_bad: int = 0  # windows replaced this epoch (all ranks)
    epoch_shards: set = field(default_factory=set)
    sums: dict = field(default_factory=lambda: {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0})
    t_run: float = 0.0  # perf_counter at wall_s = 0 (earlier runs' time included)


def run(cfg) -> None:
    """Train as `cfg` says, on this process's share of the world torchrun describes."""
    check(resolve_defaults(cfg))  # before the device and the process group are set up
    if cfg.tensorboard:
        require_tensorboard()
    world = distributed.setup(cfg.device, cfg.dist_timeout)
    try:
        with contextlib.ExitStack() as stack:  # rank 0 holds the run folder's lock in it
            _train(prepare(cfg, world, stack))
    finally:
        distributed.teardown()


def _train(r: Run) -> None:
    if r.finished:
        print(f"{r.out}: the run finished at step {r.total_steps} already", file=sys.stderr)
        return
    p, c = _parts(r), _counters(r)
    batches = data.batches(r.stream, c.step, pin_memory=r.world.device.type == "cuda")
    bar = tqdm(
        total=r.total_steps,
        initial=c.step,
        desc=r.cfg.method,
        unit="step",
        disable=not (r.world.main and r.cfg.progress),
        dynamic_ncols=True,
    )
    try:  # the loader's workers stop however the loop ends (an error, SIGTERM, SIGINT)
        _loop(r, p, c, batches, bar)
    finally:
        batches.close()
        bar.close()
        p.log.close()


def _loop(r: Run, p: Parts, c: Counters, batches, bar) -> None:
    if r.state is not None:
        p.log.write({"kind": "resume", "step": c.step, "wall_s": float(r.state["wall_s"])})
    for step in range(c.step, r.total_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t0
        if batch["epoch"] != c.epoch:
            _epoch_summary(r, c)
            c.epoch, c.epoch_bad, c.epoch_shards = batch["epoch"], 0, set()
            c.sums = dict.fromkeys(c.sums, 0.0)
        record = _step(r, p, c, batch, step)
        dt = time.perf_counter() - t0
        c.step, c.images = step + 1, c.images + r.cfg.batch * len(r.frames)
        record.update(
            images=c.images,
            windows=c.step * r.cfg.batch,
            images_per_s=r.cfg.batch * len(r.frames) / dt,
            windows_per_s=r.cfg.batch / dt,
            data_wait=wait / dt,
            wall_s=time.perf_counter() - c.t_run,
            skipped_steps=c.skipped,
            bad_windows=c.epoch_bad,
        )
        p.log.write(record)
        loss = record["loss"] if _finite(record["loss"]) else 0.0
        for key, value in (("loss", loss), ("steps", 1), ("wait", wait), ("time", dt)):
            c.sums[key] += value
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", wait=f"{wait / dt:.0%}", refresh=False)
        _evaluate_and_save(r, p, c)
    _epoch_summary(r, c)
    p.log.write({"kind": "finished", "step": c.step})


def _step(r: Run, p: Parts, c: Counters, batch: dict, step: int) -> dict:
    """One optimizer step on `batch`; returns its record (losses averaged over ranks)."""
    cfg, world, dev = r.cfg, r.world, r.world.device
    x0 = diagnostics.to_unit(batch["frames"], dev)
    msq = batch["flow_msq"].to(dev, non_blocking=True)
    torch.manual_seed(_step_seed(cfg.seed, world.rank + 1, step))  # dropout: per rank
    gen = torch.Generator(dev).manual_seed(_step_seed(cfg.seed, 0, step))  # noise: global
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    for group in p.opt.param_groups:
        group["lr"] = lr
    check_ddp = world.distributed and _due(cfg.diag_every, step + 1)
    terms = _forward_backward(r, p, x0, msq, gen, sync=not check_ddp)
    ddp_dev = _ddp_deviation(world, p.model) if check_ddp else None
    names = list(terms)
    sums = distributed.all_sum(
        world,
        torch.tensor([float(batch["bad"]), *terms.values()], dtype=torch.float64, device=dev),
    )
    c.epoch_bad += int(sums[0])
    c.epoch_shards.update(batch["bad_shards"])
    _check_bad_windows(r, c)
    terms = {n: float(v) / world.size for n, v in zip(names, sums[1:].tolist(), strict=True)}
    grad_norm = float("nan")
    if _finite(terms["loss"]):
        clip = cfg.clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(p.model.parameters(), clip))
    if _finite(terms["loss"]) and _finite(grad_norm):
        p.opt.step()
        _ema_update(p.ema, p.model, ema_decay(cfg.ema, cfg.ema_warmup, step))
        c.bad_in_row = 0
    else:
        c.skipped, c.bad_in_row = c.skipped + 1, c.bad_in_row + 1
        if c.bad_in_row >= cfg.max_bad_steps:
            saved = checkpoint.steps_saved(r.out)
            kept = f"the checkpoint of step {saved[-1]} is intact" if saved else "none saved"
            raise TrainingError(
                f"{c.bad_in_row} steps in a row had a non-finite loss or gradient (step "
                f"{step + 1}); stopped ({kept}). Lower --lr or set --clip"
            )
    p.opt.zero_grad(set_to_none=True)
    if ddp_dev is not None:
        p.log.write({"kind": "diag_ddp", "step": step + 1, "ddp_grad_dev": ddp_dev})
    return {
        "step": step + 1,
        "epoch": c.epoch,
        **terms,
        "lr": lr,
        "grad_norm": grad_norm,
        "param_dist": diagnostics.parameter_distance(p.model, p.init),
    }


def _forward_backward(r: Run, p: Parts, x0, msq, gen, sync: bool) -> dict[str, float]:
    """Loss terms of one step over ``--grad-accum`` micro-batches; gradients left in .grad.

    With ``sync`` False, DDP does not all-reduce (the caller does it, to compare local and
    global gradients).
    """
    noise = _rank_noise(r, x0.shape, gen)
    chunks = [c.chunk(r.cfg.grad_accum) for c in (x0, msq, noise.t, noise.eps)]
    parts = list(zip(*chunks, strict=True))
    bf16 = r.cfg.precision == "bf16" or (r.cfg.precision == "auto" and x0.device.type == "cuda")
    autocast = (
        torch.autocast(x0.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    sums: dict[str, float] = {}
    for i, (x, m, t, eps) in enumerate(parts):
        last = i == len(parts) - 1
        quiet = p.ddp is not p.model and not (last and sync)
        with p.ddp.no_sync() if quiet else contextlib.nullcontext():
            with autocast:
                per_window, terms = r.method.objective(p.net, r.sched, x, m, Noise(t, eps), r.opts)
            loss = per_window.float().mean()
            (loss / len(parts)).backward()
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach().float().mean()) / len(parts)
    return sums


def _rank_noise(r: Run, shape, gen) -> Noise:
    """This rank's slice of the global batch's noise: the same draws under any world size."""
    b = shape[0]
    full = draw_noise(
        (b * r.world.size, *shape[1:]), r.method.shared_noise, r.sched.T, gen, gen.device
    )
    part = slice(r.world.rank * b, (r.world.rank + 1) * b)
    return Noise(full.t[part], full.eps[part])


def _evaluate_and_save(r: Run, p: Parts, c: Counters) -> None:
    """Rank 0: gradient variance, validation loss (a new best is saved) and checkpoints."""
    cfg, step = r.cfg, c.step
    if not r.world.main:
        return
    done = step == r.total_steps
    where = {"step": step, "epoch": c.epoch, "images": c.images}
    if _due(cfg.diag_every, step) and r.probe is not None:
        stats = diagnostics.gradient_variance(p.model, r.sched, r.method, r.opts, r.probe)
        p.log.write(
            {
                "kind": "diag",
                **where,
                "wall_s": time.perf_counter() - c.t_run,
                "probe_size": len(r.probe),
                **stats,
            }
        )
    saved = False
    if r.val is not None and (done or _due(cfg.val_every, step)):
        val = diagnostics.validation_loss(p.model, r.sched, r.val)
        val_ema = diagnostics.validation_loss(p.ema, r.sched, r.val)
        p.log.write(
            {
                "kind": "val",
                **where,
                "wall_s": time.perf_counter() - c.t_run,
                "val_loss": val,
                "val_loss_ema": val_ema,
                "val_size": len(r.val),
            }
        )
        if val_ema < r.best_val:
            p.log.sync()
            checkpoint.save(r.out, step, _state(r, p, c), cfg.keep)
            checkpoint.mark_best(r.out, step, val_ema)
            r.best_val, saved = val_ema, True
    if not saved and (done or _due(cfg.ckpt_every, step)):
        p.log.sync()
        checkpoint.save(r.out, step, _state(r, p, c), cfg.keep)


def _parts(r: Run) -> Parts:
    model, dev = r.model, r.world.device
    ddp = model
    if r.world.distributed:
        ids = [dev.index] if dev.type == "cuda" else None
        ddp = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    init = [q.detach().clone() for q in model.parameters()]  # before any checkpoint is loaded
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r.cfg.lr, weight_decay=0.0)
    if r.state is not None:
        model.load_state_dict(r.state["model"])
        ema.load_state_dict(r.state["ema"])
        opt.load_state_dict(r.state["optimizer"])
    net = torch.compile(ddp) if r.cfg.compile else ddp
    resumed = None if r.state is None else int(r.state["step"])
    # the checkpoint's run mirrored every record up to it into RUN/tb/train
    complete = r.state is not None and bool(r.state["config"].get("tensorboard"))
    log = MetricsLog(r.out, r.world.main, r.cfg.tensorboard, resumed, complete)
    return Parts(model, ddp, net, ema, opt, init, log)


def _counters(r: Run) -> Counters:
    c = Counters(t_run=time.perf_counter())
    if r.state is not None:
        s = r.state
        c.step, c.images, c.skipped = int(s["step"]), int(s["images"]), int(s["skipped_steps"])
        c.t_run -= float(s["wall_s"])
        c.epoch = c.step // r.stream.steps_per_epoch
        if int(s.get("epoch", -1)) == c.epoch:  # saved mid-epoch: its bad windows count on
            c.epoch_bad = int(s.get("epoch_bad", 0))  # 0 in a checkpoint from before the count
            c.epoch_shards = set(s.get("epoch_bad_shards", []))
    return c


def _ddp_deviation(world, model) -> float:
    """All-reduce the gradients by hand; return ||g_local - g_mean||^2 averaged over ranks."""
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    local = torch.cat([g.flatten() for g in grads])
    mean = local.clone()
    torch.distributed.all_reduce(mean)
    mean /= world.size
    for g, m in zip(grads, mean.split([g.numel() for g in grads]), strict=True):
        g.copy_(m.view_as(g))
    dev = (local - mean).double().pow(2).sum().reshape(1)
    return float(distributed.all_sum(world, dev)) / world.size


def _check_bad_windows(r: Run, c: Counters) -> None:
    per_epoch = r.stream.steps_per_epoch * r.cfg.batch
    if c.epoch_bad > r.cfg.max_bad_fraction * per_epoch:
        where = ", ".join(sorted(c.epoch_shards)) or "shards read by other ranks"
        raise data.DataError(
            f"{c.epoch_bad} of this epoch's {per_epoch} windows failed to decode, more than "
            f"--max-bad-fraction {r.cfg.max_bad_fraction} (in {where}); "
            "check the build with `pipeline validate`"
        )


def _state(r: Run, p: Parts, c: Counters) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    S = r.stream.steps_per_epoch
    return {
        "model": p.model.state_dict(),
        "ema": p.ema.state_dict(),
        "optimizer": p.opt.state_dict(),
        "scaler": {},  # bf16 autocast needs no loss scaler
        "step": c.step,
        "epoch": c.epoch,
        "images": c.images,
        "skipped_steps": c.skipped,
        "epoch_bad": c.epoch_bad,  # windows replaced so far in this epoch, all ranks
        "epoch_bad_shards": sorted(c.epoch_shards),
        "wall_s": time.perf_counter() - c.t_run,
        "rng": rng,
        "loader": {
            "next_batch": c.step,
            "epoch": c.step // S,
            "step_in_epoch": c.step % S,
            "lanes": r.stream.lanes,
            "world": r.world.size,
        },
        "config": r.resolved,
    }


def _epoch_summary(r: Run, c: Counters) -> None:
    s = c.sums
    if not r.world.main or not s["steps"]:
        return
    tqdm.write(
        f"epoch {c.epoch}: {int(s['steps'])} steps, mean loss {s['loss'] / s['steps']:.4f}, "
        f"data wait {s['wait'] / max(s['time'], 1e-9):.0%}, {c.epoch_bad} bad windows",
        file=sys.stderr,
    )


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step * 2) % (2**62)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def ema_decay(ema: float, warmup: bool, step: int) -> float:
    """The EMA decay at (0-based) ``step``; with warmup, diffusers' ``EMAModel`` rule.

    ``min(ema, (1 + step) / (10 + step))``, and 0 at step 0 (the EMA starts as a copy of the
    first updated weights): 0.5 at step 8, 0.99 at step 890. A function of the step alone, so
    a resumed run averages exactly as an uninterrupted one.
    """
    if not warmup:
        return ema
    return 0.0 if step == 0 else min(ema, (1 + step) / (10 + step))


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    torch._foreach_lerp_(
        list(ema.parameters()), [q.detach() for q in model.parameters()], 1.0 - decay
    )
    for eb, mb in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(mb)
