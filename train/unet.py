"""A compact convolution-attention UNet that predicts the noise, or v (DDPM / ADM style).

Layout, for ``L = len(config.mults)`` resolution levels (level 0 = full resolution)::

    stem conv -> [level 0 .. L-1: `blocks` x (res block [+ attention]), then strided-conv down]
              -> middle (res, attention, res)
              -> [level L-1 .. 0: `blocks + 1` x (concat skip, res block [+ attention]), then up]
              -> GroupNorm, SiLU, conv (zero-initialised)

Every residual block sees the timestep through a sinusoidal embedding and an MLP, applied as a
GroupNorm scale and shift (ADM's ``use_scale_shift_norm``). Attention runs the fused
``scaled_dot_product_attention``, and plain ``torch.matmul`` and softmax inside `plain_attention`
(for ``torch.func.vmap`` and ptflops).
As in DDPM, the last conv of every residual block, every attention output projection and the
output conv start at zero, so the untrained model is the identity inside each block and predicts
exactly zero noise.

Dropout: with ``config.dropout > 0`` and the model in train mode, ``torch.func.vmap`` needs
``randomness="different"`` (or ``"same"``); with ``dropout == 0`` no dropout layer exists at all.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MIN_BOTTOM_RES = 4
"""Smallest allowed feature-map side at the lowest level (``image_size / 2**(L-1)``)."""


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters of :class:`UNet`.

    channels: base width (level ``i`` has ``channels * mults[i]`` channels).
    mults: channel multiplier per resolution level; each level after the first halves the side.
    blocks: residual blocks per level on the way down (the way up has ``blocks + 1``).
    attn_levels: level indices that get self-attention after each residual block.
    heads: attention heads (must divide the width of every attended level and the middle).
    dropout: dropout probability inside residual blocks.
    groups: GroupNorm groups (must divide ``channels``).
    """

    channels: int
    mults: tuple[int, ...]
    blocks: int
    attn_levels: tuple[int, ...]
    heads: int
    dropout: float = 0.0
    groups: int = 32

    def __post_init__(self) -> None:
        """Reject inconsistent settings with a one-line ValueError."""
        if self.channels < 1 or self.blocks < 1 or self.heads < 1 or self.groups < 1:
            raise ValueError("UNetConfig: channels, blocks, heads and groups must be >= 1")
        if not self.mults or min(self.mults) < 1:
            raise ValueError(f"UNetConfig: mults must be non-empty positive ints, got {self.mults}")
        if self.channels % self.groups:
            raise ValueError(
                f"UNetConfig: groups={self.groups} must divide channels={self.channels}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig: dropout must be in [0, 1), got {self.dropout}")
        bad = [i for i in self.attn_levels if not 0 <= i < len(self.mults)]
        if bad:
            raise ValueError(f"UNetConfig: attn_levels {bad} outside 0..{len(self.mults) - 1}")
        widths = [self.channels * self.mults[i] for i in self.attn_levels]
        widths.append(self.channels * self.mults[-1])  # the middle attention
        if any(w % self.heads for w in widths):
            raise ValueError(f"UNetConfig: heads={self.heads} must divide attended widths {widths}")


PRESETS: dict[str, UNetConfig] = {
    # CPU tests and smoke runs: 32 px in well under a second per step of 32 images on 2 cores.
    "tiny": UNetConfig(channels=32, mults=(1, 2, 2), blocks=1, attn_levels=(2,), heads=4, groups=8),
    # quick GPU experiments at 32-64 px: attention at the two lowest levels.
    "small": UNetConfig(channels=64, mults=(1, 2, 2, 2), blocks=2, attn_levels=(2, 3), heads=4),
    # paper-scale 128 px GPU model (DDPM-like; 108.2M params, 71.4 GMAC at 128 px); attention
    # at level 3 = 16x16 at 128 px and in the middle, both 512 wide (4 heads of 128, so that
    # diffusers' UNet2DModel, which has one head width, holds it: `python -m eval export`).
    "base": UNetConfig(
        channels=128, mults=(1, 1, 2, 4, 4), blocks=2, attn_levels=(3,), heads=4, dropout=0.1
    ),
}
# the layouts a preset had in earlier versions of framebridge: a run of one is refused in one
# line naming the version (its weights do not fit this version's preset)
FORMER_LAYOUTS: dict[str, tuple[tuple[str, UNetConfig], ...]] = {
    "base": (  # 4 heads at widths 384 (level 3) and 512 (middle): no single head width
        (
            "0.1",
            UNetConfig(
                channels=128,
                mults=(1, 1, 2, 3, 4),
                blocks=2,
                attn_levels=(3,),
                heads=4,
                dropout=0.1,
            ),
        ),
    ),
}


def _as_json(cfg: UNetConfig) -> dict:
    """A layout as config.json records it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def layout_refusal(preset: str, recorded: dict | None) -> str | None:
    """Why a run whose config.json records `recorded` as the layout of its `preset` cannot be
    used by this version (one line), or None when it can (or recorded none)."""
    if recorded is None or preset not in PRESETS:
        return None
    recorded = json.loads(json.dumps(recorded))  # a checkpoint holds tuples, config.json lists
    if recorded == _as_json(PRESETS[preset]):
        return None
    for version, cfg in FORMER_LAYOUTS.get(preset, ()):
        if recorded == _as_json(cfg):
            return (
                f"its {preset} UNet has the layout of framebridge {version} (mults "
                f"{list(cfg.mults)}), not this version's (mults {list(PRESETS[preset].mults)}): "
                f"train it again, or use framebridge {version} for it"
            )
    return f"its {preset} UNet layout {recorded} is not this version's {_as_json(PRESETS[preset])}"


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of integer timesteps, cosines then sines."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _zero(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, timestep scale-shift, SiLU, dropout, conv (zero-init), plus skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        """Map ``cin`` to ``cout`` channels; a 1x1 conv skip is used when they differ."""
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W), emb (B, emb_dim) -> (B, cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over all pixels, with a residual connection.

    It runs ``F.scaled_dot_product_attention`` (the fused kernel where the device has one);
    inside `plain_attention` it is written out as ``torch.matmul`` and softmax, which
    ``torch.func.vmap`` (per-sample gradients) and ptflops (it counts both matmuls) need. The two
    paths compute the same attention (to float rounding).
    """

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        """``heads`` must divide ``channels``; the output projection starts at zero."""
        super().__init__()
        self.heads = heads
        self.fused = True
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        d, n = c // self.heads, height * width
        qkv = self.qkv(self.norm(x))
        if self.fused:  # q, k, v as (B, heads, N, d) with d contiguous, as the fused kernels want
            qkv = qkv.reshape(b, 3 * c, n).transpose(1, 2).contiguous()
            q, k, v = qkv.view(b, n, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(d)
            return x + self.proj(out.transpose(-1, -2).reshape(b, c, height, width))
        q, k, v = qkv.reshape(b, 3, self.heads, d, n).unbind(dim=1)  # each (B, heads, d, N)
        scale = d**-0.25  # split between q and k: keeps the logits small in half precision
        logits = torch.matmul((q * scale).transpose(-1, -2), k * scale)  # (B, heads, N, N)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = torch.matmul(v, weights.transpose(-1, -2))  # (B, heads, d, N)
        return x + self.proj(out.reshape(b, c, height, width))


@contextlib.contextmanager
def plain_attention(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every attention block on its matmul-and-softmax path for the duration."""
    blocks = [m for m in model.modules() if isinstance(m, AttnBlock)]
    before = [block.fused for block in blocks]
    for block in blocks:
        block.fused = False
    try:
        yield model
    finally:
        for block, fused in zip(blocks, before, strict=True):
            block.fused = fused


class Block(nn.Module):
    """One residual block, optionally followed by self-attention."""

    def __init__(self, cin: int, cout: int, emb_dim: int, cfg: UNetConfig, attn: bool) -> None:
        """Residual block ``cin -> cout``; attention over ``cout`` channels when ``attn``."""
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, cfg.groups, cfg.dropout)
        self.attn = AttnBlock(cout, cfg.heads, cfg.groups) if attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W) -> (B, cout, H, W)."""
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


class Downsample(nn.Module):
    """Halve the side with a 3x3 stride-2 conv."""

    def __init__(self, channels: int) -> None:
        """Keep the channel count."""
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double the side: nearest-neighbour upsampling then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        """Keep the channel count."""
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The blocks of one resolution level and the resampler that follows them (or None)."""

    def __init__(self, blocks: list[Block], resample: nn.Module | None) -> None:
        """Hold ``blocks`` in order, then ``resample``."""
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class UNet(nn.Module):
    """Epsilon-prediction UNet: ``forward(x, t)`` maps noisy images and timesteps to noise."""

    def __init__(self, config: UNetConfig, image_size: int, in_channels: int = 3) -> None:
        """Build the network for square ``image_size`` inputs with ``in_channels`` channels."""
        super().__init__()
        _check_image_size(config, image_size)
        self.config = config
        self.image_size = image_size
        self.in_channels = in_channels
        ch, emb_dim = config.channels, 4 * config.channels
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.stem = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, skip_widths, width = self._build_down(emb_dim)
        self.mid = nn.ModuleList(
            [
                ResBlock(width, width, emb_dim, config.groups, config.dropout),
                AttnBlock(width, config.heads, config.groups),
                ResBlock(width, width, emb_dim, config.groups, config.dropout),
            ]
        )
        self.up = self._build_up(emb_dim, skip_widths, width)
        self.out_norm = nn.GroupNorm(config.groups, ch)
        self.out_conv = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def _build_down(self, emb_dim: int) -> tuple[nn.ModuleList, list[int], int]:
        """Down levels, the width of every skip they push (stem first), and the final width."""
        cfg = self.config
        width = cfg.channels
        skips = [width]
        levels = []
        for i, mult in enumerate(cfg.mults):
            blocks = []
            for _ in range(cfg.blocks):
                blocks.append(Block(width, cfg.channels * mult, emb_dim, cfg, i in cfg.attn_levels))
                width = cfg.channels * mult
                skips.append(width)
            last = i == len(cfg.mults) - 1
            levels.append(Level(blocks, None if last else Downsample(width)))
            if not last:
                skips.append(width)
        return nn.ModuleList(levels), skips, width

    def _build_up(self, emb_dim: int, skips: list[int], width: int) -> nn.ModuleList:
        """Up levels from the lowest resolution to level 0, each block eating one skip."""
        cfg = self.config
        skips = list(skips)
        levels = []
        for i in reversed(range(len(cfg.mults))):
            blocks = []
            for _ in range(cfg.blocks + 1):
                cout = cfg.channels * cfg.mults[i]
                blocks.append(Block(width + skips.pop(), cout, emb_dim, cfg, i in cfg.attn_levels))
                width = cout
            levels.append(Level(blocks, Upsample(width) if i > 0 else None))
        return nn.ModuleList(levels)

    def block_names(self) -> list[str]:
        """Capturable block names in forward order.

        ``down{i}`` / ``up{i}``: output of the last block of level ``i`` (before its resampler),
        so both have side ``image_size / 2**i``; ``mid``: output of the middle section. The up
        path runs from the lowest level, so the order is down0.., mid, up{L-1}, .., up0.
        """
        n = len(self.config.mults)
        return [f"down{i}" for i in range(n)] + ["mid"] + [f"up{i}" for i in reversed(range(n))]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, capture: str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the noise in ``x`` (B, C, H, W) at integer timesteps ``t`` (B,).

        Returns eps (B, C, H, W), or ``(eps, activation)`` when ``capture`` names a block from
        :meth:`block_names`; the activation is that block's output (B, C', H', W').
        """
        if capture is not None and capture not in self.block_names():
            raise ValueError(f"unknown block {capture!r}; valid: {', '.join(self.block_names())}")
        kept: dict[str, torch.Tensor] = {}

        def mark(name: str, h: torch.Tensor) -> None:
            if name == capture:
                kept[name] = h

        emb = self.time_mlp(timestep_embedding(t, self.config.channels))
        h = self.stem(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)
            mark(f"down{i}", h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        res1, attn, res2 = self.mid
        h = res2(attn(res1(h, emb)), emb)
        mark("mid", h)
        for i, level in zip(reversed(range(len(self.up))), self.up, strict=True):
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            mark(f"up{i}", h)
            if level.resample is not None:
                h = level.resample(h)
        eps = self.out_conv(F.silu(self.out_norm(h)))
        return (eps, kept[capture]) if capture is not None else eps


def _check_image_size(config: UNetConfig, image_size: int) -> None:
    """Raise ValueError unless ``image_size`` halves cleanly down to at least MIN_BOTTOM_RES."""
    factor = 2 ** (len(config.mults) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} is not divisible by 2**(len(mults)-1) = {factor}"
        )
    if image_size // factor < MIN_BOTTOM_RES:
        raise ValueError(
            f"image_size {image_size} is too small: the lowest level would be "
            f"{image_size // factor} px, need >= {MIN_BOTTOM_RES} (image_size >= "
            f"{factor * MIN_BOTTOM_RES})"
        )


def build_unet(preset: str, image_size: int) -> UNet:
    """Build the UNet of a named preset (see PRESETS) for ``image_size`` px RGB images."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    return UNet(PRESETS[preset], image_size)


def model_cost(model: UNet, image_size: int) -> tuple[int, int]:
    """MACs of one forward pass per image, and the trainable parameter count, via ptflops.

    Uses ptflops' ``aten`` backend, which counts every convolution, linear layer and matmul
    (both attention matmuls included) at the dispatcher level, and nothing else (norms,
    activations and additions are not MACs). That backend leaves forward hooks on the
    modules it measures, so it runs on a deep copy and ``model`` is left untouched. Attention is
    counted on its plain path (`plain_attention`): ptflops does not see inside the fused kernel.
    """
    from ptflops import get_model_complexity_info  # here: the GPU check's image has no ptflops

    probe = copy.deepcopy(model)
    param = next(probe.parameters())

    def make_inputs(res: tuple[int, ...]) -> dict[str, torch.Tensor]:
        x = torch.zeros((1, *res), dtype=param.dtype, device=param.device)
        t = torch.zeros(1, dtype=torch.long, device=param.device)
        return {"x": x, "t": t}

    with torch.no_grad(), plain_attention(probe):
        macs, params = get_model_complexity_info(
            probe,
            (model.in_channels, image_size, image_size),
            print_per_layer_stat=False,
            as_strings=False,
            input_constructor=make_inputs,
            backend="aten",
        )
    if macs is None or params is None:
        raise RuntimeError("ptflops failed to measure the model (see the traceback above)")
    return int(macs), int(params)
