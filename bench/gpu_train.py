"""GPU training and sampling throughput and peak memory per preset, method and attention path.

Needs only torch. Feeds synthetic frames straight from GPU memory (no loader), bf16 autocast and
TF32 as the trainer uses them, and prints images/s and peak memory for each preset x method x
attention path (fused ``scaled_dot_product_attention``, what training and sampling run, against
the plain matmul path of ``train.unet.plain_attention``), the regulariser's overhead per image
against iid at equal images per step, and DDIM sampling images/s per preset. Run on a GPU machine:
    python3 bench/gpu_train.py [--presets small base --size 128 --window-batch 32 --steps 30]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from train.diffusion import Schedule, ddim_step, ddim_timesteps
from train.objectives import Options, draw_noise, get_method
from train.unet import build_unet, plain_attention


def rate(
    preset: str, method_name: str, batch: int, k: int, size: int, steps: int, fused: bool
) -> tuple:
    torch.manual_seed(0)
    model = build_unet(preset, size).cuda()
    path = contextlib.nullcontext() if fused else plain_attention(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = Schedule().to("cuda")
    method = get_method(method_name)
    x0 = torch.rand(batch, k, 3, size, size, device="cuda") * 2 - 1
    msq = torch.rand(batch, k - 1, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    with path:
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                t = time.perf_counter()
            noise = draw_noise(tuple(x0.shape), method.shared_noise, sched.T, gen, "cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = method.objective(model, sched, x0, msq, noise, Options())
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    images = batch * k * steps / (time.perf_counter() - t)
    return images, torch.cuda.max_memory_allocated() / 2**30


@torch.no_grad()
def sampling_rate(preset: str, size: int, batch: int, steps: int) -> float:
    """DDIM images/s (``steps`` steps, eta 0, x0 clipped, bf16 autocast, fused attention)."""
    torch.manual_seed(0)
    model = build_unet(preset, size).cuda().eval()
    sched = Schedule().to("cuda")
    timesteps = ddim_timesteps(sched.T, steps)
    for _ in range(2):  # the first is a warmup
        torch.cuda.synchronize()
        t = time.perf_counter()
        x = torch.randn(batch, 3, size, size, device="cuda")
        for step, prev in zip(timesteps, timesteps[1:] + [-1], strict=True):
            tt = torch.full((batch,), step, device="cuda", dtype=torch.long)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, tt).float()
            x = ddim_step(sched, x, out, step, prev, eta=0.0, noise=None, clip=True)
        torch.cuda.synchronize()
    return batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "base"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--window-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sample-batch", type=int, default=64, help="images per DDIM batch")
    p.add_argument("--ddim-steps", type=int, default=50)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, {a.size} px, bf16, {a.window_batch} windows of 3 "
          f"or {3 * a.window_batch} frames per step")  # fmt: skip
    print(f"{'preset':<8}{'method':<12}{'attention':<10}{'images/s':>10}{'vs iid':>8}"
          f"{'peak GiB':>10}")  # fmt: skip
    for preset in a.presets:
        for fused in (True, False):
            base = None
            for name in ("iid", "flow", "divergence"):
                k = 1 if name == "iid" else 3
                batch = a.window_batch * (3 if name == "iid" else 1)
                images, peak = rate(preset, name, batch, k, a.size, a.steps, fused)
                base = base or images
                print(f"{preset:<8}{name:<12}{'fused' if fused else 'plain':<10}{images:>10.0f}"
                      f"{images / base:>7.2f}x{peak:>10.2f}")  # fmt: skip
    for preset in a.presets:
        images = sampling_rate(preset, a.size, a.sample_batch, a.ddim_steps)
        print(f"{preset:<8}{'DDIM ' + str(a.ddim_steps):<12}{'fused':<10}{images:>10.1f}")


if __name__ == "__main__":
    main()
