"""An open API (``auth.insecure_local``) answers loopback clients only, wherever it is deployed.

No Ray: the real FastAPI app of ``keeper_serve.ingress`` is called as ASGI with hand-built
scopes (the ``client`` each names is what Serve's proxy passes on), around a real
``KeeperIngress`` instance found through a patched ``serve.get_replica_context``.
"""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import Callable
from typing import Any

import pytest
from serve_fakes import Recorder, ingress_class

from keeper_core.models import PreprocessConfig
from keeper_serve import ingress
from keeper_serve.config import KeeperAppArgs
from keeper_serve.local import HAPROXY_FLAG

SPEC = "keeper-tiny:random"
TOKEN = "open-api-test-token-" + "x" * 20
CODE = "open_api_loopback_only"
#: Given, as the app's builder gives it: the instance then never imports open_clip.
PREPROCESS = PreprocessConfig(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

Front = Any  # the KeeperIngress class itself, under Serve's wrapper


@pytest.fixture
def build(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Front]:
    """``build(open=True)`` -> this replica's KeeperIngress (no handles: no route here uses one)."""
    import ray.serve

    monkeypatch.delenv(HAPROXY_FLAG, raising=False)
    monkeypatch.setenv("KEEPER_API_TOKEN", TOKEN)

    def make(*, open: bool = True) -> Front:
        args = KeeperAppArgs(
            clip_model=SPEC, auth={"insecure_local": open}, ranker={"model_uri": None}
        )
        inst = ingress_class()(None, None, None, args, preprocess=PREPROCESS)
        inst.requests, inst.latency = Recorder(), Recorder()
        monkeypatch.setattr(
            ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=inst)
        )
        return inst

    return make


def call(
    path: str,
    client: Any = ("127.0.0.1", 50000),
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, Any]]:
    """One request to the app as ASGI; ``client=...``: a scope without the key at all."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "server": ("127.0.0.1", 8000),
    }
    if client is not ...:
        scope["client"] = client
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(ingress.app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(data) if data.startswith((b"{", b"[")) else {"_text": data}


def refused(message: str = ingress.OPEN_REFUSALS["loopback"]) -> tuple[int, dict[str, Any]]:
    return 403, {"error": {"code": CODE, "message": message}}


LOOPBACK = [
    ("127.0.0.1", 50000),
    ("127.8.9.10", 1),  # all of 127.0.0.0/8
    ("::1", 50000),
    ("::ffff:127.0.0.1", 50000),  # IPv4-mapped, as a dual-stack socket reports IPv4 loopback
    ("::ffff:7f00:2", 50000),
    ["127.0.0.1", 50000],  # a list, as a scope that went through JSON would carry it
]
NOT_LOOPBACK = [
    ("192.0.2.2", 50000),
    ("10.0.0.1", 50000),
    ("0.0.0.0", 50000),
    ("::", 50000),
    ("2001:db8::1", 50000),
    ("::ffff:192.0.2.2", 50000),
    ("fe80::1%eth0", 50000),
    ("localhost", 50000),  # a name, not an address: never trusted
    ("testclient", 50000),  # Starlette's TestClient
    ("", 0),
    ("/run/keeper.sock", None),
    (),
    None,  # the server did not say: fail closed
    ...,  # no "client" key at all
]


@pytest.mark.parametrize("client", LOOPBACK, ids=repr)
def test_open_api_answers_loopback_clients(build: Callable[..., Front], client: Any) -> None:
    build()
    status, doc = call("/openapi.json", client)
    assert status == 200, doc
    assert "/v1/rank" in doc["paths"]
    assert call("/nowhere", client)[1]["error"]["code"] == "not_found"  # through to the app


@pytest.mark.parametrize("client", NOT_LOOPBACK, ids=repr)
def test_open_api_refuses_every_other_client(build: Callable[..., Front], client: Any) -> None:
    """Before: an open API served whoever reached its port (here: 200 and the OpenAPI doc)."""
    build()
    for path in ("/openapi.json", "/docs", "/v1/models", "/nowhere"):
        assert call(path, client) == refused(), path
    # Refused before the body is read or any handle called (there are none here).
    embed = call("/v1/embed", client, method="POST", body=b'{"texts": ["a"]}')
    assert embed == refused()


@pytest.mark.parametrize(
    ("host", "origin", "answered"),
    [
        ("127.0.0.1:8000", None, True),
        ("localhost:8000", "http://localhost:8000", True),
        ("LOCALHOST.", None, True),
        ("[::1]:8000", "http://[::1]:8000", True),
        ("app.localhost:8000", None, True),
        ("127.0.0.1:8000", "null", False),  # a sandboxed frame of any page: a cross-site post
        # DNS rebinding: a page on the attacker's name, once it resolves to 127.0.0.1, sends
        # its requests from the developer's own browser, on loopback (they were answered).
        ("rebind.attacker.example:8000", "http://rebind.attacker.example:8000", False),
        ("rebind.attacker.example:8000", None, False),
        ("127.0.0.1.nip.io:8000", None, False),
        ("localhost.attacker.example", None, False),
        ("127.0.0.1:8000", "http://attacker.example", False),  # a cross-site form post
        ("127.0.0.1:8000", "https://127.0.0.1.attacker.example", False),
    ],
)
def test_open_api_answers_only_requests_naming_this_machine(
    build: Callable[..., Front], host: str, origin: str | None, answered: bool
) -> None:
    build()
    headers = {"Host": host, **({"Origin": origin} if origin else {})}
    status, doc = call("/openapi.json", ("127.0.0.1", 50000), headers=headers)
    assert (status == 200) == answered, doc
    if not answered:
        assert (status, doc) == refused()


def test_refusal_is_json_counted_and_leaves_the_public_routes_open(
    build: Callable[..., Front],
) -> None:
    front = build()
    stranger = ("192.0.2.2", 41000)
    assert call("/healthz", stranger) == (200, {"status": "ok"})
    assert call("/ui", stranger)[0] == 200  # the page's files hold no data
    assert call("/openapi.json", stranger)[0] == 403
    assert {"route": "/openapi.json", "status": "403"} in front.requests.tags
    assert {"route": "/healthz", "status": "200"} in front.requests.tags


def test_a_token_changes_nothing_when_open(
    build: Callable[..., Front],
) -> None:
    build()
    auth = {"Authorization": f"Bearer {TOKEN}"}  # open: there is no token to match
    assert call("/openapi.json", ("192.0.2.2", 1), headers=auth) == refused()
    assert call("/openapi.json", ("127.0.0.1", 1), headers=auth)[0] == 200


def test_with_a_token_the_client_address_does_not_matter(build: Callable[..., Front]) -> None:
    front = build(open=False)
    assert front.open_to is None
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for client in (("192.0.2.2", 1), ("127.0.0.1", 1), None):
        assert call("/openapi.json", client, headers=auth)[0] == 200
        status, body = call("/openapi.json", client)
        assert (status, body["error"]["code"]) == (401, "unauthorized")


# ------------------------------------------------------------------------- under HAProxy

HOSTS = [
    ("127.0.0.1", "loopback"),
    ("127.0.0.2", "loopback"),
    ("::1", "loopback"),
    ("localhost", "loopback"),
    ("0.0.0.0", "nobody"),
    ("::", "nobody"),
    ("192.0.2.2", "nobody"),
    ("node.example", "nobody"),
    (None, "nobody"),  # the host could not be read: fail closed
]


def under_haproxy(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """RAY_SERVE_ENABLE_HA_PROXY set, and Serve's controller says its HTTP options bind ``host``.

    Patched where ``_serve_http_host`` looks (Ray), not the function: ``@serve.ingress`` froze
    the class's methods with a copy of the module's globals.
    """
    import ray
    import ray.serve.context

    monkeypatch.setenv(HAPROXY_FLAG, "1")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    client = types.SimpleNamespace(http_config=types.SimpleNamespace(host=host))
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **kw: client)


@pytest.mark.parametrize(("host", "whom"), HOSTS)
def test_under_haproxy_only_a_loopback_http_host_keeps_clients_local(
    host: str | None, whom: str
) -> None:
    assert ingress.open_to_whom(True, lambda: host) == whom


def test_without_haproxy_the_http_host_is_not_asked() -> None:
    def ask() -> str:
        raise AssertionError("asked for the HTTP host")

    assert ingress.open_to_whom(False, ask) == "loopback"


def test_under_haproxy_on_a_public_host_no_client_is_answered(
    build: Callable[..., Front], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HAProxy connects to the replica from loopback for every client, and X-Forwarded-For is
    the client's to write: a loopback address proves nothing there."""
    under_haproxy(monkeypatch, "0.0.0.0")
    front = build()
    assert front.open_to == "nobody"
    nobody = refused(ingress.OPEN_REFUSALS["nobody"])
    assert call("/openapi.json", ("127.0.0.1", 30000)) == nobody
    assert (
        call("/openapi.json", ("127.0.0.1", 0), headers={"X-Forwarded-For": "127.0.0.1"}) == nobody
    )
    assert call("/healthz", ("127.0.0.1", 30000)) == (200, {"status": "ok"})


def test_under_haproxy_on_loopback_local_clients_are_answered(
    build: Callable[..., Front], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``keeper serve --haproxy --insecure-local`` runs it: every entry point binds loopback."""
    under_haproxy(monkeypatch, "127.0.0.1")
    build()
    assert call("/openapi.json", ("127.0.0.1", 30000))[0] == 200
    assert call("/openapi.json", ("192.0.2.2", 30000)) == refused()


def test_an_unreadable_http_host_under_haproxy_answers_no_one(
    build: Callable[..., Front], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.serve.context

    under_haproxy(monkeypatch, "127.0.0.1")

    def lost(**kw: Any) -> Any:
        raise RuntimeError("the controller is gone")

    monkeypatch.setattr(ray.serve.context, "_get_global_client", lost)
    assert build().open_to == "nobody"


def test_the_http_host_is_unknown_outside_ray() -> None:
    import ray

    assert not ray.is_initialized()
    assert ingress._serve_http_host() is None
    assert not ray.is_initialized()  # asking started no Ray
