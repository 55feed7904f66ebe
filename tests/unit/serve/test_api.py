"""keeper_serve.api and .config: request models, errors, ImagePreparer; the ingress app in-process.

No Ray is started. The last section drives the real FastAPI app of ``keeper_serve.ingress`` with
Starlette's TestClient: a real ``KeeperIngress`` instance (its class, not the Serve deployment)
with fake encoder/ranker handles, found through a patched ``serve.get_replica_context``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from serve_fakes import Remote, ingress_class
from support import jpeg_with_scans, photo, png_declaring

from keeper_core.errors import DECODE_REASONS, ConfigError
from keeper_core.images import image_size
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import QUALITY_INPUTS
from keeper_serve import api
from keeper_serve.api import ApiError, ImagePreparer, ImageRef
from keeper_serve.config import AuthArgs, KeeperAppArgs, LimitArgs

SPEC = "keeper-tiny:random"
SIZE = 64  # keeper-tiny's image size
LIMITS = LimitArgs(
    max_request_bytes=2_000_000,
    max_image_bytes=1_000_000,
    max_pixels=4_000_000,
    min_side=16,
    max_images=4,
    max_texts=3,
    max_text_chars=20,
)
BUCKET_ALLOWED_BY_NAME = "keeper-allowed"
Q_COLS = [FEATURE_NAMES.index(n) for n in QUALITY_INPUTS]  # what a ranker reads
WH_COLS = [FEATURE_NAMES.index("width"), FEATURE_NAMES.index("height")]


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> ImageRef:
    return ImageRef(b64=base64.b64encode(data).decode())


JPEG = encode(photo(320, 240, 1), "JPEG", quality=90)
PNG = encode(photo(120, 80, 2), "PNG")
# Drafted by decode_image (> 2 x 256 on both sides): decoded at 1/2 scale, 600 x 450.
BIG_JPEG = encode(photo(1200, 900, 3), "JPEG", quality=85)


def rotated_jpeg() -> bytes:
    """A JPEG stored 400 x 300 with EXIF orientation 6 (displayed 300 x 400)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(400, 300, 4), "JPEG", quality=90, exif=exif)


def app_args(**kw: Any) -> KeeperAppArgs:
    return KeeperAppArgs(clip_model=SPEC, limits=LIMITS, **kw)


@pytest.fixture(scope="module")
def prep() -> ImagePreparer:
    return ImagePreparer(app_args(s3_allow_buckets=[BUCKET_ALLOWED_BY_NAME]))


def refused(fn: Any, *a: Any, **kw: Any) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*a, **kw)
    return e.value


# ---------------------------------------------------------------------------- AuthArgs


def test_token_from_env_is_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPER_API_TOKEN", "  " + "a" * 20 + "\n")
    assert AuthArgs().token() == "a" * 20


def test_token_from_a_custom_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPER_API_TOKEN", raising=False)
    monkeypatch.setenv("MY_TOKEN", "b" * 16)
    assert AuthArgs(token_env="MY_TOKEN").token() == "b" * 16


def test_token_file_wins_over_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEEPER_API_TOKEN", "e" * 20)
    f = tmp_path / "token"
    f.write_text("f" * 32 + "\n")
    assert AuthArgs(token_file=str(f)).token() == "f" * 32


@pytest.mark.parametrize("value", ["", "   ", "x" * 15])
def test_token_too_short_or_missing_in_env(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("KEEPER_API_TOKEN", value)
    with pytest.raises(ConfigError, match=r"KEEPER_API_TOKEN.*>= 16"):
        AuthArgs().token()


def test_token_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPER_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="insecure-local"):
        AuthArgs().token()


def test_token_file_too_short_or_missing(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("x" * 15)
    with pytest.raises(ConfigError, match=">= 16"):
        AuthArgs(token_file=str(short)).token()
    with pytest.raises(ConfigError, match="cannot read"):
        AuthArgs(token_file=str(tmp_path / "absent")).token()


def test_insecure_local_has_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPER_API_TOKEN", raising=False)
    assert AuthArgs(insecure_local=True).token() is None
    assert AuthArgs(insecure_local=True, token_file="/nonexistent").token() is None


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("bucket", ["", "s3://b", "b/prefix"])
def test_allow_list_takes_bare_bucket_names(bucket: str) -> None:
    with pytest.raises(ValidationError, match="bare bucket names"):
        KeeperAppArgs(s3_allow_buckets=[bucket])


def test_image_limit_must_fit_the_request_limit() -> None:
    with pytest.raises(ValidationError, match="max_image_bytes"):
        KeeperAppArgs(limits=LimitArgs(max_request_bytes=10, max_image_bytes=11))


def test_app_args_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="extra"):
        KeeperAppArgs.model_validate({"limits": {"max_imagez": 3}})


# ---------------------------------------------------------------------------- request models


def test_image_ref_is_exactly_one_of_b64_or_uri() -> None:
    assert ImageRef(b64="AAAA").uri is None
    assert ImageRef(uri="s3://b/k").b64 is None
    for kw in ({}, {"b64": "AAAA", "uri": "s3://b/k"}):
        with pytest.raises(ValidationError, match="exactly one of b64 or uri"):
            ImageRef(**kw)
    with pytest.raises(ValidationError, match="extra"):
        ImageRef.model_validate({"b64": "AAAA", "url": "x"})


def test_embed_request_needs_an_image_or_a_text() -> None:
    with pytest.raises(ValidationError, match="at least one image or text"):
        api.EmbedRequest()
    assert api.EmbedRequest(texts=["a"]).images == []
    assert len(api.EmbedRequest(images=[ImageRef(b64="AAAA")]).images) == 1


def test_api_error_body() -> None:
    assert ApiError(400, "x", "m").body() == {"error": {"code": "x", "message": "m"}}
    assert ApiError(400, "x", "m", index=0).body() == {
        "error": {"code": "x", "message": "m", "index": 0}
    }


def test_decode_status_covers_every_decode_reason() -> None:
    # keeper_core's reasons: one without a status would be a KeyError (500) in the API.
    assert set(api.DECODE_STATUS) == set(DECODE_REASONS)
    assert all(400 <= s < 500 for s, _ in api.DECODE_STATUS.values())


# ---------------------------------------------------------------------------- parse_json


@pytest.mark.parametrize("body", [b"{", b"", b"not json", b'{"texts": ["a"],}', b"\xff"])
def test_parse_json_invalid_json(body: bytes) -> None:
    e = refused(api.parse_json, body, api.EmbedRequest)
    assert (e.status, e.code) == (422, "invalid_json")


@pytest.mark.parametrize(
    ("model", "body", "names"),
    [
        (api.EmbedRequest, b'{"images": [{"b64": 1}]}', "images.0.b64"),
        (api.EmbedRequest, b'{"texts": "a"}', "texts"),
        (api.EmbedRequest, b"{}", "at least one image or text"),
        (api.EmbedRequest, b"[]", "body"),
        (api.AestheticRequest, b'{"images": []}', "images"),
        (api.RelevanceRequest, b'{"images": [{"b64": "AA=="}]}', "positive"),
        (
            api.RelevanceRequest,
            b'{"positive": ["a"], "images": [{"b64": "AA=="}], "temperature": 0}',
            "temperature",
        ),
        (
            api.RankRequest,
            b'{"series": [{"images": [{"uri": "s3://b/k", "b64": "AA=="}]}]}',
            "one of",
        ),
        (api.RankRequest, b'{"series": [{"id": 3, "images": []}]}', "series.0.id"),
    ],
)
def test_parse_json_schema_violation_names_the_field(
    model: type[Any], body: bytes, names: str
) -> None:
    e = refused(api.parse_json, body, model)
    assert (e.status, e.code) == (422, "invalid_request")
    assert names in e.message


def test_parse_json_rejects_extra_keys() -> None:
    e = refused(api.parse_json, b'{"texts": ["a"], "colour": "red"}', api.EmbedRequest)
    assert (e.status, e.code) == (422, "invalid_request")
    assert e.message.startswith("colour:")
    e = refused(api.parse_json, b'{"series": [{"images": [], "name": "x"}]}', api.RankRequest)
    assert "series.0.name" in e.message


def test_parse_json_accepts_a_valid_body() -> None:
    req = api.parse_json(
        b'{"positive": ["a cat"], "negative": ["blur"], "images": [{"uri": "s3://b/k"}]}',
        api.RelevanceRequest,
    )
    assert req.temperature == 0.01
    assert req.images[0].uri == "s3://b/k"


def test_form_list() -> None:
    assert api.form_list('["a", "b"]', "texts") == ["a", "b"]
    assert api.form_list("  a cat ", "texts") == ["a cat"]
    for bad in ('["a", ', "[1, 2]", '["\\ud800"]'):
        e = refused(api.form_list, bad, "positive")
        assert (e.status, e.code) == (422, "invalid_request")
        assert "form field 'positive'" in e.message


# ---------------------------------------------------------------------------- ImagePreparer


def test_prepare_good_images(prep: ImagePreparer) -> None:
    out = prep.prepare([JPEG, b64(PNG)], quality=True)
    assert out.pixels.shape == (2, 3, SIZE, SIZE)
    assert out.pixels.dtype == np.uint8
    assert out.quality is not None
    assert out.quality.shape == (2, len(FEATURE_NAMES))
    assert out.quality.dtype == np.float32
    assert np.isfinite(out.quality).all()
    assert prep.prepare([PNG], quality=False).quality is None


def test_prepare_nothing(prep: ImagePreparer) -> None:
    out = prep.prepare([], quality=True)
    assert out.pixels.shape == (0, 3, SIZE, SIZE)
    assert out.quality is None


def test_too_many_images(prep: ImagePreparer) -> None:
    e = refused(prep.prepare, [PNG] * 5, quality=False)
    assert (e.status, e.code) == (400, "too_many_images")
    prep.check_count(4)
    assert refused(prep.check_count, 5).code == "too_many_images"


@pytest.mark.parametrize("bad", ["!!!!", "AAA", "AA==AA==", "a b c d"])
def test_invalid_base64(prep: ImagePreparer, bad: str) -> None:
    e = refused(prep.prepare, [b64(PNG), ImageRef(b64=bad)], quality=False)
    assert (e.status, e.code, e.index) == (400, "invalid_base64", 1)
    assert e.body()["error"]["index"] == 1


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"hello, not an image at all", 415, "not_an_image"),
        (b"", 400, "empty_image"),
        (JPEG[: len(JPEG) // 2], 400, "undecodable_image"),
        (png_declaring(5000, 5000), 400, "too_many_pixels"),
        (jpeg_with_scans(300), 400, "too_many_scans"),
        (encode(photo(8, 40), "PNG"), 400, "image_too_small"),
        (b"\xff\xd8\xff" + b"\x00" * 1_000_000, 413, "image_too_large"),
    ],
)
def test_bad_image_names_its_index(
    prep: ImagePreparer, data: bytes, status: int, code: str
) -> None:
    for refs in ([PNG, data], [b64(PNG), b64(data)]):
        e = refused(prep.prepare, refs, quality=True)
        assert (e.status, e.code, e.index) == (status, code, 1), e.message
        assert "image 1" in e.message


def test_the_scan_limit_is_the_apps() -> None:
    """limits.max_jpeg_scans reaches the decoder: a 10-scan progressive JPEG passes at 10 and
    is refused at 9."""
    progressive = encode(photo(96, 64), "JPEG", progressive=True)
    for limit, refused_ in ((10, False), (9, True)):
        limits = LIMITS.model_copy(update={"max_jpeg_scans": limit})
        assert limits.decode_limits().max_jpeg_scans == limit
        prepare = ImagePreparer(KeeperAppArgs(clip_model=SPEC, limits=limits)).prepare
        if refused_:
            e = refused(prepare, [progressive], quality=False)
            assert (e.status, e.code, e.index) == (400, "too_many_scans", 0)
        else:
            assert len(prepare([progressive], quality=False).pixels) == 1


def test_the_first_bad_image_is_reported(prep: ImagePreparer) -> None:
    e = refused(prep.prepare, [PNG, b"not an image", ImageRef(b64="!!")], quality=False)
    assert (e.code, e.index) == ("not_an_image", 1)


def _has_heif() -> bool:
    Image.init()
    return "HEIF" in Image.OPEN


@pytest.mark.skipif(_has_heif(), reason="a HEIF plugin is installed here")
def test_broken_heic_is_undecodable(prep: ImagePreparer) -> None:
    # HEIC is decoded (pillow-heif): a HEIF signature over garbage is a broken image, not 415.
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    e = refused(prep.prepare, [heic], quality=False)
    assert (e.status, e.code, e.index) == (400, "undecodable_image", 0)


def test_base64_over_the_size_limit_is_refused_before_decoding(prep: ImagePreparer) -> None:
    # ~1.4 MB of base64 text, never decoded: 413 with the index.
    e = refused(prep.prepare, [ImageRef(b64="A" * 1_400_000)], quality=False)
    assert (e.status, e.code, e.index) == (413, "image_too_large", 0)


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com/a.jpg",
        "https://x/y.png",
        "gs://b/k.jpg",
        "/etc/passwd",
        "s3://",
        # An allow-listed bucket, and a key a path-normalising proxy would read elsewhere.
        "s3://allowed/../secret/k.jpg",
        "s3://allowed/a/./b.jpg",
    ],
)
def test_unsupported_uri(uri: str) -> None:
    prep = ImagePreparer(app_args(s3_allow_buckets=["allowed"]))
    e = refused(prep.prepare, [PNG, ImageRef(uri=uri)], quality=False)
    assert (e.status, e.code, e.index) == (400, "unsupported_uri", 1)


def test_uri_outside_the_allow_list(prep: ImagePreparer) -> None:
    # Refused from the URI alone: no request reaches any S3 endpoint.
    e = refused(prep.prepare, [ImageRef(uri="s3://someone-elses-bucket/a.jpg")], quality=False)
    assert (e.status, e.code, e.index) == (403, "uri_not_allowed", 0)
    assert "someone-elses-bucket" in e.message
    closed = ImagePreparer(app_args())  # the default: no bucket allowed
    assert refused(closed.prepare, [ImageRef(uri="s3://any/k")], quality=False).status == 403


def test_allowed_bucket_on_s3(s3_bucket: str) -> None:
    prep = ImagePreparer(app_args(s3_allow_buckets=[s3_bucket]))
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=s3_bucket, Key="photos/a.jpg", Body=JPEG)
    s3.put_object(Bucket=s3_bucket, Key="photos/big.jpg", Body=b"\xff\xd8\xff" + bytes(1_000_001))

    out = prep.prepare([ImageRef(uri=f"s3://{s3_bucket}/photos/a.jpg"), PNG], quality=True)
    np.testing.assert_array_equal(out.pixels, prep.prepare([JPEG, PNG], quality=False).pixels)

    e = refused(
        prep.prepare, [PNG, ImageRef(uri=f"s3://{s3_bucket}/photos/big.jpg")], quality=False
    )
    assert (e.status, e.code, e.index) == (413, "image_too_large", 1)
    assert f"1000004 bytes > {prep.limits.max_image_bytes}" in e.message  # from one ranged GET

    e = refused(prep.prepare, [ImageRef(uri=f"s3://{s3_bucket}/photos/missing.jpg")], quality=False)
    assert (e.status, e.code, e.index) == (400, "unreadable_uri", 0)


def test_check_texts(prep: ImagePreparer) -> None:
    prep.check_texts(["a", "b", "x" * 20])
    e = refused(prep.check_texts, ["a"] * 4)
    assert (e.status, e.code) == (400, "too_many_texts")
    e = refused(prep.check_texts, ["ok", "y" * 21], "prompts")
    assert (e.status, e.code, e.index) == (400, "text_too_long", 1)
    assert e.message.startswith("prompts[1]")
    for empty in ("", "   \n"):
        e = refused(prep.check_texts, ["ok", empty])
        assert (e.status, e.code, e.index) == (422, "invalid_request", 1)


# ------------------------------------------------- served features == trained features


def embed_prepare(tmp_path: Path, images: dict[str, bytes], limits: LimitArgs) -> dict[str, Any]:
    from keeper_train.jobs.embed import prepare_batch

    paths = []
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    out = prepare_batch(
        {"image_uri": np.array(paths, dtype=object)},
        spec=SPEC,
        limits={
            "max_pixels": limits.max_pixels,
            "max_bytes": limits.max_image_bytes,
            "min_side": limits.min_side,
        },
        draft=True,
        errors_dir=str(tmp_path / "errors"),
        run_id="parity",
    )
    assert len(out["image_uri"]) == len(images), "keeper embed refused an image"
    return out


PARITY_IMAGES = {
    "small.jpg": JPEG,
    "big.jpg": BIG_JPEG,
    "rotated.jpg": rotated_jpeg(),
    "photo.png": PNG,
    "alpha.png": encode(photo(100, 90, 5).convert("RGBA"), "PNG"),
    "grey.jpg": encode(photo(200, 150, 6).convert("L"), "JPEG", quality=80),
}


def test_served_features_equal_embed_features(tmp_path: Path) -> None:
    limits = LIMITS.model_copy(update={"max_images": len(PARITY_IMAGES)})
    prep = ImagePreparer(KeeperAppArgs(clip_model=SPEC, limits=limits))
    trained = embed_prepare(tmp_path, PARITY_IMAGES, limits)
    served = prep.prepare(list(PARITY_IMAGES.values()), quality=True)
    np.testing.assert_array_equal(served.pixels, trained["pixel_values"])
    assert served.quality is not None
    want = np.stack([trained[n] for n in FEATURE_NAMES], axis=1)
    np.testing.assert_allclose(served.quality[:, Q_COLS], want[:, Q_COLS], rtol=0, atol=1e-5)
    # Images decode_image does not draft: every column matches, width and height included.
    undrafted = [i for i, n in enumerate(PARITY_IMAGES) if n != "big.jpg"]
    np.testing.assert_allclose(served.quality[undrafted], want[undrafted], rtol=0, atol=1e-5)


def test_the_ingress_preparer_imports_neither_torch_nor_open_clip(tmp_path: Path) -> None:
    """Given the builder's preprocess config (keeper_serve.app.bind passes it), an ingress
    replica prepares images without torch (~0.7 GiB a replica). A fresh interpreter."""
    import pickle
    import subprocess
    import sys

    from keeper_core.models import preprocess_config

    (tmp_path / "pre.pkl").write_bytes(pickle.dumps(preprocess_config(SPEC)))
    (tmp_path / "a.jpg").write_bytes(BIG_JPEG)
    script = f"""
import pickle, sys
from pathlib import Path
from keeper_serve.api import ImagePreparer
from keeper_serve.config import KeeperAppArgs
d = Path({str(tmp_path)!r})
prep = ImagePreparer(KeeperAppArgs(clip_model={SPEC!r}), pickle.loads((d / "pre.pkl").read_bytes()))
out = prep.prepare([(d / "a.jpg").read_bytes()], quality=True)
print(out.pixels.shape, [m for m in ("torch", "torchvision", "open_clip") if m in sys.modules])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"(1, 3, {SIZE}, {SIZE}) []"


def test_served_width_height_are_the_original_size(prep: ImagePreparer) -> None:
    served = prep.prepare([BIG_JPEG], quality=True)
    assert served.quality is not None
    assert tuple(served.quality[0, WH_COLS]) == image_size(BIG_JPEG) == (1200, 900)


# ------------------------------------------------- the ingress app, in this process


def _unit(n: int) -> np.ndarray:
    return np.full((n, 8), 8**-0.5, np.float32)


class FakeEncoder:
    embed_pixels = Remote(lambda px: _unit(len(px)))
    embed_texts = Remote(lambda texts: _unit(len(texts)))
    info = Remote(
        lambda: {
            "spec": SPEC,
            "embed_dim": 8,
            "image_size": SIZE,
            "random_weights": True,
            "logit_scale": 100.0,
        }
    )


class FakeRanker:
    info = Remote(lambda: {"uri": "models:/r@champion", "status": "unavailable", "error": "x"})
    rank = Remote(lambda emb, quality, lengths: {"unavailable": "no ranker loaded"})


class FakeVlm:
    info = Remote(lambda: {"status": "disabled", "source": None})


class Recorder:
    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []

    def inc(self, value: float = 1, tags: dict[str, str] | None = None) -> None:
        self.tags.append(dict(tags or {}))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.tags.append(dict(tags or {}))


TOKEN = "t0ken-" + "x" * 26
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ingress_mod() -> Any:
    from keeper_serve import ingress

    return ingress


@pytest.fixture
def served(ingress_mod: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """(TestClient, the KeeperIngress instance) with fake handles; no Ray."""
    import ray.serve
    from fastapi.testclient import TestClient

    monkeypatch.setenv("KEEPER_API_TOKEN", TOKEN)
    cls = ingress_class()
    inst = cls(FakeEncoder(), FakeRanker(), FakeVlm(), app_args())
    inst.requests, inst.latency = Recorder(), Recorder()
    monkeypatch.setattr(
        ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=inst)
    )
    with TestClient(ingress_mod.app, raise_server_exceptions=False) as client:
        yield client, inst


def err(r: Any) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_ingress_auth(served: tuple[Any, Any]) -> None:
    client, _ = served
    assert client.get("/healthz").json() == {"status": "ok"}
    for path in ("/v1/models", "/docs", "/openapi.json", "/nowhere"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = client.get(path, headers=headers)
            assert err(r) == (401, "unauthorized"), (path, headers)
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert client.get("/docs", headers=AUTH).status_code == 200
    paths = client.get("/openapi.json", headers=AUTH).json()["paths"]
    assert {"/healthz", "/v1/models", "/v1/embed", "/v1/rank"} <= set(paths)


def test_openapi_references_resolve(served: tuple[Any, Any]) -> None:
    """Every $ref in /openapi.json names a schema in its components (request bodies too)."""
    import re

    client, _ = served
    doc = client.get("/openapi.json", headers=AUTH).json()
    refs = set(re.findall(r"#/components/schemas/([A-Za-z0-9_]+)", json.dumps(doc)))
    assert {"EmbedRequest", "RankRequest", "ImageRef", "SeriesIn"} <= refs
    assert refs <= set(doc["components"]["schemas"])
    rank_body = doc["paths"]["/v1/rank"]["post"]["requestBody"]["content"]
    assert set(rank_body) == {"application/json"}  # /v1/rank takes no multipart


def test_ingress_models_and_routing_errors(served: tuple[Any, Any]) -> None:
    client, _ = served
    body = client.get("/v1/models", headers=AUTH).json()
    assert body["clip"]["random_weights"] is True
    assert body["ranker"]["status"] == "unavailable"
    assert err(client.get("/v2/nothing", headers=AUTH)) == (404, "not_found")
    assert err(client.get("/v1/embed", headers=AUTH)) == (405, "method_not_allowed")


def test_ingress_bodies(served: tuple[Any, Any]) -> None:
    client, _ = served
    r = client.post(
        "/v1/embed",
        headers=AUTH,
        json={"images": [{"b64": base64.b64encode(PNG).decode()}], "texts": ["a"]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["dim"] == 8
    assert len(r.json()["image_embeddings"]) == len(r.json()["text_embeddings"]) == 1
    assert err(client.post("/v1/embed", headers=AUTH, content=b"{")) == (422, "invalid_json")
    r = client.post("/v1/embed", headers={**AUTH, "Content-Type": "text/plain"}, content=b"{}")
    assert err(r) == (415, "unsupported_media_type")
    r = client.post("/v1/embed", headers=AUTH, content=b"x" * (LIMITS.max_request_bytes + 1))
    assert err(r) == (413, "request_too_large")
    files = [("images", ("a.png", PNG, "image/png"))]
    r = client.post("/v1/rank", headers=AUTH, files=files)
    assert err(r) == (415, "unsupported_media_type")
    series = {"series": [{"images": [{"b64": base64.b64encode(PNG).decode()}] * 2}]}
    assert err(client.post("/v1/rank", headers=AUTH, json=series)) == (503, "model_unavailable")
    one = {"series": [{"images": [{"b64": base64.b64encode(PNG).decode()}]}]}
    r = client.post("/v1/rank", headers=AUTH, json=one)
    assert (*err(r), r.json()["error"]["index"]) == (400, "series_too_short", 0)


def test_ingress_multipart(served: tuple[Any, Any]) -> None:
    client, _ = served
    files = [("images", ("a.png", PNG, "image/png")), ("images", ("b.jpg", JPEG, "image/jpeg"))]
    r = client.post(
        "/v1/score/relevance",
        headers=AUTH,
        files=files,
        data={"positive": ["a cat", "a dog"], "negative": '["blur"]', "temperature": "0.5"},
    )
    assert r.status_code == 200, r.text
    assert [s["index"] for s in r.json()["scores"]] == [0, 1]
    assert set(r.json()["scores"][0]["softmax"]) == {"a cat", "a dog", "blur"}
    r = client.post("/v1/score/aesthetic", headers=AUTH, files=files)
    assert r.status_code == 200, r.text
    r = client.post("/v1/embed", headers=AUTH, files=files, data={"texts": "hello"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/embed", headers=AUTH, files=[("photo", ("a.png", PNG, "image/png"))])
    assert err(r) == (422, "invalid_request")
    r = client.post("/v1/embed", headers=AUTH, files=files, data={"colour": "red"})
    assert err(r) == (422, "invalid_request")
    r = client.post("/v1/embed", headers=AUTH, files=files[:1] * 5, data={"texts": "x"})
    assert err(r) == (400, "too_many_images")
    r = client.post(
        "/v1/embed",
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zzz"},
        content=b"garbage",
    )
    assert err(r) == (400, "bad_multipart")


def test_ingress_multipart_embed_images_only(served: tuple[Any, Any]) -> None:
    client, _ = served
    r = client.post("/v1/embed", headers=AUTH, files=[("images", ("a.png", PNG, "image/png"))])
    assert r.status_code == 200, r.text


def test_ingress_metrics_count_requests(served: tuple[Any, Any]) -> None:
    client, inst = served
    client.get("/healthz")
    client.get("/v1/models")
    client.get("/somewhere/else", headers=AUTH)
    assert inst.requests.tags == [
        {"route": "/healthz", "status": "200"},
        {"route": "/v1/models", "status": "401"},
        {"route": "other", "status": "404"},
    ]
    assert inst.latency.tags == [{"route": "/healthz"}, {"route": "/v1/models"}, {"route": "other"}]


def test_ingress_metrics_count_internal_errors(served: tuple[Any, Any]) -> None:
    client, inst = served
    inst.encoder = None  # any unhandled exception in a route
    inst._clip_info = None
    r = client.get("/v1/models", headers=AUTH)
    assert err(r) == (500, "internal")
    assert {"route": "/v1/models", "status": "500"} in inst.requests.tags


def test_ingress_embed_texts_only(served: tuple[Any, Any]) -> None:
    """The first example of docs/http-api.md: no images, so no image count (Ray's Counter raises
    on 0; the fixture keeps the instance's real ``images_in`` Counter)."""
    client, inst = served
    assert type(inst.images_in).__module__.startswith("ray.")
    r = client.post("/v1/embed", headers=AUTH, json={"texts": ["a cat", "a dog"]})
    assert r.status_code == 200, r.text
    assert r.json()["image_embeddings"] == []
    assert len(r.json()["text_embeddings"]) == 2


@pytest.fixture
def bare_app(ingress_mod: Any) -> Iterator[Any]:
    """The FastAPI app with no replica context: ``serve.get_replica_context()`` raises."""
    from fastapi.testclient import TestClient

    with TestClient(ingress_mod.app, raise_server_exceptions=False) as client:
        yield client


NON_PUBLIC = [
    ("GET", "/v1/models"),
    ("POST", "/v1/embed"),
    ("POST", "/v1/score/aesthetic"),
    ("POST", "/v1/score/relevance"),
    ("POST", "/v1/rank"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/nowhere"),
]


@pytest.mark.parametrize(("method", "path"), NON_PUBLIC)
def test_ingress_auth_fails_closed_without_a_replica_context(
    bare_app: Any, method: str, path: str
) -> None:
    for headers in ({}, AUTH):
        r = bare_app.request(method, path, headers=headers, json={"texts": ["a"]})
        assert err(r) == (503, "auth_unavailable"), (path, r.text)
        assert r.headers["retry-after"] == "1"


def test_ingress_auth_fails_closed_when_only_the_lookup_fails(
    served: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The middleware's lookup raises, the route's would succeed: the request is still refused.

    Before failing closed, this served /v1/models with no token at all.
    """
    import ray.serve

    client, inst = served
    calls: list[int] = []

    def flaky() -> Any:
        calls.append(1)
        if len(calls) % 2:  # the middleware asks first, then the route
            raise RuntimeError("replica context unavailable")
        return types.SimpleNamespace(servable_object=inst)

    monkeypatch.setattr(ray.serve, "get_replica_context", flaky)
    r = client.get("/v1/models")  # no token
    assert err(r) == (503, "auth_unavailable")
    calls.clear()
    assert client.get("/healthz").json() == {"status": "ok"}  # public: still answered


def test_ingress_auth_fails_closed_before_the_instance_exists(
    served: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.serve

    client, _ = served
    monkeypatch.setattr(
        ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=None)
    )
    assert err(client.get("/v1/models", headers=AUTH)) == (503, "auth_unavailable")


def test_ingress_middleware_counts_a_request_the_client_left_as_499(
    served: tuple[Any, Any], ingress_mod: Any
) -> None:
    """A request cancelled before its answer began (the client went away) is counted, as 499,
    and the cancellation still propagates; one that fails after its answer began keeps that
    answer's status."""
    import asyncio

    _, inst = served

    async def leaves(scope: Any, receive: Any, send: Any) -> None:
        raise asyncio.CancelledError

    async def breaks_mid_answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("the stream broke")

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/models",
        "headers": [(b"authorization", AUTH["Authorization"].encode())],
        "query_string": b"",
    }

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(ingress_mod._AuthAndMetrics(leaves)(scope, receive, send))
    with pytest.raises(RuntimeError, match="the stream broke"):
        asyncio.run(ingress_mod._AuthAndMetrics(breaks_mid_answer)(scope, receive, send))
    assert inst.requests.tags[-2:] == [
        {"route": "/v1/models", "status": "499"},
        {"route": "/v1/models", "status": "200"},
    ]
