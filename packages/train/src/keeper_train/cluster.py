"""Connecting to Ray: one place that decides how a job driver finds its cluster."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from keeper_core import ray_token

log = logging.getLogger(__name__)


def init_ray(address: str | None = None) -> str:
    """Connect to (or start) Ray and return a one-line description of the cluster.

    Args:
        address: ``None`` uses ``RAY_ADDRESS`` when set (as under ``ray job submit``), else starts a
            local Ray for this process; ``auto`` or ``HOST:PORT`` joins a running cluster. A local
            Ray started here has token authentication on (Ray 2.60's default for ``ray.init``).
            Its workers' output (Ray Train's per-epoch reports and checkpoint lines, actor
            start-up chatter) goes to Ray's log files (``/tmp/ray/session_latest/logs`` by
            default), not to this terminal; their errors still
            reach the driver as exceptions. A cluster joined keeps Ray's defaults.
    """
    import ray

    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS") or None
        if target is None:
            ray_token.quiet_enabled_notice()
            ray.init(log_to_driver=False, logging_level=logging.WARNING)
            ray_token.restrict()  # the token a new local Ray generated: this user's only
        else:
            ray.init(address=target)
    res = ray.cluster_resources()
    desc = (
        f"ray {ray.__version__}: {int(res.get('CPU', 0))} CPU, {res.get('GPU', 0):g} GPU, "
        f"{len([n for n in ray.nodes() if n.get('Alive')])} node(s)"
    )
    log.info(desc)
    return desc


BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def custom_resources(v: dict[str, float], instead: str) -> dict[str, float]:
    """Validate a job's custom Ray resources (``{name: amount}``): no built-in resource (each has
    its own key, named by ``instead``), every amount > 0. Raises ValueError (pydantic's)."""
    for name, amount in v.items():
        if name in BUILTIN_RESOURCES:
            raise ValueError(f"{name} is not a custom resource: use {instead}")
        if not amount > 0:
            raise ValueError(f"{name}: {amount} must be > 0")
    return v


def _pool_actors(name: str) -> dict[str, Any]:
    """The actor handles this driver holds whose actor Ray Data named ``name``, by actor id."""
    from ray.actor import ActorHandle

    # type(), not isinstance(): isinstance reads each object's __class__, which some module
    # proxies answer with a warning (torch's deprecated ``distributed.reduce_op`` printed a
    # FutureWarning on every keeper embed).
    return {
        h._actor_id.hex(): h
        for h in gc.get_objects()
        if issubclass(type(h), ActorHandle) and name in repr(h)
    }


@contextmanager
def actor_pool_released(stage: type) -> Iterator[None]:
    """Kills the actors of ``stage``'s Ray Data actor pool when the block ends, however it ends.

    Ray Data leaves an execution's actors to reference counting, and references can outlive it:
    after a failure its exception's frames and the callbacks of tasks that were in flight hold
    the handles, and an actor lives while a handle does. A driver that goes on (a notebook, a
    benchmark, a test session's shared Ray) kept a failed embed run's model actor and its GPU,
    and its next job waited for them for ever (the H200 benchmark, 2026-12-04, and CI's next Ray
    Train test); after a run that succeeded they lingered for more than 15 s in CI. Killing them
    frees their resources at once; the block's output is in the driver by then. Pools already
    running in this driver when the block began are spared; one begun after it, in another
    thread of the same driver, would lose its actors (one job at a time per driver).
    """
    import ray

    name = f"MapWorker(MapBatches({stage.__name__}))"
    others = set(_pool_actors(name))
    try:
        yield
    finally:
        for actor_id, handle in _pool_actors(name).items():
            if actor_id not in others:
                ray.kill(handle, no_restart=True)
