"""``POST /v1/feedback`` and the offers log over real HTTP: the app with ``feedback`` configured
(a local root, ``max_age_s`` 3 s, a timer every second), on the session's local Ray.

Sync events are on disk when the answer says durable; async ones are written by the replica's
timer; an ``event_id`` sent twice counts once; auth and the JSON errors; ``/v1/pick`` and
``/v1/select`` answers carry a ``request_id`` and log one offer row per image, which a feedback
event joins on (request_id, image_id); the documented examples; and last, the ingress replica is
killed right after sync writes: every event an answer called durable is on disk, and the new
replica answers; then the app is deleted with an event buffered, and the replica's graceful
shutdown writes it. (``/v1/rank`` needs a registered ranker: its request_id is checked in
test_serve.py, whose app has one.)
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image
from support import small_app_overrides
from test_serve import TOKEN, Reply, call, check_examples, section_examples, wait_until

from keeper_core import storage
from keeper_core.errors import StorageError
from keeper_core.feedback import read_feedback, read_offers
from keeper_core.quality import FEATURE_NAMES
from keeper_core.synthetic import PHOTOS, load_photos

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
SPEC = "keeper-tiny:random"
MAX_EVENTS = 5
MAX_AGE_S = 3.0  # long enough that only the shutdown writes what the last test buffers
REPO = Path(__file__).resolve().parents[2]


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.resize((96, 72)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [jpeg(im) for im in load_photos(PHOTOS[:5]).values()]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("feedback") / "root")


@pytest.fixture(scope="module")
def app(
    shared_serve: int, ray_cluster: str, root: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from keeper_serve import local

    d = tmp_path_factory.mktemp("feedback-serve")
    (d / "token").write_text(TOKEN)
    overrides = small_app_overrides(
        d,
        SPEC,
        **{
            "feedback": {"root": root, "max_age_s": MAX_AGE_S, "max_events": MAX_EVENTS},
        },
    )
    url = local.start(overrides=overrides, port=shared_serve, wait_s=240)
    try:
        yield url
    finally:
        local.shutdown()


def post(
    url: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    ctype: str = "application/json",
) -> Reply:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    h = {"Content-Type": ctype, **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, body=raw if raw is not None else json.dumps(body), headers=h)
        r = conn.getresponse()
        text = r.read()
        try:
            parsed = json.loads(text) if text else {}
        except json.JSONDecodeError:
            parsed = {"_text": text.decode(errors="replace")}
        return Reply(r.status, parsed, {k.lower(): v for k, v in r.getheaders()})
    finally:
        conn.close()


def event(request_id: str, image_id: str, action: str = "accepted", **kw: Any) -> dict[str, Any]:
    return {"request_id": request_id, "image_id": image_id, "action": action, **kw}


def events_of(root: str, request_prefix: str) -> list[dict[str, Any]]:
    """The feedback rows on disk whose request_id starts with ``request_prefix``."""
    try:
        rows = read_feedback(storage.join(root, "events")).to_pylist()
    except StorageError:  # nothing written yet
        return []
    return [r for r in rows if r["request_id"].startswith(request_prefix)]


def offers_of(root: str, request_id: str) -> list[dict[str, Any]]:
    try:
        t = read_offers(storage.join(root, "offers"))
    except StorageError:
        return []
    return sorted(
        (r for r in t.to_pylist() if r["request_id"] == request_id), key=lambda r: r["position"]
    )


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


FIELDS = ("request_id", "image_id", "action", "group_id", "client")


# ----------------------------------------------------------------------------- tests


def test_auth_and_json_errors(app: str, root: str) -> None:
    ok = {"events": [event("r-1", "i-1")]}
    for token in (None, "wrong-token-" + "y" * 20):
        r = post(app, "/v1/feedback", ok, token=token)
        assert (r.status, r.body["error"]["code"]) == (401, "unauthorized"), r.body
        assert r.headers["www-authenticate"] == "Bearer"
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"events": [event("r-1", "i-1", "loved")]}, 422, "invalid_request", "events.0.action"),
        ({"events": []}, 422, "invalid_request", "events"),
        ({"events": [{"request_id": "r-1", "action": "accepted"}]}, 422, "invalid_request", "image_id"),
        ({"events": [event("r-1", "i-1", colour="red")]}, 422, "invalid_request", "colour"),
        ({**ok, "sync": "later"}, 422, "invalid_request", "sync"),
        ({"events": [event("r", "i")] * (MAX_EVENTS + 1)}, 400, "too_many_events", f"{MAX_EVENTS}"),
    ]  # fmt: skip
    for body, status, code, words in cases:
        r = post(app, "/v1/feedback", body)
        assert (r.status, r.body["error"]["code"]) == (status, code), (body, r.body)
        assert words in r.body["error"]["message"], (body, r.body)
    r = post(app, "/v1/feedback", raw=b"{not json")
    assert (r.status, r.body["error"]["code"]) == (422, "invalid_json"), r.body
    r = post(app, "/v1/feedback", raw=b"x=1", ctype="multipart/form-data; boundary=x")
    assert (r.status, r.body["error"]["code"]) == (415, "unsupported_media_type"), r.body
    r = post(app, "/v1/feedback", ok, headers={"X-Keeper-Client": "c" * 257})
    assert (r.status, r.body["error"]["code"]) == (400, "invalid_client"), r.body
    time.sleep(MAX_AGE_S + 1)  # a timer's write, were anything buffered
    assert events_of(root, "r") == []  # nothing refused was kept


def test_sync_events_are_on_disk_when_the_answer_says_durable(app: str, root: str) -> None:
    sent = [
        event("sync-1", "img-a", "accepted", group_id="burst-7"),
        event("sync-1", "img-b", "rejected", group_id="burst-7", client="reviewer-2"),
        event("sync-1", "img-a", "undone"),
    ]
    r = post(
        app, "/v1/feedback", {"events": sent, "sync": True}, headers={"X-Keeper-Client": "app-9"}
    )
    assert r.status == 200, r.body
    assert (r.body["accepted"], r.body["durable"], r.body["last_error"]) == (3, True, None)
    assert r.body["pending"] == 0, r.body
    assert r.body["writer"].startswith("ingress-"), r.body
    got = [{k: row[k] for k in FIELDS} for row in events_of(root, "sync-")]
    # The header names the client of the events that do not name one.
    want = [{"group_id": None, "client": "app-9", **e} for e in sent]
    want[1]["client"] = "reviewer-2"
    assert got == want
    assert {row["writer"] for row in events_of(root, "sync-")} == {r.body["writer"]}


def test_async_events_are_written_by_the_timer(app: str, root: str) -> None:
    sent = [event("async-1", f"img-{i}", "picked-as-keeper") for i in range(3)]
    r = post(app, "/v1/feedback", {"events": sent})
    assert r.status == 200, r.body
    assert (r.body["accepted"], r.body["durable"]) == (3, False), r.body
    assert r.body["pending"] >= 3
    t0 = time.monotonic()
    wait_until(lambda: len(events_of(root, "async-")) == 3, 15, "the timer's write")
    assert time.monotonic() - t0 < MAX_AGE_S + 10
    assert [row["image_id"] for row in events_of(root, "async-")] == ["img-0", "img-1", "img-2"]


def test_a_resent_event_with_an_event_id_counts_once(app: str, root: str) -> None:
    e = event("resend-1", "img-a", event_id="client-evt-42")
    for _ in range(2):  # the first answer "lost": the client sends it again
        r = post(app, "/v1/feedback", {"events": [e], "sync": True})
        assert (r.status, r.body["durable"]) == (200, True), r.body
    rows = events_of(root, "resend-")
    assert [(row["event_id"], row["image_id"]) for row in rows] == [("client-evt-42", "img-a")]


def _check_offers(rows: list[dict[str, Any]], n: int, route: str, dim: int, client: str) -> None:
    assert len(rows) == n, rows
    assert [r["position"] for r in rows] == list(range(n))
    assert {(r["route"], r["client"], r["model_spec"]) for r in rows} == {(route, client, SPEC)}
    by_group: dict[str, list[int]] = {}
    for r in rows:
        by_group.setdefault(r["group_id"], []).append(r["rank"])
        assert r["group_size"] == sum(x["group_id"] == r["group_id"] for x in rows)
        assert len(r["embedding"]) == dim
        assert abs(sum(x * x for x in r["embedding"]) - 1) < 1e-3
    for ranks in by_group.values():
        assert sorted(ranks) == list(range(len(ranks))), by_group


def test_pick_and_select_answers_log_their_offers(app: str, root: str, photos: list[bytes]) -> None:
    dim = call(app, "GET", "/v1/models").body["clip"]["embed_dim"]
    client = {"X-Keeper-Client": "photo-app-user-17"}

    # /v1/pick: a burst of three (times 0.3 s apart, time only) and a shot a minute later.
    times = [1714550400.0, 1714550400.3, 1714550400.6, 1714550460.0]
    images = [
        {**b64(p), "capture_time": t, "camera": "phone"}
        for p, t in zip(photos, times, strict=False)
    ]
    r = post(app, "/v1/pick", {"images": images, "min_similarity": -1}, headers=client)
    assert r.status == 200, r.body
    pick_id = r.body["request_id"]
    assert re.fullmatch("[0-9a-f]{32}", pick_id), pick_id
    assert r.body["ranker"]["kind"] == "zero-shot"
    wait_until(lambda: len(offers_of(root, pick_id)) == 4, 15, "the pick's offers")
    rows = offers_of(root, pick_id)
    _check_offers(rows, 4, "pick", dim, "photo-app-user-17")
    assert [r["image_id"] for r in rows] == [hashlib.sha256(p).hexdigest() for p in photos[:4]]
    answer = r.body["images"]
    assert [row["offered"] for row in rows] == [im["decision"] for im in answer]
    assert [row["rank"] for row in rows] == [im["rank"] - 1 for im in answer]
    assert [row["group_id"] for row in rows] == [im["group"] for im in answer]
    assert sorted(row["group_size"] for row in rows) == [1, 3, 3, 3]
    assert rows[0]["model"] == r.body["ranker"]["label"]
    assert all(len(row["quality"]) == len(FEATURE_NAMES) for row in rows)
    assert all(row["image_uri"] is None for row in rows)

    # /v1/select with images: one group, the query; the picks first.
    body = {"positive": ["a cat"], "images": [b64(p) for p in photos], "top_n": 3, "top_k": 2}
    r = post(app, "/v1/select", {**body, "dedup_threshold": None}, headers=client)
    assert r.status == 200, r.body
    select_id = r.body["request_id"]
    assert re.fullmatch("[0-9a-f]{32}", select_id), select_id
    assert select_id != pick_id
    wait_until(lambda: len(offers_of(root, select_id)) == 5, 15, "the select's offers")
    rows = offers_of(root, select_id)
    _check_offers(rows, 5, "select", dim, "photo-app-user-17")
    assert {row["group_id"] for row in rows} == {"a cat"}
    picks = r.body["picks"]
    assert [rows[i]["rank"] for i in picks] == list(range(len(picks)))
    assert [row["offered"] for row in rows] == [
        "pick" if i in picks else "candidate" for i in range(5)
    ]
    assert rows[0]["model"] == "aesthetic-rerank"  # this app has no VLM

    # A decision on an offered image joins its offer row.
    offered = offers_of(root, pick_id)[1]
    fb = event(pick_id, offered["image_id"], "rejected", group_id=offered["group_id"])
    r = post(app, "/v1/feedback", {"events": [fb], "sync": True}, headers=client)
    assert (r.status, r.body["durable"]) == (200, True), r.body
    events = read_feedback(storage.join(root, "events"))
    offers = read_offers(storage.join(root, "offers")).select(
        ["request_id", "image_id", "offered", "rank"]
    )
    joined = events.join(offers, ["request_id", "image_id"], right_suffix="_offer")
    joined = joined.filter(pa.compute.equal(joined.column("request_id"), pick_id))
    assert joined.num_rows == 1
    row = joined.to_pylist()[0]
    assert (row["action"], row["offered"], row["client"]) == (
        "rejected", offered["offered"], "photo-app-user-17",
    )  # fmt: skip


def test_documented_feedback_examples_run(app: str, tmp_path: Path) -> None:
    """docs/http-api.md's ``/v1/feedback`` examples (```shell blocks) with their statuses and
    response shapes."""
    examples = section_examples("### `POST /v1/feedback`", "/v1/feedback", end="\n### ")
    assert len(examples) >= 3
    check_examples(app, examples, tmp_path)


def _ingress_replicas() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::keeper#KeeperIngress#")
    }


def test_what_the_answers_called_durable_survives_a_killed_replica(app: str, root: str) -> None:
    """It replaces the ingress replica (next to last in the module)."""
    import ray

    promised, writers = 0, set()
    for i in range(4):
        batch = [event(f"kill-{i}", f"img-{j}", "accepted") for j in range(MAX_EVENTS)]
        r = post(app, "/v1/feedback", {"events": batch, "sync": True})
        assert r.status == 200, r.body
        promised += r.body["accepted"] if r.body["durable"] else 0
        writers.add(r.body["writer"])
    # Not durable when answered: these may be lost with the replica (the answer said so).
    r = post(app, "/v1/feedback", {"events": [event("lost-0", "img-0")]})
    assert (r.status, r.body["durable"]) == (200, False), r.body
    (victim,) = _ingress_replicas()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    assert promised == 4 * MAX_EVENTS
    assert len(events_of(root, "kill-")) == promised  # exactly what the answers promised
    assert len(events_of(root, "lost-")) <= 1

    def answers_again() -> bool:
        reply = post(app, "/v1/feedback", {"events": [event("after-0", "img-0")], "sync": True})
        return reply.status == 200 and reply.body["writer"] not in writers

    wait_until(answers_again, 120, "a new ingress replica answering")
    assert victim not in _ingress_replicas()
    assert len(events_of(root, "kill-")) == promised
    assert len(events_of(root, "after-")) >= 1


def test_a_graceful_shutdown_writes_what_is_buffered(app: str, root: str) -> None:
    """Last in the module: it deletes the app (the fixture's shutdown then finds none)."""
    from ray import serve

    r = post(app, "/v1/feedback", {"events": [event("graceful-0", "img-0")]})
    assert (r.status, r.body["durable"]) == (200, False), r.body
    serve.delete("keeper")  # Serve calls the ingress's __del__: it writes its buffers
    assert [row["writer"] for row in events_of(root, "graceful-")] == [r.body["writer"]]
