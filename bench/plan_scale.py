"""Driver-side cost of a build at HanCo scale: plan, shard jobs, index, skip record, manifest.

Fabricates the metadata of ~12k tracks x 70 frames (Track objects as pipeline/handco.py makes
them, committed metas as pipeline/tracks.process_track writes them, random pair_msq; a few
tracks split by a failed frame), then runs what the driver runs after stage 1: ``make_plan``,
every shard's job list (built one shard at a time, as ``_write_shards`` submits them), and
``write_outputs`` (index.parquet, skipped.parquet, dataset.json) with fabricated shard infos; no
shard tar is written. Also measured in the same run:

- the job lists of every shard built up front (what the old driver held), for comparison;
- file opens and time of writing one shard from a fabricated track cache, track-grouped reads
  (``write_planned_shard``) against the old per-window reader;
- peak memory of reading the ~850k-row index the old way (``to_pylist`` of the whole table)
  against the column/batch reads of inspect, validate and subset (each in a fresh process).

Peaks are the process's VmHWM (peak RSS), reset between phases through /proc/self/clear_refs.
Run: ``.venv/bin/python bench/plan_scale.py [--sequences 1500 --cameras 8 --frames 70]``
"""

from __future__ import annotations

import argparse
import builtins
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.config import BuildConfig
from pipeline.outputs import write_outputs
from pipeline.plan import make_plan
from pipeline.shards import shard_jobs, write_planned_shard
from pipeline.sources import NOT_GREEN_SCREEN, Discovery, Excluded, Track
from shards_spec.format import shard_path

MIB = 1 << 20


# ------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_mib() -> float:
    return _status_kib("VmHWM") / 1024


# ------------------------------------------------------------------ fabricated metadata


def fabricate(sequences: int, cameras: int, frames: int, seed: int = 0):
    """(tracks, committed metas, excluded) shaped like a HanCo discovery and its stage 1."""
    rng = np.random.default_rng(seed)
    tracks, metas, excluded = [], [], []
    for seq in range(sequences):
        subject = f"{seq % 150}"
        for cam in range(cameras):
            prefix = f"{seq:04d}-cam{cam}"
            d = f"/data/HanCo/rgb/{seq:04d}/cam{cam}"
            ids = tuple(range(frames))
            names = tuple(f"{f:08d}.jpg" for f in ids)
            fp = hashlib.sha256(f"{seq} {cam}".encode()).hexdigest()
            tracks.append(
                Track(track_id=f"{prefix}-00000000", prefix=prefix, source="handco",
                      kind="images", dir=d, ids=ids, names=names,
                      mask_dir=f"/data/HanCo/mask_fg/{seq:04d}/cam{cam}", mask_names=names,
                      expected=frames, side=224, fingerprint=fp, sequence=seq, camera=cam,
                      subject=subject, object=f"{seq % 40}", group=f"seq-{seq:04d}")
            )  # fmt: skip
            # one track in 20 loses a frame to a decode error: two clips, maybe a short one
            bad = int(rng.integers(0, frames)) if rng.random() < 0.05 else -1
            entries, skipped, clips, msq, mag = [], [], [], [], []
            off = 0
            for f in ids:
                if f == bad:
                    skipped.append([f"{d}/{names[f]}", f, "corrupt_image"])
                    continue
                n = int(rng.integers(20_000, 40_000))
                if not clips or entries[-1][0] != f - 1:
                    clips.append([len(entries), len(entries)])
                    msq.append([])
                    mag.append([])
                else:
                    msq[-1].append(float(rng.gamma(2.0, 1.5)))
                    mag[-1].append(0.9 * msq[-1][-1] ** 0.5)  # mean |F| <= sqrt(mean |F|^2)
                entries.append([f, off, n])
                clips[-1][1] = len(entries)
                off += n
            metas.append({"track_id": tracks[-1].track_id, "cache_key": fp, "frames": entries,
                          "clips": clips, "pair_msq": msq, "pair_mag": mag,
                          "skipped": skipped,
                          "n_input": frames, "has_masks": False, "flow_side": 224,
                          "retry": False})  # fmt: skip
        # frames of the sequence that are not green-screen, as discovery excludes them
        excl = tuple(range(frames, frames + 4))
        excluded.append(Excluded(f"{seq:04d}-cam0-{frames:08d}", f"/data/HanCo/rgb/{seq:04d}/cam0",
                                 tuple(f"{f:08d}.jpg" for f in excl), excl, NOT_GREEN_SCREEN))  # fmt: skip
    return tracks, metas, excluded


# ------------------------------------------------------------------ driver work


def driver(tracks, metas, excluded, out: Path, shard_size: int, max_windows: int | None) -> dict:
    res: dict = {}
    committed = list(zip(tracks, metas, strict=True))
    reset_peak()
    base = rss_mib()
    t0 = time.perf_counter()
    plan = make_plan(committed, window=3, val_fraction=0.05, seed=0, shard_size=shard_size,
                     max_windows=max_windows)  # fmt: skip
    res["plan_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    infos, n_jobs = {}, 0
    work = out / ".cache"
    for split, n in plan.shard_ids:
        jobs = shard_jobs(plan, split, n, work, False, False)  # as each shard is submitted
        n_jobs += len(jobs)
        infos[(split, n)] = {"path": shard_path(split, n), "sha256": "0" * 64,
                             "bytes": 1 << 20, "samples": len(jobs)}  # fmt: skip
        del jobs
    res["jobs_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = BuildConfig(src="handco", root="/data/HanCo", window=3, shard_size=shard_size,
                      val_fraction=0.05, max_windows=max_windows)  # fmt: skip
    disc = Discovery(tracks, excluded, "f" * 64, "/data/HanCo")
    by_id = {t.track_id: m for t, m in committed}
    summary = write_outputs(out, cfg, disc, plan, by_id, infos, "dis", None, 224)
    res["outputs_s"] = time.perf_counter() - t
    res["total_s"] = time.perf_counter() - t0
    res["peak_mib"] = peak_mib()
    res["peak_over_inputs_mib"] = res["peak_mib"] - base
    res["windows"] = plan.counts["windows"]
    res["shards"] = plan.counts["shards"]
    res["jobs"] = n_jobs
    res["skipped_rows"] = sum(summary["skipped_by_reason"].values())
    res["plan"] = plan
    return res


def eager_jobs_mib(plan, work: Path) -> tuple[float, float]:
    """RSS growth of holding every shard's job list at once (the old driver), and seconds."""
    reset_peak()
    base = rss_mib()
    t = time.perf_counter()
    everything = [shard_jobs(plan, s, n, work, False, False) for s, n in plan.shard_ids]
    dt = time.perf_counter() - t
    grown = peak_mib() - base
    del everything
    gc.collect()
    return grown, dt


# ------------------------------------------------------------------ shard I/O


class OldReader:
    """The shard reader before this change: a file per window, up to 64 kept open."""

    def __init__(self):
        self.files: dict = {}

    def bytes(self, path: str, offset: int, length: int) -> bytes:
        f = self.files.get(path)
        if f is None:
            if len(self.files) > 64:
                self.close()
            f = self.files[path] = open(path, "rb")  # noqa: SIM115
        f.seek(offset)
        return f.read(length)

    def close(self):
        for f in self.files.values():
            f.close()
        self.files.clear()


def old_write(out: Path, split: str, n: int, jobs: list[dict]) -> None:
    from shards_spec.writer import write_shard

    reader = OldReader()

    def samples():
        for job in jobs:
            sample = {"__key__": job["key"]}
            for k, (off, ln) in enumerate(job["frames"]):
                sample[f"f{k}.png"] = reader.bytes(f"{job['dir']}/frames.bin", off, ln)
            sample["json"] = json.dumps(job["json"], sort_keys=True).encode()
            yield sample

    try:
        write_shard(out / shard_path(split, n), samples())
    finally:
        reader.close()


@contextmanager
def counting_opens(counter: list[int], under: str):
    real = builtins.open

    def counted(file, *a, **kw):
        if str(file).startswith(under):
            counter[0] += 1
        return real(file, *a, **kw)

    builtins.open = counted
    try:
        yield
    finally:
        builtins.open = real


def shard_io(plan, base: Path, shards: int) -> dict:
    """Fabricate the track cache (frames.bin with small payloads at the planned offsets' order)
    and write ``shards`` train shards both ways; count the opens of cache files."""
    cache = base / "cache"
    for t, meta in zip(plan.tracks, plan.metas, strict=True):
        d = cache / t.track_id
        d.mkdir(parents=True)
        # payloads are shrunk to 64 bytes so 12k files fit in ~60 MB; offsets are rewritten
        for i, e in enumerate(meta["frames"]):
            e[1], e[2] = i * 64, 64
        (d / "frames.bin").write_bytes(os.urandom(64 * len(meta["frames"])))
    res = {"old_opens": 0, "new_opens": 0, "old_s": 0.0, "new_s": 0.0, "windows": 0}
    for n in range(shards):
        jobs = shard_jobs(plan, "train", n, cache, False, False)
        res["windows"] += len(jobs)
        res["tracks"] = res.get("tracks", 0) + len({j["dir"] for j in jobs})
        for name in ("old", "new"):
            count = [0]
            t = time.perf_counter()
            with counting_opens(count, str(cache)):
                if name == "old":
                    old_write(base / "old", "train", n, jobs)
                else:
                    write_planned_shard(base / "new", base / "w", "train", n, jobs)
            res[f"{name}_s"] += time.perf_counter() - t
            res[f"{name}_opens"] += count[0]
        a = (base / "old" / shard_path("train", n)).read_bytes()
        b = (base / "new" / shard_path("train", n)).read_bytes()
        assert a == b, "old and new shard bytes differ"
    return res


# ------------------------------------------------------------------ index reading


def read_index(mode: str, build: str) -> None:
    """One way of reading the index, in this (fresh) process; prints peak MiB over the start."""
    import pyarrow.parquet as pq

    from pipeline.subset import select_rows
    from shards_spec.format import distinct_pair_values
    from shards_spec.reader import open_build, pair_values
    from shards_spec.validate import _index_rows

    reset_peak()
    base = rss_mib()
    t = time.perf_counter()
    b = open_build(build)
    if mode == "old":  # what inspect, validate and subset did: every row as a dict
        rows = b.index().to_pylist()
        values = distinct_pair_values(r for r in rows if r["split"] == "train")
        n = len(rows)
    elif mode == "inspect":
        import pyarrow.compute as pc

        table = b.index(["split", "clip_id", "frame_ids", "flow_msq", "weight"])
        values = pair_values(table.filter(pc.equal(table.column("split"), "train")))
        n = table.num_rows
    elif mode == "validate":
        n = sum(1 for _ in _index_rows(pq.ParquetFile(Path(build) / "index.parquet"), []))
        values = []
    elif mode == "subset":
        picked = select_rows(b.index(["split", "flow_msq"]), "train", "flow_msq < 3", None)
        chosen = b.index().take(picked)
        n, values = chosen.num_rows, []
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps({"mode": mode, "rows": n, "pairs": len(values),
                      "peak_mib": peak_mib() - base, "s": time.perf_counter() - t}))  # fmt: skip


def read_index_all(build: Path) -> list[dict]:
    out = []
    for mode in ("old", "inspect", "validate", "subset"):
        cmd = [sys.executable, __file__, "--read-index", mode, str(build)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=1500)
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--frames", type=int, default=70)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--io-shards", type=int, default=3, help="shards written in the I/O test")
    ap.add_argument("--read-index", nargs=2, metavar=("MODE", "BUILD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read_index:
        read_index(*args.read_index)
        return

    start = rss_mib()
    t = time.perf_counter()
    tracks, metas, excluded = fabricate(args.sequences, args.cameras, args.frames)
    n_frames = sum(m["n_input"] for m in metas)
    print(f"fabricated {len(tracks)} tracks, {n_frames} frames in {time.perf_counter() - t:.1f} s;"
          f" RSS {start:.0f} -> {rss_mib():.0f} MiB (inputs)")  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="fb-plan-"))
    try:
        out = base / "out"
        out.mkdir()
        r = driver(tracks, metas, excluded, out, args.shard_size, args.max_windows)
        plan = r.pop("plan")
        print(f"windows {r['windows']}, shards {r['shards']}, skipped rows {r['skipped_rows']}")
        print(f"{'step':<34s} {'seconds':>8s}")
        for name, key in (("make_plan", "plan_s"), ("shard jobs (one shard at a time)", "jobs_s"),
                          ("index + skipped + manifest", "outputs_s"),
                          ("plan + jobs + index + manifest", "total_s")):  # fmt: skip
            print(f"{name:<34s} {r[key]:8.2f}")
        print(f"driver peak RSS (whole process)    {r['peak_mib']:8.0f} MiB  (target <= 1024)")
        print(f"  of which above the inputs        {r['peak_over_inputs_mib']:8.0f} MiB")
        print(f"index.parquet {os.path.getsize(out / 'index.parquet') / MIB:.1f} MiB, "
              f"skipped.parquet {os.path.getsize(out / 'skipped.parquet') / MIB:.1f} MiB")  # fmt: skip

        grown, dt = eager_jobs_mib(plan, out / ".cache")
        print(f"every shard's jobs held at once (old driver): +{grown:.0f} MiB, {dt:.1f} s")

        for row in read_index_all(out):
            print(f"read index, {row['mode']:<9s}: {row['rows']} rows, peak +{row['peak_mib']:.0f} "
                  f"MiB, {row['s']:.1f} s")  # fmt: skip

        io_res = shard_io(plan, base / "io", args.io_shards)
        w = io_res["windows"]
        print(f"shard I/O over {args.io_shards} shards ({w} windows from "
              f"{io_res['tracks']} track files, summed per shard; bytes identical):")  # fmt: skip
        for name in ("old", "new"):
            print(f"  {name}: {io_res[f'{name}_opens'] / args.io_shards:.0f} opens/shard, "
                  f"{io_res[f'{name}_s'] / args.io_shards:.3f} s/shard")  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
