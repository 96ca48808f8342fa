"""Shards -> batches: a streaming loader over one split of a build, exactly resumable.

An *epoch* is one pass over the split's windows. Its order is fixed by ``(seed, epoch)``: the
shards are permuted, giving one virtual sequence of all windows, and every rank takes a
contiguous range of ``steps_per_epoch * batch`` windows of it (the tail that does not fill a
global batch is left for that epoch only; the next epoch's permutation differs). A rank's range
is split among *slots*: global batch ``g = epoch * steps_per_epoch + step`` is made by slot
``g % slots``, from that slot's own range. Within a slot, each shard's part (a *segment*) is
read once and shuffled with ``(seed, epoch, shard, start)``.

So a batch's content depends only on the seed, the epoch, the step, the world size and the
number of slots (``--workers``), never on where a run was resumed: resuming at global batch
``g0`` gives each slot its first segment to read again (at most one shard per loader worker)
and skips the rest without reading. Every rank yields exactly ``steps_per_epoch`` batches per
epoch, whatever the shard sizes, so DDP never waits on a rank that ran out.

A window that fails to decode is counted as bad and replaced by a neighbour of its segment (the
batch keeps its size, and the replacement is the same on a resume); the loop stops the run when
bad windows pass ``--max-bad-fraction``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from shards_spec import Build, SpecError
from shards_spec.format import JSON_MEMBER, frame_member
from shards_spec.reader import raw_samples


class DataError(ValueError):
    """The data cannot be streamed as asked (one-line message)."""


@dataclass(frozen=True)
class Stream:
    """What one rank streams: the split's shards, the frames to decode, batch and placement."""

    urls: tuple[str, ...]  # shard URLs of the split, in manifest order
    names: tuple[str, ...]  # the shards' paths relative to the build, for messages
    counts: tuple[int, ...]  # windows per shard (from the manifest)
    frames: tuple[int, ...]  # frame members decoded per window, e.g. (1,) or (0, 1, 2)
    source_size: int  # the build's image_size
    image_size: int  # side of the frames handed out (area-downsampled when smaller)
    batch: int  # windows per rank per step
    seed: int
    rank: int = 0
    world: int = 1
    slots: int = 1  # loader workers (1 when loading in the training process)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def steps_per_epoch(self) -> int:
        return self.total // (self.batch * self.world)


@dataclass(frozen=True)
class Segment:
    shard: int  # index into Stream.urls
    lo: int  # first position in the shard
    hi: int  # one past the last position


def stream_for(
    build: Build,
    split: str,
    frames: Sequence[int],
    image_size: int,
    batch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    slots: int = 1,
    url_template: str | None = None,
) -> Stream:
    """The Stream of `split` of `build`; `url_template` maps a shard path to a URL.

    ``url_template`` holds ``{path}`` (``pipe:curl -s https://host/build/{path}``) or is a
    prefix (``/mnt/other/build``); by default the shards are read from the build folder.
    """
    if split not in build.splits:
        have = ", ".join(build.splits) or "none"
        raise DataError(f"{build.path}: split {split!r} is missing (this build has: {have})")
    shards = build.manifest["splits"][split]["shards"]
    names = tuple(s["path"] for s in shards)
    if url_template is None:
        urls = tuple(build.urls(split))
    elif "{path}" in url_template:
        urls = tuple(url_template.format(path=n) for n in names)
    else:
        urls = tuple(f"{url_template.rstrip('/')}/{n}" for n in names)
    stream = Stream(
        urls=urls,
        names=names,
        counts=tuple(int(s["samples"]) for s in shards),
        frames=tuple(frames),
        source_size=build.image_size,
        image_size=image_size,
        batch=batch,
        seed=seed,
        rank=rank,
        world=world,
        slots=max(1, slots),
    )
    if stream.steps_per_epoch == 0:
        raise DataError(
            f"split {split!r} has {stream.total} windows, fewer than one global batch of "
            f"{batch * world}: lower --batch"
        )
    return stream


def shard_order(stream: Stream, epoch: int) -> np.ndarray:
    """The shard permutation of `epoch`."""
    return np.random.default_rng([stream.seed, epoch, 0x5EED]).permutation(len(stream.urls))


def slot_steps(stream: Stream, epoch: int, slot: int) -> list[int]:
    """Steps of `epoch` whose batch `slot` makes."""
    S = stream.steps_per_epoch
    first = (slot - epoch * S) % stream.slots
    return list(range(first, S, stream.slots))


def slot_segments(stream: Stream, epoch: int, slot: int) -> list[Segment]:
    """The shard parts that make `slot`'s windows in `epoch`, in reading order."""
    b, S = stream.batch, stream.steps_per_epoch
    start = stream.rank * S * b
    start += b * sum(len(slot_steps(stream, epoch, a)) for a in range(slot))
    stop = start + b * len(slot_steps(stream, epoch, slot))
    segments, offset = [], 0
    for shard in shard_order(stream, epoch):
        n = stream.counts[shard]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            segments.append(Segment(int(shard), lo - offset, hi - offset))
        offset += n
        if offset >= stop:
            break
    return segments


def segment_order(stream: Stream, epoch: int, seg: Segment) -> np.ndarray:
    """Shuffled positions (relative to ``seg.lo``) in which a segment's windows are used."""
    rng = np.random.default_rng([stream.seed, epoch, seg.shard, seg.lo])
    return rng.permutation(seg.hi - seg.lo)


def decode_window(raw: dict, stream: Stream) -> tuple[np.ndarray, np.ndarray]:
    """One raw sample -> frames uint8 ``(k, 3, H, W)`` and flow_msq float64 ``(k-1,)``.

    Only the PNG members in ``stream.frames`` and the JSON member are decoded. Raises
    DataError on anything unusable.
    """
    key = raw.get("__key__", "?")
    out = []
    for k in stream.frames:
        data = raw.get(frame_member(k))
        if data is None:
            raise DataError(f"{key}: no member {frame_member(k)}")
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        side = stream.source_size
        if img is None or img.shape != (side, side, 3):
            raise DataError(f"{key}.{frame_member(k)}: not a {side}x{side} RGB PNG")
        if stream.image_size != side:
            size = (stream.image_size, stream.image_size)
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        out.append(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
    try:
        meta = json.loads(raw[JSON_MEMBER].decode("utf-8"))
        msq = np.asarray(meta["flow_msq"], np.float64)
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{key}.json: unusable ({exc})") from exc
    lo, hi = stream.frames[0], stream.frames[-1]
    pairs = msq[lo:hi]
    if len(stream.frames) > 1 and (len(pairs) != hi - lo or not np.all(np.isfinite(pairs))):
        raise DataError(f"{key}.json: flow_msq {meta['flow_msq']!r} does not fit the window")
    return np.stack(out), pairs


def read_segment(stream: Stream, seg: Segment) -> tuple[list[dict | None], str | None]:
    """Raw samples at positions ``lo..hi-1`` of a shard (None where the shard ends early).

    Returns the samples and, when the shard could not be read to ``hi``, why. A pickle-like
    member raises SpecError: that is refused, never skipped.
    """
    raws: list[dict | None] = []
    problem = None
    try:
        for position, raw in enumerate(raw_samples([stream.urls[seg.shard]])):
            if position >= seg.lo:
                raws.append(raw)
            if position + 1 >= seg.hi:
                break
    except SpecError:
        raise
    except Exception as exc:  # a truncated or unreadable tar: the rest of the segment is bad
        problem = f"{type(exc).__name__}: {exc}"
    missing = seg.hi - seg.lo - len(raws)
    if missing and problem is None:
        problem = f"ends after {seg.lo + len(raws)} windows, the manifest says more"
    return raws + [None] * missing, problem


@dataclass
class _Decoded:
    frames: np.ndarray
    msq: np.ndarray
    key: str


def _segment_windows(
    stream: Stream, epoch: int, seg: Segment, skip: int
) -> Iterator[tuple[_Decoded, bool]]:
    """``(window, bad)`` for a segment in its shuffled order, from the `skip`-th on."""
    raws, problem = read_segment(stream, seg)
    order = segment_order(stream, epoch, seg)
    name = stream.names[seg.shard]

    def decode(i: int) -> _Decoded | None:
        raw = raws[order[i]]
        if raw is None:
            return None
        try:
            frames, msq = decode_window(raw, stream)
        except DataError:
            return None
        return _Decoded(frames, msq, raw["__key__"])

    for i in range(skip, len(order)):
        window = decode(i)
        if window is not None:
            yield window, False
            continue
        # the nearest good window before, else after, in this segment's order
        for j in [*range(i - 1, -1, -1), *range(i + 1, len(order))]:
            window = decode(j)
            if window is not None:
                yield window, True
                break
        else:
            why = f" ({problem})" if problem else ""
            raise DataError(f"{name}: no decodable window in positions {seg.lo}..{seg.hi - 1}{why}")


def slot_batches(stream: Stream, slot: int, start: int) -> Iterator[dict]:
    """Batches made by `slot`, from global batch `start` on, epoch after epoch (endless).

    Each batch: ``g`` (global batch number), ``epoch``, ``step``, ``frames`` uint8
    ``(batch, k, 3, H, W)``, ``flow_msq`` float64 ``(batch, k-1)``, ``keys``, ``bad`` (windows
    replaced in this batch) and ``bad_shards`` (their shards).
    """
    S, b = stream.steps_per_epoch, stream.batch
    epoch = start // S
    while True:
        steps = slot_steps(stream, epoch, slot)
        done = sum(1 for s in steps if epoch * S + s < start)
        yield from _epoch_batches(stream, epoch, slot, steps[done:], skip=done * b)
        epoch += 1


def _epoch_batches(
    stream: Stream, epoch: int, slot: int, steps: list[int], skip: int
) -> Iterator[dict]:
    if not steps:
        return
    S, b = stream.steps_per_epoch, stream.batch
    windows = _slot_windows(stream, epoch, slot, skip)
    for step in steps:
        chunk = [next(windows) for _ in range(b)]
        bad_shards = sorted({name for (_, bad, name) in chunk if bad})
        yield {
            "g": epoch * S + step,
            "epoch": epoch,
            "step": step,
            "frames": torch.from_numpy(np.stack([w.frames for w, _, _ in chunk])),
            "flow_msq": torch.from_numpy(np.stack([w.msq for w, _, _ in chunk])),
            "keys": [w.key for w, _, _ in chunk],
            "bad": sum(1 for _, bad, _ in chunk if bad),
            "bad_shards": bad_shards,
        }


def _slot_windows(
    stream: Stream, epoch: int, slot: int, skip: int
) -> Iterator[tuple[_Decoded, bool, str]]:
    """The slot's windows of `epoch` in order, after skipping `skip` without reading them."""
    for seg in slot_segments(stream, epoch, slot):
        n = seg.hi - seg.lo
        if skip >= n:
            skip -= n
            continue
        name = stream.names[seg.shard]
        for window, bad in _segment_windows(stream, epoch, seg, skip):
            yield window, bad, name
        skip = 0


class ShardBatches(torch.utils.data.IterableDataset):
    """The rank's batches from global batch `start` on, for a DataLoader with batch_size=None.

    DataLoader worker ``w`` serves slot ``(start + w) % slots``, so the loader's round-robin
    over workers yields global batches ``start, start + 1, ...`` in order.
    """

    def __init__(self, stream: Stream, start: int) -> None:
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None:
            torch.set_num_threads(1)
            cv2.setNumThreads(1)
        slot = (self.start + worker) % self.stream.slots
        first = self.start + (slot - self.start) % self.stream.slots
        try:
            yield from slot_batches(self.stream, slot, first)
        except (DataError, SpecError) as exc:  # handed to the training process as one line
            yield {"error": str(exc)}


def batches(stream: Stream, start: int, workers: int, pin_memory: bool = False) -> Iterator[dict]:
    """Global batches ``start, start + 1, ...`` of the rank, endless; DataError on failure.

    ``workers`` must equal ``stream.slots`` (0 loads in this process, with one slot).
    """
    if max(1, workers) != stream.slots:
        raise ValueError(f"workers={workers} but the stream has {stream.slots} slots")
    dataset = ShardBatches(stream, start)
    if workers == 0:
        source: Iterator[dict] = iter(dataset)
    else:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=True,
            prefetch_factor=4 if pin_memory else 2,
            multiprocessing_context="spawn" if pin_memory else None,
        )
        source = iter(loader)
    expected = start
    for item in source:
        if "error" in item:
            raise DataError(item["error"])
        if item["g"] != expected:  # the loader's worker order is part of the contract
            raise RuntimeError(f"loader order broken: batch {item['g']}, expected {expected}")
        expected += 1
        yield item


def fixed_windows(
    build: Build, split: str, n: int, frames: Sequence[int], image_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first `n` decodable windows of `split` in shard order (a fixed evaluation set).

    Returns frames uint8 ``(n', k, 3, H, W)``, flow_msq ``(n', k-1)`` and the keys; windows
    that fail to decode are passed over.
    """
    stream = Stream(
        urls=tuple(build.urls(split)),
        names=(),
        counts=(),
        frames=tuple(frames),
        source_size=build.image_size,
        image_size=image_size,
        batch=1,
        seed=0,
    )
    got_frames, got_msq, keys = [], [], []
    for raw in raw_samples(stream.urls):
        if len(keys) >= n:
            break
        try:
            f, m = decode_window(raw, stream)
        except DataError:
            continue
        got_frames.append(f)
        got_msq.append(m)
        keys.append(raw["__key__"])
    if not keys:
        raise DataError(f"split {split!r} of {build.path} has no decodable window")
    return torch.from_numpy(np.stack(got_frames)), torch.from_numpy(np.stack(got_msq)), keys


def with_slots(stream: Stream, slots: int) -> Stream:
    """The same stream with another number of slots."""
    return dataclasses.replace(stream, slots=max(1, slots))
