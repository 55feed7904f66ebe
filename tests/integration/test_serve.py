"""keeper's Serve app over real HTTP on the session's local Ray, with a real `mlflow server`.

One app for the module (ingress, encoder, ranker, a tiny random VLM), deployed from the packaged Serve config
with test overrides: small CPU shares so it fits 2 cores, a 1 s registry poll, an encoder that
autoscales 1 -> 2 quickly. The registry holds two rankers trained on an embedded corpus: v1
(deliberately bad, @champion at the start) and v2 (trained, @challenger), so ``keeper promote``
moves the alias mid-test.

``/v1/pick`` is sent the corpus's JPEGs with EXIF capture times spliced in (the pixels are the
embedded files' own), so its picks can be compared with ``cull`` run offline on the embedding
table's rows.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import itertools
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import negated, register_ranker
from support import jpeg_with_scans, png_declaring
from support_photos import camera_exif

from keeper_core import storage
from keeper_core.capture import capture_row, read_capture
from keeper_core.culling import cull
from keeper_core.grouping import dhash
from keeper_core.images import decode_image
from keeper_core.picking import ZERO_SHOT_RULE
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import SeriesRanker
from keeper_core.synthetic import generate_corpus
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_train.data import join_series
from keeper_train.jobs import embed, promote, train_head

pytestmark = pytest.mark.integration

NAME = "keeper-ranker-serve"
TOKEN = "serve-test-token-" + "x" * 24
DOCS_BUCKET, DOCS_KEY = "photos", "2024/a.jpg"  # as docs/http-api.md's examples name them
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Registry:
    manifest: str
    embeddings: str
    uri: str
    rows: pd.DataFrame
    good: SeriesRanker
    bad: SeriesRanker


@pytest.fixture(scope="module")
def registry(
    ray_cluster: str, mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Registry:
    d = tmp_path_factory.mktemp("serve-registry")
    manifest = str(generate_corpus(d / "corpus", n_series=30, seed=5))
    emb = str(d / "emb")
    embed.run(embed.EmbedConfig(input=manifest, output=emb, ray_address=ray_cluster))
    cfg = train_head.TrainHeadConfig(
        embeddings=emb, series=manifest, head="mlp", epochs=30, patience=30, hidden=32
    )
    prepared = train_head.prepare(cfg)
    head, _ = train_head.train_single_process(prepared, cfg, "series-softmax")
    good = SeriesRanker(prepared.ranker_config, head)
    bad = negated(good)  # every series' order reversed: a challenger must beat this
    rows = join_series(emb, manifest)[0]
    v1 = register_ranker(mlflow_server.uri, NAME, bad, rows, d / "bad", "serve-test")
    mlflow.MlflowClient(mlflow_server.uri).set_registered_model_alias(NAME, "champion", v1)
    v2 = register_ranker(mlflow_server.uri, NAME, good, rows, d / "good", "serve-test")
    assert (v1, v2) == ("1", "2")
    return Registry(manifest, emb, mlflow_server.uri, rows, good, bad)


@pytest.fixture(scope="module")
def app(
    shared_serve: int, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from keeper_serve import local

    token_file = tmp_path_factory.mktemp("serve-token") / "token"
    token_file.write_text(TOKEN)
    vlm_dir = build_tiny_vlm(tmp_path_factory.mktemp("serve-vlm") / "tiny-vlm")
    # The bucket and key docs/http-api.md's S3 example names, on the session's moto_server.
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket=DOCS_BUCKET)
    s3.put_object(
        Bucket=DOCS_BUCKET, Key=DOCS_KEY, Body=storage.read_bytes(image_paths(registry)[0])
    )
    enc = "deployments.ClipEncoder."
    overrides = {
        "tracking_uri": registry.uri,
        "ranker.model_uri": f"models:/{NAME}@champion",
        "ranker.poll_s": 1.0,
        "auth.token_file": str(token_file),
        "s3_allow_buckets": [DOCS_BUCKET],
        "limits.max_images": 12,
        "limits.max_series_len": 6,
        "limits.max_request_bytes": 2 * 1024 * 1024,
        "limits.max_image_bytes": 1024 * 1024,
        "limits.max_pick_images": 20,  # above max_images: /v1/pick has its own cap
        "deployments.KeeperIngress.ray_actor_options.num_cpus": 0.25,
        "deployments.KeeperIngress.autoscaling_config.max_replicas": 1,
        "deployments.SeriesRanker.ray_actor_options.num_cpus": 0.25,
        "deployments.SeriesRanker.autoscaling_config.max_replicas": 1,
        "vlm.source": str(vlm_dir),
        "corpus": registry.embeddings,  # /v1/select by image_id
        "deployments.VlmJudge.ray_actor_options.num_cpus": 0.25,
        "deployments.VlmJudge.autoscaling_config.max_replicas": 1,
        enc + "ray_actor_options.num_cpus": 0.5,
        enc + "autoscaling_config.min_replicas": 1,
        enc + "autoscaling_config.max_replicas": 2,
        enc + "autoscaling_config.target_ongoing_requests": 1,
        enc + "autoscaling_config.upscale_delay_s": 1,
        enc + "autoscaling_config.downscale_delay_s": 4,
        enc + "autoscaling_config.metrics_interval_s": 0.5,
        enc + "autoscaling_config.look_back_period_s": 2,
    }
    url = local.start(overrides=overrides, port=shared_serve, wait_s=240)
    try:
        yield url
    finally:
        local.shutdown()


# ----------------------------------------------------------------------------- client


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def call(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = TOKEN,
    raw: bytes | None = None,
    ctype: str = "application/json",
    timeout: float = 60,
) -> Reply:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port.split("/")[0]), timeout=timeout)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = ctype
    try:
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        text = r.read()
        try:
            parsed = json.loads(text) if text else {}
        except json.JSONDecodeError:
            parsed = {"_text": text.decode(errors="replace")}
        return Reply(r.status, parsed, {k.lower(): v for k, v in r.getheaders()})
    finally:
        conn.close()


def b64_of(path: str) -> dict[str, str]:
    return {"b64": base64.b64encode(storage.read_bytes(path)).decode()}


def image_paths(reg: Registry) -> list[str]:
    return [str(u) for u in pd.read_csv(reg.manifest)["image_uri"]]


def series_of(reg: Registry, n: int) -> list[tuple[str, list[str]]]:
    """The first ``n`` series of the corpus: (series_id, image paths in manifest order)."""
    m = pd.read_csv(reg.manifest)
    out = []
    for sid, g in m.groupby("series_id", sort=True):
        out.append((str(sid), [str(u) for u in g["image_uri"]]))
        if len(out) == n:
            break
    return out


def with_exif(
    jpeg: bytes, seconds: float, *, make: str = "Canon", model: str = "Canon EOS R5"
) -> bytes:
    """The JPEG with an APP1 Exif segment as a camera writes it, its pixels untouched.

    DateTimeOriginal + SubSecTimeOriginal (in the Exif IFD) ``seconds`` after 2024-05-01
    10:00:00, Make and Model in IFD0.
    """
    whole, frac = divmod(round(seconds * 100), 100)
    minutes, sec = divmod(whole, 60)
    when = f"2024:05:01 {10 + minutes // 60:02d}:{minutes % 60:02d}:{sec:02d}"
    payload = camera_exif(when, f"{frac:02d}", make=make, model=model).tobytes()
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@dataclass
class Shoot:
    """Corpus photos with EXIF times: ``paths[i]`` is the embedded file ``blobs[i]`` came from."""

    paths: list[str]
    blobs: list[bytes]
    bursts: list[list[int]]  # request indices of each burst, then the single, in time order


def clean_shot(reg: Registry, series: str) -> str:
    """The series' undegraded shot: a single that no absolute check demotes to an alternate."""
    m = pd.read_csv(reg.manifest)
    return str(
        m.loc[(m["series_id"].astype(str) == series) & (m["is_best"] == 1), "image_uri"].iloc[0]
    )


def shoot(reg: Registry, n_bursts: int) -> Shoot:
    """Series 0..n_bursts-1 as bursts (0.4 s apart, 30 s between bursts), then a single an hour
    later: the clean shot of the next series."""
    paths, blobs, bursts = [], [], []
    series = series_of(reg, n_bursts + 1)
    for b, (_, burst) in enumerate(series[:n_bursts]):
        bursts.append(list(range(len(paths), len(paths) + len(burst))))
        for k, p in enumerate(burst):
            paths.append(p)
            blobs.append(with_exif(storage.read_bytes(p), 30 * b + 0.4 * k))
    bursts.append([len(paths)])
    paths.append(clean_shot(reg, series[n_bursts][0]))
    blobs.append(with_exif(storage.read_bytes(paths[-1]), 3600))
    return Shoot(paths, blobs, bursts)


def b64_bytes(data: bytes, **kw: Any) -> dict[str, Any]:
    return {"b64": base64.b64encode(data).decode(), **kw}


def rank_body(reg: Registry, n: int = 2) -> dict[str, Any]:
    return {
        "series": [
            {"id": sid, "images": [b64_of(p) for p in paths]} for sid, paths in series_of(reg, n)
        ]
    }


class Load:
    """Closed-loop clients calling ``fn`` until stopped; every outcome recorded with the time
    it came back, its status, its body and the time its request was sent."""

    def __init__(self, fn: Callable[[], Reply], clients: int) -> None:
        self.fn, self.stop = fn, threading.Event()
        self.results: list[tuple[float, int, dict[str, Any], float]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                r = self.fn()
                item = (time.monotonic(), r.status, r.body, sent)
            except (OSError, http.client.HTTPException) as e:
                error = {"error": {"code": "transport", "message": str(e)}}
                item = (time.monotonic(), -1, error, sent)
            with self._lock:
                self.results.append(item)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def snapshot(self) -> list[tuple[float, int, dict[str, Any], float]]:
        with self._lock:
            return list(self.results)


def replicas(deployment: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications["keeper"].deployments[deployment]
    return {str(k): int(v) for k, v in status.replica_states.items()}


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------- tests


def test_every_route_needs_the_token_but_healthz(app: str, registry: Registry) -> None:
    img = b64_of(series_of(registry, 1)[0][1][0])
    routes: list[tuple[str, str, Any]] = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/embed", {"images": [img], "texts": ["a photo"]}),
        ("POST", "/v1/score/aesthetic", {"images": [img]}),
        ("POST", "/v1/score/relevance", {"positive": ["a photo"], "images": [img]}),
        ("POST", "/v1/rank", rank_body(registry, 1)),
        ("POST", "/v1/pick", {"images": [img, img]}),
        ("GET", "/openapi.json", None),
        ("GET", "/docs", None),
    ]
    for method, path, body in routes:
        for bad in (None, "wrong-token-" + "y" * 20, ""):
            r = call(app, method, path, body, token=bad)
            assert r.status == 401, (path, bad, r)
            assert r.body["error"]["code"] == "unauthorized"
            assert r.headers.get("www-authenticate") == "Bearer"
        ok = call(app, method, path, body)
        assert ok.status == 200, (path, ok.body)
    assert call(app, "GET", "/healthz", token=None).body == {"status": "ok"}

    models = call(app, "GET", "/v1/models").body
    assert models["clip"]["spec"] == "keeper-tiny:random"
    assert models["clip"]["random_weights"] is True
    assert models["ranker"]["status"] == "ready"
    assert models["ranker"]["name"] == NAME
    assert models["ranker"]["alias"] == "champion"
    openapi = call(app, "GET", "/openapi.json").body
    assert {
        "/v1/embed",
        "/v1/rank",
        "/v1/pick",
        "/v1/score/aesthetic",
        "/v1/score/relevance",
    } <= set(openapi["paths"])


def test_optional_routes_answer_404_when_not_configured(app: str) -> None:
    """This app sets neither ``search``, ``references``, ``feedback`` nor ``review``: their routes
    say so, as JSON."""
    r = call(app, "POST", "/v1/search", {"text": "a cat", "k": 2})
    assert (r.status, r.body["error"]["code"]) == (404, "search_not_configured")
    for method, path, body in [
        ("POST", "/v1/compare", {"image": {"b64": "x"}, "collection": "p"}),
        ("GET", "/v1/references", None),
    ]:
        r = call(app, method, path, body)
        assert (r.status, r.body["error"]["code"]) == (404, "references_not_configured"), path
    assert call(app, "POST", "/v1/compare", {"collection": "p"}, token=None).status == 401
    # Refused before the body is parsed: an invalid body gets the same answer.
    for body in ({"events": [{"request_id": "r", "image_id": "i", "action": "accepted"}]}, {}):
        r = call(app, "POST", "/v1/feedback", body)
        assert (r.status, r.body["error"]["code"]) == (404, "feedback_not_configured"), r.body
    assert call(app, "POST", "/v1/feedback", {}, token=None).status == 401
    # No review runs: the page loads (it holds no data), lists none, and a run name is unknown.
    runs = call(app, "GET", "/v1/review/runs").body
    assert runs["runs"] == []
    assert runs["select"]["search"] is False
    assert isinstance(runs["select"]["corpus_images"], int)  # this app has a corpus
    r = call(app, "GET", "/v1/review/corpus/thumbs/abc")
    assert (r.status, r.body["error"]["code"]) == (404, "unknown_image")
    r = call(app, "GET", "/v1/review/runs/demo/groups")
    assert (r.status, r.body["error"]["code"]) == (404, "unknown_run")
    assert call(app, "GET", "/v1/review/runs", token=None).status == 401
    page = call(app, "GET", "/ui", token=None)
    assert page.status == 200, page
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_rank_over_http_matches_the_batch_ranker(app: str, registry: Registry) -> None:
    """Served features (decode, resize, quality) equal the embed job's: same scores."""
    champion = call(app, "GET", "/v1/models").body["ranker"]["version"]
    ranker = registry.bad if champion == "1" else registry.good
    body = rank_body(registry, 3)
    r = call(app, "POST", "/v1/rank", body)
    assert r.status == 200, r
    assert re.fullmatch("[0-9a-f]{32}", r.body["request_id"]), r.body["request_id"]
    assert call(app, "POST", "/v1/rank", body).body["request_id"] != r.body["request_id"]
    assert r.body["model"]["version"] == champion
    assert r.body["model"]["name"] == NAME
    offline = ranker.rank(registry.rows)
    offline["series_id"] = registry.rows["series_id"].astype(str).to_numpy()
    for s in r.body["series"]:
        want = offline[offline["series_id"] == s["id"]]
        np.testing.assert_allclose(s["scores"], want["score"].to_numpy(), atol=1e-4)
        np.testing.assert_allclose(s["probabilities"], want["prob"].to_numpy(), atol=1e-5)
        assert s["keeper_index"] == int(np.argmax(want["score"].to_numpy()))
        assert abs(sum(s["probabilities"]) - 1) < 1e-5


def test_encoder_skips_the_batch_wait_when_idle_and_batches_when_busy(app: str) -> None:
    """A lone call runs at once; concurrent calls share forwards; answers stay each caller's."""
    from ray import serve

    assert replicas("ClipEncoder") == {"RUNNING": 1}, "the stats below are one replica's"
    handle = serve.get_deployment_handle("ClipEncoder", app_name="keeper")
    rng = np.random.default_rng(5)
    px = [rng.integers(0, 255, (2, 3, 64, 64), dtype=np.uint8) for _ in range(12)]
    before = handle.batching_stats.remote().result(timeout_s=30)
    lone = [handle.embed_pixels.remote(p).result(timeout_s=60) for p in px[:3]]
    mid = handle.batching_stats.remote().result(timeout_s=30)
    assert mid["unbatched_calls"] - before["unbatched_calls"] == 3
    assert mid["forwards"] - before["forwards"] == 3
    assert mid["forward_s"] > before["forward_s"]
    burst = [handle.embed_pixels.remote(p) for p in px]
    together = [r.result(timeout_s=120) for r in burst]
    after = handle.batching_stats.remote().result(timeout_s=30)
    assert after["calls"] - mid["calls"] == 12
    assert after["forwards"] - mid["forwards"] < 12  # some calls shared a forward
    for a, b in zip(lone, together[:3], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # the same images, alone or batched
    assert len({round(float(t[0, 0]), 6) for t in together}) == 12  # each caller's own rows


def _bad_requests(reg: Registry) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, path, call kwargs + expected status/code/index) for every kind of bad input."""
    paths = series_of(reg, 2)
    good = b64_of(paths[0][1][0])
    jpeg = storage.read_bytes(paths[0][1][0])
    huge_png = {"b64": base64.b64encode(png_declaring(50_000, 50_000)).decode()}
    scan_bomb = {"b64": base64.b64encode(jpeg_with_scans(300)).decode()}
    text = {"b64": base64.b64encode(b"just some text, not an image").decode()}
    truncated = {"b64": base64.b64encode(jpeg[: len(jpeg) // 2]).decode()}
    return [
        ("malformed json", "/v1/embed", {"raw": b'{"images": [', "expect": (422, "invalid_json")}),
        ("schema", "/v1/embed", {"body": {"imagez": []}, "expect": (422, "invalid_request")}),
        ("empty embed", "/v1/embed", {"body": {}, "expect": (422, "invalid_request")}),
        ("both b64 and uri", "/v1/embed",
         {"body": {"images": [{"b64": "eA==", "uri": "s3://b/k"}]},
          "expect": (422, "invalid_request")}),
        ("too large body", "/v1/embed",
         {"raw": b'{"texts": ["' + b"a" * (3 * 1024 * 1024) + b'"]}',
          "expect": (413, "request_too_large")}),
        ("too many images", "/v1/score/aesthetic",
         {"body": {"images": [good] * 13}, "expect": (400, "too_many_images")}),
        ("bomb", "/v1/embed",
         {"body": {"images": [good, huge_png]}, "expect": (400, "too_many_pixels", 1)}),
        ("scan bomb", "/v1/embed",
         {"body": {"images": [good, scan_bomb]}, "expect": (400, "too_many_scans", 1)}),
        ("not an image", "/v1/score/aesthetic",
         {"body": {"images": [good, good, text]}, "expect": (415, "not_an_image", 2)}),
        ("truncated", "/v1/embed",
         {"body": {"images": [truncated]}, "expect": (400, "undecodable_image", 0)}),
        ("bad base64", "/v1/embed",
         {"body": {"images": [{"b64": "%%%"}]}, "expect": (400, "invalid_base64", 0)}),
        ("http uri", "/v1/embed",
         {"body": {"images": [{"uri": "http://169.254.169.254/latest"}]},
          "expect": (400, "unsupported_uri", 0)}),
        ("bucket not allowed", "/v1/embed",
         {"body": {"images": [{"uri": "s3://someone-else/x.jpg"}]},
          "expect": (403, "uri_not_allowed", 0)}),
        ("series of one", "/v1/rank",
         {"body": {"series": [{"images": [good, good]}, {"images": [good]}]},
          "expect": (400, "series_too_short", 1)}),
        ("series too long", "/v1/rank",
         {"body": {"series": [{"images": [good] * 7}]}, "expect": (400, "series_too_long", 0)}),
        ("pick: bad capture time", "/v1/pick",
         {"body": {"images": [good, {**good, "capture_time": "at noon"}]},
          "expect": (422, "invalid_capture_time", 1)}),
        ("pick: too many images", "/v1/pick",
         {"body": {"images": [good] * 21}, "expect": (400, "too_many_images")}),
        ("pick: knob out of range", "/v1/pick",
         {"body": {"images": [good], "max_gap_s": 3600}, "expect": (422, "invalid_request")}),
        ("pick: not an image", "/v1/pick",
         {"body": {"images": [good, text]}, "expect": (415, "not_an_image", 1)}),
        ("wrong content type", "/v1/embed",
         {"raw": b"images=1", "ctype": "application/x-www-form-urlencoded",
          "expect": (415, "unsupported_media_type")}),
        ("unknown route", "/v1/nope", {"body": {}, "expect": (404, "not_found")}),
    ]  # fmt: skip


def test_bad_request_barrage_interleaved_with_good_ones(app: str, registry: Registry) -> None:
    bad = _bad_requests(registry)
    good_body = {"images": [b64_of(series_of(registry, 1)[0][1][0])], "texts": ["a dog"]}
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    for item in bad * 2:
        jobs.append(item)
        jobs.append(("good", "/v1/embed", {"body": good_body, "expect": (200, None)}))

    def run(job: tuple[str, str, dict[str, Any]]) -> tuple[str, tuple[Any, ...], Reply]:
        name, path, kw = job
        kw = dict(kw)
        expect = kw.pop("expect")
        return name, expect, call(app, "POST", path, kw.pop("body", None), **kw)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, jobs))
    for name, expect, r in results:
        assert r.status == expect[0], (name, r)
        if expect[1] is None:
            assert len(r.body["image_embeddings"]) == 1
            assert len(r.body["text_embeddings"]) == 1
            continue
        assert r.body["error"]["code"] == expect[1], (name, r.body)
        assert r.body["error"]["message"], name
        if len(expect) > 2:
            assert r.body["error"]["index"] == expect[2], (name, r.body)
    assert call(app, "GET", "/healthz", token=None).status == 200
    assert call(app, "GET", "/v1/models").status == 200


def test_multipart_upload(app: str, registry: Registry) -> None:
    paths = series_of(registry, 1)[0][1][:2]
    boundary = "keeper-test-boundary"
    parts = []
    for i, p in enumerate(paths):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + storage.read_bytes(p)
            + b"\r\n"
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="texts"\r\n\r\n'
        f'["a cat", "a dog"]\r\n--{boundary}--\r\n'.encode()
    )
    r = call(
        app, "POST", "/v1/embed", raw=b"".join(parts),
        ctype=f"multipart/form-data; boundary={boundary}",
    )  # fmt: skip
    assert r.status == 200, r
    assert len(r.body["image_embeddings"]) == 2
    assert len(r.body["text_embeddings"]) == 2
    as_json = call(app, "POST", "/v1/embed", {"images": [b64_of(p) for p in paths]}).body
    np.testing.assert_allclose(r.body["image_embeddings"], as_json["image_embeddings"], atol=1e-6)


# ----------------------------------------------------------------------------- /v1/pick


def groups_of(body: dict[str, Any]) -> list[list[int]]:
    return [g["images"] for g in body["groups"]]


def test_pick_groups_exif_timed_bursts_and_a_client_time_wins(app: str, registry: Registry) -> None:
    s = shoot(registry, 2)
    images = [b64_bytes(b) for b in s.blobs]
    # Time only: the tiny random CLIP's cosines say nothing about scenes (GroupingConfig).
    r = call(app, "POST", "/v1/pick", {"images": images, "min_similarity": -1})
    assert r.status == 200, r
    body = r.body
    assert groups_of(body) == s.bursts
    for g in body["groups"]:
        keepers = [i for i in g["images"] if body["images"][i]["decision"] == "keep"]
        assert keepers == [g["keeper_index"]], g
    for im in body["images"]:
        assert im["reasons"], im
        assert all(isinstance(x, str) and x for x in im["reasons"])
        assert (im["time_source"], im["camera"]) == ("exif", "Canon EOS R5")
    assert body["images"][1]["capture_time"] == "2024-05-01T10:00:00.40"
    served = call(app, "GET", "/v1/models").body["ranker"]
    ranker = body["ranker"]
    assert ranker["kind"] == "model"
    assert (ranker["name"], ranker["version"], ranker["alias"]) == (
        served["name"],
        served["version"],
        "champion",
    )
    assert ranker["label"] == f"{NAME} v{served['version']} (models:/{NAME}@champion)"
    assert body["random_weights"] is True
    assert body["counts"]["groups"] == len(s.bursts)

    # The single, with a client time 0.4 s after the first burst's last shot, joins that burst.
    single, first = s.bursts[-1][0], s.bursts[0]
    when = f"2024-05-01T10:00:{0.4 * len(first):05.2f}"
    images[single] = b64_bytes(s.blobs[single], capture_time=when)
    r = call(app, "POST", "/v1/pick", {"images": images, "min_similarity": -1})
    assert r.status == 200, r
    assert groups_of(r.body) == [[*first, single], *s.bursts[1:-1]]
    assert r.body["images"][single]["time_source"] == "given"
    assert r.body["images"][single]["capture_time"] == when


def offline_frame(reg: Registry, s: Shoot) -> pd.DataFrame:
    """The frame keeper pick would cull: the embedding table's rows, the files' EXIF."""
    from keeper_serve.api import REQUEST_INDEX, image_name

    rows = reg.rows.assign(_key=[storage.same_key(str(u)) for u in reg.rows["image_uri"]])
    rows = rows.set_index("_key")
    n = len(s.paths)
    records = []
    for i, (path, blob) in enumerate(zip(s.paths, s.blobs, strict=True)):
        row = rows.loc[storage.same_key(path)]
        hashed = row.get("dhash")
        records.append(
            {
                REQUEST_INDEX: i,
                "image_uri": image_name(i, n),
                "image_id": hashlib.sha256(blob).hexdigest(),
                "embedding": np.asarray(row["embedding"], dtype=np.float32),
                "dhash": int(hashed) if pd.notna(hashed) else dhash(decode_image(blob)),
                **{f: row[f] for f in FEATURE_NAMES},
                **capture_row(read_capture(blob)),
            }
        )
    return pd.DataFrame(records)


def test_pick_ranks_as_cull_does_offline_with_the_served_champion(
    app: str, registry: Registry
) -> None:
    """Over /v1/pick's own image cap (above max_images), default knobs: the same picks as
    keeper_core.culling.cull on the embedding table's rows, scored by the same version."""
    s = next(sh for n in range(3, 8) if len((sh := shoot(registry, n)).paths) > 12)
    assert len(s.paths) <= 20
    r = call(app, "POST", "/v1/pick", {"images": [b64_bytes(b) for b in s.blobs]})
    assert r.status == 200, r
    version = r.body["ranker"]["version"]
    ranker = registry.bad if version == "1" else registry.good
    result = cull(
        offline_frame(registry, s),
        scorer=lambda df: ranker.rank(df)["score"].to_numpy(),
        ranker=f"v{version} offline",
    )
    got = r.body["images"]
    assert len(got) == len(result.picks)
    for row in result.picks.to_dict("records"):
        im = got[row["request_index"]]
        assert im["group"] == row["group_id"], (im, row)
        assert (im["rank"], im["decision"]) == (row["rank"], row["decision"]), (im, row)
        assert im["duplicate_kind"] == row["duplicate_kind"]
        np.testing.assert_allclose(im["score"], row["score"], atol=1e-4)
        np.testing.assert_allclose(im["prob"], row["prob"], atol=1e-4)
    assert r.body["counts"] == result.counts()


def test_pick_says_zero_shot_while_the_app_has_no_ranker(app: str, registry: Registry) -> None:
    from ray import serve

    body = {"images": [b64_bytes(b) for b in shoot(registry, 1).blobs]}
    handle = serve.get_deployment_handle("SeriesRanker", app_name="keeper")
    # The hook Serve calls when a deployment's user_config changes (docs/serving.md).
    handle.reconfigure.remote({"model_uri": None}).result(timeout_s=30)
    try:
        rank = rank_body(registry, 1)
        wait_until(
            lambda: call(app, "POST", "/v1/rank", rank).status == 503, 30, "the ranker unloaded"
        )
        r = call(app, "POST", "/v1/pick", body)
        assert r.status == 200, r
        ranker = r.body["ranker"]
        assert (ranker["kind"], ranker["label"]) == ("zero-shot", ZERO_SHOT_RULE)
        assert ranker["name"] is None
        assert ranker["version"] is None
        assert "no ranker configured" in ranker["reason"]
        for g in r.body["groups"]:
            assert [i for i in g["images"] if r.body["images"][i]["decision"] == "keep"] == [
                g["keeper_index"]
            ]
    finally:
        handle.reconfigure.remote({"model_uri": f"models:/{NAME}@champion"}).result(timeout_s=30)
        wait_until(
            lambda: call(app, "GET", "/v1/models").body["ranker"]["status"] == "ready",
            120,
            "the champion loaded again",
        )
    r = call(app, "POST", "/v1/pick", body)
    assert r.body["ranker"]["kind"] == "model"


def test_promotion_under_load_switches_versions_with_no_failures(
    app: str, registry: Registry, tmp_path: Path
) -> None:
    body = rank_body(registry, 2)
    with Load(lambda: call(app, "POST", "/v1/rank", body), clients=3) as load:
        wait_until(lambda: len(load.snapshot()) >= 6, 60, "responses from v1")
        assert promote.main(
            [NAME, "--embeddings", registry.embeddings, "--series", registry.manifest,
             "--tracking-uri", registry.uri, "--json", str(tmp_path / "p.json")]
        ) == 0  # fmt: skip
        decision = json.loads((tmp_path / "p.json").read_text())
        assert decision["decision"] == "promoted", decision
        promoted_at = time.monotonic()

        def v2_for_a_while() -> bool:
            after = [r for r in load.snapshot() if r[0] > promoted_at and r[1] == 200]
            return sum(r[2]["model"]["version"] == "2" for r in after) >= 6

        wait_until(v2_for_a_while, 60, "responses from v2")
    results = load.snapshot()
    failed = [r for r in results if r[1] != 200]
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
    ordered = sorted(results, key=lambda r: r[0])
    versions = [r[2]["model"]["version"] for r in ordered]
    first_v2 = versions.index("2")
    assert set(versions[:first_v2]) == {"1"}
    assert first_v2 > 0
    # One swap, no flapping back: every request sent after the first v2 answer came back is
    # answered by v2. (A request already in flight across the swap may still come back with v1
    # after it: three clients overlap, so completion order alone cannot say.)
    v2_back = ordered[first_v2][0]
    late = [(r[3] - v2_back, r[2]["model"]["version"]) for r in ordered if r[3] > v2_back]
    assert {v for _, v in late} == {"2"}, f"v1 after v2 came back: {late[:10]}"
    assert call(app, "GET", "/v1/models").body["ranker"]["version"] == "2"


def test_encoder_autoscales_up_under_load_and_back_down(app: str, registry: Registry) -> None:
    body = {"images": [b64_of(p) for p in series_of(registry, 1)[0][1][:2]]}
    # Earlier tests' load may have scaled it up: start from one replica.
    wait_until(lambda: replicas("ClipEncoder") == {"RUNNING": 1}, 90, "1 encoder replica")
    with Load(lambda: call(app, "POST", "/v1/embed", body), clients=8) as load:
        wait_until(lambda: replicas("ClipEncoder").get("RUNNING", 0) == 2, 90, "2 encoders")
    results = load.snapshot()
    assert results
    assert all(r[1] == 200 for r in results), Counter(r[1] for r in results)
    wait_until(lambda: replicas("ClipEncoder") == {"RUNNING": 1}, 90, "back to 1 encoder replica")


def _encoder_replicas() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::keeper#ClipEncoder#")
    }


def test_killed_encoder_replica_is_replaced_while_serving(app: str, registry: Registry) -> None:
    import ray

    body = {"images": [b64_of(series_of(registry, 1)[0][1][0])]}
    with Load(lambda: call(app, "POST", "/v1/embed", body), clients=4) as load:
        wait_until(lambda: len(load.snapshot()) >= 8, 60, "traffic before the kill")
        before = _encoder_replicas()
        victim = sorted(before)[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

        def replaced() -> bool:
            alive = _encoder_replicas()
            return victim not in alive and len(alive) >= len(before)

        wait_until(replaced, 120, "the killed encoder replica replaced")
        recovered_at = time.monotonic()
        wait_until(
            lambda: sum(r[0] > recovered_at and r[1] == 200 for r in load.snapshot()) >= 8,
            60,
            "answers after the replacement",
        )
    results = load.snapshot()
    failed = [r for r in results if r[1] != 200]
    during = [r for r in results if r[0] > killed_at]
    print(
        f"replica kill: {len(before)} encoder replica(s) at the kill, {len(failed)} failed of "
        f"{len(results)} requests ({len(during)} after the kill); replaced in "
        f"{recovered_at - killed_at:.1f} s"
    )
    # Requests in flight on the killed replica can fail (at most one batch per client); every
    # failure is a JSON 5xx, never a hang, and the app answers again once it is replaced.
    assert len(failed) <= 4, Counter((r[1], r[2].get("error", {}).get("code")) for r in failed)
    assert all(500 <= r[1] < 600 and "error" in r[2] for r in failed), failed[:3]
    assert call(app, "GET", "/healthz", token=None).status == 200


def select_body(reg: Registry, n: int, **knobs: Any) -> dict[str, Any]:
    images = [b64_of(p) for p in image_paths(reg)[:n]]
    return {"positive": ["a sharp photo"], "images": images, **knobs}


def test_select_over_http_spends_the_vlm_on_the_top_n_and_accounts_for_every_candidate(
    app: str, registry: Registry
) -> None:
    knobs = {"top_n": 4, "top_k": 2, "dedup_threshold": None}  # random CLIP: all look alike
    r = call(app, "POST", "/v1/select", select_body(registry, 12, **knobs))
    assert r.status == 200, r.body
    out = r.body
    stages = out["stages"]
    assert stages[0]["n_in"] == 12
    for before, stage in itertools.pairwise(stages):
        assert stage["n_in"] == before["n_kept"]
    assert all(s["n_in"] == s["n_kept"] + s["n_dropped"] for s in stages)
    judged = [c["index"] for c in out["candidates"] if c["vlm"] is not None]
    assert out["cost"]["vlm_calls"] == len(judged) == 4
    assert len(out["picks"]) == 2
    assert set(out["picks"]) <= set(judged)
    for c in out["candidates"]:
        if c["vlm"] is not None:
            assert c["final"] == pytest.approx(0.5 * c["clip"] + 0.5 * c["vlm"], abs=1e-6)
    vlm = out["models"]["vlm"]
    assert vlm["status"] == "ready"
    assert vlm["random_weights"] is True
    assert out["models"]["clip_random_weights"] is True
    assert call(app, "GET", "/v1/models").body["vlm"]["status"] == "ready"
    # Deterministic: the same request, the same answer.
    again = call(app, "POST", "/v1/select", select_body(registry, 12, **knobs)).body
    assert again["picks"] == out["picks"]
    assert [c["final"] for c in again["candidates"]] == [c["final"] for c in out["candidates"]]
    assert out["rationales"] is None
    explained = call(app, "POST", "/v1/select", select_body(registry, 12, rationale=True, **knobs))
    assert explained.status == 200, explained.body
    assert [r["index"] for r in explained.body["rationales"]] == out["picks"]
    assert all(isinstance(r["text"], str) for r in explained.body["rationales"])


def test_select_duplicates_collapse_and_limits_are_json_errors(
    app: str, registry: Registry
) -> None:
    paths = image_paths(registry)
    images = [b64_of(p) for p in [paths[0]] * 3 + paths[1:4]]
    body = {"positive": ["a photo of a cat"], "images": images}
    r = call(app, "POST", "/v1/select", body)
    assert r.status == 200, r.body
    dropped = [c for c in r.body["candidates"] if (c["reason"] or "").startswith("near_dup")]
    assert len(dropped) >= 2
    assert len({0, 1, 2} & set(r.body["picks"])) <= 1
    over = call(app, "POST", "/v1/select", select_body(registry, 2, top_n=10_000))
    assert (over.status, over.body["error"]["code"]) == (400, "over_limit")
    empty = call(app, "POST", "/v1/select", {**select_body(registry, 2), "positive": []})
    assert (empty.status, empty.body["error"]["code"]) == (422, "invalid_request")


def test_select_by_image_id_over_the_embedded_corpus(app: str, registry: Registry) -> None:
    table = storage.read_parquet(storage.join(registry.embeddings, embed.EMBEDDINGS)).to_pandas()
    ids = table["image_id"].tolist()[:10]
    body = {
        "positive": ["a sharp photo"],
        "ids": ids,
        "top_n": 3,
        "top_k": 2,
        "dedup_threshold": None,
    }
    r = call(app, "POST", "/v1/select", body)
    assert r.status == 200, r.body
    assert r.body["cost"] == {"candidates": 10, "vlm_calls": 3, "ms": r.body["cost"]["ms"]}
    assert r.body["stages"][0]["n_in"] == 10
    assert len(r.body["picks"]) == 2
    unknown = call(app, "POST", "/v1/select", {**body, "ids": [ids[0], "no-such-id"]})
    assert (unknown.status, unknown.body["error"]["code"]) == (400, "unknown_id")
    assert unknown.body["error"]["index"] == 1


def _vlm_replicas() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::keeper#VlmJudge#")
    }


def test_a_killed_vlm_replica_never_gives_a_wrong_answer(app: str, registry: Registry) -> None:
    import ray

    body = select_body(registry, 8, top_n=4, top_k=3, dedup_threshold=None)
    expected = call(app, "POST", "/v1/select", body).body["picks"]
    with Load(lambda: call(app, "POST", "/v1/select", body), clients=3) as load:
        wait_until(lambda: len(load.snapshot()) >= 4, 60, "traffic before the kill")
        victim = sorted(_vlm_replicas())[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        wait_until(lambda: victim not in _vlm_replicas() and bool(_vlm_replicas()), 120, "replaced")
        wait_until(
            lambda: sum(r[0] > killed_at and r[1] == 200 for r in load.snapshot()) >= 4,
            120,
            "answers after the replacement",
        )
    results = load.snapshot()
    for _, status, reply, _ in results:
        if status == 200:
            assert reply["picks"] == expected  # a retried request answers the same
        else:  # never a wrong answer: a JSON 503 naming what failed
            assert status == 503, reply
            assert reply["error"]["code"] in {"vlm_unavailable", "replica_unavailable"}, reply


# ----------------------------------------------------------------------------- the docs


@dataclass
class Example:
    """A documented shell example: its commands, the statuses it documents, the response shown."""

    where: str
    script: str
    statuses: list[int]
    response: Any = None  # the JSON block that follows it, if any


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- example: ([\d ]+) -->\s*$")


def doc_examples(path: Path) -> list[Example]:
    """Every ```bash block calling the API, with its ``<!-- example: STATUS ... -->`` marker.

    A block calling the API without a marker is an error: every example is run.
    """
    text = path.read_text()
    blocks = list(FENCE.finditer(text))
    out: list[Example] = []
    for i, m in enumerate(blocks):
        lang, body = m.group(1), m.group(2)
        if lang != "bash" or "127.0.0.1:8000/" not in body:
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        assert marker, f"{path.name}:{line}: an API example without <!-- example: STATUS -->"
        response = None
        if i + 1 < len(blocks) and blocks[i + 1].group(1) == "json":
            response = json.loads(blocks[i + 1].group(2))
        statuses = [int(x) for x in marker.group(1).split()]
        out.append(Example(f"{path.name}:{line}", body, statuses, response))
    return out


def section_examples(heading: str, route: str, *, end: str = "\n## ") -> list[Example]:
    """The ```shell examples of docs/http-api.md's section ``heading`` (to ``end``) that call
    ``route``, each with its marker and the JSON block right after it (run against an app with
    that route configured, unlike the ```bash ones :func:`doc_examples` takes)."""
    text = (REPO / "docs" / "http-api.md").read_text()
    section = text[text.index(heading) :]
    section = section[: section.index(end)]
    out: list[Example] = []
    for m in FENCE.finditer(section):
        if m.group(1) != "shell" or f"127.0.0.1:8000{route}" not in m.group(2):
            continue
        marker = MARKER.search(section[: m.start()].rstrip("\n").rsplit("\n", 1)[-1])
        assert marker, m.group(2)
        after = FENCE.search(section, m.end())
        response = None
        if after and after.group(1) == "json" and not section[m.end() : after.start()].strip():
            response = json.loads(after.group(2))
        statuses = [int(x) for x in marker.group(1).split()]
        out.append(
            Example(f"http-api.md {route} example {len(out) + 1}", m.group(2), statuses, response)
        )
    return out


def check_examples(app: str, examples: list[Example], cwd: Path) -> None:
    """Run each example: its statuses as documented, its bodies shaped as the JSON shown (and an
    error's code the one shown)."""
    for ex in examples:
        results = run_example(app, ex, cwd)
        assert [s for s, _ in results] == ex.statuses, (ex.script, results)
        if ex.response is None:
            continue
        for status, body in results:
            assert not shape_errors(ex.response, body), shape_errors(ex.response, body)
            if status >= 400:
                assert body["error"]["code"] == ex.response["error"]["code"], body


def readme_examples() -> list[Example]:
    """README's HTTP examples (section "Serving over HTTP"): the token line and each curl."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Serving over HTTP") :]
    body = FENCE.search(section)
    assert body, "README: no example block under 'Serving over HTTP'"
    commands = body.group(2).replace("\\\n", " ").splitlines()
    run = [c for c in commands if c.startswith("TOKEN=") or "127.0.0.1:8000/" in c]
    n = sum("127.0.0.1:8000/" in c for c in run)
    assert n >= 2, run
    return [Example("README.md", "\n".join(run), [200] * n)]


# Each curl of an example: its status to $KEEPER_DOC_OUT/status, its body to body.N; the
# command line itself runs as documented.
CURL_PRELUDE = r"""
curl() {
  local n=$(( $(wc -l < "$KEEPER_DOC_OUT/status") + 1 ))
  command curl -sS -o "$KEEPER_DOC_OUT/body.$n" -w '%{http_code}\n' "$@" >> "$KEEPER_DOC_OUT/status"
}
"""


def run_example(app: str, ex: Example, cwd: Path) -> list[tuple[int, Any]]:
    out = cwd / f"out-{abs(hash(ex.where))}"
    out.mkdir()
    (out / "status").write_text("")
    script = CURL_PRELUDE + ex.script.replace("http://127.0.0.1:8000", app)
    r = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env={**os.environ, "KEEPER_DOC_OUT": str(out), "TOKEN": TOKEN},  # as docs say to set
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, (ex.where, r.stderr)
    statuses = [int(x) for x in (out / "status").read_text().split()]
    bodies = []
    for i in range(1, len(statuses) + 1):
        raw = (out / f"body.{i}").read_bytes()
        try:
            bodies.append(json.loads(raw))
        except json.JSONDecodeError:
            bodies.append(raw.decode(errors="replace"))
    return list(zip(statuses, bodies, strict=True))


def shape_errors(doc: Any, got: Any, where: str = "") -> list[str]:
    """Where ``got`` differs from the documented JSON: keys, nesting, JSON types (not values)."""
    if doc is None or got is None:
        return []
    if isinstance(doc, dict):
        if not isinstance(got, dict) or set(doc) != set(got):
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            return [f"{where or '.'}: documented {sorted(doc)}, got {keys}"]
        return [e for k in doc for e in shape_errors(doc[k], got[k], f"{where}.{k}")]
    if isinstance(doc, list):
        if not isinstance(got, list):
            return [f"{where}: documented a list, got {type(got).__name__}"]
        return shape_errors(doc[0], got[0], f"{where}[0]") if doc and got else []
    number = (int, float)
    if isinstance(doc, bool) or isinstance(got, bool):
        same = isinstance(doc, bool) and isinstance(got, bool)
    else:
        same = isinstance(doc, number) == isinstance(got, number) and isinstance(
            doc, str
        ) == isinstance(got, str)
    return [] if same else [f"{where}: documented {doc!r}, got {got!r}"]


@pytest.fixture
def doc_files(registry: Registry, tmp_path: Path) -> Path:
    """The folder the examples run in: the images they name and keeper serve's token file."""
    paths = image_paths(registry)
    for i, name in enumerate(["photo.jpg", "a.jpg", "b.jpg", "1.jpg", "2.jpg"]):
        (tmp_path / name).write_bytes(storage.read_bytes(paths[i]))
    # /v1/pick's examples: a burst of two (0.4 s apart) and a shot two minutes later.
    (_, burst), (other, _) = series_of(registry, 2)
    for name, path, at in [
        ("IMG_0001.jpg", burst[0], 0.0),
        ("IMG_0002.jpg", burst[1], 0.4),
        ("IMG_0003.jpg", clean_shot(registry, other), 120.0),
    ]:
        (tmp_path / name).write_bytes(with_exif(storage.read_bytes(path), at))
    (tmp_path / "keeper-data").mkdir()
    (tmp_path / "keeper-data" / "api-token").write_text(TOKEN + "\n")
    return tmp_path


def test_every_documented_example_runs_as_documented(app: str, doc_files: Path) -> None:
    """docs/http-api.md's examples (each with the statuses it documents and the response it
    shows) and README's, run with curl against the app."""
    examples = doc_examples(REPO / "docs" / "http-api.md")
    assert len(examples) >= 10, [e.where for e in examples]
    for ex in [*examples, *readme_examples()]:
        results = run_example(app, ex, doc_files)
        assert [s for s, _ in results] == ex.statuses, (ex.where, results)
        if ex.response is None:
            continue
        is_error = "error" in ex.response
        checked = [b for s, b in results if (s >= 400) == is_error]
        assert checked, ex.where
        for body in checked:
            assert not shape_errors(ex.response, body), (ex.where, shape_errors(ex.response, body))
            if is_error:
                assert body["error"]["code"] == ex.response["error"]["code"], (ex.where, body)
                assert body["error"].get("index") == ex.response["error"].get("index")


def raw_request(url: str, head: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes as they are (no client fixing headers up): (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    headers, _, body = data.partition(b"\r\n\r\n")
    return int(headers.split()[1]), headers, body


def test_what_the_http_layer_answers_itself(app: str) -> None:
    """docs/http-api.md's promises about answers keeper's JSON handlers never see."""
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # A non-numeric Content-Length never reaches the app: the proxy's HTTP server refuses it.
    status, headers, body = raw_request(
        app,
        b"POST /v1/embed HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
        b"Content-Length: ten\r\nConnection: close\r\n\r\n{}",
    )
    assert status == 400, (headers, body)
    assert b"text/plain" in headers.lower(), (headers, body)
    assert body == b"Invalid HTTP request received.", body
    # Serve's own routes, without keeper's auth.
    assert call(app, "GET", "/-/healthz", token=None).status == 200
    assert call(app, "GET", "/-/routes", token=None).status == 200
    # 405 names the allowed method.
    r = call(app, "GET", "/v1/embed")
    assert (r.status, r.body["error"]["code"]) == (405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
