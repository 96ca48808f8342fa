"""`pipeline build`: sources -> tracks (Ray tasks, flow actors) -> plan -> shards (Ray tasks).

Resumable: tracks and shards are committed atomically under ``OUT/.work`` and skipped when a
build is run again with the same configuration; the manifest is written last.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
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
    discover,
    synthetic_root,
)
from pipeline.outputs import format_summary, write_outputs  # noqa: F401 - re-exported
from pipeline.plan import Plan, make_plan
from pipeline.raycluster import ray_session
from pipeline.shards import done_shard, window_job, write_planned_shard
from pipeline.sources import Discovery, Track
from pipeline.tracks import TrackOptions, commit_flow, load_meta, process_track
from shards_spec.writer import atomic_write_json

BUILD_FILES = {"dataset.json", "index.parquet", "skipped.parquet", "summary.json", ".work"}


# ------------------------------------------------------------------ Ray workers

_FLOW_IMPLS: dict = {}


def _cpu_flow(backend: str):
    if backend not in _FLOW_IMPLS:
        import cv2

        cv2.setNumThreads(1)
        _FLOW_IMPLS[backend] = fl.make_flow(backend)
    return _FLOW_IMPLS[backend]


@ray.remote(num_cpus=1)
def _track_task(work: str, track: Track, opts: TrackOptions, backend: str) -> dict:
    return process_track(Path(work), track, opts, _cpu_flow(backend))[0]


@ray.remote(num_cpus=1, num_returns=2)
def _prepare_task(work: str, track: Track, opts: TrackOptions):
    import cv2

    cv2.setNumThreads(1)
    return process_track(Path(work), track, opts, None)


@ray.remote
class FlowActor:
    """One RAFT model per actor (one actor per GPU); flow for whole tracks, batched."""

    def __init__(self, raft: fl.RaftConfig):
        self.flow = fl.RaftFlow(raft)

    def run(self, work: str, track: Track, meta: dict, clips, keep_flow: int) -> dict:
        flows = [self.flow.pairs(c) if len(c) > 1 else [] for c in clips]
        return commit_flow(Path(work), track, meta, flows, keep_flow)


@ray.remote(num_cpus=1)
def _shard_task(out: str, work: str, split: str, n: int, jobs: list[dict]) -> dict:
    return write_planned_shard(Path(out), Path(work), split, n, jobs)


def _bounded(submit, items: Sequence, limit: int) -> Iterator[tuple[object, object]]:
    """Submit ``submit(item) -> ref`` with at most ``limit`` refs in flight; yield (item, value)."""
    it = iter(items)
    pending: dict = {}
    while True:
        while len(pending) < limit and (item := next(it, None)) is not None:
            pending[submit(item)] = item
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)


# ------------------------------------------------------------------ stages


def _in_flight(cpus: float, workers: int | None) -> int:
    """Tasks kept in flight: --workers exactly, else two per CPU so no core waits on the driver."""
    return workers if workers else max(1, 2 * int(cpus))


def _run_tracks(todo, work, opts, backend, raft, cpus, gpus, rt, bar) -> Iterator[tuple]:
    limit = _in_flight(cpus, rt.workers)
    if backend in fl.CPU_BACKENDS:

        def submit(t):
            return _track_task.remote(str(work), t, opts, backend)

        for track, meta in _bounded(submit, todo, limit):
            bar.update(len(track.frames))
            yield track, meta
        return

    n_actors = rt.flow_actors or (int(gpus) if gpus >= 1 else 1)
    # A CPU actor reserves a core only when another is left for the prepare tasks.
    actor_opts = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1 if cpus >= 2 else 0}
    actors = [FlowActor.options(**actor_opts).remote(raft) for _ in range(n_actors)]
    turn = iter(range(1 << 62))

    def submit(t):  # prepare on a CPU task, then flow on the next actor; frames stay in Ray
        meta_ref, clips_ref = _prepare_task.remote(str(work), t, opts)
        actor = actors[next(turn) % n_actors]
        return actor.run.remote(str(work), t, meta_ref, clips_ref, opts.keep_flow)

    for track, meta in _bounded(submit, todo, limit + 2 * n_actors):
        bar.update(len(track.frames))
        yield track, meta


def _identity(cfg: BuildConfig, disc: Discovery, backend: str) -> dict:
    return {"config": {**dataclasses.asdict(cfg), "flow": backend}, "fingerprint": disc.fingerprint}


def _prepare_out(out: Path, identity: dict, overwrite: bool) -> bool:
    """Check ``out`` against this config. True when the build there is already complete."""
    work = out / ".work"
    previous = None
    if (out / "dataset.json").is_file():
        m = json.loads((out / "dataset.json").read_text())
        previous = {"config": m.get("build_config"), "fingerprint": m["source"]["fingerprint"]}
    elif (work / "config.json").is_file():
        previous = json.loads((work / "config.json").read_text())
    if out.is_dir():
        foreign = [
            p.name
            for p in out.iterdir()
            if p.name not in BUILD_FILES and not (p.is_dir() and p.name in ("train", "val"))
        ]
        if foreign and previous is None:
            raise BuildError(f"{out} is not empty and holds no build; choose another --out")
    if previous is not None and previous != identity:
        if not overwrite:
            changed = sorted(
                k
                for k in set(previous.get("config") or {}) | set(identity["config"])
                if (previous.get("config") or {}).get(k) != identity["config"].get(k)
            )
            what = ", ".join(changed) or "source data"
            raise BuildError(
                f"{out} holds a build with a different configuration ({what}); "
                "pass --overwrite to replace it or choose another --out"
            )
        for name in (*BUILD_FILES, "train", "val"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        previous = None
    if previous is not None and (out / "dataset.json").is_file():
        return True
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "config.json", identity)
    return False


def build(cfg: BuildConfig, rt: Runtime | None = None) -> dict:
    """Run a whole build; returns the summary (also written to OUT/summary.json)."""
    rt = rt or Runtime()
    t0 = time.perf_counter()
    lap = _Laps()
    check_config(cfg)
    disc = discover(cfg, rt.progress)
    out = Path(rt.out)
    work = out / ".work"
    lap("discover")
    with ray_session(rt.address, rt.workers) as res:
        lap("ray_start")
        backend = fl.resolve_backend(cfg.flow, res["gpus"])
        raft = None
        weights_path = None
        if backend in fl.RAFT_BACKENDS:
            raft = fl.RaftConfig(
                backend, cfg.flow_weights, cfg.flow_precision, cfg.flow_batch, cfg.raft_iters
            )
            weights_path = fl.resolve_raft_weights(raft)  # fails fast when the file is missing
            if weights_path is None:
                print("warning: RAFT with random weights (--flow-weights none): flow values are "
                      "meaningless; for tests and benchmarks only", file=sys.stderr)  # fmt: skip
        identity = _identity(cfg, disc, backend)
        if _prepare_out(out, identity, rt.overwrite):
            print(f"{out}: already complete; nothing to do")
            return json.loads((out / "summary.json").read_text())
        spec = fr.FrameSpec(cfg.size, cfg.flow_size, fr.parse_bg(cfg.bg))
        opts = TrackOptions(spec, cfg.keep_mask, cfg.keep_flow)

        # Stage 1: tracks (each frame decoded once, each pair's flow once)
        committed: dict[str, dict] = {}
        todo = []
        for t in disc.tracks:
            meta = load_meta(work, t)
            if meta is None:
                todo.append(t)
            else:
                committed[t.track_id] = meta
        todo.sort(key=lambda t: -len(t.frames))  # longest first: the last task ends soonest
        total = sum(len(t.frames) for t in disc.tracks)
        done = sum(len(t.frames) for t in disc.tracks if t.track_id in committed)
        with tqdm(total=total, initial=done, unit="frame", desc="frames+flow",
                  disable=not rt.progress, dynamic_ncols=True) as bar:  # fmt: skip
            for track, meta in _run_tracks(
                todo, work, opts, backend, raft, res["cpus"], res["gpus"], rt, bar
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
        infos = _write_shards(plan, out, work, cfg, rt, res["cpus"])
        lap("shards")
    lap("ray_stop")

    summary = write_outputs(out, cfg, disc, plan, committed, infos, backend, weights_path)
    lap("index_manifest")
    wall = time.perf_counter() - t0
    summary.update(
        wall_s=round(wall, 3),
        stage_s=lap.times,
        frames_per_s=round(summary["frames_input"] / wall, 2) if wall else None,
    )
    atomic_write_json(out / "summary.json", summary)
    if not rt.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return summary


class _Laps:
    """Wall seconds of each step of a build, in order (summary.json's ``stage_s``)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._t, 3)
        self._t = now


def _write_shards(plan: Plan, out: Path, work: Path, cfg, rt, cpus) -> dict[tuple[str, int], dict]:
    infos: dict[tuple[str, int], dict] = {}
    todo = []
    for split, shards in plan.shards.items():
        for n, ws in enumerate(shards):
            info = done_shard(work, split, n, out)
            if info is None:
                jobs = [window_job(w, work, cfg.keep_mask, bool(cfg.keep_flow)) for w in ws]
                todo.append((split, n, jobs))
            else:
                infos[(split, n)] = info
    limit = _in_flight(cpus, rt.workers)

    def submit(item):
        split, n, jobs = item
        return _shard_task.remote(str(out), str(work), split, n, jobs)

    total = sum(len(s) for s in plan.shards.values())
    with tqdm(total=total, initial=len(infos), unit="shard", desc="shards",
              disable=not rt.progress, dynamic_ncols=True) as bar:  # fmt: skip
        for (split, n, _), info in _bounded(submit, todo, limit):
            infos[(split, n)] = info
            bar.update(1)
    return infos
