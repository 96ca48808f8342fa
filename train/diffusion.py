"""DDPM noise schedule: linear betas, cumulative alphas and the forward (noising) process.

Notation follows Ho et al. 2020: ``alpha_t = 1 - beta_t``, ``abar_t = prod_{s<=t} alpha_s``
and ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, for integer ``t`` in ``[0, T)`` (index 0
is the first noising step, so ``abar[0] = 1 - beta_start``). Tables are computed in float64 and
stored as float32. Samplers (DDIM) are meant to be added next to this class and read the
tables it holds.
"""

from __future__ import annotations

import copy

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
