"""`pipeline build`: sources -> tracks (Ray tasks, flow actors) -> plan -> shards (Ray tasks).

Resumable: tracks are committed atomically under ``OUT/.cache`` (kept after the build, keyed by
their inputs and the options that change frames or flow) and shards under ``OUT/.work``; both are
skipped when the build is run again; the manifest is written last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import ray
from tqdm import tqdm

from pipeline import flow as fl
from pipeline import frames as fr
from pipeline.config import (  # noqa: F401 - re-exported: the build API in one place
    BuildConfig,
    BuildError,
    Runtime,
    check_config,
    check_runtime,
)
from pipeline.outputs import format_summary, write_outputs  # noqa: F401 - re-exported
from pipeline.plan import SPLITS, Plan, make_plan
from pipeline.raycluster import Resources, check_shared_folder, ray_session
from pipeline.shards import done_shard, shard_jobs, write_planned_shard
from pipeline.sources import (  # noqa: F401 - discover and synthetic_root re-exported
    Discovery,
    Track,
    default_flow_size,
    discover,
    synthetic_root,
)
from pipeline.tracks import ChunkedPairs, CpuPairs, TrackOptions, load_meta, process_track
from shards_spec.format import INDEX_NAME, MANIFEST_NAME, SKIPPED_NAME, SPEC_VERSION, SUMMARY_NAME
from shards_spec.writer import atomic_write_json

CACHE = ".cache"  # OUT/.cache/{track_id}: stage-1 results, kept for later builds (--drop-cache)
BUILD_FILES = {MANIFEST_NAME, INDEX_NAME, SKIPPED_NAME, SUMMARY_NAME, ".work", CACHE}


# ------------------------------------------------------------------ Ray workers

# Fault tolerance is Ray's own: a task whose worker or node dies (a lost machine, the OOM killer)
# is run again elsewhere, up to TASK_RETRIES times; every task is idempotent (it writes its
# outputs atomically to paths fixed by its inputs). A RAFT actor whose process or node dies is
# restarted wherever its GPU (or CPU) fits, up to ACTOR_RESTARTS times, and the calls it had not
# answered are sent again once it is back (max_task_retries=-1: a call is a pure function of its
# frames; Ray counts every attempt made while the actor is unreachable as a retry, so a finite
# number runs out in the seconds before the cluster declares a lost node dead). With one actor
# per GPU, a lost GPU node's actor waits for a free GPU (a node added back). A call fails once the
# actor cannot be restarted any more. Errors raised by our own code are reported, not retried.
TASK_RETRIES = 4
ACTOR_RESTARTS = 4
ACTOR_TASK_RETRIES = -1

_FLOW_IMPLS: dict = {}


def _cpu_flow(backend: str):
    if backend not in _FLOW_IMPLS:
        import cv2

        cv2.setNumThreads(1)
        _FLOW_IMPLS[backend] = fl.make_flow(backend)
    return _FLOW_IMPLS[backend]


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES)
def _track_task(cache: str, track: Track, opts: TrackOptions, backend: str) -> dict:
    pairs = CpuPairs(_cpu_flow(backend), opts.keep_flow)
    return process_track(Path(cache), track, opts, pairs)


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES)
def _raft_track_task(cache: str, track: Track, opts: TrackOptions, actor, chunk: int) -> dict:
    """Frames on this CPU task; flow on a RAFT actor, one bounded chunk of a clip at a time."""
    import cv2

    cv2.setNumThreads(1)
    pairs = ChunkedPairs(
        submit=lambda frames: actor.run.remote(frames, opts.keep_flow),
        fetch=ray.get,
        chunk=chunk,
    )
    return process_track(Path(cache), track, opts, pairs)


@ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_TASK_RETRIES)
class FlowActor:
    """One RAFT model per actor (one actor per GPU); flow for chunks of clips, batched."""

    def __init__(self, raft: fl.RaftConfig):
        self.flow = fl.RaftFlow(raft)

    def run(self, frames, keep_flow: int):
        """Pairs of consecutive ``frames`` -> (flow_msq per pair, flow_mag per pair, stored
        fields or None)."""
        fields = self.flow.pairs(frames)
        msq = [fl.flow_msq(f) for f in fields]
        mag = [fl.flow_mag(f) for f in fields]
        stored = [fl.downsample_flow(f, keep_flow) for f in fields] if keep_flow else None
        return msq, mag, stored


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES)
def _shard_task(out: str, work: str, split: str, n: int, jobs: list[dict]) -> dict:
    return write_planned_shard(out=Path(out), work=Path(work), split=split, n=n, jobs=jobs)


STALL_WARN_S = 900.0  # nothing finished for this long: say what may be waiting


def _bounded(submit, items, limit: int) -> Iterator[tuple[object, object]]:
    """Submit ``submit(item) -> ref`` with at most ``limit`` refs in flight; yield (item, value)."""
    it = iter(items)
    pending: dict = {}
    while True:
        while len(pending) < limit and (item := next(it, None)) is not None:
            pending[submit(item)] = item
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=STALL_WARN_S)
        if not ready:
            print(f"warning: no task finished in the last {STALL_WARN_S / 60:.0f} min; if a node "
                  "was lost, its RAFT actors wait for a free GPU (add a node, or stop and run the "
                  "same command again to resume); `ray status` shows what is pending",
                  file=sys.stderr)  # fmt: skip
            continue
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)


# ------------------------------------------------------------------ stages

RAFT_CHUNK = 32  # frames of a clip sent to a RAFT actor at once (bounded memory per task)


def _in_flight(cpus: float, workers: int | None) -> int:
    """Tasks kept in flight: --workers exactly, else two per CPU so no core waits on the driver."""
    return workers if workers else max(1, 2 * int(cpus))


def _run_tracks(
    todo: list[Track],
    *,
    cache: Path,
    opts: TrackOptions,
    backend: str,
    raft: fl.RaftConfig | None,
    res: Resources,
    rt: Runtime,
    bar: tqdm,
) -> Iterator[tuple[Track, dict]]:
    """Run stage 1 on the tracks ``todo``; yield (track, committed meta) as each finishes."""
    limit = _in_flight(res.cpus, rt.workers)
    if backend in fl.CPU_BACKENDS:

        def submit(t):
            return _track_task.remote(str(cache), t, opts, backend=backend)

        for track, meta in _bounded(submit, todo, limit):
            bar.update(max(track.expected, 1))
            yield track, meta
        return

    n_actors = _flow_actors(rt.flow_actors, res)
    # A CPU actor reserves a core only when another is left for the frame tasks.
    actor_opts = {"num_gpus": 1} if res.gpus >= 1 else {"num_cpus": 1 if res.cpus >= 2 else 0}
    actors = [FlowActor.options(**actor_opts).remote(raft) for _ in range(n_actors)]
    turn = iter(range(1 << 62))

    def submit(t):
        actor = actors[next(turn) % n_actors]
        return _raft_track_task.remote(str(cache), t, opts, actor=actor, chunk=RAFT_CHUNK)

    for track, meta in _bounded(submit, todo, limit + 2 * n_actors):
        bar.update(max(track.expected, 1))
        yield track, meta


def _flow_actors(requested: int | None, res: Resources) -> int:
    """RAFT actors: one per GPU by default; never more than the cluster can place."""
    cpus, gpus = res.cpus, res.gpus
    if requested is None:
        return int(gpus) if gpus >= 1 else 1
    room = int(gpus) if gpus >= 1 else max(1, int(cpus) - 1)
    if requested > room:
        where = f"{int(gpus)} GPUs" if gpus >= 1 else f"{int(cpus)} CPUs (one is kept for frames)"
        raise BuildError(
            f"--flow-actors {requested}: the Ray cluster can place at most {room} (it has {where})"
        )
    return requested


def _identity(cfg: BuildConfig, disc: Discovery, backend: str, flow_size: int) -> dict:
    config = {**dataclasses.asdict(cfg), "flow": backend, "flow_size": flow_size}
    return {"config": config, "fingerprint": disc.fingerprint, "spec_version": SPEC_VERSION}


def _prepare_out(out: Path, identity: dict, overwrite: bool) -> bool:
    """Check ``out`` against this config. True when the build there is already complete.

    A finished build of another configuration or other source data is refused unless
    ``overwrite``; an unfinished one of the same configuration is resumed (its shards are kept
    only if the source data is unchanged, and only if this code writes the same shard spec
    version; a finished build of another version is refused unless ``overwrite``). The track
    cache is never removed here: each entry carries its own key and is recomputed when that no
    longer matches.
    """
    work = out / ".work"
    previous = None
    if (out / MANIFEST_NAME).is_file():
        try:
            m = json.loads((out / MANIFEST_NAME).read_text())
            previous = {"config": m.get("build_config"), "fingerprint": m["source"]["fingerprint"],
                        "spec_version": m.get("spec_version")}  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError):
            previous = {"config": None, "fingerprint": None}
    elif (work / "config.json").is_file():
        try:
            previous = json.loads((work / "config.json").read_text())
        except (OSError, ValueError):
            previous = None
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in BUILD_FILES | set(SPLITS)]
        if foreign and previous is None and not (work.is_dir() or (out / CACHE).is_dir()):
            raise BuildError(f"{out} is not empty and holds no build; choose another --out")
    finished = (out / MANIFEST_NAME).is_file()
    same_config = previous is not None and previous.get("config") == identity["config"]
    if previous is not None and not same_config and not overwrite:
        old = previous.get("config") or {}
        changed = sorted(k for k in set(old) | set(identity["config"])
                         if old.get(k) != identity["config"].get(k))  # fmt: skip
        raise BuildError(
            f"{out} holds a build with a different configuration ({', '.join(changed)}); "
            "pass --overwrite to replace it or choose another --out"
        )
    source_changed = previous is not None and previous.get("fingerprint") != identity["fingerprint"]
    if finished and same_config and source_changed and not overwrite:
        raise BuildError(
            f"{out} holds a build of other source data (files were added, removed or "
            "changed since); pass --overwrite to rebuild it (unchanged tracks are reused)"
        )
    old_spec = previous.get("spec_version") if previous is not None else None
    if finished and same_config and old_spec != SPEC_VERSION and not overwrite:
        what = f"of shard spec {old_spec}" if old_spec else "that records no shard spec version"
        raise BuildError(
            f"{out} holds a build {what}; this code writes {SPEC_VERSION}: pass "
            "--overwrite to rebuild it (tracks cached before spec 1.1 are processed again once)"
        )
    if previous is not None and previous != identity:
        for name in (*BUILD_FILES, *SPLITS):
            if name == CACHE:
                continue
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        previous = None
    if previous is not None and finished:
        return True
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "config.json", identity)
    return False


def _check_resources(rt: Runtime, res: Resources, backend: str) -> None:
    if backend in fl.RAFT_BACKENDS:
        _flow_actors(rt.flow_actors, res)


def _check_cluster_paths(cfg: BuildConfig, disc: Discovery) -> None:
    """On a cluster, input paths must be absolute: tasks do not run in this folder.

    (--out is made absolute: it is not part of the output's bytes; the source root and the RAFT
    weights are recorded in the manifest as given.)
    """
    named = {"--root": disc.root, "--mask-root": cfg.mask_root}
    if cfg.flow_weights not in (None, "none"):
        named["--flow-weights"] = cfg.flow_weights
    for flag, path in named.items():
        if path and not os.path.isabs(path):
            raise BuildError(
                f"{flag} {path} is a relative path: on a Ray cluster the tasks run in other "
                "working folders; give an absolute path (on a filesystem every node mounts at "
                "the same path)"
            )


def _probe_inputs(disc: Discovery) -> list[str]:
    """A few source files (of the first and last track) every node must read the same."""
    picks = disc.tracks[:1] + disc.tracks[-1:] if disc.tracks else []
    return sorted({t.frame_path(0) if t.kind == "images" and t.names else t.dir for t in picks})


def _ray_client() -> bool:
    """Whether this driver talks to the cluster through Ray Client (``ray://``)."""
    from ray.util.client import ray as client

    return client.is_connected()


def build(cfg: BuildConfig, rt: Runtime | None = None) -> dict:
    """Run a whole build; returns the summary (also written to OUT/summary.json)."""
    rt = rt or Runtime()
    t0 = time.perf_counter()
    lap = _Laps()
    check_config(cfg)
    check_runtime(rt)
    out = Path(rt.out)
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file, not a folder")
    disc = discover(cfg, rt.progress)
    for note in disc.notes or ():
        print(f"warning: {note}", file=sys.stderr)
    flow_size = cfg.flow_size or default_flow_size(disc.tracks)
    if not flow_size:
        raise BuildError(
            "could not read the size of any input frame; pass --flow-size (a multiple of 8)"
        )
    work = out / ".work"
    cache = out / CACHE
    lap("discover")
    with ray_session(rt.address, rt.workers) as session:
        res = Resources(**session)
        lap("ray_start")
        if res.cluster:  # tasks run in other working folders, maybe on other machines
            _check_cluster_paths(cfg, disc)
            out = out.absolute()
            work, cache = out / ".work", out / CACHE
        backend = fl.resolve_backend(cfg.flow, res.gpus)
        _check_resources(rt, res, backend)
        raft = None
        weights_path = None
        flow_id = ""
        if backend in fl.RAFT_BACKENDS:
            raft = fl.RaftConfig(
                name=backend,
                weights=cfg.flow_weights,
                precision=cfg.flow_precision,
                batch=cfg.flow_batch,
                iters=cfg.raft_iters,
            )
            weights_path = fl.resolve_raft_weights(raft)  # fails fast when the file is missing
            if weights_path is None:
                print("warning: RAFT with random weights (--flow-weights none): flow values are "
                      "meaningless; for tests and benchmarks only", file=sys.stderr)  # fmt: skip
            flow_id = json.dumps([fl.file_sha256(weights_path), cfg.flow_precision,
                                  cfg.raft_iters, cfg.flow_batch])  # fmt: skip
        identity = _identity(cfg, disc, backend, flow_size)
        if _prepare_out(out, identity, rt.overwrite):
            print(f"{out}: already complete; nothing to do")
            if rt.drop_cache:
                shutil.rmtree(cache, ignore_errors=True)
            return json.loads((out / SUMMARY_NAME).read_text())
        if res.cluster and (res.nodes > 1 or _ray_client()):
            check_shared_folder(out, _probe_inputs(disc))
        spec = fr.FrameSpec(cfg.size, flow_size, fr.parse_bg(cfg.bg))
        opts = TrackOptions(
            spec=spec,
            keep_mask=cfg.keep_mask,
            keep_flow=cfg.keep_flow,
            flow=backend,
            flow_id=flow_id,
        )

        # Stage 1: tracks (each frame decoded once, each pair's flow once)
        committed: dict[str, dict] = {}
        todo = []
        for t in disc.tracks:
            meta = load_meta(cache, t, opts)
            if meta is None:
                todo.append(t)
            else:
                committed[t.track_id] = meta
        todo.sort(key=lambda t: -t.expected)  # longest first: the last task ends soonest
        total = sum(max(t.expected, 1) for t in disc.tracks)
        done = sum(max(t.expected, 1) for t in disc.tracks if t.track_id in committed)
        with tqdm(total=total, initial=done, unit="frame", desc="frames+flow",
                  disable=not rt.progress, dynamic_ncols=True) as bar:  # fmt: skip
            for track, meta in _run_tracks(
                todo, cache=cache, opts=opts, backend=backend, raft=raft, res=res, rt=rt, bar=bar
            ):
                committed[track.track_id] = meta
        lap("frames_flow")

        # Stage 2: plan (driver)
        pairs = [(t, committed[t.track_id]) for t in disc.tracks]
        plan = make_plan(
            pairs,
            window=cfg.window,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            shard_size=cfg.shard_size,
            max_windows=cfg.max_windows,
        )
        if plan.counts["windows"] == 0:
            raise BuildError(
                f"no window of {cfg.window} consecutive usable frames in the dataset "
                f"({plan.counts['frames_kept']} frames kept); see the skip reasons"
            )

        lap("plan")

        # Stage 3: shards
        infos = _write_shards(plan, out=out, work=work, cache=cache, cfg=cfg, rt=rt, res=res)
        lap("shards")
    lap("ray_stop")

    summary = write_outputs(
        out,
        cfg,
        disc=disc,
        plan=plan,
        committed=committed,
        infos=infos,
        backend=backend,
        weights_path=weights_path,
        flow_size=flow_size,
    )
    lap("index_manifest")
    wall = time.perf_counter() - t0
    summary.update(
        wall_s=round(wall, 3),
        stage_s=lap.times,
        frames_per_s=round(summary["frames_input"] / wall, 2) if wall else None,
    )
    atomic_write_json(out / SUMMARY_NAME, summary)
    if not rt.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    if rt.drop_cache:
        shutil.rmtree(cache, ignore_errors=True)
    else:
        _prune_cache(cache, {t.track_id for t in disc.tracks})
    return summary


def _prune_cache(cache: Path, keep: set[str]) -> None:
    """Remove cached tracks that are no longer part of the source."""
    if cache.is_dir():
        for d in cache.iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


class _Laps:
    """Wall seconds of each step of a build, in order (summary.json's ``stage_s``)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._t, 3)
        self._t = now


def _write_shards(
    plan: Plan, *, out: Path, work: Path, cache: Path, cfg: BuildConfig, rt: Runtime, res: Resources
) -> dict[tuple[str, int], dict]:
    """Write the shards not yet committed; a shard's jobs are built only when it is submitted."""
    infos: dict[tuple[str, int], dict] = {}
    todo = []
    for split, n in plan.shard_ids:
        info = done_shard(work, split, n, out)
        if info is None:
            todo.append((split, n))
        else:
            infos[(split, n)] = info
    limit = _in_flight(res.cpus, rt.workers)

    def submit(item):
        split, n = item
        jobs = shard_jobs(
            plan, split, n, cache, keep_mask=cfg.keep_mask, keep_flow=bool(cfg.keep_flow)
        )
        return _shard_task.remote(out=str(out), work=str(work), split=split, n=n, jobs=jobs)

    total = len(plan.shard_ids)
    with tqdm(total=total, initial=len(infos), unit="shard", desc="shards",
              disable=not rt.progress, dynamic_ncols=True) as bar:  # fmt: skip
        for (split, n), info in _bounded(submit, todo, limit):
            infos[(split, n)] = info
            bar.update(1)
    _remove_stale_temps(out, {split for split, _ in plan.shard_ids})
    return infos


def _remove_stale_temps(out: Path, splits: set[str]) -> None:
    """Remove shard temp files left by a task whose worker or node died while writing.

    Every shard is committed by now; a retried task wrote its shard under another temp name.
    """
    for split in splits:
        for tmp in (out / split).glob(f".{split}-*.tar.*.tmp"):
            tmp.unlink(missing_ok=True)
