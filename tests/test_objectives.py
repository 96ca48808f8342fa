"""CPU tests of the training objectives (train/objectives.py) and train/diagnostics.py.

They hold the code to the math of ``../shared/DESIGN.md`` ("The math"): shared noise, the
temporal regulariser and its flow / trajectory-divergence weights, Dispersive Loss, and the
convergence diagnostics (gradient variance, fixed-noise validation loss).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from train import diagnostics
from train.diffusion import Schedule
from train.objectives import (
    METHODS,
    Noise,
    Options,
    auto_sigma_div,
    dispersive_loss,
    divergence_rate,
    draw_noise,
    flow_weights,
    get_method,
    pair_mismatch,
)
from train.unet import UNet, build_unet

T = 1000
SIZE = 16
REGULARISED = ("adjacent", "flow", "divergence")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on shared cores extra threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Deterministic weights and inputs in every test."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def sched() -> Schedule:
    """The DDPM schedule of the paper (linear betas 1e-4..0.02, T = 1000)."""
    return Schedule(T)


@pytest.fixture(scope="module")
def perturbed() -> UNet:
    """A tiny UNet whose zero-initialised layers are perturbed, so it predicts non-zero noise."""
    torch.manual_seed(1)
    return _perturb(build_unet("tiny", SIZE)).eval()


# --------------------------------------------------------------------------------------------
# helpers


def _perturb(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Add noise to every parameter so zero-initialised layers stop hiding the rest."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def _windows(batch: int = 8, k: int = 3, size: int = SIZE, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Smooth synthetic windows ``(batch, k, 3, size, size)`` in [-1, 1] and their flow_msq.

    Each window is a tilted gradient plus a Gaussian blob, both translating by a per-window
    velocity ``v`` (pixels per frame); ``flow_msq`` is ``|v|^2`` for every adjacent pair.
    """
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    frames = torch.empty(batch, k, 3, size, size)
    msq = torch.empty(batch, k - 1)
    for b in range(batch):
        angle, phase = (torch.rand(2, generator=gen) * 2 * math.pi).tolist()
        vx, vy = ((torch.rand(2, generator=gen) - 0.5) * 3).tolist()
        cx, cy = (size / 4 + torch.rand(2, generator=gen) * size / 2).tolist()
        colour = torch.rand(3, generator=gen) * 2 - 1
        msq[b] = vx * vx + vy * vy
        for f in range(k):
            u = (xs - vx * f) * math.cos(angle) + (ys - vy * f) * math.sin(angle)
            grad_img = torch.sin(2 * math.pi * u / size + phase)
            blob = torch.exp(-((xs - cx - vx * f) ** 2 + (ys - cy - vy * f) ** 2) / 8)
            img = 0.6 * grad_img[None] + colour[:, None, None] * blob[None]
            frames[b, f] = img.clamp(-1, 1)
    return frames, msq


def _to_uint8(x0: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 frames, channels last (what the data loader hands out)."""
    return ((x0 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1)


def _true_abar() -> Tensor:
    """abar_t in float64, computed independently of `Schedule`."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _noisy(sched: Schedule, x: Tensor, t: int, eps: Tensor) -> Tensor:
    """x_t of one frame (C, H, W) by hand: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    a = sched.sqrt_alphas_cumprod[t]
    s = sched.sqrt_one_minus_alphas_cumprod[t]
    return a * x + s * eps


class _Stub(nn.Module):
    """A parameter-free 'model' whose output is a known function of (x, t)."""

    def forward(self, x: Tensor, t: Tensor, capture: str | None = None) -> Tensor:
        """eps_hat = tanh(0.8 x) + t / 2000 (so both inputs matter)."""
        return torch.tanh(0.8 * x) + t.float()[:, None, None, None] / 2000


def _centre(x0: Tensor, msq: Tensor) -> tuple[Tensor, Tensor]:
    """The centre frame of each window, as the loader feeds the single-frame methods."""
    c = x0.shape[1] // 2
    return x0[:, c : c + 1], msq[:, :0]


def _noise_for(method_name: str, x0: Tensor, seed: int = 0) -> Noise:
    """Noise drawn the way the training loop draws it for `method_name`."""
    gen = torch.Generator().manual_seed(seed)
    return draw_noise(tuple(x0.shape), METHODS[method_name].shared_noise, T, gen, "cpu")


# --------------------------------------------------------------------------------------------
# 1. noise and method flags


def test_shared_noise_is_one_draw_per_window() -> None:
    """shared=True: every frame of a window gets the same t and eps; windows differ."""
    gen = torch.Generator().manual_seed(3)
    noise = draw_noise((6, 4, 3, SIZE, SIZE), True, T, gen, "cpu")
    assert noise.t.shape == (6, 4) and noise.t.dtype == torch.long
    assert noise.eps.shape == (6, 4, 3, SIZE, SIZE)
    assert ((noise.t >= 0) & (noise.t < T)).all()
    for f in range(1, 4):
        assert torch.equal(noise.t[:, f], noise.t[:, 0])
        assert torch.equal(noise.eps[:, f], noise.eps[:, 0])
    assert len(set(noise.t[:, 0].tolist())) > 1
    assert not torch.equal(noise.eps[0, 0], noise.eps[1, 0])
    assert noise.eps.std().item() == pytest.approx(1.0, abs=0.05)


def test_independent_noise_differs_per_frame() -> None:
    """shared=False (the `seq` method): t and eps are drawn separately for every frame."""
    assert METHODS["seq"].shared_noise is False
    gen = torch.Generator().manual_seed(3)
    noise = draw_noise((6, 4, 3, SIZE, SIZE), METHODS["seq"].shared_noise, T, gen, "cpu")
    assert noise.t.shape == (6, 4)
    for f in range(1, 4):
        assert not torch.equal(noise.t[:, f], noise.t[:, 0])
        for b in range(6):
            assert not torch.equal(noise.eps[b, f], noise.eps[b, 0])
    # the same seed gives the same draw
    again = draw_noise((6, 4, 3, SIZE, SIZE), False, T, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(again.t, noise.t) and torch.equal(again.eps, noise.eps)


def test_method_flags() -> None:
    """Shared noise only for the regularised methods; window input for all but iid/dispersive."""
    assert set(METHODS) == {"iid", "seq", "adjacent", "flow", "divergence", "dispersive"}
    shared = {name: m.shared_noise for name, m in METHODS.items()}
    window = {name: m.window for name, m in METHODS.items()}
    assert shared == {
        "iid": False,
        "seq": False,
        "adjacent": True,
        "flow": True,
        "divergence": True,
        "dispersive": False,
    }
    assert window == {
        "iid": False,
        "seq": True,
        "adjacent": True,
        "flow": True,
        "divergence": True,
        "dispersive": False,
    }
    for name, m in METHODS.items():
        assert m.name == name and get_method(name) is m


# --------------------------------------------------------------------------------------------
# 2. the regulariser vanishes on identical frames


@pytest.mark.parametrize("name", REGULARISED)
def test_regulariser_zero_for_identical_frames(name: str, sched: Schedule, perturbed: UNet) -> None:
    """Identical frames + shared noise -> identical eps_hat -> reg == 0 exactly; distinct > 0."""
    method = get_method(name)
    x0, msq = _windows(batch=4, k=3)
    same = x0[:, :1].expand_as(x0).contiguous()
    noise = _noise_for(name, x0, seed=5)
    opts = Options(sigma=1.0, sigma_div=0.01, lam=1.0)
    with torch.no_grad():
        loss, terms = method.objective(perturbed, sched, same, msq, noise, opts)
        assert terms["reg"].shape == (4,)
        assert torch.equal(terms["reg"], torch.zeros(4))
        assert torch.allclose(loss, terms["denoise"])
        assert (terms["denoise"] > 0).all()

        _, terms = method.objective(perturbed, sched, x0, msq, noise, opts)
        assert (terms["reg"] > 0).all()
        assert torch.isfinite(terms["reg"]).all()


# --------------------------------------------------------------------------------------------
# 3. flow weights and the regulariser formula


def test_flow_weights_and_regulariser_by_hand(sched: Schedule) -> None:
    """flow: w = exp(-flow_msq / sigma), reg = sum_k w_k mean_p (eps_hat^k - eps_hat^{k+1})^2."""
    x0, _ = _windows(batch=3, k=4)
    msq = torch.tensor([[0.0, 0.3, 1.2], [2.5, 0.05, 0.7], [4.0, 9.0, 0.0]], dtype=torch.float64)
    noise = _noise_for("flow", x0, seed=7)
    sigma, lam = 0.7, 0.3
    stub = _Stub()
    loss, terms = get_method("flow").objective(
        stub, sched, x0, msq, noise, Options(sigma=sigma, lam=lam)
    )

    for b in range(3):
        t = int(noise.t[b, 0])
        eps_hat = [
            stub(_noisy(sched, x0[b, f], t, noise.eps[b, f])[None], torch.tensor([t]))[0]
            for f in range(4)
        ]
        w = [math.exp(-float(msq[b, j]) / sigma) for j in range(3)]
        mismatch = [float((eps_hat[j] - eps_hat[j + 1]).pow(2).mean()) for j in range(3)]
        reg = sum(wj * mj for wj, mj in zip(w, mismatch, strict=True))
        denoise = sum(float((eps_hat[f] - noise.eps[b, f]).pow(2).mean()) for f in range(4)) / 4

        assert float(terms["w_mean"][b]) == pytest.approx(sum(w) / 3, rel=1e-6)
        assert float(terms["reg"][b]) == pytest.approx(reg, rel=1e-5)
        assert float(terms["denoise"][b]) == pytest.approx(denoise, rel=1e-5)
        assert float(loss[b]) == pytest.approx(denoise + lam * reg, rel=1e-5)


def test_pair_mismatch_and_weights_order() -> None:
    """pair_mismatch is per adjacent pair; a larger flow gives a smaller weight in (0, 1]."""
    eps_hat = torch.zeros(1, 3, 1, 2, 2)
    eps_hat[0, 1] = 1.0
    eps_hat[0, 2] = 3.0
    assert torch.allclose(pair_mismatch(eps_hat), torch.tensor([[1.0, 4.0]]))
    w = flow_weights(torch.tensor([[0.0, 0.1, 1.0, 10.0]]), 0.5)
    assert w[0, 0] == 1.0 and (w[0, 1:] < w[0, :-1]).all() and (w > 0).all()


# --------------------------------------------------------------------------------------------
# 4. trajectory divergence: the closed form


def _closed_form_rate(x0: Tensor, t: Tensor, delta: int) -> Tensor:
    """|abar(hi) - abar(lo)| / (hi - lo) * mean((x0^k - x0^{k+1})^2), hi/lo = t +- delta clamped."""
    abar = _true_abar()
    lo, hi = (t - delta).clamp(0, T - 1), (t + delta).clamp(0, T - 1)
    slope = (abar[hi] - abar[lo]).abs() / (hi - lo).double()
    pair = (x0[:, 1:].double() - x0[:, :-1].double()).pow(2).flatten(2).mean(2)
    return slope[:, None] * pair


# t = 0, 2 clamp below (lo = 0) and 997, 999 clamp above (hi = T - 1) for both deltas
TIMES = [0, 2, 250, 500, 997, 999]


@pytest.mark.parametrize(("delta", "rtol"), [(50, 1e-5), (5, 1e-3)])
def test_divergence_rate_matches_closed_form(sched: Schedule, delta: int, rtol: float) -> None:
    """divergence_rate == |abar(t+d) - abar(t-d)| / span * mean pair diff^2 (span = hi - lo).

    Shared eps cancels out of x_t^k - x_t^{k+1}, so Ddot is known in closed form. With the
    default delta = 5, differencing two nearly equal float32 D_t near t = 0 costs ~4 digits,
    hence rtol 1e-3 there (a wrong span or a missing abar factor is off by far more).
    """
    x0, _ = _windows(batch=len(TIMES), k=3)
    noise = _noise_for("divergence", x0, seed=11)
    t = torch.tensor(TIMES)
    noise = Noise(t[:, None].expand(len(TIMES), 3), noise.eps)
    rate = divergence_rate(sched, x0, noise, delta)
    expected = _closed_form_rate(x0, t, delta)
    assert rate.shape == (len(TIMES), 2)
    assert torch.allclose(rate.double(), expected, rtol=rtol, atol=0)
    # the clamped spans really are shorter than 2 delta: the unclamped formula is off by > 20 %
    naive = expected.clone()
    for i, ti in enumerate(TIMES):
        lo, hi = max(ti - delta, 0), min(ti + delta, T - 1)
        naive[i] *= (hi - lo) / (2 * delta)
    clamped = [i for i, ti in enumerate(TIMES) if ti < delta or ti > T - 1 - delta]
    assert clamped
    for i in clamped:
        assert not torch.allclose(rate[i].double(), naive[i], rtol=0.2, atol=0)


def test_divergence_rate_independent_of_eps_and_weights(sched: Schedule) -> None:
    """Ddot does not depend on the shared eps, and the divergence method's w matches it."""
    x0, msq = _windows(batch=len(TIMES), k=3)
    t = torch.tensor(TIMES)[:, None].expand(len(TIMES), 3)
    zero = divergence_rate(sched, x0, Noise(t, torch.zeros_like(x0)), 50)
    eps = _noise_for("divergence", x0, seed=2).eps
    assert torch.allclose(divergence_rate(sched, x0, Noise(t, eps), 50), zero, rtol=1e-4, atol=0)

    sigma_div = float(zero.median())
    noise = Noise(t, eps)
    _, terms = get_method("divergence").objective(
        _Stub(), sched, x0, msq, noise, Options(sigma_div=sigma_div, delta=50)
    )
    expected_w = torch.exp(-_closed_form_rate(x0, torch.tensor(TIMES), 50) / sigma_div)
    assert torch.allclose(terms["w_mean"].double(), expected_w.mean(1), rtol=1e-4, atol=0)


def test_auto_sigma_div_is_positive_median(sched: Schedule) -> None:
    """auto_sigma_div returns the median |Ddot| at random t (> 0), and 1.0 when all are 0."""
    x0, _ = _windows(batch=8, k=3)
    value = auto_sigma_div(sched, x0, 5, torch.Generator().manual_seed(4))
    assert value > 0 and math.isfinite(value)
    noise = draw_noise(tuple(x0.shape), True, T, torch.Generator().manual_seed(4), "cpu")
    rate = _closed_form_rate(x0, noise.t[:, 0], 5).flatten()
    assert value == pytest.approx(float(rate.median()), rel=1e-3)
    same = x0[:, :1].expand_as(x0).contiguous()
    assert auto_sigma_div(sched, same, 5, torch.Generator().manual_seed(4)) == 1.0


# --------------------------------------------------------------------------------------------
# 5. dispersive loss


def _dispersive_by_loop(z: Tensor, tau: float) -> float:
    """log(mean_ij exp(-||z_i - z_j||^2 / (d tau))) with a plain double loop in float64."""
    z = z.double().flatten(1)
    n, d = z.shape
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += math.exp(-float((z[i] - z[j]).pow(2).sum()) / (d * tau))
    return math.log(total / (n * n))


@pytest.mark.parametrize("n", [5, 30])  # 30 > 25 takes cdist's matrix-multiply path
def test_dispersive_loss_matches_double_loop(n: int) -> None:
    """dispersive_loss equals the InfoNCE-L2 formula evaluated pair by pair."""
    z = torch.randn(n, 4, 2, 2)
    for tau in (0.5, 2.0):
        assert float(dispersive_loss(z, tau)) == pytest.approx(
            _dispersive_by_loop(z, tau), rel=1e-5, abs=1e-6
        )


def test_dispersive_loss_zero_when_collapsed_and_lower_when_spread() -> None:
    """All z equal -> 0 (the maximum); spread-out z score lower than clustered z."""
    for n in (6, 40):
        z = torch.randn(1, 8, 4, 4).expand(n, 8, 4, 4)
        assert float(dispersive_loss(z, 0.5)) == pytest.approx(0.0, abs=1e-5)
    base = torch.randn(16, 32)
    clustered = dispersive_loss(0.05 * base, 0.5)
    spread = dispersive_loss(3.0 * base, 0.5)
    assert float(spread) < float(clustered) < 0


def test_dispersive_objective_terms(sched: Schedule, perturbed: UNet) -> None:
    """dispersive: loss = denoise + disp_weight * dispersive_loss(block activation, tau)."""
    x0, msq = _centre(*_windows(batch=6, k=3))
    noise = _noise_for("dispersive", x0, seed=6)
    opts = Options(disp_weight=0.7, disp_tau=0.4, disp_block="down1")
    with torch.no_grad():
        loss, terms = get_method("dispersive").objective(perturbed, sched, x0, msq, noise, opts)
        flat = x0.flatten(0, 1)
        t = noise.t.reshape(-1)
        xt = sched.q_sample(flat, t, noise.eps.reshape(flat.shape))
        eps_hat, feat = perturbed(xt, t, capture="down1")
    assert feat.shape[1:] == (64, SIZE // 2, SIZE // 2)
    disp = float(dispersive_loss(feat, 0.4))
    denoise = (eps_hat - noise.eps.flatten(0, 1)).pow(2).flatten(1).mean(1)
    assert disp < 0
    assert torch.allclose(terms["disp"], torch.full((6,), disp), rtol=1e-5)
    assert torch.allclose(terms["denoise"], denoise, rtol=1e-5)
    assert torch.allclose(loss, denoise + 0.7 * disp, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 6. unknown method


def test_get_method_unknown_lists_methods() -> None:
    """get_method('nope') raises ValueError naming 'nope' and every known method."""
    with pytest.raises(ValueError) as info:
        get_method("nope")
    message = str(info.value)
    assert "nope" in message
    for name in ("iid", "seq", "adjacent", "flow", "divergence", "dispersive"):
        assert name in message


# --------------------------------------------------------------------------------------------
# 7. every method trains


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains(name: str, sched: Schedule) -> None:
    """40 AdamW steps on a fixed batch: finite losses, reg >= 0, loss and denoise term go down."""
    method = get_method(name)
    x0, msq = _windows(batch=8, k=3)
    if not method.window:
        x0, msq = _centre(x0, msq)
    opts = Options(sigma=1.0)
    if name == "divergence":
        sigma_div = auto_sigma_div(sched, x0, opts.delta, torch.Generator().manual_seed(9))
        opts = Options(sigma_div=sigma_div)
    torch.manual_seed(0)
    model = build_unet("tiny", SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(42)
    losses, denoises = [], []
    for _ in range(40):
        noise = draw_noise(tuple(x0.shape), method.shared_noise, T, gen, "cpu")
        per_window, terms = method.objective(model, sched, x0, msq, noise, opts)
        loss = per_window.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert per_window.shape == (8,)
        value = loss.item()
        assert math.isfinite(value), f"{name}: non-finite loss {value}"
        if "reg" in terms:
            assert (terms["reg"] >= 0).all()
        losses.append(value)
        denoises.append(terms["denoise"].mean().item())
    for label, series in (("loss", losses), ("denoise", denoises)):
        first, last = sum(series[:10]) / 10, sum(series[-10:]) / 10
        assert last < first, f"{name}: {label} did not fall ({first:.4f} -> {last:.4f})"


# --------------------------------------------------------------------------------------------
# 8. gradient variance


def _grad_stats_by_loop(model, sched, method, opts, probe) -> dict[str, float]:
    """mean_i ||g_i - g_mean||^2 etc. from per-sample torch.autograd.grad calls."""
    params = list(model.parameters())
    grads = []
    for i in range(len(probe)):
        part = slice(i, i + 1)
        noise = Noise(probe.noise.t[part], probe.noise.eps[part])
        loss, _ = method.objective(model, sched, probe.x0[part], probe.flow_stat[part], noise, opts)
        g = torch.autograd.grad(loss.sum(), params)
        grads.append(torch.cat([x.double().flatten() for x in g]))
    stack = torch.stack(grads)
    mean = stack.mean(0)
    return {
        "grad_var": float((stack - mean).pow(2).sum(1).mean()),
        "grad_mean_sq": float(mean.pow(2).sum()),
        "grad_sample_sq": float(stack.pow(2).sum(1).mean()),
    }


@pytest.mark.parametrize("name", list(METHODS))
def test_gradient_variance_matches_loop(name: str, sched: Schedule, perturbed: UNet) -> None:
    """gradient_variance (torch.func) equals a per-sample autograd loop; the mode is kept.

    Dispersive Loss is a batch term, so its per-sample gradient is that of the iid loss.
    """
    method = get_method(name)
    x0, msq = _windows(batch=4, k=3, seed=5)
    if not method.window:
        x0, msq = _centre(x0, msq)
    probe = diagnostics.probe_set(_to_uint8(x0), msq, method, T, "cpu")
    if method.shared_noise:
        assert torch.equal(probe.noise.t, probe.noise.t[:, :1].expand_as(probe.noise.t))
    opts = Options(sigma=1.0, lam=1.0, sigma_div=1e-3)
    perturbed.train()
    stats = diagnostics.gradient_variance(perturbed, sched, method, opts, probe, chunk=3)
    assert perturbed.training
    perturbed.eval()
    reference = get_method("iid") if name == "dispersive" else method
    expected = _grad_stats_by_loop(perturbed, sched, reference, opts, probe)
    assert stats["grad_var"] >= 0
    assert stats["grad_var"] > 0.01 * stats["grad_sample_sq"]  # the probe is not degenerate
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-4), key


# --------------------------------------------------------------------------------------------
# 9. validation loss


def test_validation_loss_deterministic_and_by_hand(sched: Schedule, perturbed: UNet) -> None:
    """validation_loss: fixed t spread over [0, T), fixed eps, mean per-frame MSE; repeatable."""
    x0, _ = _windows(batch=4, k=1, seed=8)
    frames = _to_uint8(x0)
    val = diagnostics.validation_set(frames, torch.zeros(4, 0), T, "cpu")
    assert val.noise.t.flatten().tolist() == [125, 375, 625, 875]
    gen = torch.Generator().manual_seed(diagnostics.FIXED_SEED)
    assert torch.equal(val.noise.eps, torch.randn(x0.shape, generator=gen))
    assert torch.allclose(val.x0, frames.movedim(-1, -3).float() / 127.5 - 1)

    perturbed.train()
    first = diagnostics.validation_loss(perturbed, sched, val, batch=3)
    second = diagnostics.validation_loss(perturbed, sched, val, batch=3)
    assert perturbed.training
    perturbed.eval()
    assert first == second

    errors = []
    with torch.no_grad():
        for i in range(4):
            t = int(val.noise.t[i, 0])
            eps = val.noise.eps[i, 0]
            xt = _noisy(sched, val.x0[i, 0], t, eps)
            eps_hat = perturbed(xt[None], torch.tensor([t]))[0]
            errors.append(float((eps_hat - eps).pow(2).mean()))
    assert first == pytest.approx(sum(errors) / 4, rel=1e-5)
    assert diagnostics.validation_loss(perturbed, sched, val, batch=64) == pytest.approx(
        first, rel=1e-5
    )
