"""Ray, started the way a one-laptop user or a cluster user expects."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray

from pipeline.config import BuildError

PROBE_BYTES = 64  # what a node reads of each file it is asked to check
CHECK_TIMEOUT_S = 120.0  # how long a node may take to answer the shared-folder check
CONNECT_TIMEOUT_S = 10.0  # a cluster address that does not answer a TCP connection in this time
NODE_DEATH_S = 45.0  # how long a node whose check task failed may take to be declared dead
TOKEN_HELP = (
    "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, or in a file named by "
    "RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token"
)


@dataclass(frozen=True)
class Resources:
    """What a build can use of the Ray it runs on."""

    cpus: float
    gpus: float
    nodes: int  # alive nodes that can run work
    cluster: bool  # an existing cluster was joined: tasks run in other working folders


@contextlib.contextmanager
def ray_session(address: str | None = None, workers: int | None = None) -> Iterator[dict]:
    """Join ``address`` (or $RAY_ADDRESS), else start a private local Ray instance.

    The local instance (``address="local"``) never attaches to another Ray found on the machine
    (a stale ``ray_current_cluster`` file in Ray's temp folder included), listens on 127.0.0.1
    only, and gets ``workers`` CPUs, or what Ray itself detects (it respects a container's CPU
    quota). No dashboard, no usage stats, and workers at normal priority: Ray's default
    (niceness 15) lets its own agents and the driver preempt the workers on a small machine.

    A cluster is joined with the token authentication Ray reads from the environment
    (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``). An address nobody listens on fails at once (Ray would retry forever)
    and a cluster that refuses this driver (no token, a wrong one) gives one line, not a trace.
    A Ray that is already initialised in this process is used as it is and left running.

    Yields ``{"cpus", "gpus", "nodes", "cluster"}``: the cluster's resources, its alive nodes
    that can run work, and whether an existing cluster was joined; a plain dict (it prints as
    JSON) of the fields of :class:`Resources` (``Resources(**res)``).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield dataclasses.asdict(_resources(cluster=not _started_here()))
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        _join(address)
        cluster = True
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        with _single_node(), _processes_only():
            ray.init(
                address="local",
                num_cpus=workers,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=True,
                _node_ip_address="127.0.0.1",
            )
        cluster = False
    try:
        yield dataclasses.asdict(_resources(cluster=cluster))
    finally:
        ray.shutdown()


def token_auth_on() -> bool:
    """Whether this process talks to Ray with token authentication (RAY_AUTH_MODE=token)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


def _join(address: str) -> None:
    """``ray.init(address)`` with one-line errors; warns when the cluster takes no token."""
    _reachable(address)
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except ray.exceptions.AuthenticationError as e:  # RAY_AUTH_MODE=token but no token here
        raise BuildError(f"cannot join the Ray cluster at {address}: {e}; {TOKEN_HELP}") from e
    except ConnectionError as e:
        hint = (
            "is RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) the cluster's token?"
            if token_auth_on()
            else f"if it uses token authentication, {TOKEN_HELP}"
        )
        raise BuildError(f"could not join the Ray cluster at {address} ({e}); {hint}") from e
    if not token_auth_on():
        print(
            f"warning: the Ray cluster at {address} accepts connections without a token: anyone "
            "who reaches its ports can run code on it (start it with RAY_AUTH_MODE=token)",
            file=sys.stderr,
        )


def _reachable(address: str) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on (Ray itself retries forever)."""
    m = re.fullmatch(r"\[?([^\[\]/]+?)\]?:(\d+)", address)
    if m is None:
        return
    try:
        with socket.create_connection((m[1], int(m[2])), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise BuildError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}): is its head "
            "running (`ray start --head`) and the port open from here?"
        ) from e


@contextlib.contextmanager
def _single_node() -> Iterator[None]:
    """Make Ray keep a local instance on the loopback interface.

    Ray turns 127.0.0.1 into the machine's routable address unless clusters are disabled
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by the processes Ray starts, and by this one
    at import, hence the constant). With it, the GCS, raylet and workers listen on 127.0.0.1
    only: nothing outside this machine can reach them.
    """
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_const = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


@contextlib.contextmanager
def _processes_only() -> Iterator[None]:
    """Start a local Ray without the processes a one-machine build never uses.

    A head node starts, besides its GCS and raylet, the autoscaler's monitor and an API server
    (the dashboard's backend, started even without the dashboard, for the state and job APIs).
    Neither serves a local build, and on a 2-core machine their start-up CPU competes with the
    workers. Ray has no public switch for either, so for the span of ``ray.init`` the two
    private ``Node`` methods that start them do nothing. Were they renamed in a later Ray, the
    patch is skipped and Ray starts them as before.
    """
    from ray._private.node import Node

    names = [n for n in ("start_monitor", "start_api_server") if hasattr(Node, n)]
    saved = {n: Node.__dict__[n] for n in names if n in Node.__dict__}
    for n in saved:
        setattr(Node, n, lambda self, *args, **kwargs: None)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(Node, n, fn)


def _started_here() -> bool:
    """Whether the Ray this process is connected to is a local instance it started itself."""
    node = ray._private.worker._global_node
    return bool(node is not None and getattr(node, "head", False))


def work_nodes() -> list[dict]:
    """Alive nodes that can run a build's tasks or actors (some CPU or GPU)."""
    return [
        n
        for n in ray.nodes()
        if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)
    ]


def _resources(cluster: bool) -> Resources:
    res = ray.cluster_resources()
    return Resources(
        cpus=float(res.get("CPU", 1.0)),
        gpus=float(res.get("GPU", 0.0)),
        nodes=len(work_nodes()),
        cluster=cluster,
    )


# ------------------------------------------------------------------ shared folders


def head_bytes(path: str) -> bytes | None:
    """The first bytes of ``path`` as this process sees it; None when it cannot read it."""
    try:
        with open(path, "rb") as f:
            return f.read(PROBE_BYTES)
    except OSError:
        return None


@ray.remote(num_cpus=0, max_retries=0)
def _look(paths: list[str], patience_s: float = 3.0) -> list[bytes | None]:
    """``head_bytes`` of each path on this node; a missing file is looked for again for
    ``patience_s`` (a network filesystem may show a new file to other machines a moment late)."""
    seen = [head_bytes(p) for p in paths]
    deadline = time.monotonic() + patience_s
    while None in seen and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = [b if b is not None else head_bytes(p) for p, b in zip(paths, seen, strict=True)]
    return seen


def node_label(node: dict) -> str:
    host = node.get("NodeManagerHostname") or ""
    ip = node.get("NodeManagerAddress") or "?"
    where = ip if not host or host == ip else f"{host} ({ip})"
    return f"{where} node {node['NodeID'][:8]}"


def unseen_on_nodes(
    expected: Mapping[str, bytes], timeout_s: float = CHECK_TIMEOUT_S
) -> dict[str, list[str]]:
    """Which work nodes do not read ``expected`` (path -> its first bytes): label -> paths.

    One tiny task per node, pinned there (NodeAffinitySchedulingStrategy, soft=False), reads the
    first bytes of every path. A node that does not answer in ``timeout_s`` misses them all.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = list(expected)
    refs: dict = {}
    ids: dict = {}
    for node in work_nodes():
        pin = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        ref = _look.options(scheduling_strategy=pin).remote(paths)
        refs[ref], ids[ref] = node_label(node), node["NodeID"]
    if not refs:
        return {}
    done, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    unseen: dict[str, list[str]] = {}
    for ref in late:
        unseen[f"{refs[ref]} (no answer in {timeout_s:.0f} s)"] = paths
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    for ref in done:
        try:
            seen = ray.get(ref)
        except ray.exceptions.RayError:  # the node died or could not run the check
            if _leaves(ids[ref]):
                continue  # a node that died, not yet declared dead by Ray: it will get no work
            seen = [None] * len(paths)
        missing = [p for p, got in zip(paths, seen, strict=True) if got != expected[p]]
        if missing:
            unseen[refs[ref]] = missing
    return unseen


def _leaves(node_id: str, wait_s: float = NODE_DEATH_S) -> bool:
    """Whether the node is (or within `wait_s` is declared) dead by the cluster."""
    deadline = time.monotonic() + wait_s
    while node_id in {n["NodeID"] for n in work_nodes()}:
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def check_shared_folder(out: Path, inputs: Sequence[str] = ()) -> None:
    """Refuse to build unless every work node sees ``out`` (and ``inputs``) as this driver does.

    The driver writes a marker of random name and content into ``out/.work``; each node must
    read it back at the same path, and read the same first bytes of each of ``inputs`` (a few of
    the source's files). Raises :class:`BuildError` naming the nodes that cannot; the marker is
    removed either way. Costs one tiny task per node.
    """
    work = Path(out) / ".work"
    work.mkdir(parents=True, exist_ok=True)
    marker = work / f".shared-check-{secrets.token_hex(8)}"
    token = secrets.token_hex(16).encode()
    expected = {str(p): b for p in inputs if (b := head_bytes(str(p))) is not None}
    marker.write_bytes(token)
    try:
        unseen = unseen_on_nodes({str(marker): token, **expected})
    finally:
        marker.unlink(missing_ok=True)
    if not unseen:
        return
    no_out = [n for n, paths in unseen.items() if str(marker) in paths]
    if no_out:
        raise BuildError(
            f"--out {out} is not visible from every Ray node (not from {', '.join(no_out)}): on a "
            "cluster --out must be on a filesystem every node mounts at the same path (a shared "
            "filesystem), or shards would be written to other machines' disks"
        )
    first = next(iter(unseen.items()))
    raise BuildError(
        f"the source files are not visible from every Ray node ({', '.join(unseen)} cannot read "
        f"{first[1][0]}): on a cluster the source (--root) must be on a filesystem every node "
        "mounts at the same path (a shared filesystem)"
    )
