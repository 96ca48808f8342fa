"""CPU tests of the UNet (train/unet.py) and the DDPM schedule (train/diffusion.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.func import functional_call, grad, vmap

from train.diffusion import Schedule
from train.unet import PRESETS, AttnBlock, UNet, UNetConfig, build_unet, model_cost, plain_attention

T = 1000


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Deterministic weights and inputs in every test."""
    torch.manual_seed(0)


def _inputs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] and integer timesteps."""
    x = torch.rand(batch, 3, size, size) * 2 - 1
    t = torch.randint(0, T, (batch,))
    return x, t


def _perturb(model: UNet, std: float = 0.05) -> UNet:
    """Add noise to every parameter so zero-initialised layers stop hiding the rest."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("preset", "size"), [("tiny", 16), ("tiny", 32), ("small", 32)])
def test_output_shape_matches_input(preset: str, size: int) -> None:
    model = build_unet(preset, size)
    x, t = _inputs(2, size)
    with torch.no_grad():
        assert model(x, t).shape == x.shape


def test_zero_init_output_and_first_loss() -> None:
    model = build_unet("tiny", 16)
    x, t = _inputs(4, 16)
    eps = torch.randn_like(x)
    out = model(x, t)
    assert torch.count_nonzero(out) == 0
    loss = torch.mean((out - eps) ** 2)
    assert loss.item() == torch.mean(eps**2).item()


def test_capture_every_block() -> None:
    model = _perturb(build_unet("tiny", 16)).eval()
    x, t = _inputs(2, 16)
    names = model.block_names()
    levels = len(model.config.mults)
    assert names == ["down0", "down1", "down2", "mid", "up2", "up1", "up0"]
    with torch.no_grad():
        plain = model(x, t)
        assert torch.count_nonzero(plain) > 0
        for name in names:
            eps, act = model(x, t, capture=name)
            torch.testing.assert_close(eps, plain, rtol=0, atol=0)
            level = levels - 1 if name == "mid" else int(name[-1])
            side = 16 // 2**level
            assert act.shape[0] == 2 and act.shape[2:] == (side, side), name


def test_bad_image_size_raises() -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_unet("tiny", 18)
    with pytest.raises(ValueError, match="too small"):
        build_unet("tiny", 8)


def test_unknown_preset_and_block_raise() -> None:
    with pytest.raises(ValueError, match="tiny"):
        build_unet("huge", 32)
    model = build_unet("tiny", 16)
    x, t = _inputs(1, 16)
    with pytest.raises(ValueError, match="down0"):
        model(x, t, capture="nope")


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(channels=32, mults=(1, 2), blocks=1, attn_levels=(), heads=1, groups=5)
    with pytest.raises(ValueError, match="attn_levels"):
        UNetConfig(channels=32, mults=(1, 2), blocks=1, attn_levels=(2,), heads=1, groups=8)
    with pytest.raises(ValueError, match="heads"):
        UNetConfig(channels=32, mults=(1, 2), blocks=1, attn_levels=(1,), heads=3, groups=8)


def test_model_cost_scales_with_pixels() -> None:
    small_side, big_side = build_unet("tiny", 16), build_unet("tiny", 32)
    macs16, params16 = model_cost(small_side, 16)
    macs32, params32 = model_cost(big_side, 32)
    assert macs16 > 0 and macs32 > 0
    # convs scale by exactly 4, attention by 16, the time MLP by 1
    assert 3.9 < macs32 / macs16 < 4.6
    assert params16 == params32 == sum(p.numel() for p in big_side.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in big_side.modules())


def test_model_cost_counts_attention_matmuls() -> None:
    cfg = PRESETS["tiny"]
    with_attn = build_unet("tiny", 16)
    without = UNet(UNetConfig(**{**cfg.__dict__, "attn_levels": ()}), 16)
    diff = model_cost(with_attn, 16)[0] - model_cost(without, 16)[0]
    # tiny at 16 px attends at level 2 (4x4 px, 64 ch): 1 down + 2 up blocks, no middle change
    n, c = 4 * 4, cfg.channels * cfg.mults[2]
    qkv, matmuls, proj = 3 * c * c * n + 3 * c * n, 2 * n * n * c, c * c * n + c * n  # + biases
    per_block = qkv + matmuls + proj
    assert diff == 3 * per_block


def test_per_sample_grads_match_loop() -> None:
    model = _perturb(build_unet("tiny", 16))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, t = _inputs(4, 16)
    eps = torch.randn_like(x)

    def loss_one(p: dict, xi: torch.Tensor, ti: torch.Tensor, ei: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi[None], ti[None]))
        return torch.mean((out - ei[None]) ** 2)

    with plain_attention(model):  # as the gradient-variance probe runs it
        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, x, t, eps)
    for i in range(4):
        model.zero_grad()
        torch.mean((model(x[i : i + 1], t[i : i + 1]) - eps[i : i + 1]) ** 2).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=0, atol=1e-5, msg=name)


def test_vmap_with_dropout_needs_randomness() -> None:
    cfg = UNetConfig(channels=16, mults=(1, 2), blocks=1, attn_levels=(1,), heads=2, groups=4)
    model = UNet(UNetConfig(**{**cfg.__dict__, "dropout": 0.1}), 8).train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, t = _inputs(2, 8)

    def out_one(p: dict, xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi[None], ti[None])).sum()

    with plain_attention(model):
        grads = vmap(grad(out_one), in_dims=(None, 0, 0), randomness="different")(params, x, t)
        assert all(torch.isfinite(g).all() and g.shape[0] == 2 for g in grads.values())
        with pytest.raises(RuntimeError, match="randomness"):
            vmap(grad(out_one), in_dims=(None, 0, 0))(params, x, t)


@pytest.mark.parametrize(("preset", "size"), [("tiny", 32), ("small", 32), ("base", 64)])
def test_fused_and_plain_attention_agree(preset: str, size: int) -> None:
    """scaled_dot_product_attention (training and sampling) and the matmul-softmax path
    (torch.func) give the same outputs, and for tiny the same gradients, to 1e-5 of the
    output's scale (max(1, max |output|), as the export's check)."""
    model = _perturb(build_unet(preset, size), std=0.1).eval()
    assert all(block.fused for block in model.modules() if isinstance(block, AttnBlock))
    x, t = _inputs(2, size)
    fused = model(x, t)
    with plain_attention(model):
        assert not any(block.fused for block in model.modules() if isinstance(block, AttnBlock))
        plain = model(x, t)
    assert all(block.fused for block in model.modules() if isinstance(block, AttnBlock))
    assert fused.abs().max() > 0.5  # attention contributes: the projections are not zero
    scale = max(1.0, float(plain.detach().abs().max()))
    print(
        f"{preset}: max |fused - plain| {float((fused - plain).detach().abs().max()):.3g}, scale {scale:.3g}"
    )
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5 * scale)
    if preset != "tiny":
        return
    grads = []
    for path in (contextlib.nullcontext(), plain_attention(model)):
        model.zero_grad()
        with path:
            model(x, t).pow(2).mean().backward()
        grads.append({name: q.grad.clone() for name, q in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=0, atol=1e-5, msg=name)


def test_schedule_tables() -> None:
    s = Schedule()
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float32
    assert s.betas.shape == s.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-7)
    steps = s.betas[1:] - s.betas[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, 0.0199 / 999), rtol=0, atol=1e-7)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)
    t = torch.tensor([0, 5, 999])
    assert s.abar(t).shape == (3,)
    torch.testing.assert_close(s.abar(t), s.alphas_cumprod[t])


def test_q_sample_formula() -> None:
    s = Schedule()
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    # reference in float64: 1 - abar in float32 loses digits near t = 0
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    abar = abar[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    torch.testing.assert_close(s.q_sample(x0, t, eps).double(), expected, rtol=0, atol=1e-6)
    flat = torch.randn(3, 7)  # any trailing shape broadcasts
    assert s.q_sample(flat, t, flat).shape == (3, 7)
    moved = s.to("cpu")
    torch.testing.assert_close(moved.q_sample(x0, t, eps), s.q_sample(x0, t, eps))


def test_schedule_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="beta_start"):
        Schedule(beta_start=0.03, beta_end=0.02)
