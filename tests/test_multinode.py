"""Multi-node training: two torchrun "nodes" on 127.0.0.1 with c10d rendezvous (gloo, CPU)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from netutil import free_port
from shardutil import make_build

from train.checkpoint import steps_saved
from train.metrics import read_metrics, steps

pytestmark = pytest.mark.slow  # every test starts two torchrun agents

PY = sys.executable


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("nodes"), n_train=40, n_val=8, size=16, shard_size=7)


def train_args(build: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(build), "--out", str(out), "--batch", "8", "--val-every", "0",
            "--diag-every", "0", "--ckpt-every", "3", "--no-progress", *extra]  # fmt: skip


def start_nodes(port: int, argv: list[str], *torchrun: str) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each; node 0 hosts the c10d store."""
    procs = []
    for node in range(2):
        cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"job{port}", "--rdzv-conf", f"is_host={int(node == 0)}",
               *torchrun, "-m", "train", *argv]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    return procs


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent and everything it started, as a dying machine would."""
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            kill_node(p)
        p.wait()


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        stop(procs)


def test_two_nodes_train_what_one_process_trains(build, tmp_path):
    """2 nodes x 1 rank (1 loader worker each) = 1 process with 2 workers, same global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([PY, "-m", "train", *train_args(build, one, "--max-steps", "6",
                          "--workers", "2")], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-1500:]
    procs = start_nodes(free_port(), train_args(build, two, "--max-steps", "6", "--workers", "1"))
    codes = wait_all(procs, 180)
    assert codes == [0, 0], [p.stderr.read()[-1500:] for p in procs]
    a = torch.load(one / "ckpt-00000006.pt", weights_only=True)
    b = torch.load(two / "ckpt-00000006.pt", weights_only=True)
    assert b["config"]["world_size"] == 2
    assert max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]) < 1e-5
    la = [r["loss"] for r in steps(read_metrics(one))]
    lb = [r["loss"] for r in steps(read_metrics(two))]
    assert lb == pytest.approx(la, rel=1e-5)


def test_a_dead_node_stops_the_job_and_resume_continues(build, tmp_path):
    """Killing one node makes the other exit (no hang); the same command then resumes."""
    out = tmp_path / "run"
    argv = train_args(build, out, "--max-steps", "100000", "--workers", "0",
                      "--dist-timeout", "15")  # fmt: skip
    procs = start_nodes(free_port(), argv)
    try:
        deadline = time.monotonic() + 150
        while not steps_saved(out) or steps_saved(out)[-1] < 6:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.2)
        kill_node(procs[1])  # node 1 dies: its agent and its rank
        t = time.monotonic()
        procs[0].wait(timeout=120)  # node 0 stops by itself
        assert procs[0].returncode != 0
        stopped_after = time.monotonic() - t
    finally:
        stop(procs)
    assert stopped_after < 120
    last = steps_saved(out)[-1]
    resumed = train_args(build, out, "--max-steps", str(last + 3), "--workers", "0")
    codes = wait_all(start_nodes(free_port(), resumed), 180)
    assert codes == [0, 0]
    records = read_metrics(out)
    assert [r["step"] for r in records if r.get("kind") == "resume"][-1] == last
    assert [r["step"] for r in steps(records)] == list(range(1, last + 4))
