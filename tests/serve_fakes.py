"""The ingress app in this process with fake deployment handles: no Ray, no Serve.

``tests/unit/serve``'s route tests build a real ``KeeperIngress`` instance (its class, not the
Serve deployment) around fakes, and drive the real FastAPI app with Starlette's TestClient; the
middleware finds the instance through a patched ``serve.get_replica_context``.
"""

from __future__ import annotations

import contextlib
import inspect
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def remote_error(e: Exception, where: str) -> BaseException:
    """``e`` as a Serve handle raises an error of another deployment: ``RayTaskError(cause)``."""
    from ray.exceptions import RayTaskError

    wrapped: BaseException = RayTaskError(
        f"ServeReplica:keeper:{where}.handle_request",
        "".join(traceback.format_exception(e)),
        e,
        proctitle=f"ray::ServeReplica:keeper:{where}",
        pid=4242,
        ip="10.1.2.3",
    ).as_instanceof_cause()
    return wrapped


class Remote:
    """A deployment handle method: ``.remote(...)`` returns an awaitable (``fn`` may be async).

    With ``where`` (the deployment's name) an error ``fn`` raises arrives as Serve delivers one
    from another deployment, :func:`remote_error`; a lost replica (RayActorError) as it is.
    """

    def __init__(self, fn: Callable[..., Any], where: str | None = None) -> None:
        self.fn, self.where = fn, where

    def remote(self, *a: Any, **kw: Any) -> Any:
        from ray.exceptions import RayActorError

        async def call() -> Any:
            try:
                out = self.fn(*a, **kw)
                return await out if inspect.isawaitable(out) else out
            except RayActorError:
                raise
            except Exception as e:
                if self.where is None:
                    raise
                raise remote_error(e, self.where) from None

        return call()


class Recorder:
    """Stands in for Ray's Counter and Histogram."""

    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []

    def inc(self, value: float = 1, tags: dict[str, str] | None = None) -> None:
        self.tags.append(dict(tags or {}))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.tags.append(dict(tags or {}))


def ingress_class() -> type:
    """``KeeperIngress``'s own class: ``@serve.ingress`` wraps it; it is the first class of the
    wrapper's MRO not from Serve."""
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    from keeper_serve import ingress

    return next(
        c
        for c in ingress.KeeperIngress.func_or_class.__mro__
        if "_authorised" in vars(c) and not issubclass(c, ASGIAppReplicaWrapper)
    )


@contextlib.contextmanager
def ingress_clients(monkeypatch: pytest.MonkeyPatch, token: str) -> Iterator[Callable[..., Any]]:
    """``make(encoder, ranker, vlm, args) -> TestClient``; every client is closed on exit."""
    import ray.serve
    from fastapi.testclient import TestClient

    from keeper_serve import ingress

    monkeypatch.setenv("KEEPER_API_TOKEN", token)
    cls = ingress_class()
    clients: list[Any] = []

    def make(encoder: Any, ranker: Any, vlm: Any, args: Any) -> Any:
        inst = cls(encoder, ranker, vlm, args)
        inst.requests, inst.latency = Recorder(), Recorder()
        monkeypatch.setattr(
            ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=inst)
        )
        client = TestClient(ingress.app, raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    try:
        yield make
    finally:
        for c in clients:
            c.__exit__(None, None, None)


class Inline:
    """Stands in for a replica's TorchThread: runs the call here."""

    def call(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    async def run(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def bare_ranker(clip_model: str, tracking_uri: str, model_uri: str) -> Any:
    """A ``SeriesRanker`` replica's state as its constructor leaves it before the first load,
    without Ray (the deployment's class, not a Serve deployment)."""
    import asyncio

    import torch

    from keeper_serve import ranker

    obj = ranker.SeriesRanker.func_or_class.__new__(ranker.SeriesRanker.func_or_class)
    obj.device = torch.device("cpu")
    obj._torch = Inline()
    obj.clip_model = clip_model
    obj.tracking_uri = tracking_uri
    obj.model_uri = model_uri
    obj.poll_s = 3600.0
    obj.current = None
    obj.error = None
    obj._failed = None
    obj._poller = None
    obj._background = set()
    obj._swap_lock = asyncio.Lock()
    return obj
