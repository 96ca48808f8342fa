"""`pipeline build --address` on a Ray cluster started with `ray start`: a head (no CPU; it runs
the drivers) and worker nodes.

Every node runs on this machine, listens on 127.0.0.1 only, uses token authentication and its
own temp folder, and is stopped by its process group (every process it ran checked by PID) even
when a test fails. A cluster build must give the bytes of a local build, also when a worker node
is killed in the middle of it (running a task, or hosting the RAFT actor); a driver without the
token is refused."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from buildutil import tree_bytes
from netutil import free_port

from pipeline.build import BuildError
from shards_spec import validate

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# `ray start` turns --node-ip-address 127.0.0.1 into the machine's routable address and then
# listens on every interface; with clusters "disabled" (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) it
# keeps 127.0.0.1 and listens on loopback only, but refuses to add a worker node. This wrapper
# runs the real `ray start` with the worker-node refusal lifted and 127.0.0.1 kept as given.
RAY_START = (
    "import sys\n"
    "from ray._private import ray_constants, services\n"
    "ray_constants.ENABLE_RAY_CLUSTER = True\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "main()\n"
)
SMALL = ["--src", "synthetic", "--synth-sequences", "4", "--synth-frames", "24", "--size", "32",
         "--no-progress"]  # fmt: skip


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        st = _stat(int(d.name))
        if st and int(st[3]) == sid and st[0] != "Z":
            pids.append(int(d.name))
    return pids


def task_pids(sid: int, *names: str) -> list[int]:
    """Ray workers of session ``sid`` running one of the tasks ``names`` or hosting the actor."""
    found = []
    for pid in session_pids(sid):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            if any(cmd == f"ray::{n}" or cmd.startswith(f"ray::{n}.") for n in names):
                found.append(pid)
    return found


def listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by one of ``pids``."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # LISTEN
                    ip_hex, port = f[1].split(":")
                    raw = bytes.fromhex(ip_hex)  # 32-bit words in host (little-endian) order
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    found.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class Node:
    """One `ray start --block` in a session of its own: the node's processes are that session."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path):
        self.name = name
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PY, "-c", RAY_START, "start", "--block", *args],
                env=env,
                cwd=logs,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.sid = self.proc.pid
        self.seen: set[int] = {self.proc.pid}

    def pids(self) -> list[int]:
        pids = session_pids(self.sid)
        self.seen.update(pids)
        return pids

    def kill(self) -> None:
        """SIGKILL the node (its raylet, GCS, agents and workers), as a dying machine would."""
        self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.sid, signal.SIGKILL)
        for pid in self.pids():  # anything that left the process group but not the session
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


def _ray_temp(tmp_path_factory) -> tuple[Path, bool]:
    """A temp folder for Ray; short, since Ray's Unix socket paths must fit in 107 bytes."""
    d = tmp_path_factory.mktemp("ray")
    if len(str(d)) <= 40:
        return d, False
    return Path(tempfile.mkdtemp(prefix="fbr", dir="/tmp")), True


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}  # fmt: skip
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), **extra)
    return env


class Cluster:
    """A head (no CPU: it runs the drivers only, as on a real cluster) and worker nodes (2 CPUs
    each, so that one node can host the flow actor and a frame task), all on 127.0.0.1 with token
    auth."""

    def __init__(self, work: Path, ray_tmp: Path):
        self.work, self.ray_tmp = work, ray_tmp
        self.token = secrets.token_hex(32)
        self.env = clean_env(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # drivers keep 127.0.0.1 too
            RAY_TMPDIR=str(ray_tmp / "d"),  # drivers' and local builds' Ray files: not /tmp/ray
            FRAMEBRIDGE_CACHE=str(work / "synth"),
        )
        # a local build: a private Ray instance with a token of its own (not the cluster's)
        self.local_env = {**self.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []

    def _start(self, name: str, *args: str, cpus: int) -> Node:
        node = Node(name, [*args, "--temp-dir", str(self.ray_tmp / name), "--node-ip-address",
                           "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0",
                           "--disable-usage-stats"], self.env, self.work)  # fmt: skip
        self.nodes.append(node)
        return node

    def start_head(self) -> None:
        head = self._start("head", "--head", "--port", str(self.port), "--include-dashboard",
                           "false", cpus=0)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if head.proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"`ray start --head` cannot start a head here: {head.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.5)

    def workers(self) -> list[Node]:
        return [n for n in self.nodes if n.name != "head" and n.proc.poll() is None]

    def ensure_workers(self, n: int) -> list[Node]:
        """Start worker nodes until ``n`` run; wait until the cluster sees them all alive."""
        while len(self.workers()) < n:
            self._start(f"w{len(self.nodes)}", "--address", self.address, cpus=2)
        want = 1 + n
        wait = (
            "import ray, time\n"
            f"ray.init(address={self.address!r}, log_to_driver=False)\n"
            "alive = lambda: sum(n['Alive'] for n in ray.nodes())\n"
            "t = time.monotonic()\n"
            f"while alive() != {want} and time.monotonic() - t < 90:\n"
            "    time.sleep(0.3)\n"
            "print('alive nodes:', alive())\n"
        )
        r = subprocess.run([PY, "-c", wait], env=self.env, cwd=self.work, capture_output=True,
                           text=True, timeout=150)  # fmt: skip
        tails = [n.tail() for n in self.workers()]
        # the driver may also print Ray's notices of nodes killed earlier on stdout
        seen = re.findall(r"^alive nodes: (\d+)$", r.stdout, re.MULTILINE)
        assert seen == [str(want)], (r.stdout, r.stderr[-1500:], tails)
        for node in self.nodes:
            node.pids()
        return self.workers()

    def stop(self) -> None:
        """SIGKILL every node; then check that no process any of them ran is left (by PID)."""
        for node in reversed(self.nodes):
            node.kill()
        deadline = time.monotonic() + 20
        while True:
            alive = [p for n in self.nodes for p in n.seen if _stat(p) and _stat(p)[0] != "Z"]
            alive += [p for n in self.nodes for p in session_pids(n.sid)]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not alive, f"Ray processes survived: {sorted(set(alive))}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray_tmp, remove_tmp = _ray_temp(tmp_path_factory)
    c = Cluster(tmp_path_factory.mktemp("cluster"), ray_tmp)
    try:
        c.start_head()
        c.ensure_workers(2)
        yield c
    finally:
        try:
            c.stop()
        finally:
            if remove_tmp:
                shutil.rmtree(ray_tmp, ignore_errors=True)


def start_build(out: Path, env: dict, *extra: str, cwd: Path = REPO) -> subprocess.Popen:
    cmd = [PY, "-m", "pipeline", "build", *SMALL, *extra, "--out", str(out)]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[str, str]]:
    """Wait for the drivers; SIGKILL the process group of any still running (even on error)."""
    try:
        deadline = time.monotonic() + timeout
        return [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def run_build(out: Path, env: dict, *extra: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = start_build(out, env, *extra, cwd=cwd)
    ((stdout, stderr),) = finish([proc])
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def local_build(cluster) -> Path:
    """The same configuration built by a private local Ray (its own token, not the cluster's)."""
    out = cluster.work / "B"
    r = run_build(out, cluster.local_env, "--workers", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
def test_every_node_listens_on_loopback_only(cluster):
    pids = [p for n in cluster.nodes for p in n.pids()]
    ports = listening(pids)
    assert cluster.port in {port for _, port in ports}  # the GCS is seen
    assert ports and all(is_loopback(a) for a, _ in ports), sorted(ports)


@pytest.mark.slow
def test_cluster_build_gives_the_bytes_of_a_local_build(cluster, local_build):
    """`--out A`, relative: the tasks (which run in the nodes' own working folders) get it made
    absolute, and the shared-folder check passes (both nodes see this machine's disk)."""
    out = cluster.work / "A"
    r = run_build(Path("A"), cluster.env, "--address", cluster.address, cwd=cluster.work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"built {out}:" in r.stdout
    assert "without a token" not in r.stderr
    assert tree_bytes(out) == tree_bytes(local_build)
    assert validate(out) == []
    assert not (out / ".work").exists()  # the shared-folder marker went with it


@pytest.mark.slow
def test_a_driver_without_the_token_is_refused(cluster, tmp_path):
    """No token, and a wrong one: the cluster refuses the driver; one line, exit 2, no output."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH_")}
    wrong = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    procs = [
        start_build(tmp_path / "none", env, "--address", cluster.address),
        start_build(tmp_path / "wrong", wrong, "--address", cluster.address),
    ]
    results = finish(procs, timeout=150)
    (_, none_err), (_, wrong_err) = results
    assert [p.returncode for p in procs] == [2, 2], (none_err[-1500:], wrong_err[-1500:])
    last = none_err.strip().splitlines()[-1]
    assert "could not join the Ray cluster" in last and "RAY_AUTH_MODE=token" in last, last
    last = wrong_err.strip().splitlines()[-1]
    assert "could not join the Ray cluster" in last and "the cluster's token" in last, last
    assert not (tmp_path / "none" / "dataset.json").exists()


@pytest.mark.slow
def test_shared_folder_check_on_the_cluster(cluster, tmp_path):
    """Both nodes see a folder of this machine; a file nobody can read is refused by both."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from pipeline.raycluster import check_shared_folder, ray_session, unseen_on_nodes\n"
        "from pipeline.build import BuildError\n"
        f"with ray_session({cluster.address!r}) as res:\n"
        f"    check_shared_folder(Path({str(tmp_path / 'o')!r}))\n"
        "    left = sorted(p.name for p in Path(sys.argv[1], '.work').iterdir())\n"
        "    unseen = unseen_on_nodes({'/nonexistent/marker': b'x'})\n"
        "    print(json.dumps([res, left, unseen]))\n"
    )
    r = subprocess.run([PY, "-c", code, str(tmp_path / "o")], env=cluster.env, cwd=REPO,
                       capture_output=True, text=True, timeout=150)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res, left, unseen = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["nodes"] == 2 and res["cluster"] is True
    assert left == []  # the marker is removed
    assert len(unseen) == 2 and all(v == ["/nonexistent/marker"] for v in unseen.values())
    assert all("127.0.0.1" in label and " node " in label for label in unseen)


def build_losing_a_node(cluster: Cluster, out: Path, names: tuple[str, ...], *extra: str):
    """Build on the cluster; SIGKILL the first worker node seen running one of ``names`` (a task
    or an actor) once some tracks are committed. Returns (driver, stderr, what was killed)."""
    workers = cluster.ensure_workers(2)
    proc = start_build(out, cluster.env, "--address", cluster.address, *extra)
    killed = None
    try:
        deadline = time.monotonic() + 150
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            if list((out / ".cache").glob("*/meta.json")):
                for node in workers:
                    if busy := task_pids(node.sid, *names):
                        done = len(list((out / ".cache").glob("*/meta.json")))
                        node.kill()
                        killed = (node, busy, done)
                        break
            time.sleep(0.01)
    finally:
        ((_, stderr),) = finish([proc])
    assert killed is not None, f"no worker node ran {names} before the build ended: {stderr}"
    node, busy, done = killed
    print(f"killed {node.name} while it ran {busy}, {done} tracks committed before")
    assert not node.pids(), "the killed node is still running"
    return proc, stderr, killed


@pytest.mark.slow
def test_losing_a_worker_node_mid_build_is_survived(cluster, local_build):
    """SIGKILL a worker node (raylet and workers) while it runs a task: Ray runs the task again
    on the other node (max_retries) and the output is byte-identical."""
    out = cluster.work / "K"
    proc, stderr, _ = build_losing_a_node(cluster, out, ("_track_task", "_shard_task"))
    assert proc.returncode == 0, stderr[-3000:]
    assert tree_bytes(out) == tree_bytes(local_build)
    assert not list(out.glob("*/.*.tmp"))  # no temp file of a killed shard task is left


RAFT = ["--flow", "raft-small", "--flow-weights", "none", "--raft-iters", "2", "--flow-size", "64"]


@pytest.mark.slow
def test_losing_the_node_of_the_raft_actor_is_survived(cluster):
    """SIGKILL the node that hosts the flow actor: Ray restarts the actor on the other node
    (max_restarts) and sends it the calls it had not answered (max_task_retries)."""
    local = cluster.work / "B-raft"
    r = run_build(local, cluster.local_env, "--workers", "2", *RAFT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = cluster.work / "K-raft"
    proc, stderr, _ = build_losing_a_node(cluster, out, ("FlowActor",), *RAFT)
    assert proc.returncode == 0, stderr[-3000:]
    assert tree_bytes(out) == tree_bytes(local)


def test_refusal_names_the_nodes_that_cannot_see_out(tmp_path, monkeypatch):
    """The refusal path of the shared-folder check, with one node's check failing (no Ray)."""
    from pipeline import raycluster

    calls = []

    def one_node_blind(expected, timeout_s=raycluster.CHECK_TIMEOUT_S):
        calls.append(dict(expected))
        return {"10.0.0.7 node 1a2b3c4d": list(expected)}

    monkeypatch.setattr(raycluster, "unseen_on_nodes", one_node_blind)
    out = tmp_path / "shards"
    with pytest.raises(BuildError) as e:
        raycluster.check_shared_folder(out)
    msg = str(e.value)
    assert "\n" not in msg and "10.0.0.7 node 1a2b3c4d" in msg
    assert f"--out {out}" in msg and "filesystem every node mounts at the same path" in msg
    ((marker, content),) = calls[0].items()
    assert Path(marker).parent == out / ".work" and len(content) == 32
    assert not Path(marker).exists()  # removed after the check

    src = tmp_path / "frame.png"
    src.write_bytes(b"\x89PNG" + bytes(100))
    monkeypatch.setattr(raycluster, "unseen_on_nodes",
                        lambda expected, timeout_s=0: {"gpu7 node 99": [str(src)]})  # fmt: skip
    with pytest.raises(BuildError, match=r"source files are not visible .*gpu7 node 99.*--root"):
        raycluster.check_shared_folder(out, [str(src)])
    monkeypatch.setattr(raycluster, "unseen_on_nodes", lambda expected, timeout_s=0: {})
    raycluster.check_shared_folder(out, [str(src)])  # every node sees everything: no error


def test_an_address_nobody_listens_on_fails_fast():
    from pipeline.raycluster import ray_session

    address = f"127.0.0.1:{free_port()}"
    t = time.monotonic()
    with (
        pytest.raises(BuildError, match="cannot reach the Ray cluster at 127.0.0.1"),
        ray_session(address),
    ):
        pass
    assert time.monotonic() - t < 15


def test_relative_input_paths_are_refused_on_a_cluster():
    from pipeline.build import BuildConfig, _check_cluster_paths
    from pipeline.sources import Discovery

    disc = Discovery([], [], "", "data/HanCo")
    with pytest.raises(BuildError, match="--root data/HanCo is a relative path"):
        _check_cluster_paths(BuildConfig(src="handco"), disc)
    absolute = Discovery([], [], "", "/data/HanCo")
    _check_cluster_paths(BuildConfig(src="handco"), absolute)
    with pytest.raises(BuildError, match="--flow-weights w.pth"):
        _check_cluster_paths(BuildConfig(src="handco", flow_weights="w.pth"), absolute)
