"""Evaluation throughput: DDIM sampling and feature extraction images/s, measured in one run.

Sampling: `eval.sample.sample` with the given preset at the given size (perturbed random
weights: the cost does not depend on them), DDIM `--steps`, eta 0, batch `--batch`, at 1 and at
all torch threads. Features: the offline extractor (and Inception when its weight file is found)
on `--n` images, clean-fid's clean resize included. Prints images/s and, for sampling, UNet
evaluations per second (images x steps).

Run: .venv/bin/python bench/eval_throughput.py [--preset tiny --size 32 --steps 100 --n 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from eval import features
from eval.sample import sample
from train.diffusion import Schedule
from train.unet import build_unet


def sampling_rate(preset: str, size: int, steps: int, n: int, batch: int) -> float:
    torch.manual_seed(0)
    model = build_unet(preset, size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sched = Schedule()
    sample(model, sched, list(range(batch)), 0, 2, 0.0, batch, "cpu")  # warm-up
    t = time.perf_counter()
    sample(model, sched, list(range(n)), 0, steps, 0.0, batch, "cpu")
    return n / (time.perf_counter() - t)


def feature_rate(name: str, size: int, n: int, batch: int) -> float | None:
    try:
        ext = features.get_extractor(name, None, "cpu")
    except (features.FeatureError, ValueError) as exc:
        print(f"{name}: not measured ({str(exc).splitlines()[0][:100]})")
        return None
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    features.extract(images[:batch], ext, batch, progress=False)  # warm-up
    t = time.perf_counter()
    features.extract(images, ext, batch, progress=False)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    cores = torch.get_num_threads()
    print(f"CPU, {cores} torch threads; {a.preset} at {a.size} px, DDIM {a.steps} steps, "
          f"batch {a.batch}, {a.n} images")  # fmt: skip
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        r = sampling_rate(a.preset, a.size, a.steps, a.n, a.batch)
        print(f"sampling, {threads} thread(s): {r:.2f} images/s = {r * a.steps:.0f} UNet "
              f"evaluations/s")  # fmt: skip
    torch.set_num_threads(cores)
    for name in ("offline", "inception"):
        r = feature_rate(name, a.size, a.n, a.batch)
        if r is not None:
            print(f"features, {name} (clean resize to 299 px included): {r:.0f} images/s")


if __name__ == "__main__":
    main()
