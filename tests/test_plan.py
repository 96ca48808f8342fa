"""The plan (driver, no pixels): windows, splits, sigma, shuffling, subsets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.plan import SHORT_CLIP, assign_val_groups, make_plan, windows_of
from pipeline.sources import Track


def fake_track(seq: int, frame_ids: list[int], subject: str = "s0") -> Track:
    prefix = f"{seq:04d}-cam0"
    return Track(f"{prefix}-{frame_ids[0]:08d}", prefix, "handco", "images", f"/x/{seq}",
                 ids=tuple(frame_ids), names=tuple(f"{f}.jpg" for f in frame_ids),
                 expected=len(frame_ids), sequence=seq, camera=0, subject=subject,
                 group=f"seq-{seq:04d}")  # fmt: skip


def fake_meta(frame_ids: list[int], clips: list[tuple[int, int]], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "frames": [[f, 0, 1] for f in frame_ids],
        "clips": [list(c) for c in clips],
        "pair_msq": [[float(x) for x in rng.random(e - s - 1) * 10] for s, e in clips],
        "skipped": [],
        "n_input": len(frame_ids),
    }


def test_windows_stay_inside_clips_and_short_clips_are_recorded():
    ids = list(range(10))
    # clips [0..5), [5..7) (too short for K=3), [7..10)
    track, meta = fake_track(1, ids), fake_meta(ids, [(0, 5), (5, 7), (7, 10)])
    windows, orphans, kept, pairs = windows_of(track, meta, 3)
    assert [w.frame_ids for w in windows] == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [7, 8, 9]]
    assert orphans == [5, 6] and kept == 10 and pairs == 4 + 1 + 2
    # each window's msq are its own pairs, and pair_index points into the flat pair list
    flat = [m for clip in meta["pair_msq"] for m in clip]
    for w in windows:
        assert w.msq == flat[w.pair_index : w.pair_index + 2]
    assert windows[0].key == "0001-cam0-00000000" and windows[-1].clip_id == "0001-cam0-00000007"
    assert SHORT_CLIP == "clip_shorter_than_window"


def _plan(n_seq: int = 10, **kw):
    committed = []
    for s in range(n_seq):
        ids = list(range(12))
        committed.append((fake_track(s, ids, subject=f"s{s % 3}"), fake_meta(ids, [(0, 12)], s)))
    base = dict(window=3, val_fraction=0.2, seed=0, shard_size=8)
    return committed, make_plan(committed, **{**base, **kw})


def test_split_by_group_is_deterministic_and_sigma_is_train_median():
    committed, plan = _plan()
    val_seqs = {w.track.sequence for shard in plan.shards["val"] for w in shard}
    train_seqs = {w.track.sequence for shard in plan.shards["train"] for w in shard}
    assert len(val_seqs) == 2 and not val_seqs & train_seqs
    _, again = _plan()
    assert [[w.key for w in s] for s in again.shards["train"]] == [
        [w.key for w in s] for s in plan.shards["train"]
    ]
    train_pairs = [m for t, m in committed if t.sequence in train_seqs for m in m["pair_msq"][0]]
    assert plan.sigma == pytest.approx(float(np.median(train_pairs)))
    w = plan.shards["train"][0][0]
    assert w.weight == pytest.approx([float(np.exp(-m / plan.sigma)) for m in w.msq])


def test_shuffle_spreads_clips_and_seed_changes_order():
    _, plan = _plan()
    shards_of = {}
    for n, shard in enumerate(plan.shards["train"]):
        for w in shard:
            shards_of.setdefault(w.clip_id, set()).add(n)
    assert all(len(s) > 1 for s in shards_of.values())
    _, other = _plan(seed=1)
    assert [w.key for w in other.shards["train"][0]] != [w.key for w in plan.shards["train"][0]]


def test_max_windows_draws_a_seeded_subset():
    _, full = _plan()
    _, sub = _plan(max_windows=20)
    keys = [w.key for s in sub.shards["train"] for w in s]
    assert (
        len(keys) == 20
        and sub.counts["windows_dropped_by_max_windows"]
        == full.counts["windows"]
        - full.counts["windows"]
        + sum(len(s) for s in full.shards["train"])
        - 20
    )
    assert set(keys) <= {w.key for s in full.shards["train"] for w in s}
    _, again = _plan(max_windows=20)
    assert keys == [w.key for s in again.shards["train"] for w in s]


def test_val_groups():
    assert assign_val_groups(["a"], 0.5, 0) == set()  # one group: everything trains
    assert assign_val_groups(["a", "b", "c"], 0.0, 0) == set()
    groups = [f"g{i}" for i in range(100)]
    val = assign_val_groups(groups, 0.05, 0)
    assert len(val) == 5 and val == assign_val_groups(list(reversed(groups)), 0.05, 0)
    assert val != assign_val_groups(groups, 0.05, 1)


def test_split_by_subject_groups_tracks_by_subject(synth_root):
    from pipeline.handco import discover_handco

    disc = discover_handco(synth_root, split_by="subject")
    assert all(t.group == f"subject-{t.subject}" for t in disc.tracks)
    by_seq = discover_handco(synth_root)
    assert all(t.group == f"seq-{t.sequence:04d}" for t in by_seq.tracks)
