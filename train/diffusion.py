"""DDPM noise schedules (betas, cumulative alphas, forward process) and the DDIM sampler.

Notation follows Ho et al. 2020: ``alpha_t = 1 - beta_t``, ``abar_t = prod_{s<=t} alpha_s``
and ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, for integer ``t`` in ``[0, T)`` (index 0
is the first noising step). Two beta schedules (:data:`SCHEDULES`): ``linear`` (Ho et al.,
1e-4..0.02; diffusers' ``"linear"``) and ``cosine`` (Nichol & Dhariwal 2021,
``abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2`` with each beta capped at 0.999; diffusers'
``"squaredcos_cap_v2"``). Tables are computed in float64 and stored as float32.

DDIM (Song et al. 2021) reads those tables: :func:`ddim_timesteps` picks the sampled steps and
:func:`ddim_step` moves ``x_t`` to ``x_{t_prev}`` from the network's output, optionally
clamping the predicted ``x_0`` to [-1, 1] and re-deriving eps from it (``clip``). Both match
diffusers' ``DDIMScheduler`` with ``set_alpha_to_one=True, timestep_spacing="leading",
steps_offset=0``, ``prediction_type`` ``"epsilon"`` or ``"v_prediction"``, ``clip_sample=clip``
and ``step(..., use_clipped_model_output=True)`` (tested to 1e-5 for both schedules and both
predictions, with and without clipping).

What the network predicts (:data:`PREDICTIONS`, the schedule's ``prediction``): ``eps``, the
noise (Ho et al.; diffusers' ``"epsilon"``), or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``
(Salimans & Ho 2022; diffusers' ``"v_prediction"``). :meth:`Schedule.target` is what the
denoising loss compares the output with and :meth:`Schedule.eps_from` turns an output into the
predicted noise, which is what the temporal regulariser and the validation loss compare, so that
they mean the same for both.
"""

from __future__ import annotations

import copy
import math

import torch

SCHEDULES = ("linear", "cosine")  # the beta schedules, by the name --schedule takes
DEFAULT_SCHEDULE = "linear"  # the paper's; also what a run made before --schedule existed used
COSINE_S = 0.008  # iDDPM's offset, so that beta_0 is not vanishingly small
MAX_BETA = 0.999  # iDDPM's cap on the cosine betas (the last ones would reach 1)
PREDICTIONS = ("eps", "v")  # what the network outputs, by the name --prediction takes
DEFAULT_PREDICTION = "eps"  # the paper's; also what a run made before --prediction existed used


def cosine_betas(T: int) -> torch.Tensor:
    """iDDPM's cosine betas (float64, shape (T,)): ``1 - abar((i+1)/T) / abar(i/T)``, capped."""

    def abar(s: float) -> float:
        return math.cos((s + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), MAX_BETA) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


class Schedule:
    """DDPM schedule with ``T`` steps: ``linear`` betas (``beta_start..beta_end``) or ``cosine``.

    Attributes (float32, shape (T,)): ``betas``, ``alphas_cumprod`` (abar),
    ``sqrt_alphas_cumprod`` and ``sqrt_one_minus_alphas_cumprod``.

    Device handling: the tables live on one device (CPU at construction); ``to(device)``
    returns a copy on another. Lookups move ``t`` to the tables' device and the result back to
    the caller's device, so a CPU schedule still works with CUDA tensors (at the cost of a
    small transfer per call); call ``to`` once to avoid it.
    """

    def __init__(
        self,
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        kind: str = DEFAULT_SCHEDULE,
        prediction: str = DEFAULT_PREDICTION,
    ) -> None:
        """Precompute the tables; ValueError unless ``T >= 1``, ``0 < start <= end < 1``,
        ``kind`` is one of :data:`SCHEDULES` (``beta_start``/``beta_end`` are the linear's) and
        ``prediction`` one of :data:`PREDICTIONS`."""
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}"
            )
        if T < 1 or not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"Schedule needs T >= 1 and 0 < beta_start <= beta_end < 1, "
                f"got T={T}, beta_start={beta_start}, beta_end={beta_end}"
            )
        self.T, self.kind, self.prediction = T, kind, prediction
        if kind == "cosine":
            betas = cosine_betas(T)
        else:
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

    def _coefficients(self, like: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``sqrt(abar_t)`` and ``sqrt(1 - abar_t)`` for ``t`` (B,), shaped to broadcast."""
        shape = (-1,) + (1,) * (like.dim() - 1)
        a = self._lookup(self.sqrt_alphas_cumprod, t).to(like.dtype).view(shape)
        s = self._lookup(self.sqrt_one_minus_alphas_cumprod, t).to(like.dtype).view(shape)
        return a, s

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Noise clean ``x0`` (B, ...) to step ``t`` (B,) with noise ``eps`` (shaped like x0)."""
        a, s = self._coefficients(x0, t)
        return a * x0 + s * eps

    def target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the network should output for ``x0`` noised to ``t`` with ``eps``."""
        if self.prediction == "eps":
            return eps
        a, s = self._coefficients(x0, t)
        return a * eps - s * x0

    def eps_from(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise an output ``out`` at ``x_t`` and step ``t`` (B,) predicts."""
        if self.prediction == "eps":
            return out
        a, s = self._coefficients(out, t)
        return a * out + s * x_t.to(out.dtype)


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
    out: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float,
    noise: torch.Tensor | None,
    clip: bool = False,
) -> torch.Tensor:
    """One DDIM update ``x_t -> x_{t_prev}`` from the network's output ``out`` at ``t``.

    ``out`` is the predicted noise ``eps`` or, when the schedule's prediction is ``v``,
    ``v``, read as diffusers does: ``x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v`` and
    ``eps = sqrt(a_t) v + sqrt(1 - a_t) x_t``. For eps,
    ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``; with ``clip``, ``x0`` is clamped to
    [-1, 1] and ``eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)`` re-derived from it; then
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
    if sched.prediction == "v":
        x0 = math.sqrt(a_t) * x_t - math.sqrt(1.0 - a_t) * out
        eps = math.sqrt(a_t) * out + math.sqrt(1.0 - a_t) * x_t
    else:
        eps = out
        x0 = (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("DDIM step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev
