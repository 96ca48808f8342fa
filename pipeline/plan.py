"""Stage 2 (driver, no pixels): clips -> K-frame windows -> splits -> sigma -> shuffled shards.

Everything here is a pure function of the committed track metadata and the config, so the
plan, and with it every shard's content, is the same whatever the number of workers and
however often the build was interrupted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.sources import Track
from shards_spec.format import flow_stats, flow_weight

SHORT_CLIP = "clip_shorter_than_window"


@dataclass
class Window:
    """One sample: K consecutive kept frames of one clip."""

    key: str
    track: Track
    clip_id: str
    frames: list[list[int]]  # K entries [frame_id, offset, length(, mask_offset, mask_length)]
    pair_index: int  # index of the window's first pair in the track's flow.npy
    msq: list[float]
    split: str = ""
    weight: list[float] = field(default_factory=list)

    @property
    def frame_ids(self) -> list[int]:
        return [f[0] for f in self.frames]

    def sample_json(self) -> dict:
        t = self.track
        return {
            "key": self.key,
            "clip_id": self.clip_id,
            "source": t.source,
            "split": self.split,
            "sequence": t.sequence,
            "camera": t.camera,
            "subject": t.subject,
            "object": t.object,
            "frame_ids": self.frame_ids,
            "flow_msq": self.msq,
            "weight": self.weight,
        }


@dataclass
class Plan:
    shards: dict[str, list[list[Window]]]  # split -> shards -> windows in write order
    sigma: float
    flow_stats: dict
    counts: dict
    short_clip_frames: list[tuple[Track, list[int]]]  # frames in no window, by track


def windows_of(track: Track, meta: dict, k: int) -> tuple[list[Window], list[int], int, int]:
    """All stride-1 windows of every clip of a track, plus the frame ids no window holds."""
    out: list[Window] = []
    orphans: list[int] = []
    pair_base = 0
    n_pairs = 0
    for (start, end), msq in zip(meta["clips"], meta["pair_msq"], strict=True):
        frames = meta["frames"][start:end]
        clip_id = track.key(frames[0][0])
        n_pairs += len(msq)
        if len(frames) < k:
            orphans.extend(f[0] for f in frames)
        for i in range(len(frames) - k + 1):
            out.append(
                Window(
                    key=track.key(frames[i][0]),
                    track=track,
                    clip_id=clip_id,
                    frames=frames[i : i + k],
                    pair_index=pair_base + i,
                    msq=[float(x) for x in msq[i : i + k - 1]],
                )
            )
        pair_base += max(0, len(frames) - 1)
    return out, orphans, sum(e - s for s, e in meta["clips"]), n_pairs


def assign_val_groups(groups: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """Deterministic group-level split: the groups with the smallest seeded hash go to val."""
    uniq = sorted(set(groups))
    if val_fraction <= 0 or len(uniq) < 2:
        return set()
    n_val = min(len(uniq) - 1, max(1, round(val_fraction * len(uniq))))
    ranked = sorted(uniq, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    return set(ranked[:n_val])


def make_plan(
    committed: Sequence[tuple[Track, dict]],
    *,
    window: int,
    val_fraction: float,
    seed: int,
    shard_size: int,
    max_windows: int | None = None,
    sigma: float | None = None,
) -> Plan:
    windows: list[Window] = []
    orphans: list[tuple[Track, list[int]]] = []
    n_frames = n_pairs = 0
    pair_msq: dict[str, list[float]] = {"train": [], "val": []}
    val_groups = assign_val_groups([t.group for t, _ in committed], val_fraction, seed)
    for track, meta in committed:
        w, orph, nf, npairs = windows_of(track, meta, window)
        split = "val" if track.group in val_groups else "train"
        for x in w:
            x.split = split
        windows.extend(w)
        n_frames += nf
        n_pairs += npairs
        pair_msq[split].extend(m for clip in meta["pair_msq"] for m in clip)
        if orph:
            orphans.append((track, orph))

    if sigma is None:
        train = pair_msq["train"] or pair_msq["val"]
        sigma = float(np.median(train)) if train else 1.0
    sigma = max(float(sigma), 1e-6)  # a still video would otherwise divide by zero

    by_split: dict[str, list[Window]] = {"train": [], "val": []}
    for x in windows:
        x.weight = [flow_weight(m, sigma) for m in x.msq]
        by_split[x.split].append(x)

    dropped = 0
    if max_windows is not None and len(by_split["train"]) > max_windows:
        rng = np.random.default_rng([seed, 1])
        keep = np.sort(rng.choice(len(by_split["train"]), size=max_windows, replace=False))
        dropped = len(by_split["train"]) - max_windows
        by_split["train"] = [by_split["train"][i] for i in keep]

    shards: dict[str, list[list[Window]]] = {}
    for i, split in enumerate(("train", "val")):
        ws = by_split[split]
        if not ws:
            continue
        order = np.random.default_rng([seed, 100 + i]).permutation(len(ws))
        ws = [ws[j] for j in order]
        shards[split] = [ws[s : s + shard_size] for s in range(0, len(ws), shard_size)]

    counts = {
        "tracks": len(committed),
        "clips": sum(len(m["clips"]) for _, m in committed),
        "frames_kept": n_frames,
        "pairs": n_pairs,
        "windows": sum(len(v) for v in by_split.values()),
        "windows_dropped_by_max_windows": dropped,
        "shards": sum(len(v) for v in shards.values()),
    }
    stats = {s: flow_stats(v) for s, v in pair_msq.items()}
    return Plan(shards, sigma, stats, counts, orphans)
