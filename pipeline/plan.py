"""Stage 2 (driver, no pixels): clips -> K-frame windows -> splits -> sigma -> shuffled shards.

Everything here is a pure function of the committed track metadata and the config, so the
plan, and with it every shard's content, is the same whatever the number of workers and
however often the build was interrupted.

The plan is columnar: a window is a row of a few numpy arrays (its track, the kept-frame index
of its first frame and of its clip's first frame, and its first pair), never an object, so a
HanCo-sized plan (~840k windows) costs tens of MB in the driver. Shards are slices of a
per-split permutation; their jobs are built only when a shard is submitted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.sources import Track
from shards_spec.format import flow_stats

SHORT_CLIP = "clip_shorter_than_window"
DROPPED_BY_MAX_WINDOWS = "dropped_by_max_windows"
SPLITS = ("train", "val")


@dataclass
class Plan:
    """Every window of a build, by index ``i`` into the per-window arrays.

    Kept frames of all tracks are numbered globally in track order (``frame_base[t]`` is the
    number of track ``t``'s first kept frame), so are adjacent pairs (``pair_base[t]``).
    """

    tracks: list[Track]
    metas: list[dict]
    window: int
    shard_size: int
    frame_base: np.ndarray  # int64 (tracks + 1): first global kept-frame number of each track
    pair_base: np.ndarray  # int64 (tracks + 1): first global pair number of each track
    frame_ids: np.ndarray  # int64 per global kept frame
    msq: np.ndarray  # float64 per global pair: mean |F|^2
    mag: np.ndarray  # float64 per global pair: mean |F|
    weight: np.ndarray  # float64 per global pair: exp(-msq / sigma)
    w_track: np.ndarray  # int32 per window: index into ``tracks``
    w_frame: np.ndarray  # int64 per window: global number of its first frame
    w_clip: np.ndarray  # int64 per window: global number of its clip's first frame
    w_pair: np.ndarray  # int64 per window: global number of its first pair
    is_val: np.ndarray  # bool per track
    order: dict[str, np.ndarray]  # split -> window indices in write order (after max-windows)
    sigma: float
    flow_stats: dict  # split -> flow_stats of flow_msq over its windows' distinct pairs
    mag_stats: dict  # split -> flow_stats of flow_mag over the same pairs
    counts: dict
    short_clips: list[tuple[int, int, int]]  # (track, first, end) global kept frames, < K long
    dropped_frames: np.ndarray  # global kept frames of long clips that are in no kept window

    # ---------------------------------------------------------------- shards

    def n_shards(self, split: str) -> int:
        n = len(self.order.get(split, ()))
        return -(-n // self.shard_size)

    @property
    def shard_ids(self) -> list[tuple[str, int]]:
        """Every (split, shard number), splits in name order."""
        return [(s, n) for s in sorted(self.order) for n in range(self.n_shards(s))]

    def shard(self, split: str, n: int) -> np.ndarray:
        """Window indices of shard ``n`` of ``split``, in write order."""
        return self.order[split][n * self.shard_size : (n + 1) * self.shard_size]

    # ---------------------------------------------------------------- one window

    def split_of(self, i: int) -> str:
        return "val" if self.is_val[self.w_track[i]] else "train"

    def track_of(self, i: int) -> Track:
        return self.tracks[int(self.w_track[i])]

    def key(self, i: int) -> str:
        return self.track_of(i).key(int(self.frame_ids[self.w_frame[i]]))

    def clip_id(self, i: int) -> str:
        return self.track_of(i).key(int(self.frame_ids[self.w_clip[i]]))

    def frames(self, i: int) -> list[list[int]]:
        """The K committed entries [frame_id, offset, length(, mask_offset, mask_length)]."""
        t = int(self.w_track[i])
        start = int(self.w_frame[i] - self.frame_base[t])
        return self.metas[t]["frames"][start : start + self.window]

    def pair_index(self, i: int) -> int:
        """Index of the window's first pair in its track's flow.npy."""
        return int(self.w_pair[i] - self.pair_base[self.w_track[i]])

    def sample_json(self, i: int) -> dict:
        t = self.track_of(i)
        f, p, k = int(self.w_frame[i]), int(self.w_pair[i]), self.window
        return {
            "key": self.key(i),
            "clip_id": self.clip_id(i),
            "source": t.source,
            "split": self.split_of(i),
            "sequence": t.sequence,
            "camera": t.camera,
            "subject": t.subject,
            "object": t.object,
            "frame_ids": self.frame_ids[f : f + k].tolist(),
            "flow_msq": self.msq[p : p + k - 1].tolist(),
            "flow_mag": self.mag[p : p + k - 1].tolist(),
            "weight": self.weight[p : p + k - 1].tolist(),
        }

    # ---------------------------------------------------------------- frames in no window

    def unwindowed(self) -> Iterator[tuple[Track, str, int, str]]:
        """(track, clip_id, frame_id, reason) of every kept frame that is in no written window:
        frames of clips shorter than K, and frames only the windows --max-windows dropped had."""
        for t, a, e in self.short_clips:
            track = self.tracks[t]
            clip = track.key(int(self.frame_ids[a]))
            for fid in self.frame_ids[a:e].tolist():
                yield track, clip, fid, SHORT_CLIP
        if not len(self.dropped_frames):
            return
        tr = np.searchsorted(self.frame_base, self.dropped_frames, side="right") - 1
        # the clip of a dropped frame: the last clip start at or before it in its track
        starts = self._clip_starts()
        clip_of = starts[np.searchsorted(starts, self.dropped_frames, side="right") - 1]
        fids = self.frame_ids[self.dropped_frames].tolist()
        clip_fids = self.frame_ids[clip_of].tolist()
        for t, c, fid in zip(tr.tolist(), clip_fids, fids, strict=True):
            track = self.tracks[t]
            yield track, track.key(c), fid, DROPPED_BY_MAX_WINDOWS

    def _clip_starts(self) -> np.ndarray:
        out = [
            int(self.frame_base[t]) + s
            for t, meta in enumerate(self.metas)
            for s, _ in meta["clips"]
        ]
        return np.asarray(out, np.int64)


def _flat_pairs(metas: Sequence[dict], field: str, n_pairs: int) -> np.ndarray:
    """The per-pair values ``field`` (``pair_msq``, ``pair_mag``) of every track, flat."""
    out = np.empty(n_pairs, np.float64)
    at = 0
    for meta in metas:
        for clip in meta[field]:
            out[at : at + len(clip)] = clip
            at += len(clip)
    return out


def assign_val_groups(groups: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """Deterministic group-level split: the groups with the smallest seeded hash go to val."""
    uniq = sorted(set(groups))
    if val_fraction <= 0 or len(uniq) < 2:
        return set()
    n_val = min(len(uniq) - 1, max(1, round(val_fraction * len(uniq))))
    ranked = sorted(uniq, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    return set(ranked[:n_val])


def _covered(n: int, starts: np.ndarray, length: int) -> np.ndarray:
    """Boolean mask of the ``n`` positions covered by the runs [s, s + length) of ``starts``."""
    diff = np.zeros(n + 1, np.int64)
    if length > 0 and len(starts):
        np.add.at(diff, starts, 1)
        np.add.at(diff, starts + length, -1)
    return np.cumsum(diff[:n]) > 0


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
    k = window
    tracks = [t for t, _ in committed]
    metas = [m for _, m in committed]
    n_t = len(tracks)
    val_groups = assign_val_groups([t.group for t in tracks], val_fraction, seed)
    is_val = np.array([t.group in val_groups for t in tracks], bool)

    frame_base = np.zeros(n_t + 1, np.int64)
    pair_base = np.zeros(n_t + 1, np.int64)
    w_track, w_frame, w_clip, w_pair = [], [], [], []
    short: list[tuple[int, int, int]] = []
    n_clips = 0
    for t, meta in enumerate(metas):
        fb, pb = int(frame_base[t]), int(pair_base[t])
        n_pairs = 0
        for (start, end), msq in zip(meta["clips"], meta["pair_msq"], strict=True):
            n_clips += 1
            length = end - start
            if length < k:
                short.append((t, fb + start, fb + end))
            else:
                nw = length - k + 1
                w_track.append(np.full(nw, t, np.int32))
                w_frame.append(np.arange(fb + start, fb + start + nw, dtype=np.int64))
                w_clip.append(np.full(nw, fb + start, np.int64))
                w_pair.append(np.arange(pb + n_pairs, pb + n_pairs + nw, dtype=np.int64))
            n_pairs += len(msq)
        frame_base[t + 1] = fb + len(meta["frames"])
        pair_base[t + 1] = pb + n_pairs

    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    wt, wf, wc, wp = (cat(w_track, np.int32), cat(w_frame, np.int64), cat(w_clip, np.int64),
                      cat(w_pair, np.int64))  # fmt: skip
    frame_ids = np.fromiter(
        (f[0] for meta in metas for f in meta["frames"]), np.int64, int(frame_base[-1])
    )
    msq_all = _flat_pairs(metas, "pair_msq", int(pair_base[-1]))
    mag_all = _flat_pairs(metas, "pair_mag", int(pair_base[-1]))

    # Windows in track, clip, start order; train and val keep that order.
    val_w = is_val[wt] if len(wt) else np.zeros(0, bool)
    by_split = {"train": np.flatnonzero(~val_w), "val": np.flatnonzero(val_w)}
    dropped = 0
    if max_windows is not None and len(by_split["train"]) > max_windows:
        rng = np.random.default_rng([seed, 1])
        keep = np.sort(rng.choice(len(by_split["train"]), size=max_windows, replace=False))
        dropped = len(by_split["train"]) - max_windows
        by_split["train"] = by_split["train"][keep]

    # Distinct adjacent pairs of each split's windows (SPEC 6): after --max-windows, and never
    # a pair of a clip shorter than K (no window holds one).
    n_pairs_all = int(pair_base[-1])
    in_split = {s: _covered(n_pairs_all, wp[idx], k - 1) for s, idx in by_split.items()}
    pair_values = {s: msq_all[m] for s, m in in_split.items()}
    if sigma is None:
        values = pair_values["train"] if len(pair_values["train"]) else pair_values["val"]
        sigma = float(np.median(values)) if len(values) else 1.0
    sigma = max(float(sigma), 1e-6)  # a still video would otherwise divide by zero
    weight = np.exp(-msq_all / sigma)

    # Kept frames of long clips that no written window holds (only --max-windows drops any).
    kept_windows = np.concatenate([by_split["train"], by_split["val"]])
    in_long = np.ones(int(frame_base[-1]), bool)
    for _, a, e in short:
        in_long[a:e] = False
    covered = _covered(int(frame_base[-1]), wf[kept_windows], k)
    dropped_frames = np.flatnonzero(in_long & ~covered)

    order: dict[str, np.ndarray] = {}
    for i, split in enumerate(SPLITS):
        ws = by_split[split]
        if len(ws):
            order[split] = ws[np.random.default_rng([seed, 100 + i]).permutation(len(ws))]

    n_windows = sum(len(v) for v in order.values())
    counts = {
        "tracks": n_t,
        "clips": n_clips,
        "frames_kept": int(sum(e - s for m in metas for s, e in m["clips"])),
        "pairs": n_pairs_all,
        "windows": n_windows,
        "windows_dropped_by_max_windows": dropped,
        "shards": sum(-(-len(v) // shard_size) for v in order.values()),
    }
    stats = {s: flow_stats(v) for s, v in pair_values.items()}
    mag_stats = {s: flow_stats(mag_all[m]) for s, m in in_split.items()}
    return Plan(
        tracks=tracks,
        metas=metas,
        window=k,
        shard_size=shard_size,
        frame_base=frame_base,
        pair_base=pair_base,
        frame_ids=frame_ids,
        msq=msq_all,
        mag=mag_all,
        weight=weight,
        w_track=wt,
        w_frame=wf,
        w_clip=wc,
        w_pair=wp,
        is_val=is_val,
        order=order,
        sigma=sigma,
        flow_stats=stats,
        mag_stats=mag_stats,
        counts=counts,
        short_clips=short,
        dropped_frames=dropped_frames,
    )
