"""Ray, started the way a one-laptop user or a cluster user expects."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def ray_session(address: str | None = None, workers: int | None = None) -> Iterator[dict]:
    """Join ``address`` (or $RAY_ADDRESS), else start a private local Ray instance.

    The local instance (``address="local"``) never attaches to another Ray found on the machine
    (a stale ``ray_current_cluster`` file in Ray's temp folder included), listens on 127.0.0.1 only, and gets
    ``workers`` CPUs, or what Ray itself detects (it respects a container's CPU quota). No
    dashboard, no usage stats, and workers at normal priority: Ray's default (niceness 15) lets
    its own agents and the driver preempt the workers on a small machine.
    A Ray that is already initialised in this process is used as it is and left running.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield _resources()
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        with _single_node():
            ray.init(
                address="local",
                num_cpus=workers,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=True,
                _node_ip_address="127.0.0.1",
            )
    try:
        yield _resources()
    finally:
        ray.shutdown()


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


def _resources() -> dict:
    res = ray.cluster_resources()
    return {"cpus": float(res.get("CPU", 1.0)), "gpus": float(res.get("GPU", 0.0))}
