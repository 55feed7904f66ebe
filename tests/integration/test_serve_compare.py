"""``POST /v1/compare`` and ``GET /v1/references`` over real HTTP: reference collections embedded
by the embed job's stages under one root, served by the app with ``references`` configured
(``poll_s`` 1 s).

A member finds itself first; the percentiles are the ones ``ReferenceProfile`` computes offline
from the same table; a collection embedded with another model is listed as refused (409); auth
and the JSON errors; the documented examples; then a collection is added and removed while
clients compare continuously: no request fails, the new one answers within a few polls and the
removed one answers 404 again.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support import embed_files, small_app_overrides
from test_serve import TOKEN, call, check_examples, section_examples, wait_until

from keeper_core import storage
from keeper_core.quality import FEATURE_NAMES
from keeper_core.references import (
    TOTAL,
    ReferenceMeta,
    ReferenceProfile,
    load_collection,
    now,
    percentile_rank,
    remove_collection,
    write_meta,
)
from keeper_core.scoring import AestheticConfig
from keeper_core.synthetic import PHOTOS, load_photos
from keeper_train.jobs import embed

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
SPEC = "keeper-tiny:random"
OTHER_SPEC = "ViT-B-32:laion2b_s34b_b79k"  # what the refused collection says it was embedded with
PORTFOLIO = 10  # the first photos: the portfolio; the rest: a refused one, a later one, queries
MAX_K = 6
REPO = Path(__file__).resolve().parents[2]


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


@dataclass
class Refs:
    base: Path  # photos under base/photos, collections under base/refs
    root: str
    files: dict[str, bytes]

    def names(self, lo: int, hi: int) -> dict[str, bytes]:
        return dict(list(self.files.items())[lo:hi])


def add_collection(refs: Refs, name: str, files: dict[str, bytes], *, spec: str = SPEC) -> None:
    """What ``keeper reference add`` leaves: the table under ROOT/NAME, reference.json last."""
    table = embed_files(str(refs.base), files, spec=SPEC, capture=False, table=f"refs/{name}")
    rows = storage.read_parquet(storage.join(table, embed.EMBEDDINGS))
    stamp = now()
    meta = ReferenceMeta(
        name=name,
        model_spec=spec,
        embed_dim=len(rows.column("embedding")[0]),
        images=rows.num_rows,
        description=f"test collection {name}",
        created_at=stamp,
        updated_at=stamp,
    )
    write_meta(refs.root, meta)


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> Refs:
    base = tmp_path_factory.mktemp("compare-refs")
    files = {f"{n}.jpg": jpeg(im) for n, im in load_photos(PHOTOS).items()}
    r = Refs(base, str(base / "refs"), files)
    add_collection(r, "portfolio", r.names(0, PORTFOLIO))
    # Rows of the served model, but reference.json says another: refused, never fatal.
    add_collection(r, "other-model", r.names(PORTFOLIO, PORTFOLIO + 2), spec=OTHER_SPEC)
    # A table without reference.json is an add in progress: not a collection.
    embed_files(str(base), r.names(0, 2), spec=SPEC, capture=False, table="refs/half-added")
    return r


@pytest.fixture(scope="module")
def app(
    shared_serve: int, ray_cluster: str, refs: Refs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from keeper_serve import local

    d = tmp_path_factory.mktemp("compare-serve")
    (d / "token").write_text(TOKEN)
    overrides = small_app_overrides(
        d,
        SPEC,
        **{
            "references": {"root": refs.root, "poll_s": 1.0, "max_k": MAX_K},
            "deployments.ReferenceCollections.ray_actor_options.num_cpus": 0.1,
        },
    )
    url = local.start(overrides=overrides, port=shared_serve, wait_s=240)
    try:
        yield url
    finally:
        local.shutdown()


def compare(url: str, body: dict[str, Any], **kw: Any) -> Any:
    return call(url, "POST", "/v1/compare", body, **kw)


def member_uri(refs: Refs, name: str) -> str:
    return storage.join(str(refs.base), "photos", name)


# ----------------------------------------------------------------------------- tests


def test_a_member_finds_itself_first(app: str, refs: Refs) -> None:
    name, data = list(refs.files.items())[3]
    r = compare(app, {"image": b64(data), "collection": "portfolio", "k": 4, "request_id": "c-1"})
    assert r.status == 200, r.body
    body = r.body
    assert (body["request_id"], body["model"], body["random_weights"]) == ("c-1", SPEC, True)
    assert body["collection"] == {
        "name": "portfolio",
        "images": PORTFOLIO,
        "model_spec": SPEC,
        "updated_at": body["collection"]["updated_at"],
        "description": "test collection portfolio",
    }
    nearest = body["nearest"]
    assert len(nearest) == 4
    assert nearest[0]["image_uri"] == member_uri(refs, name)
    assert nearest[0]["score"] > 0.99, nearest
    scores = [n["score"] for n in nearest]
    assert scores == sorted(scores, reverse=True)
    assert len({n["image_uri"] for n in nearest}) == 4
    dims = list(body["aesthetic"])
    assert dims[0] == TOTAL, dims
    assert set(dims[1:]) >= {"composition", "sharpness"}, dims
    assert list(body["quality"]) == list(FEATURE_NAMES)
    for s in [*body["aesthetic"].values(), *body["quality"].values()]:
        assert 0.0 <= s["percentile"] <= 100.0, s


def test_percentiles_are_the_offline_profiles(app: str, refs: Refs) -> None:
    """A photo outside the portfolio: its scores and percentiles as ReferenceProfile computes
    them from the same table, with the prompt and image embeddings the app's encoder gives."""
    config = AestheticConfig.default()
    prompts = config.all_prompts()
    data = list(refs.files.values())[-1]
    r = call(app, "POST", "/v1/embed", {"texts": prompts, "images": [b64(data)]})
    assert r.status == 200, r.body
    prompt_emb = {
        t: np.asarray(e, np.float32)
        for t, e in zip(prompts, r.body["text_embeddings"], strict=True)
    }
    query = np.asarray(r.body["image_embeddings"][0], np.float32)
    collection = load_collection(refs.root, "portfolio", model_spec=SPEC)
    profile = ReferenceProfile.build(collection, prompt_emb, config)
    offline = profile.compare(query, None, k=MAX_K)

    r = compare(app, {"image": b64(data), "collection": "portfolio", "k": MAX_K})
    assert r.status == 200, r.body
    got = r.body
    one_rank = 100.0 / len(collection)
    assert list(got["aesthetic"]) == list(offline.aesthetic)
    for d, s in got["aesthetic"].items():
        want = offline.aesthetic[d]
        assert s["value"] == pytest.approx(want.value, abs=1e-6), d
        # The served percentile is where the served value sits among the members' scores...
        assert s["percentile"] == percentile_rank(profile.aesthetic[d], s["value"]), d
        # ... and the offline query's, up to a rank where the two values straddle a member.
        assert want.percentile is not None
        assert abs(s["percentile"] - want.percentile) <= one_rank, d
    for f, s in got["quality"].items():
        assert s["percentile"] == percentile_rank(profile.quality[f], s["value"]), f
    assert [n["image_uri"] for n in got["nearest"]] == [n.image_uri for n in offline.nearest]
    for n, want_n in zip(got["nearest"], offline.nearest, strict=True):
        assert n["score"] == pytest.approx(want_n.score, abs=1e-5)
        assert n["image_id"] == want_n.image_id
    # A photo's own quality features sit among the members' where the table says it would.
    table = storage.read_parquet(storage.join(refs.root, "portfolio", embed.EMBEDDINGS))
    first = table.to_pandas().iloc[0]
    name = Path(first["image_uri"]).name
    r = compare(app, {"image": b64(refs.files[name]), "collection": "portfolio", "k": 1})
    for f in FEATURE_NAMES:
        assert r.body["quality"][f]["value"] == pytest.approx(first[f], rel=1e-5, abs=1e-6), f


def test_references_lists_the_collections_and_the_refused(app: str, refs: Refs) -> None:
    r = call(app, "GET", "/v1/references")
    assert r.status == 200, r.body
    (listed,) = r.body["collections"]  # half-added has no reference.json: not a collection
    assert (listed["name"], listed["images"], listed["model_spec"]) == ("portfolio", 10, SPEC)
    assert (listed["failed"], listed["error"]) == (0, None)
    (refused,) = r.body["refused"]
    assert refused["name"] == "other-model"
    assert OTHER_SPEC in refused["reason"], refused
    assert SPEC in refused["reason"], refused


def test_auth_and_json_errors(app: str, refs: Refs) -> None:
    image = b64(next(iter(refs.files.values())))
    ok = {"image": image, "collection": "portfolio"}
    for method, path, body in [("POST", "/v1/compare", ok), ("GET", "/v1/references", None)]:
        r = call(app, method, path, body, token=None)
        assert (r.status, r.body["error"]["code"]) == (401, "unauthorized"), path
        assert r.headers["www-authenticate"] == "Bearer"
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({**ok, "collection": "nope"}, 404, "unknown_collection", "'nope'"),
        ({**ok, "collection": "half-added"}, 404, "unknown_collection", "half-added"),
        ({**ok, "collection": "other-model"}, 409, "collection_unusable", OTHER_SPEC),
        ({**ok, "k": 0}, 400, "k_out_of_range", "k=0"),
        ({**ok, "k": MAX_K + 1}, 400, "k_out_of_range", f"1..{MAX_K}"),
        ({"collection": "portfolio"}, 422, "invalid_request", "image"),
        ({"image": image}, 422, "invalid_request", "collection"),
        ({**ok, "image": {"b64": "not base64!"}}, 400, "invalid_base64", "image 0"),
        ({**ok, "image": {"b64": base64.b64encode(b"GIF8").decode()}}, 415, "not_an_image", ""),
        ({**ok, "colour": "red"}, 422, "invalid_request", "colour"),
    ]
    for body, status, code, words in cases:
        r = compare(app, body)
        assert (r.status, r.body["error"]["code"]) == (status, code), (body, r.body)
        assert words in r.body["error"]["message"], (body, r.body)
        assert "Traceback" not in r.body["error"]["message"], r.body
    r = call(app, "POST", "/v1/compare", raw=b"x=1", ctype="multipart/form-data; boundary=x")
    assert (r.status, r.body["error"]["code"]) == (415, "unsupported_media_type")
    # This app has no search index: /v1/search says so.
    r = call(app, "POST", "/v1/search", {"text": "a cat", "k": 2})
    assert (r.status, r.body["error"]["code"]) == (404, "search_not_configured"), r.body


def test_documented_compare_examples_run(app: str, refs: Refs, tmp_path: Path) -> None:
    """docs/http-api.md's ``/v1/compare`` and ``/v1/references`` examples (```shell blocks, as
    /v1/search's) with their statuses and response shapes."""
    examples = section_examples("### `POST /v1/compare`", "/v1/")
    assert len(examples) >= 3
    assert any("/v1/references" in e.script for e in examples)
    (tmp_path / "photo.jpg").write_bytes(next(iter(refs.files.values())))
    check_examples(app, examples, tmp_path)


def test_a_collection_added_and_removed_under_load_with_no_failures(app: str, refs: Refs) -> None:
    image = b64(list(refs.files.values())[1])
    statuses: list[int] = []
    failures: list[Any] = []
    stop = threading.Event()

    def client() -> None:
        for _ in range(2000):  # bounded: stops on the event long before
            if stop.is_set():
                return
            r = compare(app, {"image": image, "collection": "portfolio", "k": 3}, timeout=30)
            if r.status != 200 or len(r.body.get("nearest", [])) != 3:
                failures.append((r.status, r.body))
            statuses.append(r.status)

    def later_status() -> int:
        r = compare(app, {"image": image, "collection": "later", "k": 2})
        assert r.status in (200, 404), r.body
        return int(r.status)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(statuses) >= 5, 30, "requests before the add")
        assert later_status() == 404
        later = refs.names(PORTFOLIO + 2, PORTFOLIO + 5)
        add_collection(refs, "later", later)
        added = time.monotonic()
        wait_until(lambda: later_status() == 200, 15, "the added collection")
        add_s = time.monotonic() - added
        r = compare(app, {"image": b64(next(iter(later.values()))), "collection": "later", "k": 2})
        assert r.body["collection"]["images"] == len(later)
        assert r.body["nearest"][0]["image_uri"] == member_uri(refs, next(iter(later)))
        names = [c["name"] for c in call(app, "GET", "/v1/references").body["collections"]]
        assert names == ["later", "portfolio"]
        n = len(statuses)
        assert remove_collection(refs.root, "later") > 0
        wait_until(lambda: later_status() == 404, 15, "the removed collection")
        wait_until(lambda: len(statuses) >= n + 5, 30, "requests after the remove")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=35)
    assert not failures, f"{len(failures)} of {len(statuses)} failed: {failures[:3]}"
    assert add_s < 1.0 + 10, add_s  # poll_s + a load, with margin for a busy machine
    names = [c["name"] for c in call(app, "GET", "/v1/references").body["collections"]]
    assert names == ["portfolio"]
