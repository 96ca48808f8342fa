"""The files a build ends with: index, skip record and manifest (last); the summary line."""

from __future__ import annotations

import dataclasses
from collections import Counter
from importlib import metadata
from pathlib import Path

from pipeline import flow as fl
from pipeline.config import BuildConfig
from pipeline.plan import SHORT_CLIP, Plan
from pipeline.sources import Discovery
from shards_spec.format import SPEC_VERSION
from shards_spec.writer import write_index, write_manifest, write_skipped


def write_outputs(
    out: Path,
    cfg: BuildConfig,
    disc: Discovery,
    plan: Plan,
    committed: dict[str, dict],
    infos: dict[tuple[str, int], dict],
    backend: str,
    weights_path: str | None,
    flow_size: int,
) -> dict:
    """Index, skip record, manifest (last). Returns the summary counts."""
    rows = []
    for split, shards in plan.shards.items():
        for n, ws in enumerate(shards):
            rel = infos[(split, n)]["path"]
            for pos, w in enumerate(ws):
                j = w.sample_json()
                rows.append({**{k: j[k] for k in (
                    "key", "split", "clip_id", "source", "sequence", "camera", "subject",
                    "object", "frame_ids", "flow_msq", "weight")}, "shard": rel, "position": pos})  # fmt: skip
    write_index(out / "index.parquet", rows)

    skipped = [
        {"source_path": path, "clip_id": clip, "frame_id": fid, "reason": reason}
        for e in disc.excluded
        for path, clip, fid, reason in e.rows()
    ]
    n_excluded = len(skipped)
    for tid, meta in committed.items():
        for path, fid, reason in meta["skipped"]:
            skipped.append({"source_path": path, "clip_id": tid, "frame_id": fid, "reason": reason})
    for track, fids in plan.short_clip_frames:
        for fid in fids:
            skipped.append(
                {
                    "source_path": track.path_of(fid),
                    "clip_id": track.track_id,
                    "frame_id": fid,
                    "reason": SHORT_CLIP,
                }  # fmt: skip
            )
    skipped.sort(key=lambda r: (r["clip_id"], r["frame_id"], r["reason"]))
    write_skipped(out / "skipped.parquet", skipped)

    members = [f"f{k}.png" for k in range(cfg.window)]
    if cfg.keep_mask and any(m.get("has_masks") for m in committed.values()):
        members += [f"mask{k}.png" for k in range(cfg.window)]
    if cfg.keep_flow:
        members.append("flow.npy")
    members.append("json")
    by_reason = Counter(r["reason"] for r in skipped)
    counts = {
        **plan.counts,
        "frames_input": sum(m["n_input"] for m in committed.values()) + n_excluded,
        "frames_excluded": n_excluded,
        "frames_skipped": len(skipped) - n_excluded,
    }
    splits = {}
    for split, shards in plan.shards.items():
        entries = [infos[(split, n)] for n in range(len(shards))]
        splits[split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    manifest = {
        "spec_version": SPEC_VERSION,
        "window": cfg.window,
        "image_size": cfg.size,
        "flow_size": flow_size,
        "members": members,
        "code_version": _code_version(),
        "build_config": {**dataclasses.asdict(cfg), "flow": backend, "flow_size": flow_size},
        "source": {"kind": cfg.src, "root": disc.root, "fingerprint": disc.fingerprint},
        "splits": splits,
        "flow": {
            "backend": backend,
            "weights": weights_path if backend in fl.RAFT_BACKENDS else None,
            "weights_sha256": fl.file_sha256(weights_path),
            "random_weights": backend in fl.RAFT_BACKENDS and weights_path is None,
            "sigma": plan.sigma,
            "sigma_rule": "median flow_msq over the train split's adjacent pairs",
            "stats": plan.flow_stats["train"]
            if plan.flow_stats["train"]["count"]
            else plan.flow_stats["val"],
        },
        "counts": {**counts, **{f"skipped_{k}": v for k, v in sorted(by_reason.items())}},
    }
    write_manifest(out / "dataset.json", manifest)
    return {
        **counts,
        "splits": {s: v["samples"] for s, v in splits.items()},
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "sigma": plan.sigma,
        "flow_backend": backend,
        "out": str(out),
    }


def _code_version() -> str:
    try:
        return metadata.version("framebridge")
    except metadata.PackageNotFoundError:
        return "unknown"


def format_summary(s: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped_by_reason"].items()) or "none"
    splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    return "\n".join(
        [
            f"built {s['out']}: {s['windows']} windows ({splits}) in {s['shards']} shards",
            f"  clips {s['clips']}  frames in {s['frames_input']}  kept {s['frames_kept']}  "
            f"pairs {s['pairs']}  flow {s['flow_backend']}  sigma {s['sigma']:.4g}",
            f"  skipped/excluded: {skipped}",
            f"  wall {s.get('wall_s', 0):.1f} s, {s.get('frames_per_s') or 0:.1f} frames/s",
        ]
    )
