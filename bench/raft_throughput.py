"""RAFT pairs/s: batched bf16 against one pair per call in fp32, side by side.

One pair per call in fp32 is how common video tools call RAFT; the pipeline's flow actors
batch pairs and may autocast to bf16. Random weights (the cost is the same as trained ones).
    python bench/raft_throughput.py --pairs 256 --size 224 --batch 32        # on a GPU
    python bench/raft_throughput.py --pairs 8 --size 128 --batch 4 --iters 4 # CPU smoke run
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from pipeline.flow import RaftConfig, RaftFlow


def frames(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    return [np.roll(base, i, axis=1) for i in range(n + 1)]


def pairs_per_s(flow: RaftFlow, seq: list[np.ndarray]) -> float:
    flow.pairs(seq[: flow.cfg.batch + 1])  # warm-up: kernels, allocator
    if flow.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    flow.pairs(seq)
    if flow.device.type == "cuda":
        torch.cuda.synchronize()
    return (len(seq) - 1) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="raft-large", choices=("raft-large", "raft-small"))
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=12)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="RAFT with random weights")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    seq = frames(args.pairs, args.size)
    runs = [("one pair per call, fp32", 1, "fp32"), (f"batch {args.batch}, bf16", args.batch, "bf16"),
            (f"batch {args.batch}, fp32", args.batch, "fp32")]  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"{args.model} {args.size}x{args.size}, {args.iters} iterations, {args.pairs} pairs, {name}"
    )
    rates = {}
    for label, batch, precision in runs:
        cfg = RaftConfig(args.model, "none", precision, batch, args.iters)
        rates[label] = pairs_per_s(RaftFlow(cfg, device), seq)
        print(f"  {label:28s} {rates[label]:9.1f} pairs/s")
    base = rates[runs[0][0]]
    for label in list(rates)[1:]:
        print(f"  speed-up {label}: {rates[label] / base:.2f}x")


if __name__ == "__main__":
    main()
