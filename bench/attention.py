"""Fused against plain attention: a training step's speed and peak memory, side by side in one run.

The UNet's attention runs ``F.scaled_dot_product_attention`` (fused) in training and sampling,
and matmul plus softmax (plain) inside ``train.unet.plain_attention``, where ``torch.func``
needs it. Each measurement is one fresh process: it builds the preset, takes ``--warmup`` and
then ``--steps`` forward-and-backward steps (MSE to random noise at random t, float32) at the
given batch, and reports the median step time and the growth of its peak resident memory over
the steps (``ru_maxrss`` after the steps minus the resident size before the first). Fused and
plain alternate over ``--rounds`` rounds (this VM's speed drifts); medians over the rounds.

Run: .venv/bin/python bench/attention.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = (("small", 64, 16), ("base", 128, 2))  # preset, image side, batch

CHILD = """
import json, resource, statistics, sys, time, contextlib
import torch
sys.path.insert(0, {root!r})
from train.unet import build_unet, plain_attention
preset, size, batch, fused, warmup, steps = {args!r}
torch.manual_seed(0)
model = build_unet(preset, size).train()
x = torch.randn(batch, 3, size, size)
t = torch.randint(0, 1000, (batch,))
eps = torch.randn_like(x)
def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024
path = contextlib.nullcontext() if fused else plain_attention(model)
times = []
with path:
    for i in range(warmup + steps):
        if i == warmup:
            before = rss_kb()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = (model(x, t) - eps).pow(2).mean()
        loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"step_s": statistics.median(times), "step_mem_mb": (peak - before) / 1024,
                  "peak_mb": peak / 1024}}))
"""


def measure(preset: str, size: int, batch: int, fused: bool, args) -> dict:
    code = CHILD.format(root=str(ROOT), args=(preset, size, batch, fused, args.warmup, args.steps))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    print(f"{'preset':<8}{'px':>5}{'batch':>6}  {'attention':<10}{'step s':>9}{'images/s':>10}"
          f"{'step MB':>9}{'peak MB':>9}")  # fmt: skip
    for preset, size, batch in CASES:
        got: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.rounds):
            for fused in (True, False):
                got[fused].append(measure(preset, size, batch, fused, args))
        med = {
            fused: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for fused, rs in got.items()
        }
        for fused in (True, False):
            m = med[fused]
            print(f"{preset:<8}{size:>5}{batch:>6}  {'fused' if fused else 'plain':<10}"
                  f"{m['step_s']:>9.3f}{batch / m['step_s']:>10.2f}{m['step_mem_mb']:>9.0f}"
                  f"{m['peak_mb']:>9.0f}")  # fmt: skip
        speed = med[False]["step_s"] / med[True]["step_s"]
        memory = med[True]["step_mem_mb"] / max(med[False]["step_mem_mb"], 1e-9)
        print(
            f"  {preset}: fused is {speed:.2f}x the speed of plain; its step memory "
            f"{memory:.2f}x plain's (medians of {args.rounds} alternating rounds)"
        )


if __name__ == "__main__":
    main()
