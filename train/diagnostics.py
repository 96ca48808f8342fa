"""Convergence diagnostics: validation loss at fixed noise, gradient variance, parameter travel.

The validation loss uses a fixed set of frames with fixed t (spread evenly over [0, T)) and
fixed eps, so its curve has no sampling noise of its own. The gradient variance is the paper's
eq. 18 quantity: the mean squared deviation of per-sample gradients from their batch mean, on a
fixed probe batch with fixed noise, computed with ``torch.func``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from train.data import to_unit
from train.diffusion import Schedule
from train.objectives import Method, Noise, Options, draw_noise, get_method
from train.unet import plain_attention

FIXED_SEED = 20_251_126  # the val and probe noise: the same for every run of a build


@dataclass
class FixedSet:
    """Windows with their noise fixed once: the validation set or the probe batch."""

    x0: Tensor  # (n, k, C, H, W) in [-1, 1]
    flow_stat: Tensor  # (n, k-1): the flow statistic the method's weights read
    noise: Noise

    def __len__(self) -> int:
        return self.x0.shape[0]


def validation_set(frames: Tensor, stat: Tensor, T: int, device) -> FixedSet:
    """Fixed t evenly spread over [0, T) and fixed eps for single frames (loader layout)."""
    x0 = to_unit(frames, device)
    n = x0.shape[0]
    gen = torch.Generator().manual_seed(FIXED_SEED)
    t = ((torch.arange(n, dtype=torch.float64) + 0.5) * T / n).long().clamp(0, T - 1)
    eps = torch.randn(x0.shape, generator=gen)
    noise = Noise(t[:, None].to(device), eps.to(device))
    return FixedSet(x0, stat.to(device), noise)


def probe_set(frames: Tensor, stat: Tensor, method: Method, T: int, device) -> FixedSet:
    """The probe batch with noise drawn once, shared per window when the method shares it."""
    x0 = to_unit(frames, device)
    gen = torch.Generator().manual_seed(FIXED_SEED + 1)
    noise = draw_noise(tuple(x0.shape), method.shared_noise, T, gen, "cpu")
    return FixedSet(
        x0,
        stat.to(device),
        Noise(noise.t.contiguous().to(device), noise.eps.contiguous().to(device)),
    )


@torch.no_grad()
def validation_loss(model: nn.Module, sched: Schedule, val: FixedSet, batch: int = 64) -> float:
    """Mean squared error of the predicted noise over the fixed set (whatever the network
    outputs, so that runs of either prediction compare); the model is left in its mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(val), batch):
        x0 = val.x0[i : i + batch].flatten(0, 1)
        t = val.noise.t[i : i + batch].reshape(-1)
        eps = val.noise.eps[i : i + batch].flatten(0, 1)
        xt = sched.q_sample(x0, t, eps)
        eps_hat = sched.eps_from(model(xt, t), xt, t)
        total += float((eps_hat.float() - eps).pow(2).flatten(1).mean(1).sum())
    model.train(was_training)
    return total / len(val)


def gradient_variance(
    model: nn.Module,
    sched: Schedule,
    method: Method,
    opts: Options,
    probe: FixedSet,
    chunk: int = 4,
) -> dict[str, float]:
    """Per-sample gradients on the probe batch: their mean squared deviation from the mean.

    Returns ``grad_var`` (mean over samples of ||g_i - g_mean||^2), ``grad_mean_sq``
    (||g_mean||^2) and ``grad_sample_sq`` (mean ||g_i||^2). Dispersive Loss is a batch term,
    so its per-sample gradient is that of the denoising loss alone. Runs in eval mode (no
    dropout), in float32.
    """
    objective = get_method("iid").objective if method.name == "dispersive" else method.objective
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p, x0, stat, t, eps):
        def net(xt, tt, capture=None):
            return functional_call(model, (p, buffers), (xt, tt), {"capture": capture})

        loss, _ = objective(net, sched, x0[None], stat[None], Noise(t[None], eps[None]), opts)
        return loss.sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0, 0))
    was_training = model.training
    model.eval()
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    sq = 0.0
    n = len(probe)
    with plain_attention(model):  # vmap runs through matmul and softmax, not the fused kernel
        for i in range(0, n, chunk):
            part = slice(i, i + chunk)
            x0, stat = probe.x0[part], probe.flow_stat[part]
            grads = per_sample(params, x0, stat, probe.noise.t[part], probe.noise.eps[part])
            for k, g in grads.items():
                total[k] += g.sum(0)
                sq += float(g.double().pow(2).sum())
    model.train(was_training)
    mean_sq = sum(float((g.double() / n).pow(2).sum()) for g in total.values())
    sample_sq = sq / n
    return {
        "grad_var": sample_sq - mean_sq,
        "grad_mean_sq": mean_sq,
        "grad_sample_sq": sample_sq,
    }


def parameter_distance(model: nn.Module, init: list[Tensor]) -> float:
    """L2 distance of the parameters from their initial values."""
    params = [p.detach() for p in model.parameters()]
    diffs = torch._foreach_sub(params, init)
    norms = torch._foreach_norm(diffs)
    return float(torch.linalg.vector_norm(torch.stack(norms)))
