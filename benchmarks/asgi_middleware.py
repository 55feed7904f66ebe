"""What an HTTP middleware costs a request: Starlette's ``BaseHTTPMiddleware`` against plain ASGI.

    .venv/bin/python benchmarks/asgi_middleware.py [--requests 4000] [--repeats 5] \
        [--out benchmarks/results/asgi-middleware.json]

keeper's ingress checks the bearer token and counts and times every request in one middleware.
Written with ``@app.middleware("http")`` it was a ``BaseHTTPMiddleware``; since 2026-12-04 it is
plain ASGI (``keeper_serve.ingress._AuthAndMetrics``). This script measures the difference on
its own, side by side in one process: the same FastAPI app (one ``POST`` route that parses a
small JSON body and answers a 512-float embedding, as ``/v1/embed`` does), called directly as an
ASGI app (no server, no sockets) with

1. no middleware (the floor),
2. the former middleware, a ``BaseHTTPMiddleware`` making the same calls as keeper's
   (``_refusal``: the token check; ``_route_label``; the request counter and latency histogram),
3. keeper's ``_AuthAndMetrics`` itself.

Outside a Serve replica there is no ``KeeperIngress`` to check the token against, so both
middlewares are given a stand-in (the same token compare, counters that keep what they are
told) through ``keeper_serve.ingress._ingress``.

Each variant serves ``--requests`` requests one after another on one event loop, the variants
alternated ``--repeats`` times; the best repeat counts. Printed as a table (microseconds a
request, and each middleware's cost over the floor), saved as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fastapi
import starlette

# benchmarks/ is sys.path[0] when this runs as a script: embed.py's machine_info.
from embed import machine_info, write_record
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Scope

from keeper_serve import ingress

TOKEN = "t" * 43
BODY = json.dumps({"images": [{"b64": "x" * 64}]}).encode()
VECTOR = [0.01 * i for i in range(512)]


class _Record:
    """Stands in for Ray's Counter and Histogram: keeps each call's tags."""

    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.tags.append(dict(tags or {}))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.tags.append(dict(tags or {}))


class _Front:
    """What the middleware needs of a ``KeeperIngress``: the token check and two metrics."""

    def __init__(self) -> None:
        self.requests, self.latency = _Record(), _Record()
        self.open_to = None  # a token is required, as in production

    def _authorised(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), TOKEN)


def make_app(kind: str) -> FastAPI:
    """The route, with the middleware ``kind``: none, base (the former) or asgi (keeper's)."""
    app = FastAPI()

    @app.post("/v1/embed")
    async def embed(request: Request) -> dict[str, Any]:
        body = json.loads(await request.body())
        return {"model": "m", "n": len(body["images"]), "image_embeddings": [VECTOR]}

    if kind == "base":

        @app.middleware("http")
        async def auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
            front = ingress._ingress()
            t0 = time.perf_counter()
            response = ingress._refusal(front, request) or await call_next(request)
            if front is not None:
                route = ingress._route_label(request.url.path)
                front.requests.inc(tags={"route": route, "status": str(response.status_code)})
                front.latency.observe((time.perf_counter() - t0) * 1000, tags={"route": route})
            return response

    elif kind == "asgi":
        app.add_middleware(ingress._AuthAndMetrics)
    return app


def scope() -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/embed",
        "raw_path": b"/v1/embed",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"authorization", f"Bearer {TOKEN}".encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def one_request(app: ASGIApp) -> int:
    """One request through ``app``; the response's status (and its body must be JSON)."""
    sent = False
    status, chunks = 0, []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)  # a disconnect never comes while the app runs
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope(), receive, send)
    json.loads(b"".join(chunks))
    return status


async def serve_n(app: ASGIApp, n: int) -> float:
    """Seconds for ``n`` requests, one after another."""
    t0 = time.perf_counter()
    for _ in range(n):
        if await one_request(app) != 200:
            raise RuntimeError("the app did not answer 200")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/asgi-middleware.json"))
    a = p.parse_args(argv)
    kinds = ("none", "base", "asgi")
    fronts = {k: _Front() for k in kinds}
    apps = {k: make_app(k) for k in kinds}
    loop = asyncio.new_event_loop()

    def run(kind: str, n: int) -> float:
        ingress._ingress = lambda: fronts[kind]  # this variant's stand-in KeeperIngress
        return loop.run_until_complete(serve_n(apps[kind], n))

    for k in kinds:  # warm-up: routes compiled, middleware stacks built
        run(k, 200)
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.repeats):
        for k in kinds:
            runs[k].append(run(k, a.requests))
    loop.close()
    want = [{"route": "/v1/embed", "status": "200"}] * (200 + a.repeats * a.requests)
    for k in ("base", "asgi"):  # each middleware counted every request, with its status
        if fronts[k].requests.tags != want:
            raise RuntimeError(f"{k}: the middleware counted {len(fronts[k].requests.tags)}")
    us = {k: 1e6 * min(v) / a.requests for k, v in runs.items()}
    table = [
        "| middleware | us a request (best of repeats) | over no middleware | vs BaseHTTPMiddleware |",
        "| --- | ---: | ---: | ---: |",
    ]
    names = {"none": "none", "base": "BaseHTTPMiddleware (former)", "asgi": "plain ASGI (keeper's)"}
    for k in kinds:
        table.append(
            f"| {names[k]} | {us[k]:.1f} | {us[k] - us['none']:+.1f} us | {us[k] / us['base']:.2f} |"
        )
    print("\n".join(table))
    report = {
        "command": " ".join(["benchmarks/asgi_middleware.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "versions": {"fastapi": fastapi.__version__, "starlette": starlette.__version__},
        "requests": a.requests,
        "repeats": a.repeats,
        "seconds": runs,
        "us_per_request": us,
        "saved_us_per_request": us["base"] - us["asgi"],
    }
    write_record(a.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
