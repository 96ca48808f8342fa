"""Stage 3: write one shard from planned windows, reading encoded frames from the track cache.

Frames are copied as the PNG bytes stage 1 produced (no re-encode). A shard is committed by
its stats marker, written after the tar, so a resumed build skips finished shards.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from pipeline.plan import Window
from pipeline.tracks import track_dir
from shards_spec.format import shard_path
from shards_spec.writer import atomic_write_json, write_shard


def window_job(w: Window, work: Path, keep_mask: bool, keep_flow: bool) -> dict:
    """The small, picklable description of a window a shard task needs."""
    return {
        "key": w.key,
        "dir": str(track_dir(work, w.track)),
        "frames": [f[1:3] for f in w.frames],
        "masks": [f[3:5] for f in w.frames] if keep_mask and len(w.frames[0]) >= 5 else None,
        "pairs": [w.pair_index, w.pair_index + len(w.frames) - 1] if keep_flow else None,
        "json": w.sample_json(),
    }


def marker_path(work: Path, split: str, n: int) -> Path:
    return Path(work) / "shards" / f"{split}-{n:06d}.json"


def done_shard(work: Path, split: str, n: int, out: Path) -> dict | None:
    m = marker_path(work, split, n)
    if m.is_file() and (Path(out) / shard_path(split, n)).is_file():
        return json.loads(m.read_text())
    return None


class _Reader:
    """Seeks into track caches; keeps a few files open across the windows of one shard."""

    def __init__(self):
        self.files: dict[str, io.BufferedReader] = {}
        self.flows: dict[str, np.ndarray] = {}

    def bytes(self, path: str, offset: int, length: int) -> bytes:
        f = self.files.get(path)
        if f is None:
            if len(self.files) > 64:
                self.close()
            f = self.files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        f.seek(offset)
        return f.read(length)

    def flow(self, path: str) -> np.ndarray:
        if path not in self.flows:
            self.flows[path] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self.flows[path]

    def close(self):
        for f in self.files.values():
            f.close()
        self.files.clear()
        self.flows.clear()


def write_planned_shard(out: Path, work: Path, split: str, n: int, jobs: list[dict]) -> dict:
    """Write ``{split}/{split}-{n:06d}.tar`` and its commit marker; returns the shard info."""
    rel = shard_path(split, n)
    reader = _Reader()

    def samples():
        for job in jobs:
            d = job["dir"]
            sample = {"__key__": job["key"]}
            for k, (off, ln) in enumerate(job["frames"]):
                sample[f"f{k}.png"] = reader.bytes(f"{d}/frames.bin", off, ln)
            if job["masks"] is not None:
                for k, (off, ln) in enumerate(job["masks"]):
                    sample[f"mask{k}.png"] = reader.bytes(f"{d}/masks.bin", off, ln)
            if job["pairs"] is not None:
                a, b = job["pairs"]
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(reader.flow(f"{d}/flow.npy")[a:b]))
                sample["flow.npy"] = buf.getvalue()
            sample["json"] = json.dumps(job["json"], sort_keys=True).encode()
            yield sample

    try:
        (Path(out) / split).mkdir(parents=True, exist_ok=True)
        info = write_shard(Path(out) / rel, samples())
    finally:
        reader.close()
    info = {**info, "path": rel}
    marker = marker_path(work, split, n)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, info)
    return info
