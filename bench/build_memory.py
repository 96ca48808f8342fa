"""Peak memory of `pipeline build` at two dataset sizes, 4x apart (target: within 20%).

Each build runs as its own process; the proportional set size (PSS, so shared pages such as
Ray's object store are counted once) of the driver and every process it started (Ray's GCS,
raylet and workers) is summed every 0.2 s, and the peak is kept. Run:
    .venv/bin/python bench/build_memory.py [--sequences 4 --frames 60 --factor 4]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline.synth import generate


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_memory(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (peak summed PSS in MiB over its process tree, wall seconds)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, sum(_pss_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.2)

    t = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    if rc:
        raise SystemExit(f"build failed ({rc}): {' '.join(cmd)}")
    return peak / 1024, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--factor", type=int, default=4)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fb-mem-"))
    rows = []
    try:
        for scale in (1, args.factor):
            root = base / f"data-x{scale}"
            generate(root, sequences=args.sequences * scale, cameras=args.cameras,
                     frames=args.frames, size=224, seed=0, progress=False)  # fmt: skip
            cmd = [sys.executable, "-m", "pipeline", "build", "--src", "handco", "--root",
                   str(root), "--flow", "dis", "--shard-size", "200", "--out",
                   str(base / f"out-x{scale}"), "--no-progress"]  # fmt: skip
            mib, wall = peak_memory(cmd)
            frames = sum(1 for _ in (root / "rgb").rglob("*.jpg"))
            rows.append((scale, frames, mib, wall))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{'dataset':>8s} {'frames':>7s} {'peak PSS MiB':>13s} {'wall s':>7s}")
    for scale, frames, mib, wall in rows:
        print(f"{'x' + str(scale):>8s} {frames:7d} {mib:13.0f} {wall:7.1f}")
    ratio = rows[1][2] / rows[0][2]
    print(f"peak memory ratio x{args.factor}/x1: {ratio:.3f} (target within 20%: 0.80..1.20)")


if __name__ == "__main__":
    main()
