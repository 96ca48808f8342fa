"""The files a build ends with: index, skip record and manifest (last); the summary line."""

from __future__ import annotations

import dataclasses
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import flow as fl
from pipeline.config import BuildConfig
from pipeline.plan import Plan
from pipeline.sources import Discovery
from shards_spec.atomic import atomic_write_bytes
from shards_spec.format import (
    FLOW_MEMBER,
    INDEX_NAME,
    INDEX_SCHEMA,
    JSON_MEMBER,
    MANIFEST_NAME,
    SKIPPED_NAME,
    SKIPPED_SCHEMA,
    SPEC_VERSION,
    frame_members,
    mask_members,
)
from shards_spec.writer import parquet_bytes, write_manifest

CHUNK = 1 << 16  # index and skip rows built this many at a time


def index_table(plan: Plan, infos: dict[tuple[str, int], dict]) -> pa.Table:
    """``index.parquet``'s rows (INDEX_SCHEMA), built column by column, CHUNK rows at a time.

    Rows are ordered by split (name order), shard, position; values equal the samples' JSON.
    """
    k = plan.window
    tracks = plan.tracks
    per_track = {
        "source": pa.array([t.source for t in tracks], pa.string()),
        "sequence": pa.array([t.sequence for t in tracks], pa.int32()),
        "camera": pa.array([t.camera for t in tracks], pa.int32()),
        "subject": pa.array([t.subject for t in tracks], pa.string()),
        "object": pa.array([t.object for t in tracks], pa.string()),
    }
    prefixes = [t.prefix for t in tracks]
    batches = []
    for split in sorted(plan.order):
        order = plan.order[split]
        paths = [infos[(split, n)]["path"] for n in range(plan.n_shards(split))]
        for c in range(0, len(order), CHUNK):
            w = order[c : c + CHUNK]
            n = len(w)
            rows = np.arange(c, c + n)
            t = plan.w_track[w]
            take = pa.array(t)
            fids = plan.frame_ids[plan.w_frame[w][:, None] + np.arange(k)]
            pairs = plan.w_pair[w][:, None] + np.arange(k - 1)
            clip_fids = plan.frame_ids[plan.w_clip[w]].tolist()
            tl = t.tolist()
            cols = {
                "key": _keys(prefixes, tl, fids[:, 0].tolist()),
                "split": pa.array([split] * n, pa.string()),
                "shard": pa.array([paths[s] for s in (rows // plan.shard_size).tolist()]),
                "position": pa.array(rows % plan.shard_size, pa.int32()),
                "clip_id": _keys(prefixes, tl, clip_fids),
                **{name: col.take(take) for name, col in per_track.items()},
                "frame_ids": _lists(fids, pa.int64()),
                "flow_msq": _lists(plan.msq[pairs], pa.float64()),
                "flow_mag": _lists(plan.mag[pairs], pa.float64()),
                "weight": _lists(plan.weight[pairs], pa.float64()),
            }
            batches.append(pa.record_batch([cols[f.name] for f in INDEX_SCHEMA],
                                           schema=INDEX_SCHEMA))  # fmt: skip
    return pa.Table.from_batches(batches, schema=INDEX_SCHEMA)


def _keys(prefixes: list[str], tracks: list[int], frame_ids: list[int]) -> pa.Array:
    """Track.key for each (track, frame id): f"{prefix}-{frame_id:08d}"."""
    return pa.array(
        [f"{prefixes[t]}-{f:08d}" for t, f in zip(tracks, frame_ids, strict=True)], pa.string()
    )


def _lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A (rows, width) array as a list column."""
    rows, width = values.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type_))


def write_index_table(path: Path, table: pa.Table) -> None:
    atomic_write_bytes(path, parquet_bytes(table))


class _Rows:
    """skipped.parquet rows gathered as compact Arrow batches of CHUNK rows."""

    def __init__(self):
        self.batches: list[pa.RecordBatch] = []
        self.cols: tuple[list, list, list, list] = ([], [], [], [])
        self.n = 0

    def add(self, path: str, clip_id: str, frame_id: int, reason: str) -> None:
        for col, v in zip(self.cols, (path, clip_id, frame_id, reason), strict=True):
            col.append(v)
        if len(self.cols[0]) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.cols[0]:
            arrays = [pa.array(c, f.type) for c, f in zip(self.cols, SKIPPED_SCHEMA, strict=True)]
            self.batches.append(pa.record_batch(arrays, schema=SKIPPED_SCHEMA))
            self.n += len(self.cols[0])
            self.cols = ([], [], [], [])

    def table(self) -> pa.Table:
        self.flush()
        return pa.Table.from_batches(self.batches, schema=SKIPPED_SCHEMA)


def skipped_table(disc: Discovery, plan: Plan, committed: dict[str, dict]) -> tuple[pa.Table, int]:
    """Every input frame in no window, one row each, sorted by (clip_id, frame_id, reason).

    Frames left out at discovery keep the clip id the source gave them, frames that failed in
    stage 1 their track's id; frames of a clip (too short for a window, or only in windows
    --max-windows dropped) that clip's id, as the index names it. Returns (table, number of
    rows from discovery).
    """
    rows = _Rows()
    for e in disc.excluded:
        for row in e.rows():
            rows.add(*row)
    rows.flush()
    n_excluded = rows.n
    for tid, meta in committed.items():
        for path, fid, reason in meta["skipped"]:
            rows.add(path, tid, fid, reason)
    for track, clip_id, fid, reason in plan.unwindowed():
        rows.add(track.path_of(fid), clip_id, fid, reason)
    table = rows.table()
    if table.num_rows:
        keys = [("clip_id", "ascending"), ("frame_id", "ascending"), ("reason", "ascending")]
        table = table.take(pc.sort_indices(table, sort_keys=keys))
    return table, n_excluded


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
    write_index_table(out / INDEX_NAME, index_table(plan, infos))
    skipped, n_excluded = skipped_table(disc, plan, committed)
    atomic_write_bytes(out / SKIPPED_NAME, parquet_bytes(skipped))
    by_reason = Counter(
        {v["values"]: v["counts"] for v in pc.value_counts(skipped.column("reason")).to_pylist()}
    )
    n_skipped = skipped.num_rows
    del skipped

    members = frame_members(cfg.window)
    if cfg.keep_mask and any(m.get("has_masks") for m in committed.values()):
        members += mask_members(cfg.window)
    if cfg.keep_flow:
        members.append(FLOW_MEMBER)
    members.append(JSON_MEMBER)
    counts = {
        **plan.counts,
        "frames_input": sum(m["n_input"] for m in committed.values()) + n_excluded,
        "frames_excluded": n_excluded,
        "frames_skipped": n_skipped - n_excluded,
    }
    splits = {}
    for split in sorted(plan.order):
        entries = [infos[(split, n)] for n in range(plan.n_shards(split))]
        splits[split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    stats_split = "train" if plan.flow_stats["train"]["count"] else "val"
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
            "stats": plan.flow_stats[stats_split],
            "mag_stats": plan.mag_stats[stats_split],
        },
        "counts": {**counts, **{f"skipped_{k}": v for k, v in sorted(by_reason.items())}},
    }
    write_manifest(out / MANIFEST_NAME, manifest)
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
