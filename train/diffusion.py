"""DDPM noise schedule (linear betas, cumulative alphas, forward process) and the DDIM sampler.

Notation follows Ho et al. 2020: ``alpha_t = 1 - beta_t``, ``abar_t = prod_{s<=t} alpha_s``
and ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, for integer ``t`` in ``[0, T)`` (index 0
is the first noising step, so ``abar[0] = 1 - beta_start``). Tables are computed in float64 and
stored as float32.

DDIM (Song et al. 2021) reads those tables: :func:`ddim_timesteps` picks the sampled steps and
:func:`ddim_step` moves ``x_t`` to ``x_{t_prev}``. Both match diffusers' ``DDIMScheduler`` with
``beta_schedule="linear", set_alpha_to_one=True, timestep_spacing="leading", clip_sample=False,
steps_offset=0, prediction_type="epsilon"`` (tested to 1e-5).
"""

from __future__ import annotations

import copy
import math

import torch


class Schedule:
    """Linear-beta DDPM schedule with ``T`` steps.

    Attributes (float32, shape (T,)): ``betas``, ``alphas_cumprod`` (abar),
    ``sqrt_alphas_cumprod`` and ``sqrt_one_minus_alphas_cumprod``.

    Device handling: the tables live on one device (CPU at construction); ``to(device)``
    returns a copy on another. Lookups move ``t`` to the tables' device and the result back to
    the caller's device, so a CPU schedule still works with CUDA tensors (at the cost of a
    small transfer per call); call ``to`` once to avoid it.
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        """Precompute the tables; ValueError unless ``T >= 1`` and ``0 < start <= end < 1``."""
        if T < 1 or not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"Schedule needs T >= 1 and 0 < beta_start <= beta_end < 1, "
                f"got T={T}, beta_start={beta_start}, beta_end={beta_end}"
            )
        self.T = T
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.betas = betas.float()
        self.alphas_cumprod = abar.float()
        self.sqrt_alphas_cumprod = abar.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt().float()

    @property
    def device(self) -> torch.device:
        """Device holding the tables."""
        return self.betas.device

    def to(self, device: torch.device | str) -> Schedule:
        """Return a copy of this schedule with every table on ``device``."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(moved, name, value.to(device))
        return moved

    @staticmethod
    def _lookup(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``table[t]`` for a long tensor ``t`` of shape (B,), returned on ``t``'s device."""
        return table[t.to(table.device)].to(t.device)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """``abar_t`` for integer timesteps ``t`` (B,) -> (B,) float32."""
        return self._lookup(self.alphas_cumprod, t)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Noise clean ``x0`` (B, ...) to step ``t`` (B,) with noise ``eps`` (shaped like x0)."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self._lookup(self.sqrt_alphas_cumprod, t).to(x0.dtype).view(shape)
        s = self._lookup(self.sqrt_one_minus_alphas_cumprod, t).to(x0.dtype).view(shape)
        return a * x0 + s * eps


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """The ``steps`` DDIM timesteps of a ``T``-step schedule, descending ("leading" spacing).

    ``[(steps - 1) * r, ..., r, 0]`` with ``r = T // steps``, as diffusers' ``set_timesteps``;
    the step after ``t`` is ``t - r``, and the last one steps to ``t_prev < 0`` (``abar = 1``).
    """
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in 1..{T}, got {steps}")
    ratio = T // steps
    return [i * ratio for i in reversed(range(steps))]


def _abar_at(sched: Schedule, t: int) -> float:
    """``abar_t`` as a Python float, or 1.0 for ``t < 0`` (``set_alpha_to_one``)."""
    return 1.0 if t < 0 else float(sched.alphas_cumprod[t])


def ddim_sigma(sched: Schedule, t: int, t_prev: int, eta: float) -> float:
    """``sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)``."""
    a_t, a_prev = _abar_at(sched, t), _abar_at(sched, t_prev)
    return eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))


def ddim_step(
    sched: Schedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One DDIM update ``x_t -> x_{t_prev}`` from the predicted noise ``eps``.

    ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, then
    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t**2) eps + sigma_t noise``;
    ``t_prev < 0`` means ``a_prev = 1``. ``noise`` (shaped like ``x_t``) may be None only when
    ``eta == 0``. Coefficients come from the float32 tables, combined in float64; the tensor
    arithmetic runs in ``x_t``'s dtype.
    """
    if not 0 <= t < sched.T or t_prev >= t:
        raise ValueError(
            f"DDIM step needs 0 <= t_prev < t < {sched.T} or t_prev < 0, got {t}, {t_prev}"
        )
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    a_t, a_prev = _abar_at(sched, t), _abar_at(sched, t_prev)
    sigma = ddim_sigma(sched, t, t_prev, eta)
    x0 = (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("DDIM step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev
