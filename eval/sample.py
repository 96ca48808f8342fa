"""DDIM samples of a training run's checkpoint as numbered PNGs (`python -m eval sample`).

Image ``i`` draws its initial noise ``x_T`` and then one noise tensor per DDIM step from its own
CPU generator, seeded from ``(seed, i)`` only, and the model is always called with exactly
``batch`` rows (a short last chunk is padded), so an image's bytes do not depend on which other
indices share its batch, on its position there, on resuming or on the number of ranks. They
can depend on ``batch`` itself and on the device, through the float rounding of the kernels
(oneDNN/MKL and cuDNN choose algorithms by shape): on CPU, float32, a tiny UNet's eps differs
by ~5e-7 between batch 1..16 and 17+, which moves an odd pixel by one level.

The output folder is resumable: ``DIR/{index:06d}.png`` already present are skipped, each file
is written under a temporary name and renamed (`shards_spec.atomic`), and ``DIR/sample.json`` records what the folder
holds so that a later call with another run, checkpoint or sampler is refused; a non-empty
folder without that record is refused too (its PNGs are not this command's). ``n`` in the record
is the largest count asked for, and ``complete`` and ``written`` say how many of those are there.
One process samples into a folder at a time (a lock on ``DIR/.lock``; a second one is refused
with the holder's PID). Under torchrun, rank ``r`` of ``w`` takes the indices ``i`` with
``i % w == r``; rank 0 holds the lock.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from eval.runs import (
    RunError,
    atomic_leftover,
    check_device,
    check_finite,
    check_out_dir,
    foreign_files,
    load,
)
from shards_spec.atomic import atomic_write_bytes, atomic_write_text
from train import distributed, folder_lock
from train.diffusion import Schedule, ddim_step, ddim_timesteps

RECORD_NAME = "sample.json"
# what a resumed DIR shares; run_id changes when the run starts over (same folder, new model)
MUST_MATCH = ("run", "run_id", "step", "ema", "steps", "eta", "seed", "clip_x0")
# what a folder sampled before a field existed was sampled with
RECORD_LEGACY = {"clip_x0": False, "run_id": None}
# what may be in a folder before its first record: the lock and a killed write of the record
# (`eval.runs.atomic_leftover` of RECORD_NAME: .sample.json.*.tmp)
BEFORE_RECORD = frozenset({folder_lock.LOCK_NAME, f".{RECORD_NAME}.tmp"})


def image_name(index: int) -> str:
    """File name of image ``index`` (``000042.png``)."""
    return f"{index:06d}.png"


def image_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, index)`` only (numpy SeedSequence mixing)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for the model call: bf16 on CUDA by default, none on CPU by default."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B, 3, H, W) -> uint8 RGB (B, H, W, 3), ``round((x + 1) * 127.5)``."""
    x = x.float().clamp(-1.0, 1.0)
    out = torch.round((x + 1.0) * 127.5).to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def _noise(gens: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """One standard normal tensor of ``shape`` per generator, stacked, on ``device``."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


@torch.no_grad()
def _sample_batch(
    model: torch.nn.Module,
    sched: Schedule,
    indices: Sequence[int],
    seed: int,
    timesteps: list[int],
    eta: float,
    width: int,
    device: torch.device,
    dtype: torch.dtype | None,
    clip: bool,
) -> np.ndarray:
    """DDIM-sample one chunk of at most ``width`` indices -> uint8 (len(indices), H, W, 3).

    The model sees ``width`` rows every call (zero rows pad a short chunk), so that its kernels
    and hence the rounding of each row do not change with the chunk's length.
    """
    size = int(model.image_size)
    shape = (3, size, size)
    gens = [image_generator(seed, i) for i in indices]
    x = _noise(gens, shape, device)
    pad = torch.zeros((width - len(indices), *shape), device=device)
    tt = torch.empty(width, dtype=torch.long, device=device)
    nexts = timesteps[1:] + [-1]
    for t, t_prev in zip(timesteps, nexts, strict=True):
        with _autocast(device, dtype):
            out = model(torch.cat([x, pad]), tt.fill_(t))
        out = out[: len(indices)].float()
        noise = _noise(gens, shape, device) if eta > 0 else None
        x = ddim_step(sched, x, out, t, t_prev, eta, noise, clip)
    return to_uint8(x)


def sample(
    model: torch.nn.Module,
    sched: Schedule,
    indices: Sequence[int],
    seed: int,
    steps: int,
    eta: float,
    batch: int,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    clip: bool = False,
) -> np.ndarray:
    """DDIM samples of ``indices`` -> uint8 RGB (n, H, W, 3), in the order of ``indices``.

    ``x_T ~ N(0, I)``; image ``i``'s noise depends on ``(seed, i)`` only, and every model
    call has ``batch`` rows, so the image does not depend on its neighbours or position (and
    on ``batch`` and the device only through kernel rounding, see the module doc). ``dtype``
    is the autocast dtype of the model call (None: bfloat16 on CUDA, no autocast elsewhere);
    eps and the DDIM update are float32. ``clip`` clamps each step's predicted x0 to [-1, 1]
    (and re-derives eps from it), as ``eval sample`` does by default.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = torch.device(device)
    timesteps = ddim_timesteps(sched.T, steps)
    size = int(model.image_size)
    parts = [np.zeros((0, size, size, 3), np.uint8)]
    for start in range(0, len(indices), batch):
        chunk = list(indices[start : start + batch])
        images = _sample_batch(
            model,
            sched,
            chunk,
            seed=seed,
            timesteps=timesteps,
            eta=eta,
            width=batch,
            device=device,
            dtype=dtype,
            clip=clip,
        )
        parts.append(images)
    return np.concatenate(parts)


def write_png(folder: Path, index: int, image: np.ndarray) -> Path:
    """Write one uint8 RGB image as ``folder/{index:06d}.png`` atomically (temp, rename)."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise OSError(f"could not encode image {index} as PNG")
    path = folder / image_name(index)
    atomic_write_bytes(path, data.tobytes())
    return path


def todo(folder: Path, n: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's indices (``i % world == rank``) below ``n`` without a finished PNG."""
    return [i for i in range(rank, n, world) if not (folder / image_name(i)).is_file()]


def remove_stale_temps(folder: Path, rank: int = 0, world: int = 1) -> None:
    """Delete temporary PNGs of this rank's indices that a killed write left behind
    (``.000042.png.*.tmp``, or ``.000042.png.tmp`` of an older writer), and on rank 0 those of
    the record."""
    for tmp in {*folder.glob(".*.png.tmp"), *folder.glob(".*.png.*.tmp")}:
        stem = tmp.name[1:].split(".", 1)[0]
        if stem.isdigit() and int(stem) % world == rank:
            tmp.unlink(missing_ok=True)
    if rank == 0:
        for tmp in folder.glob(f".{RECORD_NAME}.*"):
            if atomic_leftover(tmp.name, [RECORD_NAME]):
                tmp.unlink(missing_ok=True)


def read_record(folder: Path) -> dict[str, Any] | None:
    """``folder/sample.json``, or None when there is none (RunError when unreadable)."""
    file = folder / RECORD_NAME
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunError(f"{file}: unreadable ({exc})") from None


def check_record(folder: Path, record: dict[str, Any]) -> None:
    """Refuse (RunError) a folder whose sample.json differs from ``record`` in MUST_MATCH, or a
    non-empty folder without one (its files are not this command's)."""
    old = read_record(folder)
    if old is None:
        foreign = foreign_files(folder, BEFORE_RECORD, leftovers_of=[RECORD_NAME])
        if foreign:
            raise RunError(
                f"{folder} holds files ({foreign}) but no {RECORD_NAME}: not a folder of eval "
                "sample; use an empty or new --out"
            )
        return
    if not isinstance(old, dict):
        raise RunError(f"{folder / RECORD_NAME}: not a JSON object; use another --out")
    n = old.get("n", 0)
    if type(n) is not int or n < 0:
        raise RunError(f"{folder / RECORD_NAME}: n {n!r} is not a count; use another --out")
    old = {**RECORD_LEGACY, **old}
    diff = [k for k in MUST_MATCH if old.get(k) != record[k]]
    if diff:
        said = ", ".join(f"{k} {old.get(k)!r} (now {record[k]!r})" for k in diff)
        raise RunError(f"{folder} holds other samples: {said}; use another --out")


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write ``folder/sample.json`` atomically; ``n`` never shrinks below the recorded one, and
    ``complete`` / ``written`` say what the folder holds of that ``n`` (not of this call's)."""
    old = read_record(folder) or {}
    n = max(int(record["n"]), int(old.get("n", 0)))
    written = n - len(todo(folder, n))
    record = {**record, "n": n, "complete": written == n, "written": written}
    atomic_write_text(folder / RECORD_NAME, json.dumps(record, indent=2) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``python -m eval sample`` on ``parser``."""
    # under torchrun use --run-dir and --n-images: torchrun's parser reads --run and --n as
    # abbreviations of its own options (pytorch/pytorch#120601) and stops with an error
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="training run folder (config.json, ckpt-*); --run-dir under torchrun",
    )
    parser.add_argument(
        "--n",
        "--n-images",
        dest="n",
        type=int,
        required=True,
        help="images: indices 0..n-1; --n-images under torchrun",
    )
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps (the paper's 100)")
    parser.add_argument("--out", required=True, help="folder for {index:06d}.png and sample.json")
    parser.add_argument("--seed", type=int, default=0, help="image i depends on (seed, i) only")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    add_clip_argument(parser)
    parser.add_argument("--ckpt", default="last", help="last, best or a step number")
    parser.add_argument("--batch", type=int, default=64, help="images per model call per rank")
    parser.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def add_clip_argument(parser: argparse.ArgumentParser) -> None:
    """``--clip-x0 / --no-clip-x0`` (on by default), shared by ``sample`` and ``watch``."""
    parser.add_argument(
        "--clip-x0",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clamp each DDIM step's predicted x0 to [-1, 1] and re-derive eps from it "
        "(diffusers' clip_sample, its default): a model that is not yet exact at large t "
        "otherwise drifts to saturated colours",
    )


def _check_args(args: argparse.Namespace) -> None:
    """One-line RunError for option values out of range."""
    if args.n < 0:
        raise RunError(f"--n must be >= 0, got {args.n}")
    T = Schedule().T
    if not 1 <= args.steps <= T:
        raise RunError(f"--steps must be in 1..{T}, got {args.steps}")
    check_finite("--eta", args.eta)
    if args.seed < 0:
        raise RunError(f"--seed must be >= 0, got {args.seed}")
    if args.batch < 1:
        raise RunError(f"--batch must be >= 1, got {args.batch}")
    check_device(args.device)
    check_out_dir(args.out)


def run(args: argparse.Namespace) -> int:
    """Sample ``args.n`` images of a run's checkpoint into ``args.out``; returns 0.

    Raises RunError (one line) for a bad run folder, checkpoint, option or output folder; the
    caller prints it. Joins torchrun's process group when WORLD_SIZE > 1.
    """
    _check_args(args)
    try:
        world = distributed.setup(args.device)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    try:
        _run(args, world)
    finally:
        distributed.teardown()
    return 0


def _run(args: argparse.Namespace, world: distributed.World) -> None:
    """The body of :func:`run` once the process group (if any) is up."""
    loaded = load(args.run, args.ckpt, ema=not args.no_ema, device=world.device)
    record = {
        "run": str(Path(args.run).resolve()),
        "run_id": loaded.config.get("run_id"),
        "step": loaded.step,
        "epoch": loaded.epoch,
        "images": loaded.images,
        "ema": not args.no_ema,
        "steps": args.steps,
        "eta": float(args.eta),
        "seed": args.seed,
        "clip_x0": bool(args.clip_x0),
        "schedule": loaded.schedule.kind,
        "prediction": loaded.schedule.prediction,
        "n": args.n,
    }
    folder = Path(args.out)
    lock = _claim(folder, record, world)
    try:
        _fill(folder, record, loaded, args, world)
    finally:
        if lock is not None:
            folder_lock.release(lock)


def _claim(folder: Path, record: dict[str, Any], world: distributed.World) -> int | None:
    """Rank 0 locks the folder and checks it against ``record``; every rank learns the outcome.

    Returns rank 0's lock (None on the other ranks); RunError when the folder is refused.
    """
    lock, refusal = None, None
    if world.main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = folder_lock.acquire(folder, "sample folder")
            check_record(folder, record)
            # at once, so that a killed run's folder is refused to other settings too
            write_record(folder, record)
        except (RunError, folder_lock.FolderBusy, OSError) as exc:
            refusal = RunError(str(exc)) if not isinstance(exc, RunError) else exc
            if lock is not None:
                folder_lock.release(lock)
    if distributed.broadcast_float(world, 0.0 if refusal else 1.0) == 0.0:
        raise refusal or RunError(f"{folder}: refused by rank 0 (see its error)")
    return lock


def _fill(folder: Path, record: dict[str, Any], loaded, args, world: distributed.World) -> None:
    """Sample this rank's missing indices, then (rank 0) record what the folder holds."""
    remove_stale_temps(folder, world.rank, world.size)
    mine = todo(folder, args.n, world.rank, world.size)
    sched = loaded.schedule
    bar = tqdm(total=len(mine), unit="img", disable=not world.main or args.no_progress)
    for start in range(0, len(mine), args.batch):
        chunk = mine[start : start + args.batch]
        images = sample(
            loaded.model,
            sched,
            chunk,
            seed=args.seed,
            steps=args.steps,
            eta=args.eta,
            batch=args.batch,
            device=world.device,
            clip=args.clip_x0,
        )
        for index, image in zip(chunk, images, strict=True):
            write_png(folder, index, image)
        bar.update(len(chunk))
    bar.close()
    distributed.broadcast_float(world, 1.0)  # every rank has written its images
    if world.main:
        write_record(folder, record)  # what is there now
