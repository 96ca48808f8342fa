"""The streaming loader (train/data.py): lanes, exact resume, decoding and bad data."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from shardutil import edit_shard, make_build, read_members

from shards_spec import SpecError, open_build
from shards_spec.cli import Stopped, signals_deferred, stop_on_sigterm
from shards_spec.reader import decode_png
from train.data import DataError, Stream, batches, fixed_windows, lane_batches, stream_for

SHARD0 = "train/train-000000.tar"
SHARD1 = "train/train-000001.tar"


# ---------------------------------------------------------------- helpers


def make_stream(root: Path, split: str = "train", **kw) -> Stream:
    """stream_for with the defaults most tests use (iid frame 1, 32 px, batch 2, seed 0)."""
    args = {"frames": (1,), "image_size": 32, "batch": 2, "seed": 0, **kw}
    return stream_for(open_build(root), split, **args)


def merge(parts: list[dict]) -> dict:
    """One rank batch from its lanes' parts (in lane order), as batches() should make it."""
    return {
        "g": parts[0]["g"],
        "epoch": parts[0]["epoch"],
        "step": parts[0]["step"],
        "frames": torch.cat([p["frames"] for p in parts]),
        "flow_stat": torch.cat([p["flow_stat"] for p in parts]),
        "keys": [k for p in parts for k in p["keys"]],
        "bad": sum(p["bad"] for p in parts),
        "bad_shards": sorted({n for p in parts for n in p["bad_shards"]}),
    }


def rank_batches(stream: Stream, start: int, n: int) -> list[dict]:
    """The rank's batches start..start+n-1, read lane by lane in this process."""
    lanes = {lane: lane_batches(stream, lane, start) for lane in stream.rank_lanes}
    out = []
    for g in range(start, start + n):
        parts = [next(it) for it in lanes.values()]
        assert [(p["g"], p["lane"]) for p in parts] == [(g, lane) for lane in lanes]
        assert [len(p["keys"]) for p in parts] == [stream.lane_batch] * len(lanes)
        out.append(merge(parts))
    return out


def load(stream: Stream, start: int, n: int) -> list[dict]:
    """Batches start..start+n-1: through batches() when it loads in process, else lane by lane."""
    if stream.workers == 0:
        return list(itertools.islice(batches(stream, start), n))
    return rank_batches(stream, start, n)


def assert_same(a: list[dict], b: list[dict]) -> None:
    """Two batch lists are equal: numbers, keys, frame bytes, flow stats and bad counts."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for field in ("g", "epoch", "step", "keys", "bad", "bad_shards"):
            assert x[field] == y[field], (field, x["g"])
        assert torch.equal(x["frames"], y["frames"])
        assert torch.equal(x["flow_stat"], y["flow_stat"])


def samples_of(root: Path, split: str) -> list[tuple[str, str, dict[str, bytes]]]:
    """``(shard, key, {ext: bytes})`` of a split's samples in shard order, read from the tars."""
    out: list[tuple[str, str, dict[str, bytes]]] = []
    for entry in open_build(root).manifest["splits"][split]["shards"]:
        for name, data in read_members(root / entry["path"]):
            key, ext = name.split(".", 1)
            if not out or out[-1][1] != key:
                out.append((entry["path"], key, {}))
            out[-1][2][ext] = data
    return out


def rgb(png: bytes, size: int | None = None) -> np.ndarray:
    """A frame as the loader should hand it out: RGB ``(H, W, 3)``, area-resized to `size`."""
    img = decode_png(png)
    if size is not None and size != img.shape[0]:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def replace_member(root: Path, rel: str, name: str, data: bytes) -> None:
    """Rewrite shard `rel` with member `name` holding `data` (other members kept)."""
    edit_shard(root, rel, lambda members: [(n, data if n == name else d) for n, d in members])


def epoch_batches(stream: Stream, epoch: int) -> list[dict]:
    """All batches of one epoch of the rank."""
    S = stream.steps_per_epoch
    return load(stream, epoch * S, S)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """23 train windows in shards of 4,4,4,4,4,3 (no shard count divides evenly)."""
    return make_build(tmp_path_factory.mktemp("uneven"), n_train=23, n_val=2, shard_size=4)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """8 train windows (shards 4,4) and 5 val windows (shards 4,1), never modified."""
    return make_build(tmp_path_factory.mktemp("small"), n_train=8, n_val=5, shard_size=4)


# ---------------------------------------------------------------- placement


@pytest.mark.parametrize(("workers", "batch"), [(0, 4), (2, 4), (3, 6)])
def test_ranks_get_equal_batches_and_epochs_partition_windows(uneven, workers, batch):
    """Each of 2 ranks makes exactly steps_per_epoch batches of batch/world windows per epoch.

    An epoch's windows over all ranks and steps are distinct and number steps_per_epoch * batch;
    epochs use different orders, and over 5 epochs every window is used (seed 0).
    """
    epochs, world = 5, 2
    keys: list[list[str]] = [[] for _ in range(epochs)]
    for rank in range(world):
        stream = make_stream(uneven, batch=batch, rank=rank, world=world, workers=workers)
        assert stream.steps_per_epoch == 23 // batch  # shards of 4,4,4,4,4,3: a tail is left
        S = stream.steps_per_epoch
        got = load(stream, 0, epochs * S)
        assert [b["g"] for b in got] == list(range(epochs * S))
        assert Counter(b["epoch"] for b in got) == dict.fromkeys(range(epochs), S)
        for g, b in enumerate(got):
            assert (b["epoch"], b["step"]) == divmod(g, S)
            assert b["frames"].shape == (batch // world, 1, 32, 32, 3)
            assert len(b["keys"]) == batch // world and b["bad"] == 0
            keys[b["epoch"]] += b["keys"]
    for epoch_keys in keys:
        assert len(epoch_keys) == len(set(epoch_keys)) == S * batch
    assert all(a != b for a, b in itertools.combinations(keys, 2))
    all_keys = {key for _, key, _ in samples_of(uneven, "train")}
    assert set().union(*map(set, keys)) == all_keys


def test_global_batches_depend_on_lanes_only(uneven):
    """1 rank x 2 workers makes the global batches of 2 ranks x 1 worker; 0 and 1 worker agree."""
    one = load(make_stream(uneven, batch=4, workers=2), 0, 8)
    ranks = [load(make_stream(uneven, batch=4, rank=r, world=2, workers=1), 0, 8) for r in (0, 1)]
    assert_same(one, [merge(parts) for parts in zip(*ranks, strict=True)])
    assert_same(
        load(make_stream(uneven, workers=0), 0, 15), load(make_stream(uneven, workers=1), 0, 15)
    )


def test_batch_must_divide_into_lanes(uneven):
    """A global batch that does not split evenly over ranks x workers is a DataError."""
    with pytest.raises(DataError, match="must divide into 6 lanes"):
        make_stream(uneven, batch=4, world=2, workers=3)


def test_windows_are_shuffled_within_shards(uneven):
    """Within an epoch a shard's windows come out of position order, differently per epoch."""
    stream = make_stream(uneven)
    where = {key: (shard, i % 4) for i, (shard, key, _) in enumerate(samples_of(uneven, "train"))}
    orders = []
    for epoch in range(2):
        per_shard: dict[str, list[int]] = {}
        for batch in epoch_batches(stream, epoch):
            for key in batch["keys"]:
                shard, position = where[key]
                per_shard.setdefault(shard, []).append(position)
        assert any(p != sorted(p) for p in per_shard.values())
        orders.append(per_shard)
    common = orders[0].keys() & orders[1].keys()
    assert any(orders[0][s] != orders[1][s] for s in common)


@pytest.mark.parametrize(("workers", "rank", "world", "batch"), [(0, 0, 1, 2), (2, 1, 2, 4)])
def test_batches_do_not_depend_on_start(uneven, workers, rank, world, batch):
    """Batches from start g0 equal batches g0.. of a run from 0, across epoch boundaries."""
    stream = make_stream(uneven, batch=batch, rank=rank, world=world, workers=workers)
    S = stream.steps_per_epoch
    reference = load(stream, 0, 3 * S)
    for g0 in sorted({1, S - 1, S, S + 1, 2 * S - 1, 2 * S, 2 * S + 1}):
        n = min(4, 3 * S - g0)
        assert_same(load(stream, g0, n), reference[g0 : g0 + n])


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
@pytest.mark.parametrize("pin_memory", [False, True])
def test_dataloader_workers_yield_batches_in_order(small, pin_memory):
    """batches() with 2 loader workers yields g = start, start+1, ... with in-process content."""
    stream = make_stream(small, batch=2, workers=2)
    S = stream.steps_per_epoch
    start, n = S - 1, S + 2  # an odd start across an epoch boundary
    loader = batches(stream, start, pin_memory=pin_memory)
    try:
        got = list(itertools.islice(loader, n))
    finally:
        loader.close()
    assert [b["g"] for b in got] == list(range(start, start + n))
    assert_same(got, rank_batches(stream, start, n))


def test_one_loader_worker_matches_loading_in_process(small):
    """batches() with 1 loader worker gives the batches of loading in the training process."""
    loader = batches(make_stream(small, workers=1), 1)
    try:
        got = list(itertools.islice(loader, 5))
    finally:
        loader.close()
    assert_same(got, load(make_stream(small, workers=0), 1, 5))


def test_a_signal_while_the_workers_start_waits_and_they_are_shut_down(small, monkeypatch):
    """SIGTERM that comes while the loader starts its workers is held until they have started;
    then it stops the stream, and the stream shuts every worker down (a worker left starting
    while its queues are dropped dies with a traceback)."""
    started = []
    original = torch.utils.data.DataLoader.__iter__

    def iter_then_signal(self):
        it = original(self)
        started.append(it)
        os.kill(os.getpid(), signal.SIGTERM)  # as if it came just before iter() returned
        return it

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iter_then_signal)
    loader = batches(make_stream(small, workers=2), 0)
    with stop_on_sigterm(), pytest.raises(Stopped):
        next(loader)
    assert len(started) == 1 and started[0]._shutdown
    assert not any(w.is_alive() for w in started[0]._workers)


def _sigint(pid: int) -> str:
    """How process `pid` treats SIGINT: ignored, caught (a handler) or default (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()

    def has(mask: str) -> bool:
        bits = int(re.search(rf"^{mask}:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
        return bool(bits >> (signal.SIGINT - 1) & 1)

    return "ignored" if has("SigIgn") else "caught" if has("SigCgt") else "default"


def _parent_of(pid: int) -> int:
    return int(re.search(r"^PPid:\s*(\d+)$", Path(f"/proc/{pid}/status").read_text(), re.M)[1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("trainer", "expected"), [(signal.default_int_handler, "caught"), (signal.SIG_IGN, "ignored")]
)
def test_loader_fork_server_ignores_sigint_and_workers_follow_the_trainer(small, trainer, expected):
    """A Ctrl-C reaches the whole process group. The fork server ignores it (from its first
    import on, before torch); a worker handles it as the training process does: stops at once
    where the trainer stops (KeyboardInterrupt, which torch's worker loop ends quietly on), and
    keeps working where the trainer ignores it (nohup, a script's background job)."""
    started = []
    original = torch.utils.data.DataLoader.__iter__

    def keep(self):
        started.append(original(self))
        return started[-1]

    before = signal.signal(signal.SIGINT, trainer)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.utils.data.DataLoader, "__iter__", keep)
            loader = batches(make_stream(small, workers=1), 0)
            try:
                next(loader)  # the worker has started iterating
                (worker,) = started[0]._workers
                server = _parent_of(worker.pid)
                assert server != os.getpid()
                assert _sigint(server) == "ignored"
                assert _sigint(worker.pid) == expected
            finally:
                loader.close()
    finally:
        signal.signal(signal.SIGINT, before)


def test_signals_deferred_delivers_the_held_signal_after_the_block():
    """Inside the block SIGTERM is held; on leaving it the previous handler gets it."""
    reached = []
    with stop_on_sigterm(), pytest.raises(Stopped), signals_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append("after the signal")
    assert reached == ["after the signal"]
    with signals_deferred():  # no signal: nothing delivered
        pass


def test_signals_deferred_leaves_an_ignored_signal_ignored():
    """A signal ignored before (nohup, a background job) stays SIG_IGN inside the block, so the
    processes started there inherit it, and nothing is delivered on leaving it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_deferred():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # held
            os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt, now or later
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- frames


def test_iid_frames_are_uint8_rgb(small):
    """frames=(1,) gives uint8 (B,1,H,W,3) equal to the decoded RGB PNG f1, no flow pairs."""
    members = {key: m for _, key, m in samples_of(small, "train")}
    batch = load(make_stream(small, batch=4), 0, 1)[0]
    assert batch["frames"].dtype == torch.uint8
    assert batch["frames"].shape == (4, 1, 32, 32, 3)
    assert batch["flow_stat"].shape == (4, 0)
    for i, key in enumerate(batch["keys"]):
        expected = rgb(members[key]["f1.png"])
        assert np.array_equal(batch["frames"][i, 0].numpy(), expected)
        assert not np.array_equal(batch["frames"][i, 0].numpy(), expected[..., ::-1])  # not BGR


def test_window_frames_and_flow_msq(small):
    """frames=(0,1,2) gives (B,3,H,W,3) in frame order and flow_msq (B,2) from the JSON."""
    members = {key: m for _, key, m in samples_of(small, "train")}
    batch = load(make_stream(small, frames=(0, 1, 2), batch=4), 0, 1)[0]
    assert batch["frames"].shape == (4, 3, 32, 32, 3)
    assert batch["flow_stat"].shape == (4, 2) and batch["flow_stat"].dtype == torch.float64
    for i, key in enumerate(batch["keys"]):
        for k in range(3):
            expected = rgb(members[key][f"f{k}.png"])
            assert np.array_equal(batch["frames"][i, k].numpy(), expected)
        meta = json.loads(members[key]["json"])
        assert batch["flow_stat"][i].tolist() == meta["flow_msq"]


@pytest.mark.parametrize("size", [16, 8, 24])
def test_image_size_area_downsamples(small, size):
    """A smaller image_size on a 32 px build gives cv2 INTER_AREA resizes of the frames."""
    members = {key: m for _, key, m in samples_of(small, "train")}
    batch = load(make_stream(small, image_size=size, batch=4), 0, 1)[0]
    assert batch["frames"].shape == (4, 1, size, size, 3)
    for i, key in enumerate(batch["keys"]):
        expected = rgb(members[key]["f1.png"], size=size)
        assert np.array_equal(batch["frames"][i, 0].numpy(), expected)


# ---------------------------------------------------------------- bad data


def test_undecodable_frame_is_replaced_by_a_window_of_its_shard(tmp_path):
    """A garbage f1.png counts bad == 1 in its batch, names the shard, keeps the batch size.

    The replacement is another window of the same shard, and it is the same on a resume; a
    stream that does not decode f1 sees nothing bad.
    """
    root = make_build(tmp_path, n_train=8, n_val=2, shard_size=4)
    samples = samples_of(root, "train")
    shard_of = {key: shard for shard, key, _ in samples}
    broken = samples[1][1]
    assert shard_of[broken] == SHARD0
    replace_member(root, SHARD0, f"{broken}.f1.png", b"not a png at all" * 8)

    stream = make_stream(root)
    for epoch in range(2):
        got = epoch_batches(stream, epoch)
        assert all(len(b["keys"]) == 2 and b["frames"].shape[0] == 2 for b in got)
        assert sorted(b["bad"] for b in got) == [0] * (len(got) - 1) + [1]
        bad_batch = next(b for b in got if b["bad"])
        assert bad_batch["bad_shards"] == [SHARD0]
        assert all(b["bad_shards"] == [] for b in got if not b["bad"])
        counts = Counter(key for b in got for key in b["keys"])
        assert broken not in counts
        twice = [key for key, n in counts.items() if n == 2]
        assert len(twice) == 1 and sum(counts.values()) == 8
        assert shard_of[twice[0]] == SHARD0 and twice[0] in bad_batch["keys"]
        assert_same(load(stream, bad_batch["g"], 1), [bad_batch])

    other = make_stream(root, frames=(0,))
    assert sum(b["bad"] for b in epoch_batches(other, 0)) == 0


def test_truncated_shard_counts_bad_windows(tmp_path):
    """A shard cut in the middle gives bad windows (its lost tail), not an exception."""
    root = make_build(tmp_path, n_train=8, n_val=2, shard_size=4)
    samples = [s for s in samples_of(root, "train") if s[0] == SHARD1]
    lost = {key for _, key, _ in samples[2:]}
    path = root / SHARD1
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{samples[2][1]}.f1.png")
    cut = member.offset_data + member.size // 2  # inside the third sample's f1.png
    path.write_bytes(path.read_bytes()[:cut])

    stream = make_stream(root)
    for epoch in range(2):
        got = epoch_batches(stream, epoch)
        assert all(len(b["keys"]) == 2 for b in got)
        assert sum(b["bad"] for b in got) == len(lost) == 2
        assert set().union(*(b["bad_shards"] for b in got)) == {SHARD1}
        assert not lost & {key for b in got for key in b["keys"]}


def test_segment_without_decodable_window_is_an_error(tmp_path):
    """A shard truncated before any window raises DataError naming the shard."""
    root = make_build(tmp_path, n_train=8, n_val=2, shard_size=4)
    (root / SHARD1).write_bytes((root / SHARD1).read_bytes()[:700])
    stream = make_stream(root)
    with pytest.raises(DataError, match=SHARD1):
        load(stream, 0, stream.steps_per_epoch)


def _with_pickle(root: Path) -> Stream:
    edit_shard(root, SHARD0, lambda members: [("x.pkl", b"\x80\x04K\x01."), *members])
    return make_stream(root)


def test_pickle_member_is_refused(tmp_path):
    """A shard holding x.pkl stops the stream, never skipped.

    lane_batches raises SpecError; batches() raises an error naming the member.
    """
    stream = _with_pickle(make_build(tmp_path, n_train=8, n_val=2, shard_size=4))
    S = stream.steps_per_epoch
    with pytest.raises(SpecError, match=r"pickle-like member x\.pkl"):
        list(itertools.islice(lane_batches(stream, 0, 0), S))
    with pytest.raises((DataError, SpecError), match=r"pickle-like member x\.pkl"):
        list(itertools.islice(batches(stream, 0), S))


def test_pickle_member_raises_spec_error_through_batches(tmp_path):
    """The spec says readers refuse a pickle-like member with SpecError, batches() included."""
    stream = _with_pickle(make_build(tmp_path, n_train=8, n_val=2, shard_size=4))
    with pytest.raises(SpecError):
        list(itertools.islice(batches(stream, 0), stream.steps_per_epoch))


def test_empty_frame_member_is_counted_bad(tmp_path):
    """A zero-byte f1.png is an undecodable window (counted bad), not a crash."""
    root = make_build(tmp_path, n_train=8, n_val=2, shard_size=4)
    replace_member(root, SHARD0, f"{samples_of(root, 'train')[0][1]}.f1.png", b"")
    assert sum(b["bad"] for b in epoch_batches(make_stream(root), 0)) == 1


def test_scalar_flow_msq_is_counted_bad(tmp_path):
    """A JSON whose flow_msq is a number, not a list, is an unusable window (counted bad)."""
    root = make_build(tmp_path, n_train=8, n_val=2, shard_size=4)
    _, key, members = samples_of(root, "train")[0]
    meta = {**json.loads(members["json"]), "flow_msq": 1.5}
    replace_member(root, SHARD0, f"{key}.json", json.dumps(meta).encode())
    assert sum(b["bad"] for b in epoch_batches(make_stream(root), 0)) == 1


def test_missing_split_and_oversized_batch(small):
    """A missing split is a DataError naming it; so is a global batch larger than the split."""
    with pytest.raises(DataError, match="split 'test' is missing"):
        make_stream(small, split="test")
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_stream(small, split="val", batch=6)
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_stream(small, split="val", batch=6, world=2)
    assert make_stream(small, split="val", batch=5).steps_per_epoch == 1


# ---------------------------------------------------------------- url_template, fixed_windows


def test_url_template_reads_the_copy(tmp_path):
    """A prefix or a {path} template reads the shards of a copy, not the build folder."""
    root = make_build(tmp_path, n_train=8, n_val=2, shard_size=4)
    mirror = tmp_path / "mirror"
    shutil.copytree(root, mirror)
    plain = make_stream(root)
    reference = load(plain, 0, 2 * plain.steps_per_epoch)
    streams = [
        make_stream(root, url_template=f"{mirror}/"),
        make_stream(root, url_template=f"{mirror}/{{path}}"),
    ]
    for tar in root.glob("*/*.tar"):
        tar.unlink()
    with pytest.raises(DataError):
        load(plain, 0, 1)
    for stream in streams:
        assert stream.urls == (str(mirror / SHARD0), str(mirror / SHARD1))
        assert_same(load(stream, 0, len(reference)), reference)


def test_fixed_windows_are_the_first_in_shard_order(small):
    """fixed_windows returns the first n windows of the split in shard order, decoded."""
    samples = samples_of(small, "val")
    frames, msq, keys = fixed_windows(open_build(small), "val", 4, frames=(1,), image_size=32)
    assert keys == [key for _, key, _ in samples[:4]]  # crosses no shard: the first has 4
    assert frames.shape == (4, 1, 32, 32, 3) and msq.shape == (4, 0)
    for i, (_, _, members) in enumerate(samples[:4]):
        assert np.array_equal(frames[i, 0].numpy(), rgb(members["f1.png"]))
    _, _, keys = fixed_windows(open_build(small), "val", 10, frames=(1,), image_size=32)
    assert keys == [key for _, key, _ in samples]


def test_fixed_windows_pass_over_an_undecodable_window(tmp_path):
    """An undecodable window is left out; the next ones move up, across a shard boundary."""
    root = make_build(tmp_path, n_train=4, n_val=5, shard_size=2)
    samples = samples_of(root, "val")
    broken = samples[1]
    replace_member(root, broken[0], f"{broken[1]}.f1.png", b"garbage")
    frames, _, keys = fixed_windows(open_build(root), "val", 3, frames=(1,), image_size=16)
    assert keys == [samples[0][1], samples[2][1], samples[3][1]]
    assert frames.shape == (3, 1, 16, 16, 3)
    assert np.array_equal(frames[2, 0].numpy(), rgb(samples[3][2]["f1.png"], size=16))
