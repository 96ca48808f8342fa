"""The plan (driver, no pixels): windows, splits, sigma, shuffling, subsets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.plan import DROPPED_BY_MAX_WINDOWS, SHORT_CLIP, assign_val_groups, make_plan
from pipeline.sources import Track


def fake_track(seq: int, frame_ids: list[int], subject: str = "s0") -> Track:
    prefix = f"{seq:04d}-cam0"
    return Track(f"{prefix}-{frame_ids[0]:08d}", prefix, "handco", "images", f"/x/{seq}",
                 ids=tuple(frame_ids), names=tuple(f"{f}.jpg" for f in frame_ids),
                 expected=len(frame_ids), sequence=seq, camera=0, subject=subject,
                 group=f"seq-{seq:04d}")  # fmt: skip


def fake_meta(frame_ids: list[int], clips: list[tuple[int, int]], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    msq = [[float(x) for x in rng.random(e - s - 1) * 10] for s, e in clips]
    return {
        "frames": [[f, 0, 1] for f in frame_ids],
        "clips": [list(c) for c in clips],
        "pair_msq": msq,
        "pair_mag": [[0.9 * float(np.sqrt(m)) + 0.001 * i for i, m in enumerate(c)] for c in msq],
        "skipped": [],
        "n_input": len(frame_ids),
    }


def _keys(plan, split="train"):
    return [[plan.key(int(i)) for i in plan.shard(split, n)] for n in range(plan.n_shards(split))]


def _all(plan, split):
    return [int(i) for n in range(plan.n_shards(split)) for i in plan.shard(split, n)]


def test_windows_stay_inside_clips_and_short_clips_are_recorded():
    ids = list(range(10))
    # clips [0..5), [5..7) (too short for K=3), [7..10)
    track, meta = fake_track(1, ids), fake_meta(ids, [(0, 5), (5, 7), (7, 10)])
    plan = make_plan([(track, meta)], window=3, val_fraction=0.0, seed=0, shard_size=100)
    ws = sorted(_all(plan, "train"), key=plan.key)
    assert [plan.sample_json(i)["frame_ids"] for i in ws] == [
        [0, 1, 2], [1, 2, 3], [2, 3, 4], [7, 8, 9]
    ]  # fmt: skip
    assert plan.counts["frames_kept"] == 10 and plan.counts["pairs"] == 4 + 1 + 2
    # each window's msq are its own pairs, and pair_index points into the track's pair list
    flat = [m for clip in meta["pair_msq"] for m in clip]
    for i in ws:
        assert plan.sample_json(i)["flow_msq"] == flat[plan.pair_index(i) : plan.pair_index(i) + 2]
        assert [f[0] for f in plan.frames(i)] == plan.sample_json(i)["frame_ids"]
    assert plan.key(ws[0]) == "0001-cam0-00000000" and plan.clip_id(ws[-1]) == "0001-cam0-00000007"
    assert plan.clip_id(ws[1]) == "0001-cam0-00000000"
    assert [(c, f, r) for _, c, f, r in plan.unwindowed()] == [
        ("0001-cam0-00000005", 5, SHORT_CLIP), ("0001-cam0-00000005", 6, SHORT_CLIP)
    ]  # fmt: skip
    # sigma and stats: the pairs of windows only (the short clip's pair is in none)
    in_windows = flat[0:4] + flat[5:7]
    assert plan.sigma == pytest.approx(float(np.median(in_windows)))
    assert plan.flow_stats["train"]["count"] == 6
    assert plan.flow_stats["train"]["max"] == max(in_windows)
    # flow_mag: each window's own pairs, right after flow_msq; stats over the same pairs
    mags = [g for clip in meta["pair_mag"] for g in clip]
    for i in ws:
        j = plan.sample_json(i)
        assert j["flow_mag"] == mags[plan.pair_index(i) : plan.pair_index(i) + 2]
        keys = list(j)
        assert keys[keys.index("flow_msq") + 1] == "flow_mag"
    mag_in_windows = mags[0:4] + mags[5:7]
    assert plan.mag_stats["train"]["count"] == plan.flow_stats["train"]["count"] == 6
    assert plan.mag_stats["train"]["max"] == max(mag_in_windows)
    assert plan.mag_stats["train"]["percentiles"]["p50"] == pytest.approx(
        float(np.median(mag_in_windows))
    )
    assert plan.mag_stats["val"]["count"] == 0


def _plan(n_seq: int = 10, **kw):
    committed = []
    for s in range(n_seq):
        ids = list(range(12))
        committed.append((fake_track(s, ids, subject=f"s{s % 3}"), fake_meta(ids, [(0, 12)], s)))
    base = dict(window=3, val_fraction=0.2, seed=0, shard_size=8)
    return committed, make_plan(committed, **{**base, **kw})


def test_split_by_group_is_deterministic_and_sigma_is_train_median():
    committed, plan = _plan()
    val_seqs = {plan.track_of(i).sequence for i in _all(plan, "val")}
    train_seqs = {plan.track_of(i).sequence for i in _all(plan, "train")}
    assert len(val_seqs) == 2 and not val_seqs & train_seqs
    _, again = _plan()
    assert _keys(again) == _keys(plan)
    train_pairs = [m for t, m in committed if t.sequence in train_seqs for m in m["pair_msq"][0]]
    assert plan.sigma == pytest.approx(float(np.median(train_pairs)))
    j = plan.sample_json(int(plan.shard("train", 0)[0]))
    assert j["weight"] == pytest.approx([float(np.exp(-m / plan.sigma)) for m in j["flow_msq"]])
    assert j["split"] == "train" and plan.sample_json(_all(plan, "val")[0])["split"] == "val"


def test_shuffle_spreads_clips_and_seed_changes_order():
    _, plan = _plan()
    shards_of = {}
    for n in range(plan.n_shards("train")):
        for i in plan.shard("train", n):
            shards_of.setdefault(plan.clip_id(int(i)), set()).add(n)
    assert all(len(s) > 1 for s in shards_of.values())
    _, other = _plan(seed=1)
    assert _keys(other)[0] != _keys(plan)[0]
    sizes = [len(plan.shard("train", n)) for n in range(plan.n_shards("train"))]
    assert sizes[:-1] == [8] * (len(sizes) - 1) and sum(sizes) == len(_all(plan, "train"))


def test_max_windows_draws_a_seeded_subset_and_records_its_frames():
    _, full = _plan()
    _, sub = _plan(max_windows=20)
    keys = [k for s in _keys(sub) for k in s]
    n_train = len(_all(full, "train"))
    assert len(keys) == 20 and sub.counts["windows_dropped_by_max_windows"] == n_train - 20
    assert sub.counts["windows"] == 20 + len(_all(full, "val"))
    assert set(keys) <= {k for s in _keys(full) for k in s}
    _, again = _plan(max_windows=20)
    assert keys == [k for s in _keys(again) for k in s]
    # frames of no kept window: recorded once each, under their clip's id, never a kept frame
    kept = {
        (sub.clip_id(i), f) for i in _all(sub, "train") for f in sub.sample_json(i)["frame_ids"]
    }
    dropped = [(c, f) for _, c, f, r in sub.unwindowed() if r == DROPPED_BY_MAX_WINDOWS]
    assert dropped and len(set(dropped)) == len(dropped) and not kept & set(dropped)
    train_frames = {(plan_t.key(0), f) for plan_t in {sub.track_of(i) for i in _all(sub, "train")}
                    for f in range(12)}  # fmt: skip
    assert kept | set(dropped) >= train_frames
    # sigma: median over the distinct pairs of the kept train windows only
    pairs = {}
    for i in _all(sub, "train"):
        j = sub.sample_json(i)
        for a, m in zip(j["frame_ids"], j["flow_msq"], strict=False):
            pairs[(j["clip_id"], a)] = m
    assert sub.flow_stats["train"]["count"] == len(pairs)
    assert sub.sigma == pytest.approx(float(np.median(list(pairs.values()))))
    assert sub.sigma != full.sigma


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
