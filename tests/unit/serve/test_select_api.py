"""``POST /v1/select`` without Ray: the real ingress app with fake encoder and VLM handles.

The route is driven in this process as tests/unit/serve/test_api.py drives the others. The fake
encoder embeds each image by its mean colour (so distinct images differ and identical ones
collide), texts by a hash; the fake VLM records every call and answers from a table, so the
tests see exactly which candidates reached the VLM stage and can make it reorder them.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from ray.exceptions import RayActorError
from serve_fakes import Remote, ingress_clients
from support import check_select_accounting

from keeper_core.cascade import STAGES
from keeper_serve.config import KeeperAppArgs, LimitArgs, SelectArgs

SPEC = "keeper-tiny:random"
TOKEN = "select-t0ken-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIM = 16
LIMITS = LimitArgs(max_images=2, max_select_images=12)  # /v1/select has its own cap


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _embed_pixels(px: np.ndarray) -> np.ndarray:
    """A fixed random projection of each image's coarse colour layout."""
    coarse = px.reshape(len(px), 3, 4, 16, 4, 16).mean(axis=(3, 5)).reshape(len(px), -1)
    proj = np.random.default_rng(0).normal(size=(coarse.shape[1], DIM))
    return _unit((coarse - 127.5) @ proj)


def _embed_texts(texts: list[str]) -> np.ndarray:
    seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
    return _unit(np.stack([np.random.default_rng(s).normal(size=DIM) for s in seeds]))


class FakeEncoder:
    embed_pixels = Remote(_embed_pixels)
    embed_texts = Remote(_embed_texts)
    info = Remote(
        lambda: {
            "spec": SPEC,
            "embed_dim": DIM,
            "image_size": 64,
            "random_weights": True,
            "logit_scale": 10.0,
        }
    )


class FakeRanker:
    info = Remote(lambda: {"uri": None, "status": "disabled"})


class FakeVlm:
    """Scores each image by its mean red level (a planted, checkable judgement)."""

    def __init__(self, *, ready: bool = True, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[int, str]] = []
        self.fail = fail
        keys = ("source", "architecture", "dtype", "device", "parameters", "random_weights")
        off = {"status": "disabled", **dict.fromkeys(keys)}
        on = {**off, "status": "ready", "source": "tiny", "random_weights": True}
        self.info = Remote(lambda: on if ready else off)
        self.relevance = Remote(self._relevance)
        self.rationale = Remote(lambda image, query: f"{image.shape[1]}px wide; asked: {query}")

    def _relevance(self, images: list[np.ndarray], query: str) -> np.ndarray:
        self.calls.append((len(images), query))
        if self.fail is not None:
            err, self.fail = self.fail, None  # fails once
            raise err
        return np.array([im[..., 0].mean() / 255 for im in images], np.float32)


@pytest.fixture
def client_with(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """(FakeVlm, corpus=None) -> a TestClient of the real app with fake handles; no Ray."""
    with ingress_clients(monkeypatch, TOKEN) as make:

        def with_vlm(vlm: FakeVlm, corpus: str | None = None) -> Any:
            select = SelectArgs(top_n=5, top_k=3, max_top_n=6, max_top_k=4)
            args = KeeperAppArgs(clip_model=SPEC, limits=LIMITS, select=select, corpus=corpus)
            return make(FakeEncoder(), FakeRanker(), vlm, args)

        yield with_vlm


def photo(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)
    im = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def refs(blobs: list[bytes]) -> list[dict[str, str]]:
    return [{"b64": base64.b64encode(b).decode()} for b in blobs]


def body(blobs: list[bytes], **knobs: Any) -> dict[str, Any]:
    return {"positive": ["a red scene"], "images": refs(blobs), **knobs}


check_accounting = check_select_accounting


def test_select_spends_the_vlm_on_the_top_n_only_and_accounts_for_everyone(
    client_with: Callable[[FakeVlm], Any],
) -> None:
    vlm = FakeVlm()
    client = client_with(vlm)
    blobs = [photo(i) for i in range(10)]
    knobs = {"top_n": 5, "top_k": 3, "alpha": 0.0, "beta": 1.0, "gamma": 0.1}
    r = client.post("/v1/select", json=body(blobs, **knobs), headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    check_accounting(out, 10)
    assert vlm.calls == [(5, "a red scene")]  # one call, the top-N only, the first positive
    assert out["cost"] == {"candidates": 10, "vlm_calls": 5, "ms": out["cost"]["ms"]}
    judged = [c for c in out["candidates"] if c["vlm"] is not None]
    assert len(judged) == 5
    # beta dominates: the picks are the judged candidates in order of the planted VLM score.
    red = {c["index"]: c["vlm"] for c in judged}
    assert out["picks"] == sorted(red, key=lambda i: -red[i])[:3]
    assert {c["index"] for c in out["candidates"]} == set(range(10))
    for c in out["candidates"]:
        assert (c["dropped_at"] is None) == (c["index"] in out["picks"])
    models = out["models"]
    assert models["clip_model"] == SPEC
    assert models["clip_random_weights"] is True
    assert models["logit_scale"] == 10.0
    assert models["vlm"]["status"] == "ready"
    assert models["vlm"]["query"] == "a red scene"


def test_rationales_only_when_asked_one_per_pick(client_with: Callable[..., Any]) -> None:
    client = client_with(FakeVlm())
    blobs = [photo(i) for i in range(5)]
    plain = client.post("/v1/select", json=body(blobs, top_k=2), headers=AUTH).json()
    assert plain["rationales"] is None
    asked = client.post("/v1/select", json=body(blobs, top_k=2, rationale=True), headers=AUTH)
    assert asked.status_code == 200, asked.text
    out = asked.json()
    assert [r["index"] for r in out["rationales"]] == out["picks"]
    assert out["rationales"][0]["text"] == "96px wide; asked: a red scene"
    off = client_with(FakeVlm(ready=False))
    r = off.post("/v1/select", json=body(blobs, rationale=True), headers=AUTH).json()
    assert r["rationales"] is None  # no VLM: nothing to explain with (models.vlm says so)


def test_duplicates_collapse_to_one_and_picks_only_on_request(
    client_with: Callable[[FakeVlm], Any],
) -> None:
    client = client_with(FakeVlm())
    blobs = [photo(1), photo(2), photo(1), photo(3), photo(1)]
    r = client.post("/v1/select", json=body(blobs, candidates="picks"), headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    check_accounting(out, 5)
    dedup = out["stages"][STAGES.index("dedup")]
    assert dedup["n_dropped"] == 2
    assert len({0, 2, 4} & set(out["picks"])) == 1
    assert [c["index"] for c in out["candidates"]] == out["picks"]  # the picks' records only


def test_without_a_vlm_the_stage_is_skipped_and_the_answer_says_so(
    client_with: Callable[[FakeVlm], Any],
) -> None:
    vlm = FakeVlm(ready=False)
    client = client_with(vlm)
    r = client.post("/v1/select", json=body([photo(i) for i in range(4)]), headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["stages"][STAGES.index("vlm")]["skipped"] is True
    assert out["cost"]["vlm_calls"] == 0
    assert out["models"]["vlm"]["status"] == "disabled"
    assert vlm.calls == []
    assert client.get("/v1/models", headers=AUTH).json()["vlm"]["status"] == "disabled"


def test_a_lost_vlm_replica_is_retried_once_and_a_failing_vlm_is_a_503_naming_the_stage(
    client_with: Callable[[FakeVlm], Any],
) -> None:
    blobs = [photo(i) for i in range(4)]
    lost = FakeVlm(fail=RayActorError())
    r = client_with(lost).post("/v1/select", json=body(blobs, top_n=2), headers=AUTH)
    assert r.status_code == 200, r.text
    assert [n for n, _ in lost.calls] == [2, 2]  # the retry went to the next replica

    broken = FakeVlm(fail=RuntimeError("CUDA out of memory"))
    client = client_with(broken)
    r = client.post("/v1/select", json=body(blobs), headers=AUTH)
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "vlm_unavailable"
    assert "CUDA out of memory" in err["message"]
    r = client.post("/v1/select", json=body(blobs), headers=AUTH)  # it keeps serving
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("make_body", "status", "code", "index"),
    [
        (lambda b: body(b * 13), 400, "too_many_images", None),  # 13 > max_select_images
        (lambda b: body(b, top_n=7), 400, "over_limit", None),  # max_top_n is 6
        (lambda b: body(b, top_k=5), 400, "over_limit", None),
        (lambda b: {**body(b), "positive": []}, 422, "invalid_request", None),
        (lambda b: {**body(b), "positive": [""]}, 422, "invalid_request", 0),
        (lambda b: body(b, min_aspect=2.0, max_aspect=1.0), 422, "invalid_request", None),
        (lambda b: body(b, alpha=0.0, gamma=0.0), 422, "invalid_request", None),
        (lambda b: body(b, beta=-1), 422, "invalid_request", None),
        (lambda b: body(b, surprise=1), 422, "invalid_request", None),
        (
            lambda b: {**body(b), "images": [*refs(b), *refs([b"not an image"])]},
            415,
            "not_an_image",
            1,
        ),
        (
            lambda b: {**body(b), "images": [*refs(b), *refs([b[0][:200]])]},
            400,
            "undecodable_image",
            1,
        ),
    ],
)
def test_bad_requests_get_documented_json_errors(
    client_with: Callable[[FakeVlm], Any],
    make_body: Callable[[list[bytes]], dict[str, Any]],
    status: int,
    code: str,
    index: int | None,
) -> None:
    vlm = FakeVlm()
    client = client_with(vlm)
    r = client.post("/v1/select", json=make_body([photo(0)]), headers=AUTH)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"].get("index") == index
    assert vlm.calls == []
    assert client.post("/v1/select", json=body([photo(0)]), headers=AUTH).status_code == 200


def test_multipart_upload_with_knobs(client_with: Callable[[FakeVlm], Any]) -> None:
    vlm = FakeVlm()
    client = client_with(vlm)
    files = [("images", (f"{i}.png", photo(i), "image/png")) for i in range(6)]
    data = {"positive": "a red scene", "negative": '["a dog", "a cat"]', "top_n": "3", "top_k": "2"}
    r = client.post("/v1/select", files=files, data=data, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    check_accounting(out, 6)
    assert vlm.calls == [(3, "a red scene")]
    assert len(out["picks"]) == 2


def test_needs_the_token(client_with: Callable[[FakeVlm], Any]) -> None:
    client = client_with(FakeVlm())
    r = client.post("/v1/select", json=body([photo(0)]))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


def corpus_table(folder: Path, n: int, spec: str = SPEC) -> list[str]:
    """keeper embed's layout: n photos on disk and folder/embeddings/part-0.parquet; the ids."""
    import pyarrow as pa

    from keeper_core import storage

    paths = []
    for i in range(n):
        paths.append(folder / f"p{i}.png")
        paths[-1].write_bytes(photo(100 + i))
    px = np.stack(
        [
            np.asarray(Image.open(p).convert("RGB").resize((64, 64))).transpose(2, 0, 1)
            for p in paths
        ]
    )
    emb = _embed_pixels(px)
    ids = [f"id{i:03d}" for i in range(n)]
    table = pa.table(
        {
            "image_id": ids,
            "image_uri": [str(p) for p in paths],
            "embedding": pa.array(list(emb), type=pa.list_(pa.float32())),
            "model_spec": [spec] * n,
            "width": [96] * n,
            "height": [72] * n,
        }
    )
    storage.write_parquet(table, str(folder / "embeddings" / "part-0.parquet"))
    return ids


def test_select_by_corpus_ids_reads_only_the_vlm_candidates_and_records_the_unreadable(
    client_with: Callable[..., Any], tmp_path: Path
) -> None:
    ids = corpus_table(tmp_path, 8)
    vlm = FakeVlm()
    client = client_with(vlm, str(tmp_path))
    (tmp_path / "p3.png").unlink()  # gone since it was embedded
    knobs = {"top_n": 6, "top_k": 4, "dedup_threshold": None, "candidates": "all"}
    body = {"positive": ["a red scene"], "ids": ids[:6], **knobs}  # all six reach the VLM
    r = client.post("/v1/select", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    check_accounting(out, 6)
    records = {c["index"]: c for c in out["candidates"]}
    assert vlm.calls == [(5, "a red scene")]  # the unreadable one is not sent
    assert records[3]["dropped_at"] == "vlm"
    assert records[3]["reason"].startswith("vlm_failed: corpus image")
    assert records[3]["vlm"] is None
    assert out["stages"][STAGES.index("vlm")]["n_dropped"] == 1
    assert sum(c["vlm"] is not None for c in records.values()) == 5
    assert out["cost"]["candidates"] == 6


def test_select_by_ids_errors(client_with: Callable[..., Any], tmp_path: Path) -> None:
    ids = corpus_table(tmp_path, 3)
    client = client_with(FakeVlm(), str(tmp_path))
    r = client.post("/v1/select", json={"positive": ["x"], "ids": [ids[0], "nope"]}, headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["index"]) == (
        400,
        "unknown_id",
        1,
    )
    both = {"positive": ["x"], "ids": ids, "images": refs([photo(0)])}
    r = client.post("/v1/select", json=both, headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    plain = client_with(FakeVlm())
    r = plain.post("/v1/select", json={"positive": ["x"], "ids": ids}, headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "no_corpus")


def test_a_corpus_of_another_model_fails_the_replica(
    client_with: Callable[..., Any], tmp_path: Path
) -> None:
    from keeper_core.errors import ConfigError

    corpus_table(tmp_path, 2, spec="ViT-B-32:laion2b_s34b_b79k")
    with pytest.raises(ConfigError, match="embedded with ViT-B-32"):
        client_with(FakeVlm(), str(tmp_path))


def test_a_siglip_style_encoder_selects_at_its_own_scale_its_bias_cancelling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model scoring with a logit bias (SigLIP): S_clip is sigmoid(scale * (c+ - c-)) at the
    model's own scale, whatever the bias (it cancels in the two-way choice; keeper_core.cascade)."""
    bias = -12.5

    class SiglipEncoder(FakeEncoder):
        info = Remote(
            lambda: {
                "spec": "ViT-B-16-SigLIP:random",
                "embed_dim": DIM,
                "image_size": 64,
                "random_weights": True,
                "logit_scale": 7.0,
                "logit_bias": bias,
            }
        )

    with ingress_clients(monkeypatch, TOKEN) as make:
        args = KeeperAppArgs(clip_model=SPEC, limits=LIMITS)
        client = make(SiglipEncoder(), FakeRanker(), FakeVlm(), args)
        r = client.post("/v1/select", json=body([photo(i) for i in range(4)]), headers=AUTH)
        assert r.status_code == 200, r.text
        out = r.json()
        check_accounting(out, 4)
        assert out["models"]["logit_scale"] == 7.0
        raw = np.array([c["clip_raw"] for c in out["candidates"]])
        got = np.array([c["clip"] for c in out["candidates"]])
        np.testing.assert_allclose(got, 1 / (1 + np.exp(-7.0 * raw)), rtol=1e-6)
        models = client.get("/v1/models", headers=AUTH).json()
        assert models["clip"]["logit_bias"] == bias


def test_a_huge_corpus_file_is_refused_without_being_read_whole(
    client_with: Callable[..., Any], tmp_path: Path
) -> None:
    import tracemalloc

    ids = corpus_table(tmp_path, 4)
    client = client_with(FakeVlm(), str(tmp_path))
    huge = LIMITS.max_image_bytes + (64 << 20)
    with (tmp_path / "p2.png").open("r+b") as f:  # a sparse file: no disk, all the bytes
        f.truncate(huge)
    body = {"positive": ["a red scene"], "ids": ids, "top_n": 4, "top_k": 2}
    body["dedup_threshold"] = None
    tracemalloc.start()
    try:
        r = client.post("/v1/select", json=body, headers=AUTH)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    records = {c["index"]: c for c in r.json()["candidates"]}
    assert records[2]["reason"].startswith("vlm_failed: corpus image")
    assert peak < LIMITS.max_image_bytes + (16 << 20)  # not the file
