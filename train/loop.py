"""The training loop: setup, loop, evaluate and checkpoint (in the style of nanoGPT's train.py).

Everything the loop needs is prepared in `train.setup`. One window's way from a shard to the
loss: `train.data` streams it (decoded, as uint8, and `to_unit` in [-1, 1]); `train_step`
below draws its noise and runs the method of `train.objectives`, which noises it with the
schedule of `train.diffusion` and calls the UNet of `train.unet`. The loop around the step does
the accounting (bad windows, skipped steps, the metrics record), evaluation and checkpoints.
Noise and dropout are seeded from ``(seed, rank, step)``, so a run resumed from a checkpoint
takes exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import math
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

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_bad, self.epoch_shards = epoch, 0, set()
        self.sums = dict.fromkeys(self.sums, 0.0)

    def add_to_epoch(self, loss: float, wait: float, dt: float) -> None:
        """A step in the epoch's summary (a non-finite loss adds 0 to the mean loss)."""
        loss = loss if math.isfinite(loss) else 0.0
        for key, value in (("loss", loss), ("steps", 1), ("wait", wait), ("time", dt)):
            self.sums[key] += value


def train(cfg) -> None:
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


def _train(run: Run) -> None:
    if run.finished:
        print(f"{run.out}: the run finished at step {run.total_steps} already", file=sys.stderr)
        return
    parts, counts = _parts(run), _counters(run)
    batches = data.batches(run.stream, counts.step, pin_memory=run.world.device.type == "cuda")
    bar = tqdm(
        total=run.total_steps,
        initial=counts.step,
        desc=run.cfg.method,
        unit="step",
        disable=not (run.world.main and run.cfg.progress),
        dynamic_ncols=True,
    )
    try:  # the loader's workers stop however the loop ends (an error, SIGTERM, SIGINT)
        _loop(run, parts, counts, batches, bar)
    finally:
        batches.close()
        bar.close()
        parts.log.close()


def _loop(run: Run, parts: Parts, counts: Counters, batches, bar) -> None:
    """Steps from the checkpoint's (or 0) to the last, each logged, evaluated and saved."""
    cfg = run.cfg
    if run.state is not None:
        parts.log.write(
            {"kind": "resume", "step": counts.step, "wall_s": float(run.state["wall_s"])}
        )
    for step in range(counts.step, run.total_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t0
        if batch["epoch"] != counts.epoch:
            _epoch_summary(run, counts)
            counts.new_epoch(batch["epoch"])
        _count_bad_windows(run, counts, batch)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        done = train_step(run, parts, batch, step, lr)
        _count_skipped(run, counts, done.stepped, step)
        if done.ddp_dev is not None:
            parts.log.write({"kind": "diag_ddp", "step": step + 1, "ddp_grad_dev": done.ddp_dev})
        record = {
            "step": step + 1,
            "epoch": counts.epoch,
            **done.terms,
            "lr": lr,
            "grad_norm": done.grad_norm,
            "param_dist": diagnostics.parameter_distance(parts.model, parts.init),
        }
        dt = time.perf_counter() - t0
        counts.step, counts.images = step + 1, counts.images + cfg.batch * len(run.frames)
        record.update(
            images=counts.images,
            windows=counts.step * cfg.batch,
            images_per_s=cfg.batch * len(run.frames) / dt,
            windows_per_s=cfg.batch / dt,
            data_wait=wait / dt,
            wall_s=time.perf_counter() - counts.t_run,
            skipped_steps=counts.skipped,
            bad_windows=counts.epoch_bad,
        )
        parts.log.write(record)
        counts.add_to_epoch(record["loss"], wait, dt)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", wait=f"{wait / dt:.0%}", refresh=False)
        _evaluate_and_save(run, parts, counts)
    _epoch_summary(run, counts)
    parts.log.write({"kind": "finished", "step": counts.step})


@dataclass
class StepResult:
    terms: dict[str, float]  # "loss" and the method's terms, averaged over micro-batches, ranks
    grad_norm: float  # before clipping (NaN when the loss was not finite)
    stepped: bool  # False: the loss or the gradient was not finite, and the step was skipped
    ddp_dev: float | None  # the DDP gradient check on diagnostic steps under torchrun


def train_step(run: Run, parts: Parts, batch: dict, step: int, lr: float) -> StepResult:
    """One optimizer step on `batch`: forward and backward over the ``--grad-accum``
    micro-batches, loss averaged over ranks, clip, step, EMA. The noise (and ``--hflip``'s
    coins) is seeded from ``(seed, step)`` and dropout from ``(seed, rank, step)``, so a
    resumed run repeats it."""
    cfg, world = run.cfg, run.world
    x0 = data.to_unit(batch["frames"], world.device)
    if cfg.hflip:
        x0 = data.hflip_windows(x0, cfg.seed, step, world.rank, world.size)
    flow_stat = batch["flow_stat"].to(world.device, non_blocking=True)
    torch.manual_seed(_step_seed(cfg.seed, world.rank + 1, step))  # dropout: per rank
    gen = torch.Generator(world.device).manual_seed(_step_seed(cfg.seed, 0, step))  # noise
    noise = _rank_noise(run, x0.shape, gen)
    for group in parts.opt.param_groups:
        group["lr"] = lr
    # on a diagnostic step DDP does not all-reduce: _ddp_deviation does, comparing the ranks
    check_ddp = world.distributed and _due(cfg.diag_every, step + 1)
    micro = list(
        zip(*(v.chunk(cfg.grad_accum) for v in (x0, flow_stat, noise.t, noise.eps)), strict=True)
    )
    local: dict[str, float] = {}
    for i, (x, m, t, eps) in enumerate(micro):
        with _no_sync(parts, sync=i == len(micro) - 1 and not check_ddp):
            with _autocast(cfg.precision, x.device):
                per_window, terms = run.method.objective(
                    parts.net, run.sched, x, m, Noise(t, eps), run.opts
                )
            loss = per_window.float().mean()
            (loss / len(micro)).backward()
        for name, value in {"loss": loss, **terms}.items():
            local[name] = local.get(name, 0.0) + float(value.detach().float().mean()) / len(micro)
    ddp_dev = _ddp_deviation(world, parts.model) if check_ddp else None
    terms = _mean_over_ranks(world, local)
    grad_norm = math.nan
    if math.isfinite(terms["loss"]):
        clip = cfg.clip or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parts.model.parameters(), clip))
    stepped = math.isfinite(terms["loss"]) and math.isfinite(grad_norm)
    if stepped:
        parts.opt.step()
        _ema_update(parts.ema, parts.model, ema_decay(cfg.ema, cfg.ema_warmup, step))
    parts.opt.zero_grad(set_to_none=True)
    return StepResult(terms, grad_norm, stepped, ddp_dev)


def _no_sync(parts: Parts, sync: bool):
    """DDP's no_sync (gradients kept local) unless `sync`; nothing to do without DDP."""
    return (
        parts.ddp.no_sync()
        if parts.ddp is not parts.model and not sync
        else contextlib.nullcontext()
    )


def _autocast(precision: str, device: torch.device):
    """bf16 autocast of the forward pass (``--precision``: auto is bf16 on CUDA only)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mean_over_ranks(world, local: dict[str, float]) -> dict[str, float]:
    values = torch.tensor(list(local.values()), dtype=torch.float64, device=world.device)
    sums = distributed.all_sum(world, values).tolist()
    return {name: v / world.size for name, v in zip(local, sums, strict=True)}


def _rank_noise(run: Run, shape, gen) -> Noise:
    """This rank's slice of the global batch's noise: the same draws under any world size."""
    b = shape[0]
    full = draw_noise(
        (b * run.world.size, *shape[1:]), run.method.shared_noise, run.sched.T, gen, gen.device
    )
    part = slice(run.world.rank * b, (run.world.rank + 1) * b)
    return Noise(full.t[part], full.eps[part])


def _count_bad_windows(run: Run, counts: Counters, batch: dict) -> None:
    """Add the batch's replaced windows (all ranks) to the epoch's; DataError past the limit."""
    bad = torch.tensor([float(batch["bad"])], dtype=torch.float64, device=run.world.device)
    counts.epoch_bad += int(distributed.all_sum(run.world, bad)[0])
    counts.epoch_shards.update(batch["bad_shards"])
    per_epoch = run.stream.steps_per_epoch * run.cfg.batch
    if counts.epoch_bad > run.cfg.max_bad_fraction * per_epoch:
        where = ", ".join(sorted(counts.epoch_shards)) or "shards read by other ranks"
        raise data.DataError(
            f"{counts.epoch_bad} of this epoch's {per_epoch} windows failed to decode, more than "
            f"--max-bad-fraction {run.cfg.max_bad_fraction} (in {where}); "
            "check the build with `pipeline validate`"
        )


def _count_skipped(run: Run, counts: Counters, stepped: bool, step: int) -> None:
    """Count a skipped step; TrainingError after ``--max-bad-steps`` of them in a row."""
    if stepped:
        counts.bad_in_row = 0
        return
    counts.skipped, counts.bad_in_row = counts.skipped + 1, counts.bad_in_row + 1
    if counts.bad_in_row >= run.cfg.max_bad_steps:
        saved = checkpoint.steps_saved(run.out)
        kept = f"the checkpoint of step {saved[-1]} is intact" if saved else "none saved"
        raise TrainingError(
            f"{counts.bad_in_row} steps in a row had a non-finite loss or gradient (step "
            f"{step + 1}); stopped ({kept}). Lower --lr or set --clip"
        )


def _evaluate_and_save(run: Run, parts: Parts, counts: Counters) -> None:
    """Rank 0: gradient variance, validation loss (a new best is saved) and checkpoints."""
    cfg, step = run.cfg, counts.step
    if not run.world.main:
        return
    done = step == run.total_steps
    where = {"step": step, "epoch": counts.epoch, "images": counts.images}
    if _due(cfg.diag_every, step) and run.probe is not None:
        stats = diagnostics.gradient_variance(
            parts.model, run.sched, run.method, run.opts, run.probe
        )
        parts.log.write(
            {
                "kind": "diag",
                **where,
                "wall_s": time.perf_counter() - counts.t_run,
                "probe_size": len(run.probe),
                **stats,
            }
        )
    saved = False
    if run.val is not None and (done or _due(cfg.val_every, step)):
        val = diagnostics.validation_loss(parts.model, run.sched, run.val)
        val_ema = diagnostics.validation_loss(parts.ema, run.sched, run.val)
        parts.log.write(
            {
                "kind": "val",
                **where,
                "wall_s": time.perf_counter() - counts.t_run,
                "val_loss": val,
                "val_loss_ema": val_ema,
                "val_size": len(run.val),
            }
        )
        if val_ema < run.best_val:
            parts.log.sync()
            checkpoint.save(run.out, step, _state(run, parts, counts), cfg.keep)
            checkpoint.mark_best(run.out, step, val_ema)
            run.best_val, saved = val_ema, True
    if not saved and (done or _due(cfg.ckpt_every, step)):
        parts.log.sync()
        checkpoint.save(run.out, step, _state(run, parts, counts), cfg.keep)


def _parts(run: Run) -> Parts:
    model, dev = run.model, run.world.device
    ddp = model
    if run.world.distributed:
        ids = [dev.index] if dev.type == "cuda" else None
        ddp = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    init = [q.detach().clone() for q in model.parameters()]  # before any checkpoint is loaded
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=run.cfg.lr, weight_decay=0.0)
    if run.state is not None:
        model.load_state_dict(run.state["model"])
        ema.load_state_dict(run.state["ema"])
        opt.load_state_dict(run.state["optimizer"])
    net = torch.compile(ddp) if run.cfg.compile else ddp
    resumed = None if run.state is None else int(run.state["step"])
    # the checkpoint's run mirrored every record up to it into RUN/tb/train
    complete = run.state is not None and bool(run.state["config"].get("tensorboard"))
    log = MetricsLog(run.out, run.world.main, run.cfg.tensorboard, resumed, complete)
    return Parts(model, ddp, net, ema, opt, init, log)


def _counters(run: Run) -> Counters:
    counts = Counters(t_run=time.perf_counter())
    state = run.state
    if state is not None:
        counts.step, counts.images = int(state["step"]), int(state["images"])
        counts.skipped = int(state["skipped_steps"])
        counts.t_run -= float(state["wall_s"])
        counts.epoch = counts.step // run.stream.steps_per_epoch
        if int(state.get("epoch", -1)) == counts.epoch:  # saved mid-epoch: its bad windows
            counts.epoch_bad = int(state.get("epoch_bad", 0))  # (0 before the count existed)
            counts.epoch_shards = set(state.get("epoch_bad_shards", []))
    return counts


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


def _state(run: Run, parts: Parts, counts: Counters) -> dict:
    S = run.stream.steps_per_epoch
    return {
        "model": parts.model.state_dict(),
        "ema": parts.ema.state_dict(),
        "optimizer": parts.opt.state_dict(),
        "step": counts.step,
        "epoch": counts.epoch,
        "images": counts.images,
        "skipped_steps": counts.skipped,
        "epoch_bad": counts.epoch_bad,  # windows replaced so far in this epoch, all ranks
        "epoch_bad_shards": sorted(counts.epoch_shards),
        "wall_s": time.perf_counter() - counts.t_run,
        "loader": {
            "next_batch": counts.step,
            "epoch": counts.step // S,
            "step_in_epoch": counts.step % S,
            "lanes": run.stream.lanes,
            "world": run.world.size,
        },
        "config": run.resolved,
    }


def _epoch_summary(run: Run, counts: Counters) -> None:
    s = counts.sums
    if not run.world.main or not s["steps"]:
        return
    tqdm.write(
        f"epoch {counts.epoch}: {int(s['steps'])} steps, mean loss {s['loss'] / s['steps']:.4f}, "
        f"data wait {s['wait'] / max(s['time'], 1e-9):.0%}, {counts.epoch_bad} bad windows",
        file=sys.stderr,
    )


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step * 2) % (2**62)


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
