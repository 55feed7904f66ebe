"""An open API (``auth.insecure_local``) bound to 0.0.0.0, as ``serve deploy`` could run it: over
real HTTP through Serve's proxy it answers 127.0.0.1 and refuses this machine's own non-loopback
address (403, keeper's JSON error).

Only ``KeeperIngress`` is deployed (no encoder or ranker: the routes called need none), on the
session's Ray, then Serve is stopped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port

pytestmark = pytest.mark.integration

SPEC = "keeper-tiny:random"
APP = "keeper-open-loopback"


def lan_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        found += [
            str(a[4][0]) for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        ]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # UDP: nothing is sent; the source of the default route
        found.append(s.getsockname()[0])
    return next((a for a in found if not ipaddress.ip_address(a).is_loopback), None)


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def lan() -> str:
    """This machine's non-loopback IPv4 address; skips (before any Serve starts) without one."""
    address = lan_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    return address


@pytest.fixture(scope="module")
def open_port(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of an open KeeperIngress behind Serve's proxy on 0.0.0.0 (stopped after)."""
    from ray import serve

    from keeper_core.models import preprocess_config
    from keeper_serve import local
    from keeper_serve.config import INGRESS, KeeperAppArgs
    from keeper_serve.ingress import KeeperIngress

    data: Path = tmp_path_factory.mktemp("open-loopback")
    args = KeeperAppArgs(
        clip_model=SPEC,
        data_dir=str(data),
        ranker={"model_uri": None},
        auth={"insecure_local": True},
    )
    port = free_port()
    # Serve's HTTP options are fixed while it runs: a Serve of its own, on every interface (the
    # next module's shared_serve starts the shared one again).
    serve.shutdown()
    serve.start(http_options={"host": "0.0.0.0", "port": port})
    try:
        ingress = KeeperIngress.options(name=INGRESS, ray_actor_options={"num_cpus": 0.25})
        serve.run(
            ingress.bind(None, None, None, args, preprocess=preprocess_config(SPEC)),
            name=APP,
            route_prefix="/",
            blocking=False,
        )
        local.wait_healthy(
            f"http://127.0.0.1:{port}", 120, failed=lambda: local.deploy_failure(APP)
        )
        yield port
    finally:
        serve.shutdown()


def test_open_api_on_all_interfaces_answers_loopback_only(lan: str, open_port: int) -> None:
    status, doc = get(f"http://127.0.0.1:{open_port}/openapi.json")
    assert status == 200, doc
    assert "/v1/rank" in doc["paths"]

    status, body = get(f"http://{lan}:{open_port}/openapi.json")
    assert status == 403, body
    assert body["error"]["code"] == "open_api_loopback_only"
    assert "loopback clients only" in body["error"]["message"]
    assert get(f"http://{lan}:{open_port}/healthz") == (200, {"status": "ok"})  # public
