"""Export check: a run exported to diffusers samples what our sampler samples, side by side.

Exports RUN's checkpoint with `python -m eval export` (into --export-dir, or a temporary folder),
draws N images through ``diffusers.DDIMPipeline.from_pretrained`` with image ``i``'s generator
``eval.sample.image_generator(seed, i)`` (the x_T that `eval sample` draws for it), eta 0 and
``use_clipped_model_output=True``, and the same N indices through ``eval.sample.sample`` (eta 0,
x0 clipped, as `eval sample` by default). Writes one PNG: the build's real training frames,
framebridge's samples, diffusers' samples and their difference (x8), and prints the largest and
mean per-pixel difference in levels (0..255). On CPU in float32 the two agree to a level.

Run: .venv/bin/python bench/export_grid.py --run RUN --shards BUILD --out grid.png
     [--n 16 --steps 50 --seed 0 --ckpt last --no-ema --export-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eval.__main__ import main as eval_main
from eval.generation import grid_figure, real_frames
from eval.metrics import open_split
from eval.runs import check_out_file, load
from eval.sample import image_generator, sample

DIFF_GAIN = 8  # the difference panel shows |a - b| times this


def diffusers_samples(folder: Path, n: int, seed: int, steps: int) -> np.ndarray:
    """``n`` DDIMPipeline samples of the exported ``folder`` as uint8 RGB (n, H, W, 3)."""
    import diffusers

    pipe = diffusers.DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(desc="diffusers DDIM")
    images = pipe(
        batch_size=n,
        generator=[image_generator(seed, i) for i in range(n)],
        num_inference_steps=steps,
        eta=0.0,
        use_clipped_model_output=True,
        output_type="pt",
    ).images
    return torch.round(images * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="training run folder")
    p.add_argument("--shards", required=True, help="the build the run trained on")
    p.add_argument("--out", required=True, help="the grid PNG")
    p.add_argument("--n", type=int, default=16, help="images (indices 0..n-1)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default="last", help="last, best or a step number")
    p.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--export-dir", help="keep the export here (default: a temporary folder)")
    args = p.parse_args()
    if args.n < 1 or args.steps < 1:
        p.error("--n and --steps must be >= 1")
    check_out_file(args.out)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.export_dir or Path(tmp) / "export")
        argv = ["export", args.run, "--out", str(folder), "--ckpt", args.ckpt]
        code = eval_main(argv + (["--no-ema"] if args.no_ema else []))
        if code != 0:
            return code
        t = time.perf_counter()
        theirs = diffusers_samples(folder, args.n, args.seed, args.steps)
        t_theirs = time.perf_counter() - t
    loaded = load(args.run, args.ckpt, ema=not args.no_ema)
    t = time.perf_counter()
    indices = list(range(args.n))
    ours = sample(
        loaded.model,
        loaded.schedule,
        indices,
        args.seed,
        args.steps,
        0.0,
        min(args.n, 64),
        "cpu",
        clip=True,
    )
    t_ours = time.perf_counter() - t
    size = ours.shape[1]
    real = real_frames(open_split(args.shards, "train"), "train", args.n, size)
    levels = np.abs(ours.astype(int) - theirs.astype(int))
    diff = np.clip(levels * DIFF_GAIN, 0, 255).astype(np.uint8)
    panels = {
        "real training frames": real,
        f"framebridge DDIM ({args.steps} steps)": ours,
        "diffusers DDIMPipeline": theirs,
        f"|difference| x{DIFF_GAIN}": diff,
    }
    grid_figure(panels, Path(args.out), count=args.n)
    print(
        f"{args.n} images, step {loaded.step}, {loaded.schedule.kind}/{loaded.schedule.prediction}: "
        f"max difference {levels.max()} levels, mean {levels.mean():.3g}, "
        f"pixels that differ {(levels > 0).mean():.2%}; framebridge {t_ours:.1f} s, "
        f"diffusers {t_theirs:.1f} s; grid: {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
