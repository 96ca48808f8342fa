"""Do the samples look like the data? ``python -m eval generation SAMPLES... --shards BUILD``.

Scores each folder of sample PNGs against the build's training frames beside two yardsticks of
the same size and count: Gaussian-noise images (what an untrained model draws) and real
held-out frames (the val split's centre frames, never trained on: what a perfect model would
score with this many images). For each set: the Frechet distance and precision/recall of its
features against the training frames' (the offline extractor by default: not FID), the share
of near-black pixels (the masked background of HanCo-style frames), and the mean distance from
each image to its nearest training frame in pixels (far below the held-out frames' distance
would mean copies of the training set).

``gap_closed`` is the share of the distance from noise to real frames that a set closes:
``(FD(noise) - FD(set)) / (FD(noise) - FD(real))``, 1 for real frames, 0 for noise. Real
frames are area-downsampled to the samples' size, as the trainer's ``--image-size`` does.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shards_spec import reader

from .features import FeatureError, extract, get_extractor, load_image
from .metrics import (
    EXTRACTORS,
    MetricsError,
    frechet,
    metric_name,
    open_split,
    prdc,
    reference_frames,
    sample_files,
    write_json,
)
from .plots import mosaic, save_png
from .runs import check_out_file
from .sample import to_uint8

NEAR_BLACK = 24  # a pixel whose brightest channel is at most this (of 255) counts as background
NOISE_SEED = 0
MAX_REF = 25000  # training frames compared with, at most (the FID-25k count)


def real_frames(build: reader.Build, split: str, n: int, size: int) -> np.ndarray:
    """Centre frames of the first ``n`` windows of ``split``, area-resized to ``size`` px."""
    frames = []
    for frame in reference_frames(build, split, n):
        if frame.shape[0] != size:
            frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        frames.append(frame)
    return np.stack(frames)


def noise_images(n: int, size: int, seed: int = NOISE_SEED) -> np.ndarray:
    """``n`` images of standard Gaussian noise in [-1, 1] pixel space, as uint8 RGB."""
    g = torch.Generator().manual_seed(seed)
    return to_uint8(torch.randn((n, 3, size, size), generator=g))


def near_black(images: np.ndarray, level: int = NEAR_BLACK) -> float:
    """Share of pixels whose brightest channel is at most ``level``."""
    return float((images.max(axis=-1) <= level).mean())


def nearest_distance(images: np.ndarray, train: np.ndarray) -> float:
    """Mean over ``images`` of the L2 distance to the nearest training frame ([0, 1] pixels)."""
    a = torch.from_numpy(images.reshape(len(images), -1)).float() / 255.0
    b = torch.from_numpy(train.reshape(len(train), -1)).float() / 255.0
    best = torch.full((len(a),), math.inf)
    for part in b.split(1024):
        best = torch.minimum(best, torch.cdist(a, part).min(dim=1).values)
    return float(best.mean())


def load_folder(folder: str | Path, n: int | None = None) -> np.ndarray:
    """The first ``n`` (all) sample PNGs of a folder, by name, as uint8 RGB (one size)."""
    files, _ = sample_files(folder)
    return np.stack([load_image(f) for f in files[:n]])


def score(images: np.ndarray, ref_feats: np.ndarray, train: np.ndarray, extractor) -> dict:
    """Frechet distance, precision/recall, near-black share and nearest distance of a set."""
    feats = extract(list(images), extractor, total=len(images), desc="features", progress=False)
    pr = prdc(ref_feats, feats)
    return {
        "n": len(images),
        "fd": frechet(ref_feats, feats),
        "precision": pr["precision"],
        "recall": pr["recall"],
        "near_black": near_black(images),
        "nn_l2": nearest_distance(images, train),
    }


def compare(
    samples: dict[str, np.ndarray],
    build_path: str | Path,
    extractor: str = "offline",
    inception_weights: str | None = None,
    heldout_split: str = "val",
) -> dict[str, Any]:
    """Score each named sample set, noise and held-out real frames against the train frames.

    Every set is cut to the same count ``n``: the smallest sample set, at most the held-out
    split's size. Returns ``{"n", "size", "metric_name", "sets": {name: scores}, ...}`` with
    ``gap_closed`` in each set's scores.
    """
    if not samples:
        raise MetricsError("no sample folders given")
    sizes = {images.shape[1:] for images in samples.values()}
    if len(sizes) != 1:
        raise MetricsError(f"the sample sets have different sizes: {sorted(sizes)}")
    size = next(iter(sizes))[0]
    train_build = open_split(build_path, "train")
    held_build = open_split(build_path, heldout_split)
    n = min(min(len(s) for s in samples.values()), held_build.count(heldout_split))
    train = real_frames(train_build, "train", min(train_build.count("train"), MAX_REF), size)
    try:
        ext = get_extractor(extractor, inception_weights, "cpu")
    except FeatureError as exc:
        raise MetricsError(str(exc)) from None
    ref_feats = extract(list(train), ext, total=len(train), desc="train frames", progress=False)
    sets = {name: images[:n] for name, images in samples.items()}
    sets["noise"] = noise_images(n, size)
    sets["real held-out"] = real_frames(held_build, heldout_split, n, size)
    scores = {name: score(images, ref_feats, train, ext) for name, images in sets.items()}
    fd_noise, fd_real = scores["noise"]["fd"], scores["real held-out"]["fd"]
    for s in scores.values():
        span = fd_noise - fd_real
        s["gap_closed"] = (fd_noise - s["fd"]) / span if span > 0 else None
    return {
        "n": n,
        "size": size,
        "n_train": len(train),
        "extractor": ext.name,
        "metric_name": metric_name(ext.name),
        "heldout_split": heldout_split,
        "near_black_level": NEAR_BLACK,
        "build": str(Path(build_path)),
        "sets": scores,
    }


def table(result: dict[str, Any]) -> str:
    """The comparison as a markdown table."""
    head = (
        f"{result['n']} images per set at {result['size']} px against {result['n_train']} "
        f"train frames; {result['metric_name']}\n\n"
        "| set | FD | gap closed | precision | recall | near-black | NN L2 to train |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )

    def cell(x, spec):
        return "-" if x is None else format(x, spec)

    rows = [
        f"| {name} | {s['fd']:.2f} | {cell(s['gap_closed'], '.0%')} | "
        f"{cell(s['precision'], '.2f')} | {cell(s['recall'], '.2f')} | {s['near_black']:.0%} | "
        f"{s['nn_l2']:.2f} |"
        for name, s in result["sets"].items()
    ]
    return head + "\n".join(rows)


def grid_figure(panels: dict[str, np.ndarray], path: Path, count: int = 32) -> None:
    """One panel per named image set (its first ``count``), side by side, as a PNG."""
    fig = Figure(figsize=(3.2 * len(panels), 2.0), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, images) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(mosaic(images[:count], cols=8), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    save_png(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", nargs="+", help="sample folders (NAME=DIR to name one)")
    p.add_argument("--shards", required=True, help="the build the samples' runs trained on")
    p.add_argument("--extractor", default="offline", choices=EXTRACTORS)
    p.add_argument("--inception-weights", help="path of inception-2015-12-05.pt")
    p.add_argument("--heldout-split", default="val", help="split of the real held-out frames")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--grid", help="write a PNG of samples beside real training frames here")


def _named(specs: list[str]) -> dict[str, Path]:
    named = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or Path(folder).name
        if name in named:
            raise MetricsError(f"two sample folders are named {name!r}: use NAME=DIR")
        named[name] = Path(folder)
    return named


def run(args: argparse.Namespace) -> int:
    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        if path:  # before the work, not after it
            check_out_file(path, flag)
    folders = _named(args.samples)
    samples = {name: load_folder(folder) for name, folder in folders.items()}
    result = compare(
        samples,
        args.shards,
        extractor=args.extractor,
        inception_weights=args.inception_weights,
        heldout_split=args.heldout_split,
    )
    result["folders"] = {name: str(f) for name, f in folders.items()}
    print(table(result))
    if args.out:
        write_json(args.out, result)
    if args.grid:
        size, n = result["size"], result["n"]
        real = real_frames(open_split(args.shards, "train"), "train", min(n, 32), size)
        grid_figure({"real training frames": real, **samples}, Path(args.grid))
        print(f"grid: {args.grid}", file=sys.stderr)
    return 0
