"""Shards -> batches: a streaming loader over one split of a build, exactly resumable.

An *epoch* is one pass over the split's windows: ``steps_per_epoch = windows // batch`` global
batches. Its order is fixed by ``(seed, epoch)``: the shards are permuted into one virtual
sequence of windows, and the first ``steps_per_epoch * batch`` of them are cut into ``lanes``
contiguous ranges (the tail that does not fill a global batch sits out that epoch only; the next
permutation differs). Lane ``j`` supplies part ``j`` (``batch / lanes`` windows) of every global
batch. Within a lane, each shard's part (a *segment*) is read once and shuffled with
``(seed, epoch, shard, start)``.

There are ``lanes = world size x loader workers`` lanes: rank ``r`` owns lanes
``r * workers ...``, one per DataLoader worker, so every worker reads its own shards and every
rank makes exactly ``steps_per_epoch`` batches per epoch whatever the shard sizes (DDP never
waits on a rank that ran out). A global batch depends only on the seed, the epoch, the step and
the number of lanes: one process with 2 workers sees the same global batches as 2 ranks with 1
worker each. Resuming at global batch ``g0`` reads at most one shard per lane (the segment it
stopped in) before the first new batch and skips the rest without reading.

A window that fails to decode is counted as bad and replaced by a neighbour of its segment (the
batch keeps its size, and the replacement is the same on a resume); the loop stops the run when
bad windows pass ``--max-bad-fraction``.
"""

from __future__ import annotations

import ctypes
import functools
import json
import multiprocessing
import os
import re
import signal
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from shards_spec import Build, SpecError
from shards_spec.cli import signals_deferred
from shards_spec.format import JSON_MEMBER, frame_member
from shards_spec.reader import raw_samples
from shards_spec.writer import sha256_file

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, http://, s3://, ...
_VERIFIED: set[tuple] = set()  # shards this process has hashed (--verify-shards), as stat-ed


class DataError(ValueError):
    """The data cannot be streamed as asked (one-line message)."""


@dataclass(frozen=True)
class Stream:
    """What one rank streams: the split's shards, the frames to decode, batch and lanes."""

    urls: tuple[str, ...]  # shard URLs of the split, in manifest order
    names: tuple[str, ...]  # the shards' paths relative to the build, for messages
    counts: tuple[int, ...]  # windows per shard (from the manifest)
    frames: tuple[int, ...]  # frame members decoded per window, e.g. (1,) or (0, 1, 2)
    source_size: int  # the build's image_size
    image_size: int  # side of the frames handed out (area-downsampled when smaller)
    batch: int  # global batch, windows per step over all ranks
    seed: int
    rank: int = 0
    world: int = 1
    workers: int = 0  # loader workers of this rank (0: load in the training process)
    sha256: tuple[str, ...] = ()  # the manifest's checksums, checked on first open when given
    flow_key: str = "flow_msq"  # the window JSON's per-pair flow statistic handed out

    @property
    def lanes(self) -> int:
        return self.world * max(1, self.workers)

    @property
    def lane_batch(self) -> int:
        return self.batch // self.lanes

    @property
    def rank_lanes(self) -> range:
        per = max(1, self.workers)
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def steps_per_epoch(self) -> int:
        return self.total // self.batch


@dataclass(frozen=True)
class Segment:
    shard: int  # index into Stream.urls
    lo: int  # first position in the shard
    hi: int  # one past the last position


def to_unit(frames: torch.Tensor, device) -> torch.Tensor:
    """The loader's uint8 frames ``(..., H, W, 3)`` -> float ``(..., 3, H, W)`` in [-1, 1].

    The channel move happens on `device`, in the same copy as the conversion to float.
    """
    x = frames.to(device, non_blocking=True).movedim(-1, -3)
    return x.float().div_(127.5).sub_(1.0).contiguous()


def hflip_coins(seed: int, step: int, batch: int) -> np.ndarray:
    """Which windows of global batch `step` are flipped (``--hflip``): one fair coin per
    position in the global batch of `batch` windows, from ``(seed, step)`` alone, so a resumed
    run and any split of the batch over ranks draw the same coins."""
    return np.random.default_rng([seed, step, 0xF11B]).random(batch) < 0.5


def hflip(x0: torch.Tensor, coins: np.ndarray) -> torch.Tensor:
    """Windows ``x0`` ``(B, k, C, H, W)`` with window ``i`` mirrored left to right, every frame
    of it alike, where ``coins[i]``."""
    flip = torch.from_numpy(coins).to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
    return torch.where(flip, x0.flip(-1), x0)


def hflip_windows(x0: torch.Tensor, seed: int, step: int, rank: int = 0, world: int = 1):
    """``--hflip`` on a rank's part ``x0`` of global batch `step` (each rank holds ``B`` of its
    ``B * world`` windows, rank 0 first): the coins of the windows' places in the global batch,
    so any world size flips the windows one process would."""
    b = x0.shape[0]
    return hflip(x0, hflip_coins(seed, step, b * world)[rank * b : (rank + 1) * b])


def stream_for(
    build: Build,
    split: str,
    *,
    frames: Sequence[int],
    image_size: int,
    batch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    url_template: str | None = None,
    verify: bool = False,
    flow_key: str = "flow_msq",
) -> Stream:
    """The Stream of `split` of `build` for one rank; `batch` is the global batch; each
    window's `flow_key` (``flow_msq`` or ``flow_mag``) is read from its JSON.

    `url_template` maps a shard path to a URL.
    ``url_template`` holds ``{path}`` (``pipe:curl -s https://host/build/{path}``) or is a
    prefix (``/mnt/other/build``); by default the shards are read from the build folder.
    With `verify`, each shard file's sha256 is checked against the manifest when a process
    first opens it (local files only).
    """
    if split not in build.splits:
        have = ", ".join(build.splits) or "none"
        raise DataError(f"{build.path}: split {split!r} is missing (this build has: {have})")
    shards = build.manifest["splits"][split]["shards"]
    names = tuple(s["path"] for s in shards)
    urls = shard_urls(build, split, url_template)
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
        workers=workers,
        sha256=tuple(s["sha256"] for s in shards) if verify else (),
        flow_key=flow_key,
    )
    if verify:
        check_verifiable(urls)
    if batch % stream.lanes:
        raise DataError(
            f"the global batch {batch} must divide into {stream.lanes} lanes (ranks x loader "
            "workers): change --batch or --workers"
        )
    if stream.steps_per_epoch == 0:
        raise DataError(
            f"split {split!r} has {stream.total} windows, fewer than one global batch of "
            f"{batch}: lower --batch"
        )
    return stream


def shard_urls(build: Build, split: str, url_template: str | None = None) -> tuple[str, ...]:
    """URLs of the shards of `split`: in the build folder, or mapped by `url_template`."""
    if url_template is None:
        return tuple(build.urls(split))
    names = [s["path"] for s in build.manifest["splits"][split]["shards"]]
    if "{path}" in url_template:
        return tuple(url_template.format(path=n) for n in names)
    return tuple(f"{url_template.rstrip('/')}/{n}" for n in names)


def check_verifiable(urls: Sequence[str]) -> None:
    """Raise DataError unless every URL is a local file that can be hashed."""
    remote = [u for u in urls if _REMOTE.match(u)]
    if remote:
        raise DataError(
            f"--verify-shards hashes shard files, and {remote[0]} is not a local file: drop "
            "--verify-shards or read the shards from a folder"
        )


def verify_shard(url: str, sha256: str, name: str) -> None:
    """Raise DataError when the shard file's sha256 differs from the manifest's (once each)."""
    try:
        st = os.stat(url)
        seen = (url, sha256, st.st_size, st.st_mtime_ns)
        if seen in _VERIFIED:
            return
        digest = sha256_file(url)
    except OSError as exc:
        raise DataError(f"{name}: cannot read it to verify it ({exc.strerror or exc})") from None
    if digest != sha256:
        raise DataError(
            f"{name}: sha256 {digest[:16]}... differs from the manifest's {sha256[:16]}...: the "
            "shard changed since the build; check it with `pipeline validate`"
        )
    _VERIFIED.add(seen)


def shard_order(stream: Stream, epoch: int) -> np.ndarray:
    """The shard permutation of `epoch`."""
    return np.random.default_rng([stream.seed, epoch, 0x5EED]).permutation(len(stream.urls))


def lane_segments(stream: Stream, epoch: int, lane: int) -> list[Segment]:
    """The shard parts that make `lane`'s windows in `epoch`, in reading order."""
    n = stream.steps_per_epoch * stream.lane_batch
    start, stop = lane * n, (lane + 1) * n
    segments, offset = [], 0
    for shard in shard_order(stream, epoch):
        count = stream.counts[shard]
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            segments.append(Segment(int(shard), lo - offset, hi - offset))
        offset += count
        if offset >= stop:
            break
    return segments


def segment_order(stream: Stream, epoch: int, seg: Segment) -> np.ndarray:
    """Shuffled positions (relative to ``seg.lo``) in which a segment's windows are used."""
    rng = np.random.default_rng([stream.seed, epoch, seg.shard, seg.lo])
    return rng.permutation(seg.hi - seg.lo)


def decode_window(raw: dict, stream: Stream, out: np.ndarray | None = None) -> tuple:
    """One raw sample -> frames uint8 ``(k, H, W, 3)`` RGB and its ``stream.flow_key``
    (``flow_msq`` or ``flow_mag``) float64 ``(k-1,)``.

    Frames are written into `out` when given (a slot of a batch: no copy). Only the PNG
    members in ``stream.frames`` and the JSON member are decoded. Raises DataError on anything
    unusable (`out` may then hold part of the window).
    """
    key = raw.get("__key__", "?")
    n, side = stream.image_size, stream.source_size
    if out is None:
        out = np.empty((len(stream.frames), n, n, 3), np.uint8)
    for j, k in enumerate(stream.frames):
        data = raw.get(frame_member(k))
        if data is None:
            raise DataError(f"{key}: no member {frame_member(k)}")
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:  # an empty member
            img = None
        if img is None or img.shape != (side, side, 3):
            raise DataError(f"{key}.{frame_member(k)}: not a {side}x{side} RGB PNG")
        if n != side:
            img = cv2.resize(img, (n, n), interpolation=cv2.INTER_AREA)
        cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=out[j])
    name = stream.flow_key
    try:
        meta = json.loads(raw[JSON_MEMBER].decode("utf-8"))
        stat = np.asarray(meta[name], np.float64)
        if stat.ndim != 1:
            raise ValueError(f"{name} is not a list")
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{key}.json: unusable ({exc})") from exc
    lo, hi = stream.frames[0], stream.frames[-1]
    pairs = stat[lo:hi]
    if len(stream.frames) > 1 and (len(pairs) != hi - lo or not np.all(np.isfinite(pairs))):
        raise DataError(f"{key}.json: {name} {meta[name]!r} does not fit the window")
    return out, pairs


def read_segment(stream: Stream, seg: Segment) -> tuple[list[dict | None], str | None]:
    """Raw samples at positions ``lo..hi-1`` of a shard (None where the shard ends early).

    Returns the samples and, when the shard could not be read to ``hi``, why. A pickle-like
    member raises SpecError: that is refused, never skipped.
    """
    if stream.sha256:
        verify_shard(stream.urls[seg.shard], stream.sha256[seg.shard], stream.names[seg.shard])
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


Fill = Callable[[np.ndarray], tuple[np.ndarray, str, bool]]


def _segment_windows(stream: Stream, epoch: int, seg: Segment, skip: int) -> Iterator[Fill]:
    """For each window of a segment in its shuffled order, from the `skip`-th on, a function
    that decodes it into a batch slot and returns ``(flow_stat, key, bad)``.

    A window that does not decode is replaced by the nearest good one before it, else after
    it, in the segment's order (``bad`` True).
    """
    raws, problem = read_segment(stream, seg)
    order = segment_order(stream, epoch, seg)
    name = stream.names[seg.shard]

    def decode(i: int, out: np.ndarray) -> tuple[np.ndarray, str] | None:
        raw = raws[order[i]]
        if raw is None:
            return None
        try:
            return decode_window(raw, stream, out)[1], raw["__key__"]
        except DataError:
            return None

    def fill(i: int, out: np.ndarray) -> tuple[np.ndarray, str, bool]:
        got = decode(i, out)
        if got is not None:
            return (*got, False)
        for j in [*range(i - 1, -1, -1), *range(i + 1, len(order))]:
            got = decode(j, out)
            if got is not None:
                return (*got, True)
        why = f" ({problem})" if problem else ""
        raise DataError(f"{name}: no decodable window in positions {seg.lo}..{seg.hi - 1}{why}")

    for i in range(skip, len(order)):
        yield functools.partial(fill, i)


def lane_batches(stream: Stream, lane: int, start: int) -> Iterator[dict]:
    """`lane`'s part of every global batch from `start` on, epoch after epoch (endless).

    Each part: ``g`` (global batch number), ``epoch``, ``step``, ``lane``, ``frames`` uint8
    RGB ``(lane_batch, k, H, W, 3)``, ``flow_stat`` float64 ``(lane_batch, k-1)`` (the
    windows' ``stream.flow_key``), ``keys``,
    ``bad`` (windows replaced) and ``bad_shards`` (their shards).
    """
    S, b, n = stream.steps_per_epoch, stream.lane_batch, stream.image_size
    k = len(stream.frames)
    epoch, first = divmod(start, S)
    while True:
        windows = _lane_windows(stream, epoch, lane, skip=first * b)
        for step in range(first, S):
            frames = np.empty((b, k, n, n, 3), np.uint8)
            stat = np.empty((b, k - 1), np.float64)
            keys, bad_shards, bad = [], set(), 0
            for i in range(b):
                fill, name = next(windows)
                stat[i], key, replaced = fill(frames[i])
                keys.append(key)
                if replaced:
                    bad, bad_shards = bad + 1, bad_shards | {name}
            yield {
                "g": epoch * S + step,
                "epoch": epoch,
                "step": step,
                "lane": lane,
                "frames": torch.from_numpy(frames),
                "flow_stat": torch.from_numpy(stat),
                "keys": keys,
                "bad": bad,
                "bad_shards": sorted(bad_shards),
            }
        epoch, first = epoch + 1, 0


def _lane_windows(stream: Stream, epoch: int, lane: int, skip: int) -> Iterator[tuple[Fill, str]]:
    """The lane's windows of `epoch` in order, after skipping `skip` without reading them."""
    for seg in lane_segments(stream, epoch, lane):
        n = seg.hi - seg.lo
        if skip >= n:
            skip -= n
            continue
        name = stream.names[seg.shard]
        for fill in _segment_windows(stream, epoch, seg, skip):
            yield fill, name
        skip = 0


class LaneParts(torch.utils.data.IterableDataset):
    """A rank's lane parts from global batch `start` on, for a DataLoader (batch_size=None).

    DataLoader worker ``w`` serves the rank's lane ``w``; the loader's round-robin over its
    workers hands out the parts of batch ``start``, then of ``start + 1``, and so on.
    """

    def __init__(self, stream: Stream, start: int) -> None:
        self.stream, self.start = stream, start
        # the training process's Ctrl-C handling, which its workers take over (`_worker_sigint`)
        self.sigint_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        lanes = self.stream.rank_lanes
        try:
            if info is None:
                parts = [lane_batches(self.stream, lane, self.start) for lane in lanes]
                while True:
                    yield from (next(p) for p in parts)
            else:
                die_with_parent()
                _worker_sigint(self.sigint_ignored)
                torch.set_num_threads(1)
                cv2.setNumThreads(1)
                yield from lane_batches(self.stream, lanes[info.id], self.start)
        except (DataError, SpecError) as exc:  # handed to the training process as one line
            yield {"error": str(exc), "kind": type(exc).__name__}


def batches(stream: Stream, start: int, pin_memory: bool = False) -> Iterator[dict]:
    """The rank's share of global batches ``start, start + 1, ...``, endless.

    Each batch holds the rank's lanes' parts, concatenated in lane order (see `lane_batches`
    for the fields). Raises DataError when the data cannot be read.
    """
    dataset = LaneParts(stream, start)
    source: Iterator[dict] | None = None
    lanes = list(stream.rank_lanes)
    g = start
    try:
        if stream.workers == 0:
            source = iter(dataset)
        else:
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=stream.workers,
                pin_memory=pin_memory,
                persistent_workers=True,
                prefetch_factor=4 if pin_memory else 2,
                multiprocessing_context=_worker_context(),
            )
            with signals_deferred():  # a signal waits until every worker is started
                _start_fork_server()
                source = iter(loader)
        while True:
            parts = [next(source) for _ in lanes]
            for part, lane in zip(parts, lanes, strict=True):
                if "error" in part:
                    raise (SpecError if part["kind"] == "SpecError" else DataError)(part["error"])
                if (part["g"], part["lane"]) != (g, lane):  # the loader's order is the contract
                    raise RuntimeError(
                        f"loader order broken: got batch {part['g']} lane "
                        f"{part['lane']}, expected {g} lane {lane}"
                    )
            yield _concat(parts)
            g += 1
    finally:  # the workers stop with the stream, however it ends (close, error, signal)
        shutdown = getattr(source, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _worker_context():
    """Loader workers start from a fork server that has loaded only this module: forking the
    training process itself (threads, OpenMP, Ray, CUDA) can deadlock a worker.

    The fork server (`train.loader_server`) and each worker die with their parent, so a
    training process that is killed outright (SIGKILL, the OOM killer) leaves neither behind.
    The server ignores SIGINT; the workers handle it as the training process does.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train.loader_server"])  # it imports train.data
    return ctx


def _worker_sigint(ignored: bool) -> None:
    """A loader worker handles SIGINT as the training process does. The fork server ignores
    it, but where the trainer stops on Ctrl-C its workers must too, at once: torch's worker
    loop ends quietly on KeyboardInterrupt, while a worker that went on serving a batch would
    report the trainer's dropped connection with a traceback."""
    if not ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _start_fork_server() -> None:
    """Start the loader workers' fork server (a no-op once it runs) with SIGINT blocked, so that
    it is born blocking it: a Ctrl-C to the process group while the server starts stays pending
    there until `train.loader_server`, its first import, ignores SIGINT (which drops it) and
    unblocks it. multiprocessing starts its resource tracker the same way."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()  # first: it unblocks SIGINT once it has started
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent exits (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: the loader's own watchdog remains
        return
    if os.getppid() != parent:  # the parent exited before the request took effect
        os._exit(1)


def _concat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return {
        "g": first["g"],
        "epoch": first["epoch"],
        "step": first["step"],
        # numpy copies on this thread; torch.cat would wake the intra-op pool, whose spinning
        # threads take the cores the loader workers run on
        "frames": torch.from_numpy(np.concatenate([p["frames"].numpy() for p in parts])),
        "flow_stat": torch.from_numpy(np.concatenate([p["flow_stat"].numpy() for p in parts])),
        "keys": [k for p in parts for k in p["keys"]],
        "bad": sum(p["bad"] for p in parts),
        "bad_shards": sorted({n for p in parts for n in p["bad_shards"]}),
    }


def fixed_windows(
    build: Build,
    split: str,
    n: int,
    frames: Sequence[int],
    image_size: int,
    url_template: str | None = None,
    verify: bool = False,
    flow_key: str = "flow_msq",
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first `n` decodable windows of `split` in shard order (a fixed evaluation set).

    Returns frames uint8 RGB ``(n', k, H, W, 3)``, their `flow_key` ``(n', k-1)`` and the
    keys; windows that fail to decode are passed over. With `verify`, each shard opened is checked against
    the manifest's sha256 first.
    """
    stream = Stream(
        urls=shard_urls(build, split, url_template),
        names=(),
        counts=(),
        frames=tuple(frames),
        source_size=build.image_size,
        image_size=image_size,
        batch=1,
        seed=0,
        flow_key=flow_key,
    )
    samples = raw_samples(stream.urls)
    if verify:
        shards = build.manifest["splits"][split]["shards"]
        check_verifiable(stream.urls)
        samples = _verified_samples(stream.urls, shards)
    got_frames, got_stat, keys = [], [], []
    try:
        for raw in samples if n > 0 else ():
            try:
                f, m = decode_window(raw, stream)
            except DataError:
                continue
            got_frames.append(f)
            got_stat.append(m)
            keys.append(raw["__key__"])
            if len(keys) >= n:
                break
    except (OSError, tarfile.TarError) as exc:  # a missing or truncated shard
        raise DataError(
            f"{build.path}: a {split} shard of the fixed {split} set cannot be read ({exc})"
        ) from None
    if not keys:
        raise DataError(f"split {split!r} of {build.path} has no decodable window")
    return torch.from_numpy(np.stack(got_frames)), torch.from_numpy(np.stack(got_stat)), keys


def _verified_samples(urls: Sequence[str], shards: list[dict]) -> Iterator[dict]:
    """The raw samples of the shards in order, each shard verified when it is first opened."""
    for url, entry in zip(urls, shards, strict=True):
        verify_shard(url, entry["sha256"], entry["path"])
        yield from raw_samples([url])
