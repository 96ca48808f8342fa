"""A run's checkpoint as a diffusers pipeline folder (`python -m eval export RUN --out DIR`).

``DIR`` is what ``diffusers.DDIMPipeline.from_pretrained(DIR)`` (or ``DDPMPipeline``) loads:

* ``unet/``: a ``UNet2DModel`` (``config.json`` and ``diffusion_pytorch_model.safetensors``, never
  a pickle) holding the checkpoint's weights (EMA unless ``--no-ema``), float32;
* ``scheduler/scheduler_config.json``: a ``DDIMScheduler`` with the run's schedule (``linear``:
  betas 1e-4..0.02; ``cosine``: ``squaredcos_cap_v2``) and prediction (``eps``: ``epsilon``;
  ``v``: ``v_prediction``), and the sampling settings of ``eval sample``: ``clip_sample=True``,
  ``set_alpha_to_one=True``, ``timestep_spacing="leading"``, ``steps_offset=0``;
* ``model_index.json``, and ``framebridge_export.json``: which run, step and weights it holds.

How our UNet maps (see train/unet.py and diffusers' unet_2d.py): the stem is ``conv_in``; the
time MLP is ``time_embedding`` over the ``positional`` projection (our cosines-then-sines with
frequencies ``exp(-ln(10000) i / half)`` are ``flip_sin_to_cos=True, freq_shift=0``); level ``i``
is ``down_blocks[i]`` (``AttnDownBlock2D`` where it has attention, else ``DownBlock2D``), its
residual blocks ``resnets`` (``resnet_time_scale_shift="scale_shift"``: GroupNorm, SiLU, conv,
``norm2(h) * (1 + scale) + shift``, SiLU, dropout, conv, 1x1 ``conv_shortcut``), its attention
``attentions`` (the 1x1 qkv conv split into ``to_q``, ``to_k``, ``to_v``; the output conv is
``to_out[0]``), its strided conv ``downsamplers[0]``; the middle is ``UNetMidBlock2D`` (its
attention keeps its GroupNorm through ``attn_norm_num_groups``); the up levels are ``up_blocks``
from the lowest level, ``layers_per_block + 1`` blocks each, then nearest-neighbour
``upsamplers[0]``; the output is ``conv_norm_out``, SiLU, ``conv_out``. GroupNorm eps is 1e-5.

A layout with no exact ``UNet2DModel`` equivalent is refused: diffusers has one
``attention_head_dim`` for every attention layer, while our UNet has ``heads`` heads at every
attended width, so every attended width (the middle included) must be the same.

Sampling as ``eval sample`` does: ``pipe(..., eta=0.0, use_clipped_model_output=True)`` (our DDIM
re-derives eps from the clipped x0; a scheduler config cannot say so) with one CPU generator per
image, ``eval.sample.image_generator(seed, i)``, which draws the same x_T as our sampler.

diffusers is an optional extra (``pip install 'framebridge[diffusers]'``) imported only here.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from eval.runs import Loaded, RunError, atomic_leftover, check_out_dir, foreign_files, load
from shards_spec.atomic import atomic_write_bytes, atomic_write_text, replace_folder
from train import folder_lock
from train.diffusion import Schedule
from train.unet import AttnBlock, ResBlock, UNet

RECORD_NAME = "framebridge_export.json"
TMP_NAME = ".export-tmp"  # DIR/.export-tmp/: the export being written, moved into place at the end
# what an export folder holds; anything else in DIR means it is not one
EXPORT_NAMES = frozenset(
    {"model_index.json", "unet", "scheduler", RECORD_NAME, TMP_NAME, folder_lock.LOCK_NAME}
)
PLACED = ("unet", "scheduler", RECORD_NAME, "model_index.json")  # what _place writes into DIR
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
CHECK_TOL = 1e-4  # max |diffusers - ours| on the check inputs, relative to max(1, max |ours|)
INSTALL = "pip install 'framebridge[diffusers]'"

RES_NAMES = {  # ResBlock attribute -> ResnetBlock2D attribute
    "norm1": "norm1",
    "conv1": "conv1",
    "emb": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}


def import_diffusers():
    """The diffusers module, or RunError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise RunError(f"export needs diffusers, which is not installed: {INSTALL}") from None
    return diffusers


# --- the UNet ------------------------------------------------------------------------------------


def attention_head_dim(model: UNet) -> int:
    """The one head width of every attention layer (RunError when they differ)."""
    cfg = model.config
    levels = sorted(set(cfg.attn_levels))
    widths = {f"level {i}": cfg.channels * cfg.mults[i] for i in levels}
    widths["middle"] = cfg.channels * cfg.mults[-1]
    dims = {w // cfg.heads for w in widths.values()}
    if len(dims) > 1:
        said = ", ".join(f"{k} {w} ({w // cfg.heads} per head)" for k, w in widths.items())
        raise RunError(
            f"this UNet has no exact diffusers UNet2DModel: its attention has {cfg.heads} heads "
            f"at widths {said}, while UNet2DModel has one attention_head_dim for all of them"
        )
    return dims.pop()


def unet_config(model: UNet) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments of our UNet's layout."""
    cfg = model.config
    n = len(cfg.mults)
    return {
        "sample_size": int(model.image_size),
        "in_channels": int(model.in_channels),
        "out_channels": int(model.in_channels),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": 4 * cfg.channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": [
            "AttnDownBlock2D" if i in cfg.attn_levels else "DownBlock2D" for i in range(n)
        ],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [
            "AttnUpBlock2D" if i in cfg.attn_levels else "UpBlock2D" for i in reversed(range(n))
        ],
        "block_out_channels": [cfg.channels * m for m in cfg.mults],
        "layers_per_block": cfg.blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": attention_head_dim(model),
        "norm_num_groups": cfg.groups,
        "attn_norm_num_groups": cfg.groups,  # else scale_shift drops the middle attention's norm
        "norm_eps": 1e-5,  # torch's GroupNorm default, which ours use
        "resnet_time_scale_shift": "scale_shift",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None,
    }


def _copy(out: dict[str, torch.Tensor], module: nn.Module, prefix: str) -> None:
    """Every parameter of ``module`` under ``prefix`` (a conv, linear layer or norm)."""
    for name, p in module.named_parameters():
        out[f"{prefix}.{name}"] = p.detach().clone()


def _res(out: dict[str, torch.Tensor], block: ResBlock, prefix: str) -> None:
    """A residual block as a ``ResnetBlock2D`` (no 1x1 skip when the widths agree)."""
    for ours, theirs in RES_NAMES.items():
        sub = getattr(block, ours)
        if not isinstance(sub, nn.Identity):
            _copy(out, sub, f"{prefix}.{theirs}")


def _attn(out: dict[str, torch.Tensor], block: AttnBlock, prefix: str) -> None:
    """An attention block as an ``Attention``: qkv channels are [q | k | v], head-major each."""
    _copy(out, block.norm, f"{prefix}.group_norm")
    weight = block.qkv.weight.detach()[:, :, 0, 0]
    bias = block.qkv.bias.detach()
    for name, w, b in zip(("to_q", "to_k", "to_v"), weight.chunk(3), bias.chunk(3), strict=True):
        out[f"{prefix}.{name}.weight"] = w.clone()
        out[f"{prefix}.{name}.bias"] = b.clone()
    out[f"{prefix}.to_out.0.weight"] = block.proj.weight.detach()[:, :, 0, 0].clone()
    out[f"{prefix}.to_out.0.bias"] = block.proj.bias.detach().clone()


def unet_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under ``UNet2DModel``'s names (contiguous float copies)."""
    out: dict[str, torch.Tensor] = {}
    _copy(out, model.time_mlp[0], "time_embedding.linear_1")
    _copy(out, model.time_mlp[2], "time_embedding.linear_2")
    _copy(out, model.stem, "conv_in")
    for i, level in enumerate(model.down):
        for j, block in enumerate(level.blocks):
            _res(out, block.res, f"down_blocks.{i}.resnets.{j}")
            if block.attn is not None:
                _attn(out, block.attn, f"down_blocks.{i}.attentions.{j}")
        if level.resample is not None:
            _copy(out, level.resample.conv, f"down_blocks.{i}.downsamplers.0.conv")
    res1, attn, res2 = model.mid
    _res(out, res1, "mid_block.resnets.0")
    _attn(out, attn, "mid_block.attentions.0")
    _res(out, res2, "mid_block.resnets.1")
    for k, level in enumerate(model.up):
        for j, block in enumerate(level.blocks):
            _res(out, block.res, f"up_blocks.{k}.resnets.{j}")
            if block.attn is not None:
                _attn(out, block.attn, f"up_blocks.{k}.attentions.{j}")
        if level.resample is not None:
            _copy(out, level.resample.conv, f"up_blocks.{k}.upsamplers.0.conv")
    _copy(out, model.out_norm, "conv_norm_out")
    _copy(out, model.out_conv, "conv_out")
    mapped = sum(t.numel() for t in out.values())
    have = sum(p.numel() for p in model.parameters())
    if mapped != have:  # a part of the UNet this mapping does not know
        raise RuntimeError(f"mapped {mapped} of the UNet's {have} parameters")
    return {k: v.float().contiguous() for k, v in out.items()}


def to_diffusers(model: UNet):
    """A ``diffusers.UNet2DModel`` with our UNet's layout and weights, in eval mode."""
    diffusers = import_diffusers()
    theirs = diffusers.UNet2DModel(**unet_config(model))
    theirs.load_state_dict(unet_state_dict(model), strict=True)
    return theirs.eval()


# --- the scheduler -------------------------------------------------------------------------------


def scheduler_config(sched: Schedule) -> dict[str, Any]:
    """The ``DDIMScheduler`` keyword arguments of a run's schedule and ``eval sample``'s DDIM."""
    defaults = inspect.signature(Schedule).parameters
    return {
        "num_train_timesteps": sched.T,
        "beta_start": defaults["beta_start"].default,
        "beta_end": defaults["beta_end"].default,
        "beta_schedule": BETA_SCHEDULES[sched.kind],
        "prediction_type": PREDICTION_TYPES[sched.prediction],
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "leading",
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }


def to_scheduler(sched: Schedule):
    """A ``diffusers.DDIMScheduler`` whose tables are the run's (RuntimeError when they differ)."""
    diffusers = import_diffusers()
    theirs = diffusers.DDIMScheduler(**scheduler_config(sched))
    gap = (theirs.alphas_cumprod.double() - sched.alphas_cumprod.double()).abs().max().item()
    if gap > 1e-6:
        raise RuntimeError(f"the exported {sched.kind} schedule differs from ours by {gap:.2g}")
    return theirs


# --- the folder ----------------------------------------------------------------------------------


def check_export_folder(folder: Path) -> None:
    """RunError when ``folder`` holds files other than an export's (or what an interrupted
    export left of them)."""
    if not folder.is_dir():
        return
    foreign = foreign_files(folder, EXPORT_NAMES, leftovers_of=PLACED)
    if foreign:
        raise RunError(
            f"--out {folder} holds files ({foreign}) that are not an export's: use an empty or "
            "new folder"
        )


@torch.no_grad()
def check_outputs(model: UNet, theirs, T: int, seed: int = 0) -> float:
    """Max |diffusers - ours| on two random inputs at t = T-1 and T/2, relative to
    ``max(1, max |ours|)``."""
    g = torch.Generator().manual_seed(seed)
    size = int(model.image_size)
    x = torch.randn((2, model.in_channels, size, size), generator=g)
    t = torch.tensor([T - 1, T // 2])
    ours = model(x, t)
    out = theirs(x, t).sample
    return (out - ours).abs().max().item() / max(1.0, ours.abs().max().item())


def record(loaded: Loaded, ema: bool, check: float | None) -> dict[str, Any]:
    """What ``framebridge_export.json`` says about the export."""
    diffusers = import_diffusers()
    sched = loaded.schedule
    return {
        "run": str(loaded.path.parent.resolve()),
        "run_id": loaded.config.get("run_id"),
        "checkpoint": loaded.path.name,
        "step": loaded.step,
        "epoch": loaded.epoch,
        "images": loaded.images,
        "ema": ema,
        "preset": loaded.config.get("preset"),
        "image_size": int(loaded.config["image_size"]),
        "schedule": sched.kind,
        "prediction": sched.prediction,
        "sampling": {"eta": 0.0, "use_clipped_model_output": True},
        "check_max_rel_diff": check,
        "diffusers_version": diffusers.__version__,
    }


def _remove_leftovers(folder: Path) -> None:
    """Delete what an interrupted `_place` left beside the files it writes (`atomic_leftover`)."""
    for path in folder.iterdir():
        if atomic_leftover(path.name, PLACED):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _place(tmp: Path, folder: Path, info: dict[str, Any]) -> None:
    """Move the export written in ``tmp`` into ``folder`` with its record ``info``;
    model_index.json goes last, so that a folder cut short is not loadable."""
    (folder / "model_index.json").unlink(missing_ok=True)
    _remove_leftovers(folder)
    for name in ("unet", "scheduler"):
        replace_folder(tmp / name, folder / name)
    atomic_write_text(folder / RECORD_NAME, json.dumps(info, indent=2) + "\n")
    atomic_write_bytes(folder / "model_index.json", (tmp / "model_index.json").read_bytes())
    shutil.rmtree(tmp)


def export(
    loaded: Loaded, folder: Path, ema: bool = True, check: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Write ``loaded``'s model and schedule as a diffusers pipeline folder; its record.

    RunError for a layout with no exact UNet2DModel or a folder that holds other files; a
    check above CHECK_TOL raises RuntimeError and leaves the folder as it was.
    """
    diffusers = import_diffusers()
    model = loaded.model.float().cpu().eval()
    attention_head_dim(model)  # refuse before any work
    check_export_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder_lock.acquire(folder, "export folder")
    try:
        check_export_folder(folder)
        stages = ["map weights", "write", "check"] if check else ["map weights", "write"]
        bar = tqdm(total=len(stages), unit="stage", disable=not progress, file=sys.stderr)
        bar.set_description(stages[0])
        unet = to_diffusers(model)
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=to_scheduler(loaded.schedule))
        bar.update()
        bar.set_description(stages[1])
        tmp = folder / TMP_NAME
        if tmp.exists():
            shutil.rmtree(tmp)
        pipe.save_pretrained(tmp, safe_serialization=True)
        bar.update()
        diff = None
        if check:
            bar.set_description(stages[2])
            written = diffusers.UNet2DModel.from_pretrained(tmp / "unet", low_cpu_mem_usage=False)
            written.eval()
            diff = check_outputs(model, written, loaded.schedule.T)
            bar.update()
        bar.close()
        if diff is not None and not diff <= CHECK_TOL:
            shutil.rmtree(tmp)
            raise RuntimeError(
                f"the exported UNet differs from the checkpoint's by {diff:.3g} (relative) > "
                f"{CHECK_TOL:g}; nothing was written to {folder}"
            )
        info = record(loaded, ema, diff)
        _place(tmp, folder, info)
    finally:
        folder_lock.release(lock)
    return info


# --- the command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``python -m eval export`` on ``parser``."""
    parser.add_argument("run", metavar="RUN", help="training run folder (config.json, ckpt-*)")
    parser.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    parser.add_argument("--ckpt", default="last", help="last, best or a step number")
    parser.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip comparing the written UNet2DModel with the checkpoint's UNet on two inputs",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    """Export ``args.run`` into ``args.out``; 0, or 1 when the check fails.

    Raises RunError (one line) for a bad run folder, checkpoint or output folder, a UNet with no
    exact UNet2DModel, or diffusers missing; the caller prints it.
    """
    folder = check_out_dir(args.out)
    check_export_folder(folder)
    import_diffusers()
    loaded = load(args.run, args.ckpt, ema=not args.no_ema)
    try:
        info = export(
            loaded,
            folder,
            ema=not args.no_ema,
            check=not args.no_check,
            progress=not args.no_progress,
        )
    except folder_lock.FolderBusy as exc:
        raise RunError(str(exc)) from None
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    diff = info["check_max_rel_diff"]
    checked = f", checked to {diff:.2g}" if diff is not None else ""
    print(
        f"exported step {info['step']} ({'EMA' if info['ema'] else 'raw'} weights, "
        f"{info['schedule']}/{info['prediction']}{checked}) to {folder}: "
        f"diffusers.DDIMPipeline.from_pretrained({str(folder)!r})"
    )
    return 0
