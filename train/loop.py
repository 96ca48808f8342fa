"""The training loop: config, setup, loop, checkpoint (in the style of nanoGPT's train.py)."""

from __future__ import annotations

import contextlib
import copy
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from train import checkpoint, data, diagnostics, distributed
from train.metrics import MetricsLog
from train.objectives import draw_noise
from train.setup import Run, prepare


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must see (one-line message)."""


def run(cfg) -> None:
    """Train as `cfg` says, on this process's share of the world torchrun describes."""
    world = distributed.setup(cfg.device)
    try:
        _train(prepare(cfg, world))
    finally:
        distributed.teardown()


def _train(r: Run) -> None:
    cfg, world, dev = r.cfg, r.world, r.world.device
    model = r.model
    ddp = (
        DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if world.distributed
        else model
    )
    net = torch.compile(ddp) if cfg.compile else ddp
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    init = [p.detach().clone() for p in model.parameters()]  # the seed's init, for travel
    start, wall0, images0, skipped = 0, 0.0, 0, 0
    if r.state is not None:
        model.load_state_dict(r.state["model"])
        ema.load_state_dict(r.state["ema"])
        opt.load_state_dict(r.state["optimizer"])
        start, wall0 = int(r.state["step"]), float(r.state["wall_s"])
        images0, skipped = int(r.state["images"]), int(r.state["skipped_steps"])
    log = MetricsLog(r.out, world.main)
    if r.state is not None:
        log.write({"kind": "resume", "step": start, "wall_s": wall0})
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else contextlib.nullcontext()
    )
    k = len(r.frames)
    per_step_images = cfg.batch * k
    stream = r.stream
    S = stream.steps_per_epoch
    batches = data.batches(stream, start, r.workers, pin_memory=dev.type == "cuda")
    bar = tqdm(
        total=r.total_steps,
        initial=start,
        disable=not (world.main and cfg.progress),
        desc=f"{cfg.method}",
        unit="step",
        dynamic_ncols=True,
    )
    t_run = time.perf_counter() - wall0
    bad_in_row, epoch_bad, epoch_bad_shards = 0, 0, set()
    epoch_sum = {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0}
    epoch = start // S
    images = images0
    for step in range(start, r.total_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        if batch["epoch"] != epoch:
            _epoch_summary(world, epoch, epoch_sum, epoch_bad)
            epoch, epoch_bad, epoch_bad_shards = batch["epoch"], 0, set()
            epoch_sum = dict.fromkeys(epoch_sum, 0.0)
        x0 = diagnostics.to_unit(batch["frames"], dev)
        msq = batch["flow_msq"].to(dev, non_blocking=True)
        torch.manual_seed(_step_seed(cfg.seed, world.rank, step))  # dropout: a function of step
        gen = torch.Generator(dev).manual_seed(_step_seed(cfg.seed, world.rank, step) + 1)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        diag = world.main and cfg.diag_every and (step + 1) % cfg.diag_every == 0
        local_check = world.distributed and cfg.diag_every and (step + 1) % cfg.diag_every == 0
        terms = _forward_backward(r, net, ddp, x0, msq, gen, autocast, local_check)
        ddp_dev = _ddp_deviation(world, model) if local_check else None
        epoch_bad_shards.update(batch["bad_shards"])
        sums = distributed.all_sum(
            world,
            torch.tensor(
                [terms.pop("loss"), float(batch["bad"]), *terms.values()],
                dtype=torch.float64,
                device=dev,
            ),
        )
        loss = float(sums[0]) / world.size
        epoch_bad += int(sums[1])
        terms = {
            name: float(v) / world.size for name, v in zip(terms, sums[2:].tolist(), strict=True)
        }
        _check_bad_windows(cfg, world, stream, epoch_bad, epoch_bad_shards)
        grad_norm = float("nan")
        if _finite(loss):
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or float("inf"))
            )
        if _finite(loss) and _finite(grad_norm):
            opt.step()
            _ema_update(ema, model, cfg.ema)
            bad_in_row = 0
        else:
            skipped += 1
            bad_in_row += 1
            if bad_in_row >= cfg.max_bad_steps:
                last = checkpoint.steps_saved(r.out)
                kept = (
                    f"the last checkpoint (step {last[-1]}) is intact"
                    if last
                    else "no checkpoint yet"
                )
                raise TrainingError(
                    f"{bad_in_row} steps in a row had a non-finite loss or gradient at step "
                    f"{step + 1}; stopping ({kept}). Lower --lr or raise --clip"
                )
        opt.zero_grad(set_to_none=True)
        images += per_step_images
        t2 = time.perf_counter()
        dt = t2 - t0
        epoch_sum["loss"] += loss if _finite(loss) else 0.0
        epoch_sum["steps"] += 1
        epoch_sum["wait"] += t1 - t0
        epoch_sum["time"] += dt
        record = {
            "step": step + 1,
            "epoch": epoch,
            "loss": loss,
            **terms,
            "lr": lr,
            "grad_norm": grad_norm,
            "param_dist": diagnostics.parameter_distance(model, init),
            "images": images,
            "windows": (step + 1) * cfg.batch,
            "images_per_s": per_step_images / dt,
            "windows_per_s": cfg.batch / dt,
            "data_wait": (t1 - t0) / dt,
            "wall_s": t2 - t_run,
            "skipped_steps": skipped,
            "bad_windows": epoch_bad,
        }
        log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", wait=f"{record['data_wait']:.0%}", refresh=False)
        done = step + 1 == r.total_steps
        if world.main and ddp_dev is not None:
            log.write({"kind": "diag_ddp", "step": step + 1, "ddp_grad_dev": ddp_dev})
        if diag:
            stats = diagnostics.gradient_variance(model, r.sched, r.method, r.opts, r.probe)
            log.write(
                {
                    "kind": "diag",
                    "step": step + 1,
                    "epoch": epoch,
                    "images": images,
                    "wall_s": time.perf_counter() - t_run,
                    "probe_size": len(r.probe),
                    **stats,
                }
            )
        state = lambda: _state(r, model, ema, opt, step + 1, epoch, images, skipped, t_run)  # noqa: E731, B023
        saved = False
        if world.main and r.val is not None and (done or (step + 1) % cfg.val_every == 0):
            val = diagnostics.validation_loss(model, r.sched, r.val)
            val_ema = diagnostics.validation_loss(ema, r.sched, r.val)
            log.write(
                {
                    "kind": "val",
                    "step": step + 1,
                    "epoch": epoch,
                    "images": images,
                    "wall_s": time.perf_counter() - t_run,
                    "val_loss": val,
                    "val_loss_ema": val_ema,
                    "val_size": len(r.val),
                }
            )
            best = checkpoint.best_step(r.out)
            if best is None or val_ema < r.best_val:
                checkpoint.save(r.out, step + 1, state(), cfg.keep)
                checkpoint.mark_best(r.out, step + 1, val_ema)
                r.best_val, saved = val_ema, True
        if world.main and not saved and (done or (step + 1) % cfg.ckpt_every == 0):
            checkpoint.save(r.out, step + 1, state(), cfg.keep)
    bar.close()
    _epoch_summary(world, epoch, epoch_sum, epoch_bad)
    log.close()


def _forward_backward(r: Run, net, ddp, x0, msq, gen, autocast, local_check: bool) -> dict:
    """Loss terms of one step, accumulated over ``--grad-accum`` micro-batches; grads set."""
    cfg = r.cfg
    parts = list(zip(x0.chunk(cfg.grad_accum), msq.chunk(cfg.grad_accum), strict=True))
    sums: dict[str, float] = {}
    for i, (x, m) in enumerate(parts):
        noise = draw_noise(tuple(x.shape), r.method.shared_noise, r.sched.T, gen, x.device)
        last = i == len(parts) - 1
        sync = (
            contextlib.nullcontext()
            if (last and not local_check) or ddp is r.model
            else ddp.no_sync()
        )
        with sync:
            with autocast:
                per_window, terms = r.method.objective(net, r.sched, x, m, noise, r.opts)
            loss = per_window.float().mean()
            (loss / len(parts)).backward()
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach().float().mean()) / len(parts)
    return sums


def _ddp_deviation(world, model) -> float:
    """||g_local - g_mean||^2 averaged over ranks; leaves the all-reduced mean in .grad."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.clone() for g in grads]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    dev = sum(float((a - b).double().pow(2).sum()) for a, b in zip(local, grads, strict=True))
    return (
        float(
            distributed.all_sum(world, torch.tensor([dev], dtype=torch.float64, device=flat.device))
        )
        / world.size
    )


def _check_bad_windows(cfg, world, stream, epoch_bad: int, shards: set) -> None:
    allowed = cfg.max_bad_fraction * stream.steps_per_epoch * stream.batch * world.size
    if epoch_bad > allowed:
        where = ", ".join(sorted(shards)) or "shards read by other ranks"
        raise data.DataError(
            f"{epoch_bad} windows of this epoch failed to decode, more than --max-bad-fraction "
            f"{cfg.max_bad_fraction} of {stream.steps_per_epoch * stream.batch * world.size} "
            f"(in {where}): check the build with `pipeline validate`"
        )


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step * 2) % (2**62)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    e = list(ema.parameters())
    torch._foreach_lerp_(e, [p.detach() for p in model.parameters()], 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(mb)


def _state(r: Run, model, ema, opt, step, epoch, images, skipped, t_run) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": {},  # bf16 autocast needs no loss scaler; kept for the checkpoint's shape
        "step": step,
        "epoch": epoch,
        "images": images,
        "skipped_steps": skipped,
        "wall_s": time.perf_counter() - t_run,
        "rng": rng,
        "loader": {
            "next_batch": step,
            "epoch": step // r.stream.steps_per_epoch,
            "step_in_epoch": step % r.stream.steps_per_epoch,
            "slots": r.stream.slots,
            "world": r.world.size,
        },
        "config": r.resolved,
    }


def _epoch_summary(world, epoch: int, s: dict, bad: int) -> None:
    if not world.main or not s["steps"]:
        return
    msg = (
        f"epoch {epoch}: {int(s['steps'])} steps, mean loss {s['loss'] / s['steps']:.4f}, "
        f"data wait {s['wait'] / max(s['time'], 1e-9):.0%}, {bad} bad windows"
    )
    tqdm.write(msg, file=sys.stderr)
