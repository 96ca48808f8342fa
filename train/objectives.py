"""The training objectives: the paper's method and every variant it compares, side by side.

Every objective takes the model, the schedule, a batch of windows ``x0`` of shape
``(B, k, C, H, W)`` in [-1, 1], their per-pair flow statistic ``flow_stat`` ``(B, k-1)`` (the
window JSON's ``flow_msq``, or ``flow_mag`` with ``--flow-stat mag``: `FLOW_STATS`), the noise
``(t, eps)`` drawn by `draw_noise` and the options, and returns the per-window loss ``(B,)``
plus named per-window terms.
The denoising loss of a window is the mean over its frames of the mean squared error of the
network's output (the noise, or v: the schedule's ``prediction``), so it is on the same scale as
a single frame's; the regularisers compare predicted noise, whatever the network outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from train.diffusion import Schedule


@dataclass(frozen=True)
class Options:
    """The objective's knobs (see ``python -m train --help``)."""

    lam: float = 1.0  # weight of the temporal regulariser
    weighting: str = "exp"  # flow: the weight of a pair from its flow statistic (WEIGHTINGS)
    sigma: float = 1.0  # flow, exp: w = exp(-flow_stat / sigma)
    flow_scale: float = 1.0  # flow, inverse: w = 1 / (1 + flow_stat / flow_scale)
    delta: int = 5  # divergence: the step Delta of the finite difference
    sigma_div: float = 1.0  # divergence: w = exp(-|Ddot| / sigma_div)
    disp_weight: float = 0.5  # dispersive: weight of the dispersive loss
    disp_tau: float = 0.5  # dispersive: temperature
    disp_block: str = "mid"  # dispersive: the UNet block whose activation is dispersed


@dataclass(frozen=True)
class Noise:
    t: Tensor  # (B, k) long
    eps: Tensor  # (B, k, C, H, W)


Objective = Callable[..., tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Method:
    name: str
    objective: Objective
    window: bool  # all frames of a window (True) or its centre frame only
    shared_noise: bool  # one (t, eps) per window
    help: str


def draw_noise(
    shape: tuple[int, ...], shared: bool, T: int, generator: torch.Generator, device
) -> Noise:
    """t and eps for ``x0`` of `shape` ``(B, k, C, H, W)``: one draw per window when `shared`."""
    B, k = shape[:2]
    draws = (B, 1) if shared else (B, k)
    t = torch.randint(0, T, draws, generator=generator, device=device)
    eps = torch.randn((*draws, *shape[2:]), generator=generator, device=device)
    return Noise(t.expand(B, k), eps.expand(shape))


@dataclass(frozen=True)
class Prediction:
    eps_hat: Tensor  # (B, k, C, H, W): the predicted noise, whatever the network outputs
    denoise: Tensor  # (B,): the denoising loss
    feat: Tensor | None  # the captured activation, if one was asked for


def _predict(
    model, sched: Schedule, x0: Tensor, noise: Noise, capture: str | None = None
) -> Prediction:
    """The network on ``x0`` noised by ``noise``.

    The denoising loss of a window is the mean over its frames and pixels of the squared
    difference between the output and its target (the schedule's ``prediction``: eps, or v).
    """
    flat = x0.flatten(0, 1)
    t = noise.t.reshape(-1)
    eps = noise.eps.reshape(flat.shape)
    xt = sched.q_sample(flat, t, eps)
    out = model(xt, t, capture=capture) if capture else model(xt, t)
    feat = None
    if capture:
        out, feat = out
    target = sched.target(flat, t, eps)
    denoise = (out.view(x0.shape).float() - target.view(x0.shape).float()).pow(2)
    eps_hat = sched.eps_from(out, xt, t)
    return Prediction(eps_hat.view(x0.shape), denoise.flatten(1).mean(1), feat)


def pair_mismatch(eps_hat: Tensor) -> Tensor:
    """Mean over pixels of ||eps_hat^k - eps_hat^{k+1}||^2 per adjacent pair, shape (B, k-1)."""
    diff = eps_hat[:, 1:].float() - eps_hat[:, :-1].float()
    return diff.pow(2).flatten(2).mean(2)


def flow_weights(flow_msq: Tensor, sigma: float) -> Tensor:
    """w = exp(-flow_msq / sigma) per adjacent pair."""
    return torch.exp(-flow_msq.float() / sigma)


def inverse_weights(flow_stat: Tensor, scale: float) -> Tensor:
    """w = 1 / (1 + flow_stat / scale) per adjacent pair (the public code's, with scale 1)."""
    return 1.0 / (1.0 + flow_stat.float() / scale)


def _exp(flow_stat: Tensor, opts: Options) -> Tensor:
    return flow_weights(flow_stat, opts.sigma)


def _inverse(flow_stat: Tensor, opts: Options) -> Tensor:
    return inverse_weights(flow_stat, opts.flow_scale)


# --weighting of the flow method: a pair's weight from its flow statistic
WEIGHTINGS: dict[str, Callable[[Tensor, Options], Tensor]] = {"exp": _exp, "inverse": _inverse}
# --flow-stat: the per-pair statistic the flow weights read, by the window JSON key holding it
FLOW_STATS = {"msq": "flow_msq", "mag": "flow_mag"}


def divergence_rate(sched: Schedule, x0: Tensor, noise: Noise, delta: int) -> Tensor:
    """|Ddot| per adjacent pair (B, k-1) from the noisy frames at t - delta and t + delta.

    ``D_t = ||x_t^i - x_t^j||^2 / n``, ``Ddot = (D_{t+d} - D_{t-d}) / (t_hi - t_lo)`` with the
    window's shared eps; t +- delta is clamped to [0, T-1].
    """
    T = sched.T
    t = noise.t[:, 0]
    lo, hi = (t - delta).clamp(0, T - 1), (t + delta).clamp(0, T - 1)
    span = (hi - lo).clamp(min=1).float()
    with torch.no_grad():
        eps = noise.eps.float()

        def spread(tt: Tensor) -> Tensor:
            k = x0.shape[1]
            xt = sched.q_sample(
                x0.float().flatten(0, 1), tt.repeat_interleave(k), eps.flatten(0, 1)
            )
            xt = xt.view(x0.shape)
            return (xt[:, 1:] - xt[:, :-1]).pow(2).flatten(2).mean(2)

        return ((spread(hi) - spread(lo)) / span[:, None]).abs()


def _regularised(model, sched, x0, flow_stat, noise, opts: Options, weights) -> tuple:
    p = _predict(model, sched, x0, noise)
    w = weights(sched, x0, flow_stat, noise, opts)
    reg = (w * pair_mismatch(p.eps_hat)).sum(1)
    loss = p.denoise + opts.lam * reg
    return loss, {"denoise": p.denoise, "reg": reg, "w_mean": w.mean(1)}


def iid(model, sched, x0, flow_stat, noise, opts: Options):
    """Single frames, independent t and eps: the baseline."""
    denoise = _predict(model, sched, x0, noise).denoise
    return denoise, {"denoise": denoise}


def seq(model, sched, x0, flow_stat, noise, opts: Options):
    """All frames of each window, independent t and eps, no regulariser."""
    return iid(model, sched, x0, flow_stat, noise, opts)


def adjacent(model, sched, x0, flow_stat, noise, opts: Options):
    """Shared noise, regulariser with w = 1."""

    def ones(sched, x0, flow_stat, noise, opts):
        return torch.ones(x0.shape[0], x0.shape[1] - 1, device=x0.device)

    return _regularised(model, sched, x0, flow_stat, noise, opts, ones)


def flow(model, sched, x0, flow_stat, noise, opts: Options):
    """Shared noise, w = exp(-flow_msq / sigma): the paper's method (``opts.weighting``
    ``inverse``: w = 1 / (1 + flow_stat / flow_scale), the public code's)."""

    def by_flow(sched, x0, flow_stat, noise, opts):
        return WEIGHTINGS[opts.weighting](flow_stat, opts)

    return _regularised(model, sched, x0, flow_stat, noise, opts, by_flow)


def divergence(model, sched, x0, flow_stat, noise, opts: Options):
    """Shared noise, w = exp(-|Ddot| / sigma_div) from the trajectory divergence (sec. 3.5)."""

    def by_divergence(sched, x0, flow_stat, noise, opts):
        return torch.exp(-divergence_rate(sched, x0, noise, opts.delta) / opts.sigma_div)

    return _regularised(model, sched, x0, flow_stat, noise, opts, by_divergence)


def dispersive_loss(feat: Tensor, tau: float) -> Tensor:
    """InfoNCE-L2 Dispersive Loss: log mean_ij exp(-||z_i - z_j||^2 / (d tau)) over the batch."""
    z = feat.float().flatten(1)
    d2 = torch.cdist(z, z).pow(2) / z.shape[1]
    n = z.shape[0]
    return torch.logsumexp(-d2.flatten() / tau, 0) - math.log(n * n)


def dispersive(model, sched, x0, flow_stat, noise, opts: Options):
    """iid plus Dispersive Loss on one UNet block's activation (a batch term, shared by all)."""
    p = _predict(model, sched, x0, noise, capture=opts.disp_block)
    disp = dispersive_loss(p.feat, opts.disp_tau).expand(p.denoise.shape)
    return p.denoise + opts.disp_weight * disp, {"denoise": p.denoise, "disp": disp}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("iid", iid, False, False, "centre frames, independent t and eps (baseline)"),
        Method("seq", seq, True, False, "all K frames of each window, independent noise"),
        Method("adjacent", adjacent, True, True, "shared noise, regulariser with w = 1"),
        Method(
            "flow",
            flow,
            True,
            True,
            "shared noise, w = exp(-flow_msq / sigma) (the paper); --weighting inverse: "
            "w = 1 / (1 + m / --flow-scale), with --flow-stat mag the public code's",
        ),
        Method("divergence", divergence, True, True, "shared noise, w from trajectory divergence"),
        Method("dispersive", dispersive, False, False, "iid plus Dispersive Loss"),
    )
}
# the methods that train on every frame of a window (a batch counts windows, not frames)
WINDOW_METHODS = tuple(name for name, m in METHODS.items() if m.window)


def get_method(name: str) -> Method:
    """The method called `name` (ValueError listing the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None


def auto_sigma_div(sched: Schedule, x0: Tensor, delta: int, generator: torch.Generator) -> float:
    """Default sigma_div: the median |Ddot| over windows `x0` at random t with shared eps."""
    noise = draw_noise(tuple(x0.shape), True, sched.T, generator, x0.device)
    rate = divergence_rate(sched, x0, noise, delta).flatten()
    value = float(rate.median())
    return value if value > 0 else 1.0
