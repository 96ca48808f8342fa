"""FID, KID and precision/recall/density/coverage of a sample folder against a build's frames.

``python -m eval fid --samples DIR --shards BUILD --split train`` compares the PNGs in DIR with
the reference set: the centre frame (index K//2) of the first ``--n-ref`` windows of the split
in shard order (default 25000, as the FID-25k protocol uses 25k training images; all windows
when the split has fewer). Both sets go through clean-fid's ``clean`` preprocessing and the
chosen extractor (`eval.features`). FID is clean-fid's ``frechet_distance`` on the feature means
and covariances; KID is clean-fid's ``kernel_distance`` (100 subsets of up to 1000 features,
seed 0) with the mean and standard deviation over the subsets; precision, recall, density and
coverage are ``prdc.compute_prdc`` on at most 10000 features of each set (seeded subsample).

Reference features are cached as ``.npz`` under ``$FRAMEBRIDGE_CACHE/fid_refs/`` (default
``~/.cache/framebridge/fid_refs/``), keyed by the split's manifest entry (shard sha256s), the
split, the number of reference frames and the extractor's name and version.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from cleanfid.fid import frechet_distance, kernel_distance
from prdc import compute_prdc

from shards_spec import reader
from shards_spec.atomic import atomic_output, atomic_write_text
from shards_spec.format import SpecError, frame_member

from .features import (
    EXTRACTORS,
    Extractor,
    FeatureError,
    check_images,
    extract,
    get_extractor,
    list_images,
)
from .runs import check_device, check_out_file

DEFAULT_N_REF = 25000
KID_SUBSETS = 100  # clean-fid's kernel_distance defaults
KID_SUBSET_SIZE = 1000
KID_SEED = 0
PRDC_MAX = 10000  # P/R/D/C use at most this many features of each set
PRDC_SEED = 0
CACHE_FORMAT = 1
CACHE_SUBDIR = "fid_refs"


class MetricsError(ValueError):
    """An evaluation that cannot run: bad samples, build, split or extractor (one line)."""


# --------------------------------------------------------------------------- metrics


def frechet(ref: np.ndarray, feats: np.ndarray) -> float:
    """clean-fid's ``frechet_distance`` between the Gaussians fitted to two feature sets."""
    mu1, sigma1 = ref.mean(axis=0), np.cov(ref, rowvar=False)
    mu2, sigma2 = feats.mean(axis=0), np.cov(feats, rowvar=False)
    with _stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy deprecates sqrtm(disp=...), which clean-fid uses
        try:
            return float(frechet_distance(mu2, sigma2, mu1, sigma1))
        except ValueError as exc:
            raise MetricsError(f"Frechet distance failed: {exc}") from None


def kid(
    ref: np.ndarray,
    feats: np.ndarray,
    num_subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> tuple[float, float]:
    """KID mean and standard deviation over subsets, through clean-fid's ``kernel_distance``.

    ``kernel_distance`` returns only the mean over its subsets; calling it once per subset with
    ``num_subsets=1`` from the same seeded NumPy stream draws exactly the subsets that one call
    with ``num_subsets`` would, so the mean is clean-fid's KID and the std (ddof=1) is over the
    same subsets. NumPy's global random state is restored afterwards.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        values = np.array(
            [
                kernel_distance(ref, feats, num_subsets=1, max_subset_size=max_subset_size)
                for _ in range(num_subsets)
            ]
        )
    finally:
        np.random.set_state(state)
    std = float(values.std(ddof=1)) if num_subsets > 1 else 0.0
    return float(values.mean()), std


def subsample(feats: np.ndarray, limit: int = PRDC_MAX, seed: int = PRDC_SEED) -> np.ndarray:
    """At most `limit` rows of `feats`, chosen without replacement with a fixed seed, in order."""
    if len(feats) <= limit:
        return feats
    keep = np.sort(np.random.default_rng(seed).choice(len(feats), limit, replace=False))
    return feats[keep]


def prdc(ref: np.ndarray, feats: np.ndarray, nearest_k: int = 5) -> dict[str, float | None]:
    """``prdc.compute_prdc`` (real = reference) on subsamples of at most PRDC_MAX features.

    Each set needs more than ``nearest_k + 1`` features (the k-th neighbour excluding itself);
    with fewer the four values are None.
    """
    real, fake = subsample(ref), subsample(feats)
    if min(len(real), len(fake)) < nearest_k + 2:
        return dict.fromkeys(("precision", "recall", "density", "coverage"))
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
        out = compute_prdc(real, fake, nearest_k)
    return {k: float(v) for k, v in out.items()}


@contextlib.contextmanager
def _stdout_to_stderr():
    with contextlib.redirect_stdout(sys.stderr):
        yield


def compute_metrics(
    ref: np.ndarray, feats: np.ndarray, nearest_k: int = 5
) -> dict[str, float | None]:
    """fid, kid, kid_std, precision, recall, density, coverage of `feats` against `ref`."""
    kid_mean, kid_std = kid(ref, feats)
    return {
        "fid": frechet(ref, feats),
        "kid": kid_mean,
        "kid_std": kid_std,
        **prdc(ref, feats, nearest_k),
    }


# --------------------------------------------------------------------------- reference set


def cache_dir() -> Path:
    """``$FRAMEBRIDGE_CACHE/fid_refs`` (default ``~/.cache/framebridge/fid_refs``)."""
    root = os.environ.get("FRAMEBRIDGE_CACHE") or Path.home() / ".cache" / "framebridge"
    return Path(root).expanduser() / CACHE_SUBDIR


def cache_key(split_entry: dict, split: str, n_ref: int, extractor: str, version: str) -> str:
    """Hex sha256 of the manifest's split entry (shard sha256s), split, n_ref and extractor."""
    payload = {
        "format": CACHE_FORMAT,
        "split": split,
        "split_entry": split_entry,
        "n_ref": int(n_ref),
        "extractor": extractor,
        "extractor_version": version,
        "frames": "centre frame K//2, first n_ref windows in shard order, clean-fid clean 299",
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def cache_path(split_entry: dict, split: str, n_ref: int, extractor: Extractor) -> Path:
    """The ``.npz`` file that holds (or will hold) these reference features."""
    key = cache_key(
        split_entry, split, n_ref=n_ref, extractor=extractor.name, version=extractor.version
    )
    return cache_dir() / f"{split}-{n_ref}-{extractor.name}-{key[:16]}.npz"


def load_cached(path: Path, key: str, dim: int) -> np.ndarray | None:
    """Cached features if `path` holds them for `key`, else None (a damaged file is ignored)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            feats = data["features"]
    except (OSError, ValueError, KeyError, EOFError):
        print(f"warning: ignoring unreadable reference cache {path}", file=sys.stderr)
        return None
    return feats if feats.ndim == 2 and feats.shape[1] == dim else None


def save_cached(path: Path, key: str, feats: np.ndarray) -> None:
    """Write the features atomically (temporary file in the same folder, fsync, rename)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:  # a file: savez adds .npz to a name
        np.savez(f, features=feats, key=np.array(key))


def reference_frames(build: reader.Build, split: str, n_ref: int):
    """The centre frame (K//2) of the first `n_ref` windows of `split`, in shard order.

    Only that member of each sample is decoded.
    """
    member = frame_member(build.window // 2)
    samples = reader.raw_samples(build.urls(split))
    try:
        for i, raw in enumerate(samples):
            if i >= n_ref:
                break
            if member not in raw:
                raise SpecError(f"sample {raw.get('__key__')} lacks member {member}")
            frame = reader.decode_png(raw[member], f"{raw.get('__key__')}.{member}")
            if frame.ndim != 3:
                raise SpecError(f"{raw.get('__key__')}.{member}: expected an RGB frame")
            yield frame
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()


def reference_sentence(build: reader.Build, split: str, n_ref: int, requested: int) -> str:
    """Which frames form the reference set, in words."""
    c, k = build.window // 2, build.window
    which = f"the first {n_ref} windows" if n_ref < build.count(split) else f"all {n_ref} windows"
    extra = f" (asked for {requested})" if requested > n_ref else ""
    return (
        f"centre frame f{c}.png (index K//2 = {c}, K = {k}) of {which}{extra} of split "
        f"'{split}' in shard order, build {build.path}"
    )


def reference_features(
    build: reader.Build, split: str, n_ref: int, extractor: Extractor, batch: int = 64
) -> tuple[np.ndarray, dict[str, Any]]:
    """Reference features from the cache or the shards; ``(features, cache info)``."""
    entry = build.manifest["splits"][split]
    key = cache_key(entry, split, n_ref=n_ref, extractor=extractor.name, version=extractor.version)
    path = cache_path(entry, split, n_ref, extractor)
    feats = load_cached(path, key, extractor.dim)
    if feats is not None:
        return feats, {"hit": True, "path": str(path)}
    frames = reference_frames(build, split, n_ref)
    feats = extract(frames, extractor, batch, total=n_ref, desc=f"reference {split}")
    if len(feats) != n_ref:
        raise MetricsError(f"split {split!r} yielded {len(feats)} windows, expected {n_ref}")
    try:
        save_cached(path, key, feats)
    except OSError as exc:
        print(f"warning: reference cache not written ({exc})", file=sys.stderr)
    return feats, {"hit": False, "path": str(path)}


# --------------------------------------------------------------------------- evaluate


def open_split(build_path: str | os.PathLike, split: str) -> reader.Build:
    """The build, checked to hold a non-empty `split` (MetricsError naming its splits)."""
    build = reader.open_build(build_path)
    if split not in build.splits:
        have = ", ".join(build.splits) or "none"
        raise MetricsError(f"build {build.path} has no split {split!r} (it has: {have})")
    if build.count(split) == 0:
        raise MetricsError(f"split {split!r} of build {build.path} has no windows")
    return build


def sample_files(samples_dir: str | os.PathLike) -> tuple[list[Path], tuple[int, int]]:
    """The sample PNGs (sorted by name, at least 2, one size) and their (width, height).

    A folder ``eval sample`` wrote (it holds ``sample.json``) counts only the images that record
    names (``000000.png`` .. its ``n`` - 1); other PNGs there are left out with a warning.
    """
    try:
        files = _recorded(Path(samples_dir), list_images(samples_dir))
        if len(files) < 2:
            raise MetricsError(f"{samples_dir}: {len(files)} PNG image(s), at least 2 are needed")
        return files, check_images(files)
    except FeatureError as exc:
        raise MetricsError(str(exc)) from None


def _recorded(folder: Path, files: list[Path]) -> list[Path]:
    """`files` less the PNGs an ``eval sample`` record does not name (warned, not counted)."""
    from .sample import RECORD_NAME, image_name  # imported here: torch comes with it

    try:
        record = json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return files  # no record (a folder of someone's PNGs), or one sample refuses itself
    n = record.get("n") if isinstance(record, dict) else None
    if type(n) is not int or n < 0:
        return files
    named = {image_name(i) for i in range(n)}
    kept = [f for f in files if f.name in named]
    if len(kept) < len(files):
        extra = [f.name for f in files if f.name not in named]
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        print(f"warning: {folder}: {len(extra)} PNG(s) not written by eval sample left out "
              f"({', '.join(extra[:3])}{more})", file=sys.stderr)  # fmt: skip
    return kept


def metric_name(extractor: str) -> str:
    """What the ``fid`` number is, in words."""
    if extractor == "inception":
        return "FID (clean-fid clean mode, Inception-v3 pool3 2048-d)"
    return f"Frechet distance ({extractor} extractor, not FID)"


def _check_args(n_ref: int, batch: int, nearest_k: int, extractor: str) -> None:
    if n_ref < 2:
        raise MetricsError(f"n_ref must be at least 2, got {n_ref}")
    if batch < 1:
        raise MetricsError(f"batch must be at least 1, got {batch}")
    if nearest_k < 1:
        raise MetricsError(f"nearest_k must be at least 1, got {nearest_k}")
    if extractor not in EXTRACTORS:
        raise MetricsError(f"unknown extractor {extractor!r} (choose from {', '.join(EXTRACTORS)})")


def evaluate(
    samples_dir: str | os.PathLike,
    build_path: str | os.PathLike,
    split: str,
    n_ref: int = DEFAULT_N_REF,
    extractor: str = "inception",
    inception_weights: str | os.PathLike | None = None,
    batch: int = 64,
    device: str = "cpu",
    nearest_k: int = 5,
) -> dict[str, Any]:
    """Compare the PNGs in `samples_dir` with the build's reference frames; the result dict.

    Keys: fid, kid, kid_std, precision, recall, density, coverage (None when a set has fewer
    than nearest_k + 2 features), extractor, extractor_version, metric_name, n_samples, n_ref,
    n_ref_requested, split, reference, samples, build, sample_size, image_size, feature_dim,
    nearest_k, prdc_max, kid_subsets, kid_subset_size, reference_cache {hit, path}.
    Raises MetricsError (one line) for unusable input; SpecError for a damaged build.
    """
    _check_args(n_ref, batch, nearest_k, extractor)
    build = open_split(build_path, split)
    files, (width, height) = sample_files(samples_dir)
    try:
        ext = get_extractor(extractor, inception_weights, device)
        feats = extract(files, ext, batch, total=len(files), desc="samples")
        used = min(n_ref, build.count(split))
        ref, cache = reference_features(build, split, n_ref=used, extractor=ext, batch=batch)
    except FeatureError as exc:
        raise MetricsError(str(exc)) from None
    return {
        **compute_metrics(ref, feats, nearest_k),
        "extractor": ext.name,
        "extractor_version": ext.version,
        "metric_name": metric_name(ext.name),
        "n_samples": len(feats),
        "n_ref": len(ref),
        "n_ref_requested": n_ref,
        "split": split,
        "reference": reference_sentence(build, split, len(ref), n_ref),
        "samples": str(samples_dir),
        "build": str(build.path),
        "sample_size": [width, height],
        "image_size": build.image_size,
        "feature_dim": ext.dim,
        "nearest_k": nearest_k,
        "prdc_max": PRDC_MAX,
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(KID_SUBSET_SIZE, len(ref), len(feats)),
        "reference_cache": cache,
    }


def summary(result: dict[str, Any]) -> str:
    """A short human-readable account of a result, every number labelled with its extractor."""
    ext = result["extractor"]
    fid_label = "FID" if ext == "inception" else "Frechet distance (not FID)"
    kid_label = "KID" if ext == "inception" else "kernel distance (not KID)"
    lines = [
        f"samples: {result['n_samples']} PNGs in {result['samples']}",
        f"reference: {result['reference']}"
        + (" [cached features]" if result["reference_cache"]["hit"] else ""),
        f"[{ext}] {fid_label}: {result['fid']:.4f}",
        f"[{ext}] {kid_label}: {result['kid']:.6f} +- {result['kid_std']:.6f} "
        f"({result['kid_subsets']} subsets of {result['kid_subset_size']})",
    ]
    if result["precision"] is None:
        lines.append(f"[{ext}] precision/recall/density/coverage: too few images")
    else:
        lines.append(
            f"[{ext}] precision {result['precision']:.4f}  recall {result['recall']:.4f}  "
            f"density {result['density']:.4f}  coverage {result['coverage']:.4f}  "
            f"(k={result['nearest_k']}, at most {result['prdc_max']} features per set, seed "
            f"{PRDC_SEED})"
        )
    if result["sample_size"] != [result["image_size"]] * 2:
        w, h = result["sample_size"]
        lines.append(f"note: samples are {w}x{h}, the build's frames {result['image_size']} px")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``fid`` subcommand's options to `parser`."""
    parser.description = (
        "FID, KID and precision/recall/density/coverage of a folder of sample PNGs against "
        "reference frames of a build. The reference set is the centre frame (index K//2) of "
        f"the first --n-ref windows of --split in shard order (default {DEFAULT_N_REF}, as in "
        "FID-25k on training frames; all windows when the split has fewer). Images get "
        "clean-fid's 'clean' preprocessing (299 px bicubic). P/R/D/C use at most "
        f"{PRDC_MAX} features per set (seeded subsample). Reference features are cached under "
        "$FRAMEBRIDGE_CACHE/fid_refs (default ~/.cache/framebridge/fid_refs). The last stdout "
        "line is the result as JSON."
    )
    parser.add_argument("--samples", required=True, help="folder of sample *.png (by name)")
    parser.add_argument("--shards", required=True, help="the build folder (dataset.json)")
    parser.add_argument("--split", required=True, help="reference split, e.g. train or val")
    parser.add_argument(
        "--n-ref",
        type=int,
        default=DEFAULT_N_REF,
        help=f"reference windows: centre frames of the first N in shard order ({DEFAULT_N_REF})",
    )
    parser.add_argument(
        "--extractor",
        choices=EXTRACTORS,
        default="inception",
        help="inception: clean-fid Inception-v3 (FID); offline: fixed small CNN, not FID",
    )
    parser.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="inception-2015-12-05.pt or its folder (default: /tmp, then "
        "$TORCH_HOME/hub/checkpoints); never downloaded",
    )
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass (64)")
    parser.add_argument("--nearest-k", type=int, default=5, help="k for P/R/D/C (5)")
    parser.add_argument(
        "--device", default="auto", help="torch device for inception: auto (default), cpu, cuda"
    )
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    return parser


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def write_json(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """Write `result` to `path` atomically."""
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def run(args: argparse.Namespace) -> int:
    """Run the ``fid`` subcommand: summary on stderr, JSON as the last stdout line; 0."""
    check_device(args.device, auto=True)
    if args.out:  # before the work, not after it
        check_out_file(args.out)
    result = evaluate(
        args.samples,
        args.shards,
        args.split,
        n_ref=args.n_ref,
        extractor=args.extractor,
        inception_weights=args.inception_weights,
        batch=args.batch,
        device=resolve_device(args.device),
        nearest_k=args.nearest_k,
    )
    print(summary(result), file=sys.stderr)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0
