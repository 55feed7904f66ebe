"""Request limits of the HTTP API: what a hostile or careless body costs, and what it is told.

Each test is a defect an audit reproduced in this process (no Ray): a per-request pixel budget
checked from headers before any decode, one full-size image alive at a time, static list caps and
a JSON value count before a body is parsed (off the event loop), client numbers that raised
OverflowError / ValueError / RecursionError as 500s, remote errors leaking Ray's traceback (pid,
node IP, file paths) into bodies, a NaN softmax at a tiny temperature, repeated multipart scalars
silently overwriting, and over-long ids echoed whole. The routes are driven as
tests/unit/serve/test_api.py drives them: the real FastAPI app of ``keeper_serve.ingress`` with a
``KeeperIngress`` instance holding fake handles, found through a patched
``serve.get_replica_context``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from ray.exceptions import RayTaskError
from serve_fakes import Recorder, Remote, ingress_class
from support import photo

from keeper_core.capture import given_capture
from keeper_core.errors import ConfigError, DataError
from keeper_core.models import preprocess_config
from keeper_core.preparation import DecodedImage
from keeper_core.scoring import prompt_softmax
from keeper_serve import api
from keeper_serve.api import ApiError, ImagePreparer, ImageRef
from keeper_serve.config import (
    EVENTS_CEILING,
    IMAGE_ID_CHARS,
    IMAGES_CEILING,
    SELECT_IDS_CEILING,
    SERIES_CEILING,
    TEXTS_CEILING,
    FeedbackArgs,
    KeeperAppArgs,
    LimitArgs,
    SearchArgs,
)
from keeper_serve.search import Snapshot, UnknownImageId

SPEC = "keeper-tiny:random"
TOKEN = "limits-t0ken-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIM = 8
# What a Ray Serve handle raises for an error inside another deployment: its str() is this.
REMOTE_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/home/ray/anaconda3/lib/python3.12/site-packages/keeper_serve/encoder.py", line 9\n'
    "    raise DataError(...)\n"
    "keeper_core.errors.DataError: embeddings of /srv/models/clip.pt are not finite"
)
LEAKS = ("pid", "10.1.2.3", "/home/ray", "/srv/models", "Traceback", "File ")


# ---------------------------------------------------------------------------- helpers


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _embed_texts(texts: list[str]) -> np.ndarray:
    seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
    return _unit(np.stack([np.random.default_rng(s).normal(size=DIM) for s in seeds]))


class FakeEncoder:
    def __init__(self) -> None:
        self.pixel_calls = 0
        self.loop_threads: set[int] = set()
        self.embed_pixels = Remote(self._pixels)
        self.embed_texts = Remote(self._texts)
        self.info = Remote(
            lambda: {
                "spec": SPEC,
                "embed_dim": DIM,
                "image_size": 64,
                "random_weights": True,
                "logit_scale": 100.0,
            }
        )

    def _pixels(self, px: np.ndarray) -> np.ndarray:
        self.pixel_calls += 1
        self.loop_threads.add(threading.get_ident())  # Remote runs it on the event loop
        return _unit(np.ones((len(px), DIM)))

    def _texts(self, texts: list[str]) -> np.ndarray:
        self.loop_threads.add(threading.get_ident())
        return _embed_texts(texts)


class FakeRanker:
    info = Remote(lambda: {"uri": None, "status": "disabled"})
    rank = Remote(lambda *a: {"unavailable": "no ranker loaded"})


class FakeVlm:
    def __init__(self, fail: BaseException | None = None) -> None:
        keys = ("source", "architecture", "dtype", "device", "parameters", "random_weights")
        on = {**dict.fromkeys(keys), "status": "ready", "source": "tiny", "random_weights": True}
        self.info = Remote(lambda: on)
        self.fail = fail
        self.relevance = Remote(self._relevance)

    def _relevance(self, images: list[np.ndarray], query: str) -> np.ndarray:
        if self.fail is not None:
            raise self.fail
        return np.full(len(images), 0.5, np.float32)


def remote_error(cause: BaseException) -> BaseException:
    """``cause`` as a deployment handle raises it: Ray's ``RayTaskError(Type)`` dual."""
    wrapped: BaseException = RayTaskError(
        "ServeReplica:keeper:ClipEncoder.handle_request",
        REMOTE_TRACEBACK,
        cause,
        proctitle="ray::ServeReplica:keeper:ClipEncoder",
        pid=4242,
        ip="10.1.2.3",
    ).as_instanceof_cause()
    return wrapped


@pytest.fixture
def serve_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[Any, Any]]]:
    """``make(args=None, encoder=None, vlm=None, search=None) -> (TestClient, instance)``."""
    import ray.serve
    from fastapi.testclient import TestClient

    from keeper_serve import ingress

    monkeypatch.setenv("KEEPER_API_TOKEN", TOKEN)
    cls = ingress_class()
    with contextlib.ExitStack() as stack:

        def make(
            args: KeeperAppArgs | None = None,
            encoder: Any = None,
            vlm: Any = None,
            search: Any = None,
        ) -> tuple[Any, Any]:
            args = args or KeeperAppArgs(clip_model=SPEC)
            inst = cls(
                encoder or FakeEncoder(),
                FakeRanker(),
                vlm,
                args,
                search,
                preprocess=preprocess_config(SPEC),
            )
            inst.requests, inst.latency = Recorder(), Recorder()
            monkeypatch.setattr(
                ray.serve,
                "get_replica_context",
                lambda: types.SimpleNamespace(servable_object=inst),
            )
            client = stack.enter_context(TestClient(ingress.app, raise_server_exceptions=False))
            return client, inst

        yield make


def err(r: Any) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


@pytest.fixture(scope="module")
def flat_png() -> bytes:
    """The audit's image: a flat 8000 x 5000 PNG, ~127 KB that decodes to 40 MP (120 MB RGB)."""
    return encode(Image.new("RGB", (8000, 5000), (120, 130, 140)), "PNG")


def preparer(**limits: Any) -> ImagePreparer:
    args = KeeperAppArgs(clip_model=SPEC, limits=LimitArgs(**limits))
    return ImagePreparer(args, preprocess_config(SPEC))


def refused(fn: Callable[..., Any], *a: Any, **kw: Any) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*a, **kw)
    return e.value


def never_decode(prep: ImagePreparer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``prep``'s decode fail the test if reached; returns the list of calls."""
    calls: list[int] = []

    def decode(data: bytes, *, source: str | None = None) -> DecodedImage:
        calls.append(len(data))
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(prep.preparation, "decode", decode)
    return calls


# ---------------------------------------------------------------- 1. pixels per request


#: Flat 40 MP PNGs of 127 KB each that pass the default budget of 1,000 MP together (1,040 MP).
OVER_BUDGET = 26


def test_flat_pngs_over_the_budget_are_refused_from_their_headers_before_any_decode(
    flat_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    prep = preparer()  # the defaults: 40 MP an image, 1,000 MP a request
    assert len(flat_png) < 200_000
    calls = never_decode(prep, monkeypatch)
    for prepare in (
        lambda refs: prep.prepare(refs, quality=True),
        lambda refs: prep.prepare_select(refs, 448),
        lambda refs: prep.prepare_pick(
            refs, [api.PickImage(b64="")] * len(refs), [None] * OVER_BUDGET
        ),
    ):
        e = refused(prepare, [flat_png] * OVER_BUDGET)
        assert (e.status, e.code, e.index) == (400, "too_many_request_pixels", None)
        assert "1040000000" in e.message
        assert "1000000000" in e.message
    assert calls == []


def test_the_budget_over_http_multipart(
    serve_app: Callable[..., tuple[Any, Any]], flat_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit's request, grown past the budget (26 flat PNGs, 3.3 MB of multipart to
    /v1/embed): 400, nothing decoded."""
    encoder = FakeEncoder()
    client, inst = serve_app(encoder=encoder)
    real = inst.images.preparation.decode
    calls = never_decode(inst.images, monkeypatch)
    files = [("images", (f"{i}.png", flat_png, "image/png")) for i in range(OVER_BUDGET)]
    r = client.post("/v1/embed", files=files, headers=AUTH)
    assert err(r) == (400, "too_many_request_pixels"), r.text
    assert calls == []
    assert encoder.pixel_calls == 0
    # The server keeps serving: one such image is within the budget, and decoded.
    monkeypatch.setattr(inst.images.preparation, "decode", real)
    r = client.post("/v1/embed", files=files[:1], headers=AUTH)
    assert r.status_code == 200, r.text


def test_an_s3_image_is_counted_when_fetched_before_it_is_decoded(
    flat_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    prep = preparer(max_request_pixels=100_000_000)
    small = encode(photo(64, 48), "PNG")
    monkeypatch.setattr(prep, "image_bytes", lambda ref, index: flat_png)
    decoded: list[int] = []
    real = prep.preparation.decode

    def decode(data: bytes, *, source: str | None = None) -> DecodedImage:
        decoded.append(len(data))
        return real(data, source=source)

    monkeypatch.setattr(prep.preparation, "decode", decode)
    uri = ImageRef(uri="s3://b/k.png")
    e = refused(prep.prepare, [small, uri, uri, uri], quality=False)
    assert e.code == "too_many_request_pixels"
    assert "at least 120003072" in e.message
    # The small upload and the first two 40 MP images were decoded, the third never.
    assert decoded == [len(small), len(flat_png), len(flat_png)]


@pytest.mark.parametrize(
    ("image", "fmt", "kw"),
    [
        (photo(1200, 900, 3), "JPEG", {"quality": 85}),  # drafted 1/2: 600 x 450
        (photo(2400, 1800, 4), "JPEG", {"quality": 85}),  # drafted 1/4
        (photo(320, 240, 1), "JPEG", {"quality": 90}),  # under twice the draft size: whole
        (photo(120, 80, 2), "PNG", {}),
        (photo(300, 200, 5), "WEBP", {}),
    ],
)
def test_decoded_pixels_from_the_header_are_what_the_decode_allocates(
    image: Image.Image, fmt: str, kw: dict[str, Any]
) -> None:
    prep = preparer()
    data = encode(image, fmt, **kw)
    d = prep.preparation.decode(data)
    assert prep.decoded_pixels(data) == d.image.width * d.image.height


def test_a_rotated_jpeg_counts_its_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(1200, 900, 6), "JPEG", quality=90, exif=exif)
    prep = preparer()
    d = prep.preparation.decode(data)
    assert (d.width, d.height) == (900, 1200)
    assert prep.decoded_pixels(data) == d.image.width * d.image.height == 600 * 450


def test_a_camera_jpeg_costs_its_draft_not_its_size() -> None:
    """Normal requests stay within the budget: 256 drafted 24 MP JPEGs are ~96 MP."""
    header_only = encode(photo(600, 400), "JPEG")
    prep = preparer()
    # A 6000 x 4000 JPEG's header: draft scale 8 against keeper-tiny's 256-px draft size.
    big = encode(Image.new("RGB", (6000, 4000), (90, 90, 90)), "JPEG", quality=80)
    assert prep.decoded_pixels(big) == 750 * 500
    assert 256 * prep.decoded_pixels(big) < LimitArgs().max_request_pixels
    assert prep.decoded_pixels(header_only) == 600 * 400


def test_a_heif_crop_costs_its_coded_size() -> None:
    """A HEIC whose crop box (clap) shows 16x16 of a 202x152 coded image: libheif decodes the
    whole coded image, so that is what the request's pixel budget counts (it counted 256)."""
    import struct

    from support_photos import make_heic

    data = bytearray(make_heic(Image.new("RGB", (201, 151), (90, 140, 200)), quality=10))
    at = data.find(b"clap") + 4
    data[at : at + 32] = struct.pack(">IIIIiIiI", 16, 1, 16, 1, 0, 1, 0, 1)
    prep = preparer(min_side=8)
    assert prep.decoded_pixels(bytes(data)) == 202 * 152
    assert preparer(min_side=8, max_pixels=30_000).decoded_pixels(bytes(data)) is None


def test_one_full_size_image_is_alive_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    prep = preparer()
    real = prep.preparation.decode
    alive: list[weakref.ref[DecodedImage]] = []
    most = [0]

    def decode(data: bytes, *, source: str | None = None) -> DecodedImage:
        most[0] = max(most[0], sum(r() is not None for r in alive))  # before this one exists
        d = real(data, source=source)
        alive.append(weakref.ref(d))
        return d

    monkeypatch.setattr(prep.preparation, "decode", decode)
    blobs = [encode(photo(200 + 8 * i, 150, i), "PNG") for i in range(5)]
    out = prep.prepare(blobs, quality=True)
    assert out.pixels.shape[0] == 5
    assert out.quality is not None
    assert out.quality.shape[0] == 5
    sel = prep.prepare_select(blobs, 64, quality=True)
    assert len(sel.views) == 5
    assert sel.quality is not None
    pick = prep.prepare_pick(blobs, [api.PickImage(b64="")] * 5, [None] * 5)
    assert len(pick.hashes) == 5
    assert most[0] == 0  # no earlier decode alive when the next one starts


def test_streamed_preparation_equals_the_batch_one() -> None:
    """Per-image features are the batch path's (keeper embed's), row for row."""
    prep = preparer()
    blobs = [encode(photo(200 + 8 * i, 150, i), "PNG") for i in range(3)]
    blobs.append(encode(photo(1200, 900, 3), "JPEG", quality=85))
    out = prep.prepare(blobs, quality=True)
    decoded = [prep.preparation.decode(b) for b in blobs]
    np.testing.assert_array_equal(out.pixels, prep.preparation.pixels(decoded))
    np.testing.assert_array_equal(out.quality, prep.preparation.quality(decoded))
    assert out.image_ids == [hashlib.sha256(b).hexdigest() for b in blobs]


def test_the_first_failing_image_is_still_the_one_reported() -> None:
    prep = preparer()
    good = encode(photo(64, 48), "PNG")
    e = refused(prep.prepare, [good, b"not an image", b""], quality=False)
    assert (e.code, e.index) == ("not_an_image", 1)


def test_the_budget_must_admit_one_image_at_the_limit() -> None:
    with pytest.raises(ValidationError, match=r"max_request_pixels must be >= limits\.max_pixels"):
        LimitArgs(max_pixels=40_000_000, max_request_pixels=39_999_999)
    assert LimitArgs(max_pixels=50_000_000, max_request_pixels=50_000_000).max_request_pixels


# ------------------------------------------------------------------ 2. JSON bodies


@pytest.mark.parametrize(
    ("model", "body", "where"),
    [
        (api.EmbedRequest, {"texts": ["a"] * (TEXTS_CEILING + 1)}, "texts"),
        (api.EmbedRequest, {"images": [{"b64": ""}] * (IMAGES_CEILING + 1)}, "images"),
        (api.AestheticRequest, {"images": [{"b64": ""}] * (IMAGES_CEILING + 1)}, "images"),
        (
            api.RelevanceRequest,
            {"positive": ["a"] * (TEXTS_CEILING + 1), "images": [{"b64": ""}]},
            "positive",
        ),
        (
            api.RelevanceRequest,
            {"positive": ["a"], "negative": ["b"] * (TEXTS_CEILING + 1), "images": [{"b64": ""}]},
            "negative",
        ),
        (api.RankRequest, {"series": [{"images": []}] * (SERIES_CEILING + 1)}, "series"),
        (
            api.RankRequest,
            {"series": [{"images": [{"b64": ""}] * (SERIES_CEILING + 1)}]},
            "series.0.images",
        ),
        (api.PickRequest, {"images": [{"b64": ""}] * (IMAGES_CEILING + 1)}, "images"),
        (
            api.SelectRequest,
            {"positive": ["a"], "images": [{"b64": ""}] * (IMAGES_CEILING + 1)},
            "images",
        ),
        (
            api.SelectRequest,
            {"positive": ["a"] * (TEXTS_CEILING + 1), "ids": ["x"]},
            "positive",
        ),
    ],
)
def test_request_lists_have_static_caps(model: type[Any], body: dict[str, Any], where: str) -> None:
    e = refused(api.parse_json, json.dumps(body).encode(), model)
    assert (e.status, e.code) == (422, "invalid_request")
    assert e.message.startswith(f"{where}: List should have at most")


def test_ids_and_events_have_static_caps() -> None:
    with pytest.raises(ValidationError, match="at most 1000000 items"):
        api.SelectRequest(positive=["a"], ids=["x"] * (SELECT_IDS_CEILING + 1))
    event = {"request_id": "r", "image_id": "i", "action": "accepted"}
    with pytest.raises(ValidationError, match=f"at most {EVENTS_CEILING} items"):
        api.FeedbackRequest.model_validate({"events": [event] * (EVENTS_CEILING + 1)})


@pytest.mark.parametrize(
    ("key", "ceiling"),
    [
        ("max_images", IMAGES_CEILING),
        ("max_pick_images", IMAGES_CEILING),
        ("max_select_images", IMAGES_CEILING),
        ("max_texts", TEXTS_CEILING),
        ("max_series", SERIES_CEILING),
        ("max_series_len", SERIES_CEILING),
        ("max_select_ids", SELECT_IDS_CEILING),
    ],
)
def test_a_configured_maximum_above_its_ceiling_is_refused(key: str, ceiling: int) -> None:
    LimitArgs(**{key: ceiling, "max_json_values": 2 * SELECT_IDS_CEILING})  # at it: fine
    with pytest.raises(ValidationError, match=key):
        LimitArgs(**{key: ceiling + 1, "max_json_values": 2 * SELECT_IDS_CEILING})


def test_config_keeps_the_value_count_above_what_the_other_limits_admit() -> None:
    with pytest.raises(ValidationError, match="max_json_values"):
        LimitArgs(max_select_ids=500_000)  # 500k ids could never be sent
    LimitArgs(max_select_ids=500_000, max_json_values=600_000)
    with pytest.raises(ValidationError, match="max_events"):
        FeedbackArgs(root="fb", max_events=EVENTS_CEILING + 1)
    with pytest.raises(ValidationError, match=r"feedback\.max_events"):
        KeeperAppArgs(feedback=FeedbackArgs(root="fb", max_events=50_000))


def test_a_body_of_tiny_items_is_refused_from_its_bytes_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = b'{"images": [' + b'{"b64": ""},' * 300_000 + b'{"b64": ""}]}'  # 3.6 MB
    validated: list[int] = []
    real = api.EmbedRequest.model_validate_json

    def spy(data: Any, *a: Any, **kw: Any) -> Any:
        validated.append(len(data))
        return real(data, *a, **kw)

    monkeypatch.setattr(api.EmbedRequest, "model_validate_json", spy)
    e = refused(api.parse_json, body, api.EmbedRequest, 200_000)
    assert (e.status, e.code) == (400, "too_many_json_values")
    assert "200000" in e.message
    assert validated == []
    # A normal body passes: base64 holds no comma, bracket or brace.
    ok = json.dumps({"images": [b64(encode(photo(64, 48), "PNG"))] * 4}).encode()
    assert len(api.parse_json(ok, api.EmbedRequest, 1024).images) == 4


def test_tiny_items_over_http(serve_app: Callable[..., tuple[Any, Any]]) -> None:
    client, _ = serve_app()
    body = b'{"images": [' + b'{"b64": ""},' * 250_000 + b'{"b64": ""}]}'
    r = client.post("/v1/embed", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert err(r) == (400, "too_many_json_values")
    # Multipart text fields are counted the same way.
    files = [("images", ("a.png", encode(photo(64, 48), "PNG"), "image/png"))]
    r = client.post(
        "/v1/embed", data={"texts": json.dumps([""] * 210_000)}, files=files, headers=AUTH
    )
    assert err(r) == (400, "too_many_json_values")
    assert client.post("/v1/embed", json={"texts": ["a cat"]}, headers=AUTH).status_code == 200


def test_json_bodies_are_parsed_off_the_event_loop(
    serve_app: Callable[..., tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = FakeEncoder()
    client, _ = serve_app(encoder=encoder)
    parsed_on: list[int] = []
    real = api.parse_json

    def spy(*a: Any, **kw: Any) -> Any:
        parsed_on.append(threading.get_ident())
        return real(*a, **kw)

    monkeypatch.setattr(api, "parse_json", spy)
    r = client.post("/v1/embed", json={"texts": ["a cat"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert len(parsed_on) == 1
    assert encoder.loop_threads
    assert parsed_on[0] not in encoder.loop_threads


# ------------------------------------------------------------ 3. numbers that were 500s


def test_a_huge_capture_time_is_a_422(serve_app: Callable[..., tuple[Any, Any]]) -> None:
    client, _ = serve_app()
    png = encode(photo(64, 48), "PNG")
    huge = "1" + "0" * 400
    body = '{"images": [{"b64": "' + b64(png)["b64"] + '", "capture_time": ' + huge + "}]}"
    r = client.post(
        "/v1/pick", content=body.encode(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert err(r) == (422, "invalid_capture_time"), r.text
    assert r.json()["error"]["index"] == 0
    assert len(r.text) < 400
    files = [("images", ("a.png", png, "image/png"))]
    for times, code in (
        (f"[{10**400}]", "invalid_capture_time"),  # parsed, then out of any date's range
        ("[1" + "0" * 4400 + "]", "invalid_request"),  # json refuses over 4300 digits
        ("[" * 5000, "invalid_request"),  # RecursionError in json
    ):
        r = client.post("/v1/pick", data={"capture_times": times}, files=files, headers=AUTH)
        assert err(r) == (422, code), (times[:20], r.text)
        assert len(r.text) < 400


def test_given_capture_refuses_a_huge_int_with_a_short_message() -> None:
    for t in (10**400, -(10**400), 10**5000):
        with pytest.raises(ConfigError, match="not a finite epoch") as e:
            given_capture(t)
        assert len(str(e.value)) < 120
    assert api.given_captures([api.PickImage(b64="", capture_time=1.0e9)])[0] is not None


@pytest.mark.parametrize("value", ["[" * 5000, "[" + "1" * 5000 + "]", '["a", ' + "[" * 3000])
def test_form_json_fields_refuse_what_json_raises(value: str) -> None:
    for parse in (lambda v: api.form_list(v, "texts"), lambda v: api.form_values(v, "cameras")):
        e = refused(parse, value)
        assert (e.status, e.code) == (422, "invalid_request")
        assert len(e.message) < 200


@pytest.mark.parametrize(
    ("route", "field"),
    [
        ("/v1/embed", "texts"),
        ("/v1/select", "positive"),
        ("/v1/pick", "cameras"),
        ("/v1/pick", "capture_times"),
    ],
)
@pytest.mark.parametrize("value", ["[" * 5000, "[" + "7" * 5000 + "]"])
def test_multipart_json_fields_are_422_not_500(
    serve_app: Callable[..., tuple[Any, Any]], route: str, field: str, value: str
) -> None:
    client, _ = serve_app()
    files = [("images", ("a.png", encode(photo(64, 48), "PNG"), "image/png"))]
    r = client.post(route, data={field: value}, files=files, headers=AUTH)
    assert err(r) == (422, "invalid_request"), r.text


@pytest.mark.parametrize("key", ["min_width", "max_width", "min_height", "max_height"])
def test_search_size_filters_are_bounded(key: str) -> None:
    body = '{"text": "a", "filters": {"' + key + '": 1' + "0" * 400 + "}}"
    e = refused(api.parse_json, body.encode(), api.SearchRequest)
    assert (e.status, e.code) == (422, "invalid_request")
    assert e.message.startswith(f"filters.{key}: Input should be less than or equal to")
    # The largest accepted bound compares with the table's float64 sizes.
    top = api.SearchFilters.model_validate({key: api.MAX_SIDE}).bounds()
    low, high = top[key.split("_")[1]]
    assert isinstance(low, float)
    assert isinstance(high, float)
    assert not (np.arange(4.0) >= api.MAX_SIDE).any()


def test_select_min_side_is_bounded() -> None:
    body = '{"positive": ["a"], "ids": ["x"], "min_side": 1' + "0" * 400 + "}"
    e = refused(api.parse_json, body.encode(), api.SelectRequest)
    assert (e.code, e.message.split(":")[0]) == ("invalid_request", "min_side")


# ------------------------------------------------------------------- 4. remote errors


def test_a_deployments_keeper_error_is_a_5xx_without_its_traceback(
    serve_app: Callable[..., tuple[Any, Any]],
) -> None:
    encoder = FakeEncoder()

    def fails(texts: list[str]) -> np.ndarray:
        raise remote_error(DataError("embeddings of /srv/models/clip.pt are not finite"))

    encoder.embed_texts = Remote(fails)
    client, _ = serve_app(encoder=encoder)
    r = client.post("/v1/embed", json={"texts": ["a cat"]}, headers=AUTH)
    assert err(r) == (500, "deployment_error"), r.text
    message = r.json()["error"]["message"]
    assert "DataError" in message
    assert "not finite" in message
    assert "\n" not in message
    assert not any(leak in r.text for leak in LEAKS), r.text


def test_a_deployments_other_error_names_its_own_type(
    serve_app: Callable[..., tuple[Any, Any]],
) -> None:
    encoder = FakeEncoder()

    def fails(texts: list[str]) -> np.ndarray:
        raise remote_error(ValueError("bad shape at /srv/x.py"))

    encoder.embed_texts = Remote(fails)
    client, _ = serve_app(encoder=encoder)
    r = client.post("/v1/embed", json={"texts": ["a cat"]}, headers=AUTH)
    assert r.status_code == 500
    assert r.json()["error"] == {"code": "internal", "message": "internal error (ValueError)"}


def test_the_vlm_stage_503_carries_no_path_or_ip(serve_app: Callable[..., tuple[Any, Any]]) -> None:
    vlm = FakeVlm(fail=remote_error(RuntimeError("CUDA error in /opt/kernels/attn.cu on 10.1.2.3")))
    client, _ = serve_app(vlm=vlm)
    images = [b64(encode(photo(64, 48, i), "PNG")) for i in range(3)]
    r = client.post(
        "/v1/select", json={"positive": ["a cat"], "images": images, "beta": 1.0}, headers=AUTH
    )
    assert err(r) == (503, "vlm_unavailable"), r.text
    message = r.json()["error"]["message"]
    assert "RuntimeError" in message
    assert "CUDA error" in message
    assert not any(leak in r.text for leak in (*LEAKS, "/opt/kernels")), r.text


def test_search_unwraps_the_remote_unknown_id_and_echoes_a_prefix(
    serve_app: Callable[..., tuple[Any, Any]],
) -> None:
    class FakeSearch:
        def __init__(self) -> None:
            self.search = Remote(self._search)

        def _search(self, query: Any, k: int, filters: Any) -> Any:
            Snapshot.vector(types.SimpleNamespace(by_image_id={}), query)

    args = KeeperAppArgs(clip_model=SPEC, search=SearchArgs(index="mem/table/index"))
    client, _ = serve_app(args=args, search=FakeSearch())
    wanted = "f" * IMAGE_ID_CHARS
    r = client.post("/v1/search", json={"image_id": wanted}, headers=AUTH)
    assert err(r) == (400, "unknown_id"), r.text
    assert "f" * 17 not in r.text
    assert "ffff" in r.text
    # As a deployment raises it: Ray's wrapper is unwrapped, its traceback never shown.
    from keeper_serve import ingress

    wrapped = remote_error(UnknownImageId(f"image_id {api.short_id(wanted)} is not indexed"))
    assert ingress.client_message(wrapped) == "image_id 'ffffffffffffffff...' is not indexed"
    assert ingress.brief(wrapped).startswith("UnknownImageId: ")


def test_scrub_keeps_uris_and_drops_paths_and_ips() -> None:
    from keeper_serve import ingress

    text = "\x1b[36mray::X()\x1b[39m (pid=7, ip=10.0.0.1) reading s3://bucket/key.jpg via /tmp/a/b"
    assert ingress.client_text(text) == "ray::X() reading s3://bucket/key.jpg via <path>"
    assert ingress.client_text("first line\n  File '/x.py'") == "first line"
    assert ingress.client_text("host 192.168.1.20:8265 refused") == "host <ip> refused"
    assert ingress.client_text("width / height of 1/2") == "width / height of 1/2"


# ------------------------------------------------------------------ 5. temperature


@pytest.mark.parametrize("t", [1e-39, 1e-40, 1e-46, 5e-324, 1e-4, 10.0])
def test_prompt_softmax_is_finite_for_every_positive_temperature(t: float) -> None:
    img = _unit(np.random.default_rng(0).normal(size=(3, DIM)))
    txt = _embed_texts(["a", "b", "c"])
    p = prompt_softmax(img, txt, temperature=t)
    assert p.dtype == np.float32
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    if t < 1e-30:  # one-hot on each row's best prompt
        np.testing.assert_array_equal(p.argmax(axis=1), (img @ txt.T).argmax(axis=1))
        assert (p.max(axis=1) == 1.0).all()


def test_a_tiny_temperature_over_http(serve_app: Callable[..., tuple[Any, Any]]) -> None:
    client, _ = serve_app()
    body = {
        "positive": ["a cat", "a dog"],
        "images": [b64(encode(photo(64, 48), "PNG"))],
        "temperature": 1e-40,
    }
    r = client.post("/v1/score/relevance", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert sum(r.json()["scores"][0]["softmax"].values()) == pytest.approx(1.0)


# ------------------------------------------------------------------ 6. repeated fields


@pytest.mark.parametrize(
    ("route", "data"),
    [
        ("/v1/score/relevance", {"positive": "a cat", "temperature": ["0.5", "0.01"]}),
        ("/v1/select", {"positive": "a cat", "top_k": ["1", "2"]}),
        ("/v1/pick", {"alternates": ["1", "2"]}),
    ],
)
def test_a_repeated_scalar_multipart_field_is_422(
    serve_app: Callable[..., tuple[Any, Any]], route: str, data: dict[str, Any]
) -> None:
    client, _ = serve_app()
    files = [("images", ("a.png", encode(photo(64, 48), "PNG"), "image/png"))]
    r = client.post(route, data=data, files=files, headers=AUTH)
    assert err(r) == (422, "invalid_request"), r.text
    assert "repeated form field" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- 7. ids


def test_ids_are_capped_at_an_image_ids_length() -> None:
    ok = "a" * IMAGE_ID_CHARS
    assert api.SelectRequest(positive=["x"], ids=[ok]).ids == [ok]
    assert api.SearchRequest(image_id=ok).image_id == ok
    with pytest.raises(ValidationError, match="at most 64 characters"):
        api.SelectRequest(positive=["x"], ids=[ok, ok + "a"])
    with pytest.raises(ValidationError, match="at most 64 characters"):
        api.SearchRequest(image_id=ok + "a")


def test_an_unknown_id_is_echoed_as_a_short_prefix(
    serve_app: Callable[..., tuple[Any, Any]],
) -> None:
    _, inst = serve_app()
    inst.corpus = object()  # a server with a corpus that holds none of these
    inst._corpus_rows = {}
    e = refused(inst._corpus_candidates, ["b" * IMAGE_ID_CHARS])
    assert (e.status, e.code, e.index) == (400, "unknown_id", 0)
    assert "b" * 17 not in e.message
    assert "bbbb" in e.message
    with pytest.raises(UnknownImageId) as u:
        Snapshot.vector(types.SimpleNamespace(by_image_id={}), "c" * 64)
    assert "c" * 17 not in str(u.value)
