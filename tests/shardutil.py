"""Hand-write small, valid builds for tests through the shards_spec writer."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np

from shards_spec.format import (
    INDEX_NAME,
    MANIFEST_NAME,
    SKIPPED_NAME,
    SPEC_VERSION,
    distinct_pair_values,
    flow_stats,
    frame_member,
    has_flow_mag,
    index_schema,
    mask_member,
    shard_path,
)
from shards_spec.writer import (
    encode_npy,
    encode_png,
    sha256_file,
    write_index,
    write_manifest,
    write_shard,
    write_skipped,
)

SPLIT_SEQ_BASE = {"train": 0, "val": 1000}


def make_samples(
    n_train: int = 6,
    n_val: int = 3,
    K: int = 3,
    size: int = 32,
    with_flow: bool = False,
    with_masks: bool = False,
    flow_size: int = 8,
    seed: int = 0,
) -> list[dict]:
    """Decoded samples of a synthetic build: {"split", "key", "frames", "masks", "flow", "meta"}.

    Weights are left to make_build (they need sigma). Two windows share each clip. flow_mag is
    the mean magnitude of the stored flow, or 0.8 * sqrt(flow_msq) without one.
    """
    rng = np.random.default_rng(seed)
    out = []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            seq, cam = SPLIT_SEQ_BASE[split] + i // 2, i % 2
            first = 10 * (i // 2) + 3 * (i % 2)
            frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(K)]
            masks = None
            if with_masks:
                masks = [(rng.random((size, size)) > 0.5).astype(np.uint8) * 255 for _ in range(K)]
            flow = None
            if with_flow:
                scale = rng.uniform(0.2, 2.0)
                flow = (rng.normal(0, scale, (K - 1, 2, flow_size, flow_size))).astype(np.float16)
                sq = (flow.astype(np.float64) ** 2).sum(axis=1)
                msq = sq.mean(axis=(1, 2)).tolist()
                mag = np.sqrt(sq).mean(axis=(1, 2)).tolist()
            else:
                msq = rng.uniform(0.0, 4.0, K - 1).round(6).tolist()
                mag = [round(0.8 * float(np.sqrt(m)), 6) for m in msq]
            key = f"{seq:04d}-cam{cam}-{first:08d}"
            meta = {
                "key": key,
                "clip_id": f"{seq:04d}-cam{cam}",
                "source": "synthetic",
                "split": split,
                "sequence": seq,
                "camera": cam,
                "subject": f"s{seq % 3}",
                "object": None if seq % 2 else "cup",
                "frame_ids": [first + k for k in range(K)],
                "flow_msq": msq,
                "flow_mag": mag,
            }
            out.append(
                {
                    "split": split,
                    "key": key,
                    "frames": frames,
                    "masks": masks,
                    "flow": flow,
                    "meta": meta,
                }
            )
    return out


def _sigma(samples: list[dict]) -> float:
    values = distinct_pair_values(s["meta"] for s in samples if s["split"] == "train")
    return float(np.median(values)) if values else 1.0


def make_build(
    tmp_path: Path | str,
    n_train: int = 6,
    n_val: int = 3,
    K: int = 3,
    size: int = 32,
    with_flow: bool = False,
    with_masks: bool = False,
    shard_size: int = 4,
    flow_size: int = 8,
    seed: int = 0,
    name: str = "build",
    spec_version: str = SPEC_VERSION,
) -> Path:
    """Write a small valid build under ``tmp_path/name`` and return its path.

    ``spec_version="1.0"`` writes a build of that version: no flow_mag in the samples' JSON or
    the index, no ``flow.mag_stats`` in the manifest.
    """
    root = Path(tmp_path) / name
    root.mkdir(parents=True, exist_ok=True)
    samples = make_samples(n_train, n_val, K, size, with_flow, with_masks, flow_size, seed)
    with_mag = has_flow_mag({"spec_version": spec_version})
    if not with_mag:
        for s in samples:
            del s["meta"]["flow_mag"]
    sigma = _sigma(samples)
    for s in samples:
        s["meta"]["weight"] = [math.exp(-m / sigma) for m in s["meta"]["flow_msq"]]
    members = [frame_member(k) for k in range(K)] + ["json"]
    if with_flow:
        members.append("flow.npy")
    if with_masks:
        members += [mask_member(k) for k in range(K)]

    splits: dict[str, dict] = {}
    rows: list[dict] = []
    for split in ("train", "val"):
        chosen = [s for s in samples if s["split"] == split]
        entries = []
        for n, start in enumerate(range(0, len(chosen), shard_size)):
            rel = shard_path(split, n)
            part = chosen[start : start + shard_size]
            entry = write_shard(root / rel, (_encode(s) for s in part))
            entries.append({**entry, "path": rel})
            for position, s in enumerate(part):
                rows.append(_index_row(s, rel, position))
        splits[split] = {"samples": len(chosen), "shards": entries}
    schema = index_schema({"spec_version": spec_version})
    write_index(root / INDEX_NAME, [{n: r[n] for n in schema.names} for r in rows], schema)
    write_skipped(
        root / SKIPPED_NAME,
        [
            {
                "source_path": "0000/cam0/00000009.jpg",
                "clip_id": "0000-cam0",
                "frame_id": 9,
                "reason": "unreadable",
            }
        ],
    )
    train_meta = [s["meta"] for s in samples if s["split"] == "train"]
    manifest = {
        "spec_version": spec_version,
        "window": K,
        "image_size": size,
        "flow_size": flow_size,
        "members": members,
        "code_version": "test",
        "build_config": {"seed": seed, "shard_size": shard_size},
        "source": {"kind": "synthetic", "root": "synthetic://", "fingerprint": f"seed-{seed}"},
        "splits": splits,
        "flow": {
            "backend": "synthetic",
            "weights": None,
            "weights_sha256": None,
            "sigma": sigma,
            "sigma_rule": "median_train_flow_msq",
            "stats": flow_stats(distinct_pair_values(train_meta)),
            **(
                {"mag_stats": flow_stats(distinct_pair_values(train_meta, "flow_mag"))}
                if with_mag
                else {}
            ),
        },
        "counts": {
            "clips": len({s["meta"]["clip_id"] for s in samples}),
            "windows": len(samples),
            "pairs": len(distinct_pair_values(s["meta"] for s in samples)),
            "skipped": 1,
        },
    }
    write_manifest(root / MANIFEST_NAME, manifest)
    return root


def _encode(s: dict) -> dict:
    sample: dict = {"__key__": s["key"], "json": s["meta"]}
    for k, frame in enumerate(s["frames"]):
        sample[frame_member(k)] = encode_png(frame)
    if s["masks"] is not None:
        for k, mask in enumerate(s["masks"]):
            sample[mask_member(k)] = encode_png(mask)
    if s["flow"] is not None:
        sample["flow.npy"] = encode_npy(s["flow"])
    return sample


def _index_row(s: dict, shard: str, position: int) -> dict:
    meta = s["meta"]
    return {
        "key": s["key"],
        "split": s["split"],
        "shard": shard,
        "position": position,
        **{
            name: meta[name]
            for name in (
                "clip_id",
                "source",
                "sequence",
                "camera",
                "subject",
                "object",
                "frame_ids",
                "flow_msq",
                "flow_mag",
                "weight",
            )
            if name in meta
        },
    }


def read_members(tar_path: Path | str) -> list[tuple[str, bytes]]:
    """All (name, bytes) members of a tar, in order."""
    with tarfile.open(tar_path, "r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


def write_members(tar_path: Path | str, members: list[tuple[str, bytes]]) -> None:
    """Write (name, bytes) members as a plain tar, bypassing the format's writer checks."""
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def resign(root: Path | str, rel: str) -> None:
    """Update a shard's bytes and sha256 in the manifest after editing it."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            if entry["path"] == rel:
                entry["bytes"] = (root / rel).stat().st_size
                entry["sha256"] = sha256_file(root / rel)
    write_manifest(root / MANIFEST_NAME, manifest)


def edit_shard(root: Path | str, rel: str, edit, sign: bool = True) -> None:
    """Rewrite shard `rel` with ``edit(members) -> members``; re-sign it unless told not to."""
    path = Path(root) / rel
    write_members(path, edit(read_members(path)))
    if sign:
        resign(root, rel)
