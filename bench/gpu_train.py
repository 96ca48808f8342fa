"""GPU training throughput and peak memory per preset and method (needs only torch).

Feeds synthetic frames straight from GPU memory (no loader), bf16 autocast and TF32 as the
trainer uses them, and prints images/s and peak memory for each preset x method, plus the
regulariser's overhead per image against iid at equal images per step. Run on a GPU machine:
    python3 bench/gpu_train.py [--presets small base --size 128 --window-batch 32 --steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from train.diffusion import Schedule
from train.objectives import Options, draw_noise, get_method
from train.unet import build_unet


def rate(preset: str, method_name: str, batch: int, k: int, size: int, steps: int) -> tuple:
    torch.manual_seed(0)
    model = build_unet(preset, size).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = Schedule().to("cuda")
    method = get_method(method_name)
    x0 = torch.rand(batch, k, 3, size, size, device="cuda") * 2 - 1
    msq = torch.rand(batch, k - 1, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "base"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--window-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, {a.size} px, bf16, {a.window_batch} windows of 3 "
          f"or {3 * a.window_batch} frames per step")  # fmt: skip
    print(f"{'preset':<8}{'method':<10}{'images/s':>10}{'vs iid':>8}{'peak GiB':>10}")
    for preset in a.presets:
        base = None
        for name in ("iid", "flow", "divergence"):
            k = 1 if name == "iid" else 3
            batch = a.window_batch * (3 if name == "iid" else 1)
            images, peak = rate(preset, name, batch, k, a.size, a.steps)
            base = base or images
            print(f"{preset:<8}{name:<10}{images:>10.0f}{images / base:>7.2f}x{peak:>10.2f}")


if __name__ == "__main__":
    main()
