"""Stage 3: write one shard from planned windows, reading encoded frames from the track cache.

Frames are copied as the PNG bytes stage 1 produced (no re-encode). A shard is committed by
its stats marker, written after the tar, so a resumed build skips finished shards.

A shard's windows come from many tracks (the plan shuffles globally), so its task reads what it
needs file by file: each cache file is opened once per shard (per ``READ_BUDGET`` bytes of
payload), its ranges read in offset order with adjacent ranges merged into one read, and the
samples are then written in the planned order.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.plan import Plan
from pipeline.tracks import FLOW_FILE, FRAMES_FILE, MASKS_FILE, track_dir
from shards_spec.format import FLOW_MEMBER, JSON_MEMBER, frame_member, mask_member, shard_path
from shards_spec.writer import atomic_write_json, write_shard

READ_BUDGET = 256 << 20  # bytes of frames and masks a shard task reads ahead at most


def window_job(plan: Plan, i: int, cache: Path, keep_mask: bool, keep_flow: bool) -> dict:
    """The small, picklable description of window ``i`` of ``plan`` a shard task needs
    (``cache``: the track cache folder its frames are read from)."""
    frames = plan.frames(i)
    p = plan.pair_index(i)
    return {
        "key": plan.key(i),
        "dir": str(track_dir(cache, plan.track_of(i))),
        "frames": [f[1:3] for f in frames],
        "masks": [f[3:5] for f in frames] if keep_mask and len(frames[0]) >= 5 else None,
        "pairs": [p, p + len(frames) - 1] if keep_flow else None,
        "json": plan.sample_json(i),
    }


def shard_jobs(
    plan: Plan, split: str, n: int, cache: Path, keep_mask: bool, keep_flow: bool
) -> list[dict]:
    """The jobs of shard ``n`` of ``split``, in write order (built when the shard is submitted)."""
    return [
        window_job(plan, int(i), cache, keep_mask=keep_mask, keep_flow=keep_flow)
        for i in plan.shard(split, n)
    ]


def marker_path(work: Path, split: str, n: int) -> Path:
    """The commit marker of shard ``n`` of ``split`` in the build's work folder (OUT/.work)."""
    return Path(work) / "shards" / f"{split}-{n:06d}.json"


def done_shard(work: Path, split: str, n: int, out: Path) -> dict | None:
    m = marker_path(work, split, n)
    if m.is_file() and (Path(out) / shard_path(split, n)).is_file():
        return json.loads(m.read_text())
    return None


def _chunks(jobs: list[dict], budget: int) -> Iterator[list[dict]]:
    """Consecutive runs of jobs whose payload stays within ``budget`` bytes (one job at least)."""
    run: list[dict] = []
    size = 0
    for job in jobs:
        n = sum(ln for _, ln in job["frames"]) + sum(ln for _, ln in job["masks"] or ())
        if run and size + n > budget:
            yield run
            run, size = [], 0
        run.append(job)
        size += n
    if run:
        yield run


def _read_ranges(path: str, ranges: set[tuple[int, int]], out: dict) -> None:
    """Read every (offset, length) of one file with one open; touching ranges in one read."""
    spans: list[list] = []  # [start, end, [(offset, length), ...]]
    for off, ln in sorted(ranges):
        if spans and off <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], off + ln)
            spans[-1][2].append((off, ln))
        else:
            spans.append([off, off + ln, [(off, ln)]])
    with open(path, "rb") as f:
        for start, end, parts in spans:
            f.seek(start)
            data = f.read(end - start)
            for off, ln in parts:
                out[(path, off, ln)] = data[off - start : off - start + ln]


def _prefetch(jobs: list[dict]) -> dict:
    """Every byte range and flow slice the jobs need, read file by file."""
    ranges: dict[str, set[tuple[int, int]]] = {}
    flows: dict[str, set[tuple[int, int]]] = {}
    for job in jobs:
        d = job["dir"]
        ranges.setdefault(f"{d}/{FRAMES_FILE}", set()).update(map(tuple, job["frames"]))
        if job["masks"] is not None:
            ranges.setdefault(f"{d}/{MASKS_FILE}", set()).update(map(tuple, job["masks"]))
        if job["pairs"] is not None:
            flows.setdefault(f"{d}/{FLOW_FILE}", set()).add(tuple(job["pairs"]))
    out: dict = {}
    for path in sorted(ranges):
        _read_ranges(path, ranges[path], out)
    for path in sorted(flows):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        for a, b in sorted(flows[path]):
            out[(path, a, b)] = np.ascontiguousarray(arr[a:b])
        del arr
    return out


def _samples(jobs: list[dict], budget: int) -> Iterator[dict]:
    for chunk in _chunks(jobs, budget):
        data = _prefetch(chunk)
        for job in chunk:
            d = job["dir"]
            sample = {"__key__": job["key"]}
            for k, (off, ln) in enumerate(job["frames"]):
                sample[frame_member(k)] = data[(f"{d}/{FRAMES_FILE}", off, ln)]
            if job["masks"] is not None:
                for k, (off, ln) in enumerate(job["masks"]):
                    sample[mask_member(k)] = data[(f"{d}/{MASKS_FILE}", off, ln)]
            if job["pairs"] is not None:
                a, b = job["pairs"]
                buf = io.BytesIO()
                np.save(buf, data[(f"{d}/{FLOW_FILE}", a, b)])
                sample[FLOW_MEMBER] = buf.getvalue()
            sample[JSON_MEMBER] = json.dumps(job["json"], sort_keys=True).encode()
            yield sample
        del data


def write_planned_shard(
    out: Path, work: Path, split: str, n: int, jobs: list[dict], budget: int = READ_BUDGET
) -> dict:
    """Write ``{split}/{split}-{n:06d}.tar`` and its commit marker; returns the shard info."""
    rel = shard_path(split, n)
    (Path(out) / split).mkdir(parents=True, exist_ok=True)
    info = write_shard(Path(out) / rel, _samples(jobs, budget))
    info = {**info, "path": rel}
    marker = marker_path(work, split, n)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, info)
    return info
