"""``POST /v1/pick`` without Ray: request models, capture times, the frame, cull_request, the route.

The route is driven in this process as tests/unit/serve/test_api.py drives the others: the real
FastAPI app of ``keeper_serve.ingress`` with a ``KeeperIngress`` instance holding fake encoder and
ranker handles (found through a patched ``serve.get_replica_context``). Photos are generated:
smooth scenes (a different dHash per scene, no 8x8 block grid, nothing clipped) saved as JPEGs
with EXIF DateTimeOriginal + SubSecTimeOriginal and Make/Model, as cameras write them.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter
from serve_fakes import Remote, ingress_clients
from support_photos import camera_exif

from keeper_core.capture import read_capture
from keeper_core.culling import REQUIRED, cull
from keeper_core.grouping import GroupingConfig, dhash
from keeper_core.picking import ZERO_SHOT_RULE, PickConfig
from keeper_core.quality import FEATURE_NAMES
from keeper_serve import api
from keeper_serve.api import ApiError, ImagePreparer, PickImage, PickRequest
from keeper_serve.config import KeeperAppArgs, LimitArgs

SPEC = "keeper-tiny:random"
LIMITS = LimitArgs(
    max_request_bytes=4_000_000,
    max_image_bytes=1_000_000,
    max_images=2,  # /v1/pick has its own cap: this one must not apply to it
    max_pick_images=10,
)
TOKEN = "pick-t0ken-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHARPNESS = FEATURE_NAMES.index("sharpness")


# ---------------------------------------------------------------------------- photos


def scene(seed: int, blur: float = 0.0, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth random scene: 9x8 random colours upscaled (its dHash is the seed's own)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(40, 215, (8, 9, 3)).astype(np.uint8)
    im = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    noisy = np.asarray(im, np.float32) + rng.normal(0, 3, (size[1], size[0], 3))
    im = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return im.filter(ImageFilter.GaussianBlur(blur)) if blur else im


def jpeg(
    im: Image.Image,
    when: str | None = None,
    subsec: str | None = None,
    make: str = "Canon",
    model: str = "Canon EOS R5",
) -> bytes:
    """A JPEG with EXIF as a camera writes it: Make/Model in IFD0, times in the Exif IFD."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, exif=camera_exif(when, subsec, make=make, model=model))
    return buf.getvalue()


# Two bursts (the sharp frame of each is the one to keep) and a single, an hour apart.
BURST_A = [
    jpeg(scene(1, blur=b), "2024:05:01 10:00:00", s)
    for b, s in [(2.0, "00"), (0.0, "25"), (1.5, "50")]
]
BURST_B = [jpeg(scene(2, blur=b), "2024:05:01 10:00:30", s) for b, s in [(0.0, "1"), (2.5, "6")]]
SINGLE = jpeg(scene(3), "2024:05:01 11:00:00")
SHOOT = [*BURST_A, *BURST_B, SINGLE]


def b64(data: bytes, **kw: Any) -> dict[str, Any]:
    return {"b64": base64.b64encode(data).decode(), **kw}


def refused(fn: Any, *a: Any, **kw: Any) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*a, **kw)
    return e.value


def test_generated_photos_carry_their_exif() -> None:
    c = read_capture(BURST_A[1])
    assert (c.time, c.time_source, c.camera) == ("2024-05-01T10:00:00.25", "exif", "Canon EOS R5")
    hashes = [dhash(Image.open(io.BytesIO(d))) for d in (BURST_A[1], BURST_B[0], SINGLE)]
    # Scenes differ in far more than near_duplicate_max_hamming bits: no near-duplicate marks.
    assert min(bin((a ^ b) & (2**64 - 1)).count("1") for a in hashes for b in hashes if a != b) > 8


# ---------------------------------------------------------------------------- request model


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"images": []}, "images"),
        ({"images": [{"b64": "eA==", "capture_time": True}]}, "images.0.capture_time"),
        ({"images": [{"b64": "eA==", "capture_time": [1]}]}, "images.0.capture_time"),
        ({"images": [{"b64": "eA==", "camera": ""}]}, "images.0.camera"),
        ({"images": [{"b64": "eA==", "when": "now"}]}, "images.0.when"),
        ({"images": [{"capture_time": "2024-05-01T10:00:00"}]}, "images.0"),
        ({"images": [{"b64": "eA=="}], "max_gap_s": 0}, "max_gap_s"),
        ({"images": [{"b64": "eA=="}], "max_gap_s": 31}, "max_gap_s"),
        ({"images": [{"b64": "eA=="}], "min_similarity": 1.5}, "min_similarity"),
        ({"images": [{"b64": "eA=="}], "alternates": -1}, "alternates"),
        ({"images": [{"b64": "eA=="}], "alternates": 101}, "alternates"),
        ({"images": [{"b64": "eA=="}], "max_group_len": 3}, "max_group_len"),
    ],
)
def test_request_model_refuses(body: dict[str, Any], where: str) -> None:
    import json

    e = refused(api.parse_json, json.dumps(body).encode(), PickRequest)
    assert (e.status, e.code) == (422, "invalid_request")
    assert e.message.startswith(f"{where}:"), e.message


def test_request_knobs_reach_grouping_and_picking() -> None:
    req = PickRequest.model_validate(
        {"images": [{"b64": "eA=="}], "max_gap_s": 0.5, "min_similarity": -1, "alternates": 0}
    )
    assert req.grouping() == GroupingConfig(max_gap_s=0.5, min_similarity=-1)
    assert req.picking() == PickConfig(alternates=0)
    plain = PickRequest.model_validate({"images": [{"uri": "s3://b/k.jpg"}]})
    assert (plain.grouping(), plain.picking()) == (GroupingConfig(), PickConfig())


# ---------------------------------------------------------------------------- capture times


def test_given_captures_parse_strings_and_epochs() -> None:
    images = [
        PickImage(b64="", capture_time="2024-05-01T10:00:00.25+02:00"),
        PickImage(b64="", capture_time=1714557600.5),
        PickImage(b64="", capture_time=1714557600, camera="  phone  A "),
        PickImage(b64="", camera="drone"),
        PickImage(b64=""),
    ]
    got = api.given_captures(images)
    assert got[0] is not None
    assert got[0].timestamp == pytest.approx(1714557600.25 - 7200)
    assert got[1] is not None
    assert got[1].timestamp == 1714557600.5
    assert got[2] is not None
    assert got[2].camera == "phone A"
    assert got[3] is not None
    assert (got[3].time_source, got[3].camera) == ("none", "drone")
    assert got[4] is None


@pytest.mark.parametrize(
    "bad", ["yesterday", "2024-13-01T10:00:00", "2024-05-01T10:00:00+25:00", "", 1e300]
)
def test_a_bad_capture_time_is_422_naming_the_image(bad: str | float) -> None:
    images = [PickImage(b64="", capture_time="2024-05-01T10:00:00")] * 2
    images = [*images, PickImage(b64="", capture_time=bad)]
    e = refused(api.given_captures, images)
    assert (e.status, e.code, e.index) == (422, "invalid_capture_time", 2)
    assert e.message.startswith("image 2: ")
    assert e.body()["error"]["index"] == 2


def test_request_capture_exif_then_what_the_client_gave() -> None:
    data = BURST_A[1]
    exif = api.request_capture(data, PickImage(b64=""), None)
    assert (exif.time, exif.time_source, exif.camera) == (
        "2024-05-01T10:00:00.25",
        "exif",
        "Canon EOS R5",
    )
    timed = PickImage(b64="", capture_time="2024-06-01T08:00:00")
    c = api.request_capture(data, timed, api.given_captures([timed])[0])
    assert (c.time, c.time_source, c.camera) == ("2024-06-01T08:00:00", "given", "Canon EOS R5")
    named = PickImage(b64="", camera="body 2")
    c = api.request_capture(data, named, api.given_captures([named])[0])
    assert (c.time, c.time_source, c.camera) == ("2024-05-01T10:00:00.25", "exif", "body 2")


def test_no_exif_and_no_time_is_time_source_none_never_a_file_time() -> None:
    c = api.request_capture(jpeg(scene(4)), PickImage(b64=""), None)
    assert (c.time, c.timestamp, c.time_source) == (None, None, "none")
    plain = io.BytesIO()
    scene(4).save(plain, "PNG")
    c = api.request_capture(plain.getvalue(), PickImage(b64=""), None)
    assert (c.time_source, c.camera) == ("none", "unknown")


# ---------------------------------------------------------------------------- the frame


def test_image_names_sort_as_indices() -> None:
    names = [api.image_name(i, 12) for i in range(12)]
    assert names[:2] == ["image-00", "image-01"]
    assert names[-1] == "image-11"
    assert sorted(names) == names
    assert api.image_name(0, 1) == "image-0"


@pytest.fixture(scope="module")
def prep() -> ImagePreparer:
    return ImagePreparer(KeeperAppArgs(clip_model=SPEC, limits=LIMITS))


def prepared(prep: ImagePreparer, blobs: list[bytes], **meta: Any) -> api.PickImages:
    images = [PickImage(b64="", **{k: v[i] for k, v in meta.items()}) for i in range(len(blobs))]
    return prep.prepare_pick(blobs, images, api.given_captures(images))


def test_prepare_pick_records_what_keeper_embed_records(prep: ImagePreparer) -> None:
    got = prepared(prep, SHOOT)
    assert got.image_ids == [hashlib.sha256(d).hexdigest() for d in SHOOT]
    assert [c.time for c in got.captures][:2] == [
        "2024-05-01T10:00:00.00",
        "2024-05-01T10:00:00.25",
    ]
    decoded = [prep.preparation.decode(d) for d in SHOOT]
    assert got.hashes == [dhash(d.image) for d in decoded]
    assert got.quality is not None
    assert got.quality.shape == (len(SHOOT), len(FEATURE_NAMES))
    assert got.pixels.shape[0] == len(SHOOT)


def test_prepare_pick_has_its_own_image_cap(prep: ImagePreparer) -> None:
    assert refused(prep.prepare, SHOOT[:3], quality=False).code == "too_many_images"
    e = refused(prep.prepare_pick, [SINGLE] * 11, [PickImage(b64="")] * 11, [None] * 11)
    assert (e.status, e.code) == (400, "too_many_images")
    assert "limit is 10" in e.message


def unit_rows(n: int, dim: int = 8) -> np.ndarray:
    return np.full((n, dim), dim**-0.5, np.float32)


def test_pick_frame_has_the_columns_cull_needs(prep: ImagePreparer) -> None:
    blobs = [*SHOOT, jpeg(scene(5))]  # the last has no time
    frame = api.pick_frame(prepared(prep, blobs), unit_rows(len(blobs)))
    assert set(REQUIRED) <= set(frame.columns)
    assert {"dhash", "time_source", "capture_time", api.REQUEST_INDEX} <= set(frame.columns)
    assert frame[api.REQUEST_INDEX].tolist() == list(range(len(blobs)))
    assert frame["capture_ts"].dtype == np.float64
    assert np.isnan(frame["capture_ts"].iloc[-1])
    assert frame["time_source"].iloc[-1] == "none"
    assert frame["capture_ts"].iloc[1] - frame["capture_ts"].iloc[0] == pytest.approx(0.25)
    assert frame["embedding"].iloc[0].dtype == np.float32
    with pytest.raises(api.DataError):
        api.pick_frame(prepared(prep, blobs), unit_rows(2))


# ---------------------------------------------------------------------------- cull_request


class RankSpy:
    """A blocking SeriesRanker.rank: scores = sharpness (or "unavailable"); records its calls."""

    MODEL = {"uri": "models:/r@champion", "name": "r", "version": "7", "alias": "champion"}

    def __init__(self, unavailable: str | None = None) -> None:
        self.unavailable = unavailable
        self.calls: list[list[int]] = []

    def __call__(self, emb: np.ndarray, quality: np.ndarray, lengths: list[int]) -> dict[str, Any]:
        self.calls.append(list(lengths))
        assert len(emb) == len(quality) == sum(lengths)
        if self.unavailable:
            return {"unavailable": self.unavailable}
        scores = quality[:, SHARPNESS].astype(np.float64)
        parts = np.split(scores, np.cumsum(lengths)[:-1])
        return {
            "model": dict(self.MODEL),
            "series": [(p, np.exp(p) / np.exp(p).sum()) for p in parts],
        }


@pytest.fixture(scope="module")
def shoot_frame(prep: ImagePreparer) -> pd.DataFrame:
    return api.pick_frame(prepared(prep, SHOOT), unit_rows(len(SHOOT)))


def test_cull_request_ranks_every_group_with_the_ranker(shoot_frame: pd.DataFrame) -> None:
    spy = RankSpy()
    result, ranker = api.cull_request(
        shoot_frame, spy, grouping=GroupingConfig(), picking=PickConfig()
    )
    assert spy.calls == [[3, 2, 1]]  # one call; every group a series, the single too
    assert ranker.kind == "model"
    assert (ranker.name, ranker.version, ranker.alias) == ("r", "7", "champion")
    assert ranker.label == "r v7 (models:/r@champion)"
    # The same code path offline, with the same scores: the same picks.
    offline = cull(
        shoot_frame,
        scorer=lambda df: df["sharpness"].to_numpy(np.float64),
        ranker="sharpness",
        grouping=GroupingConfig(),
        picking=PickConfig(),
    )
    cols = ["request_index", "group_id", "rank", "decision", "score", "rating"]
    pd.testing.assert_frame_equal(result.picks[cols], offline.picks[cols])
    keepers = result.picks.loc[result.picks["decision"] == "keep", "request_index"]
    assert sorted(keepers.tolist()) == [1, 3, 5]  # the sharp frame of each burst, the single


def test_cull_request_says_zero_shot_when_no_ranker_is_loaded(shoot_frame: pd.DataFrame) -> None:
    spy = RankSpy(unavailable="no ranker configured (ranker.model_uri is null)")
    result, ranker = api.cull_request(
        shoot_frame, spy, grouping=GroupingConfig(), picking=PickConfig()
    )
    assert len(spy.calls) == 1
    assert (ranker.kind, ranker.label) == ("zero-shot", ZERO_SHOT_RULE)
    assert ranker.reason == "no ranker configured (ranker.model_uri is null)"
    assert ranker.name is None
    assert ranker.version is None
    offline = cull(shoot_frame, scorer=None)
    pd.testing.assert_frame_equal(
        result.picks[["request_index", "decision", "rank"]],
        offline.picks[["request_index", "decision", "rank"]],
    )


def test_pick_response_maps_rows_back_to_request_indices(prep: ImagePreparer) -> None:
    # The single twice (an exact duplicate), a photo without time, the bursts out of order.
    blobs = [SINGLE, *BURST_B, jpeg(scene(6)), *BURST_A, SINGLE]
    frame = api.pick_frame(prepared(prep, blobs), unit_rows(len(blobs)))
    result, ranker = api.cull_request(
        frame, RankSpy(), grouping=GroupingConfig(), picking=PickConfig()
    )
    clip = {"spec": SPEC, "random_weights": True}
    body = api.PickResponse.model_validate(api.pick_response(result, ranker, clip))
    assert [im.index for im in body.images] == list(range(len(blobs)))
    groups = [g.images for g in body.groups]
    assert groups == [[4, 5, 6], [1, 2], [0, 7], [3]]  # time order; untimed last
    assert [g.keeper_index for g in body.groups] == [5, 1, 0, 3]
    dup = body.images[7]
    assert (dup.duplicate_of, dup.duplicate_kind, dup.decision) == (0, "exact", "reject")
    assert dup.reasons == ["exact duplicate of image-0"]
    assert body.images[3].time_source == "none"
    assert body.images[3].reasons == ["single shot"]
    for g in body.groups:
        assert {body.images[i].group for i in g.images} == {g.id}
        assert sum(body.images[i].decision == "keep" for i in g.images) == 1
    assert body.counts["groups"] == 4
    assert body.counts["exact_duplicates"] == 1


# ---------------------------------------------------------------------------- the route


class FakeEncoder:
    embed_pixels = Remote(lambda px: unit_rows(len(px)))
    info = Remote(lambda: {"spec": SPEC, "embed_dim": 8, "image_size": 64, "random_weights": True})


class FakeRanker:
    def __init__(self, rank: RankSpy) -> None:
        self.rank = Remote(rank)


class FakeVlm:
    info = Remote(lambda: {"status": "disabled", "source": None})


@pytest.fixture
def client_with(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A function (RankSpy) -> TestClient of the real app with fake handles; no Ray."""
    with ingress_clients(monkeypatch, TOKEN) as make:
        args = KeeperAppArgs(clip_model=SPEC, limits=LIMITS)
        yield lambda rank: make(FakeEncoder(), FakeRanker(rank), FakeVlm(), args)


def test_route_groups_exif_timed_bursts_with_the_ranker(client_with: Any) -> None:
    client = client_with(RankSpy())
    r = client.post("/v1/pick", json={"images": [b64(d) for d in SHOOT]}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ranker"]["kind"] == "model"
    assert body["ranker"]["version"] == "7"
    assert body["random_weights"] is True
    assert body["clip_model"] == SPEC
    assert [g["images"] for g in body["groups"]] == [[0, 1, 2], [3, 4], [5]]
    assert [g["keeper_index"] for g in body["groups"]] == [1, 3, 5]
    assert all(im["reasons"] for im in body["images"])
    assert {im["time_source"] for im in body["images"]} == {"exif"}
    assert body["images"][1]["capture_time"] == "2024-05-01T10:00:00.25"
    assert body["images"][1]["camera"] == "Canon EOS R5"


def test_route_says_zero_shot_when_the_app_has_no_ranker(client_with: Any) -> None:
    client = client_with(RankSpy(unavailable="no ranker loaded"))
    r = client.post("/v1/pick", json={"images": [b64(d) for d in SHOOT]}, headers=AUTH)
    assert r.status_code == 200, r.text
    ranker = r.json()["ranker"]
    assert ranker == {
        "kind": "zero-shot",
        "label": ZERO_SHOT_RULE,
        "uri": None,
        "name": None,
        "version": None,
        "alias": None,
        "reason": "no ranker loaded",
        "model_kind": None,
        "method": None,
        "base_spec": None,
    }
    assert [g["images"] for g in r.json()["groups"]] == [[0, 1, 2], [3, 4], [5]]


def test_route_client_time_overrides_exif_and_knobs_apply(client_with: Any) -> None:
    client = client_with(RankSpy())
    images = [b64(d) for d in SHOOT]
    images[5]["capture_time"] = "2024-05-01T10:00:00.75"  # the single, into burst A
    r = client.post("/v1/pick", json={"images": images}, headers=AUTH)
    assert [g["images"] for g in r.json()["groups"]] == [[0, 1, 2, 5], [3, 4]]
    assert r.json()["images"][5]["time_source"] == "given"
    r = client.post("/v1/pick", json={"images": images, "max_gap_s": 0.1}, headers=AUTH)
    assert len(r.json()["groups"]) == 6  # 0.25 s apart: no two shots share a group
    images[1]["camera"] = "second body"
    r = client.post("/v1/pick", json={"images": images}, headers=AUTH)
    assert [g["images"] for g in r.json()["groups"]] == [[0, 2, 5], [1], [3, 4]]


def test_route_multipart_with_capture_times(client_with: Any) -> None:
    client = client_with(RankSpy())
    files = [("images", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(SHOOT)]
    times = '[null, null, null, null, null, "2024-05-01T10:00:00.75"]'
    r = client.post(
        "/v1/pick",
        files=files,
        data={
            "capture_times": times,
            "cameras": '["a", "a", "a", "a", "a", "a"]',
            "alternates": "0",
        },
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [g["images"] for g in body["groups"]] == [[0, 1, 2, 5], [3, 4]]
    assert {im["camera"] for im in body["images"]} == {"a"}
    assert not any(im["decision"] == "alternate" for im in body["images"])
    r = client.post("/v1/pick", files=files, data={"capture_times": "[null, 1]"}, headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    assert "2 values for 6 images" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "code", "index"),
    [
        (
            {"images": [b64(SINGLE), b64(SINGLE, capture_time="noon")]},
            422,
            "invalid_capture_time",
            1,
        ),
        ({"images": [b64(SINGLE)] * 11}, 400, "too_many_images", None),
        ({"images": [b64(SINGLE), {"b64": "%%"}]}, 400, "invalid_base64", 1),
        ({"images": [b64(SINGLE)], "max_gap_s": -1}, 422, "invalid_request", None),
    ],
)
def test_route_errors_are_json(
    client_with: Any, body: dict[str, Any], status: int, code: str, index: int | None
) -> None:
    spy = RankSpy()
    client = client_with(spy)
    r = client.post("/v1/pick", json=body, headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert r.json()["error"].get("index") == index
    assert spy.calls == []  # refused before any ranking
    assert client.post("/v1/pick", json=body).status_code == 401


def test_openapi_documents_pick(client_with: Any) -> None:
    doc = client_with(RankSpy()).get("/openapi.json", headers=AUTH).json()
    content = doc["paths"]["/v1/pick"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert {"PickRequest", "PickImage", "PickResponse"} <= set(doc["components"]["schemas"])


def test_a_photo_sent_again_with_a_saved_rating_is_an_exact_duplicate(
    prep: ImagePreparer,
) -> None:
    import struct

    body = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>rating 5</x:xmpmeta>"
    rated = SINGLE[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + SINGLE[2:]
    frame = api.pick_frame(prepared(prep, [SINGLE, rated]), unit_rows(2))
    assert frame["image_id"].nunique() == 2  # other bytes ...
    result, _ = api.cull_request(frame, RankSpy(), grouping=GroupingConfig(), picking=PickConfig())
    kinds = result.picks.sort_values("request_index")["duplicate_kind"].tolist()
    assert kinds[1] == "exact"  # ... the same photo
