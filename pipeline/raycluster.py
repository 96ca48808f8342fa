"""Ray, started the way a one-laptop user or a cluster user expects."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def ray_session(address: str | None = None, workers: int | None = None) -> Iterator[dict]:
    """Join ``address`` (or $RAY_ADDRESS), else start a private local Ray instance.

    The local instance gets ``workers`` CPUs (default: all), no dashboard, no usage stats, and
    workers at normal priority: Ray's default (niceness 15) lets its own agents and the driver
    preempt the workers, which costs a build on a small machine a noticeable share of its CPU.
    A Ray that is already initialised in this process is used as it is and left running.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield _resources()
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            num_cpus=workers or os.cpu_count() or 1,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=True,
        )
    try:
        yield _resources()
    finally:
        ray.shutdown()


def _resources() -> dict:
    res = ray.cluster_resources()
    return {"cpus": float(res.get("CPU", 1.0)), "gpus": float(res.get("GPU", 0.0))}
