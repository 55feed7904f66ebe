"""Seeded random requests ("fuzz") against the HTTP ingress, in this process (no Ray, no network).

The standard checked: a server answers 4xx with a JSON error and keeps serving, and bad input gets
a clear, specific error. Every route is driven as tests/unit/serve/test_api.py drives them: the
real FastAPI app of ``keeper_serve.ingress`` around a real ``KeeperIngress`` instance (its class,
not the Serve deployment), found through a patched ``serve.get_replica_context``, with
Starlette's TestClient. One instance serves the whole module, configured with everything a route
can use, so fuzzed requests reach the deep code paths rather than a 404 or a 503:

- ``ClipEncoder``: a fake embedding each image by its coarse colour layout (distinct images
  differ, identical ones collide) and each text by its hash; it refuses pixels of the wrong
  dtype or shape.
- ``SeriesRanker``: a fake answering as the real one (``{"model": describe(), "series": [(scores,
  probs), ...]}``), scores from the embeddings and quality features; per case it is a head, a
  fine-tuned ranker (answers ``{"needs": "pixels"}`` first, as after a promotion) or, rarely,
  has nothing loaded (``{"unavailable": ...}``: then and only then /v1/rank may answer 503
  ``model_unavailable``, and /v1/pick culls zero-shot). It checks every array fits ``lengths``.
- ``VlmJudge``: a fake scoring each view by its red level; per case it may answer NaN for some
  views, lose its replica once (``RayActorError``: retried), or fail (then /v1/select may
  answer 503 ``vlm_unavailable``).
- ``SearchIndex`` and ``ReferenceCollections``: the real deployment classes over an exact index
  and two reference collections (one refused: another model spec) written under a temporary
  folder; ``args.corpus`` (for ``/v1/select`` by ids and corpus thumbnails) is the indexed table.
- ``args.feedback`` (events and offers logs in a temporary folder) and ``args.review`` (one pick
  run written as ``keeper pick`` writes it, one run that cannot be read).
- ``s3://keeper-fuzz/...`` is the one allow-listed bucket: ``storage.read_bytes`` answers its
  URIs from memory (a JPEG, an object over ``max_image_bytes``, garbage, no such key); every
  other URI is refused by the ingress before any read.

Every exception a fake or real deployment raises reaches the ingress as a Ray Serve handle
delivers it, ``RayTaskError(cause)`` (``as_instanceof_cause``), so statuses are those a
deployed app gives.

Each case is one seeded mutation (or a few stacked) of a route's valid body: keys dropped or
added, wrong types, NaN / Infinity / 4,400-digit integers in the raw JSON, edge numbers, long and
odd unicode strings, empty and over-limit lists, duplicate keys, deep nesting, bad base64,
truncated / garbage / bomb images (``support.png_declaring``, ``support.jpeg_with_scans``),
URIs that must not be fetched, wrong content types, invalid UTF-8, truncated JSON, multipart
variants for the routes that take multipart, wrong methods, odd query strings and path segments,
odd headers. For every response:

- the status is 200 or 4xx; 503 only with the code the case's fake deliberately causes;
- a non-2xx body is exactly ``{"error": {"code": str, "message": non-empty str, "index"?: int}}``
  (``api.ApiError.body``), never ``internal`` / ``deployment_error``, never a traceback;
- a 2xx body validates against the route's response model in ``keeper_serve.api``, and its counts
  add up with the request (one embedding / score per image and text, one ranked series per
  series, every /v1/pick image in exactly one group and counted once, /v1/select's stages
  account for every candidate, at most k results, ...);
- then the route's valid request still answers 200 (the server keeps serving).

Environment:

- ``KEEPER_FUZZ``: cases per route (default 8: the module takes ~10 s on a busy 2-core machine,
  ~30 s at 80; a bug hunt may set 100 or more, with several seeds).
- ``KEEPER_FUZZ_SEED``: the base seed (default 0). A case is a function of the base seed, its
  route and its number (its own seed is derived from the three).
- ``KEEPER_FUZZ_REPLAY=ROUTE:NUMBER``: run only that case (a failure message prints the line
  that replays it, ``KEEPER_FUZZ_SEED`` included).

The first cases of each route take the mutation kinds in turn, each route starting 8 kinds after
the previous one: at the default count every kind runs on some route, and from KEEPER_FUZZ=21 on
every route. Later cases draw one to three kinds at random.

Routes: every route is covered but ``/ui``, ``/ui/app.js``, ``/ui/app.css``, ``/docs``,
``/redoc`` and ``/openapi.json`` (static files and FastAPI's own pages: nothing a client sends
reaches keeper's code). The A/B arm (``args.ab``) is not configured: its ChallengerRanker is
another ranker fake, and test_ab_split.py covers it.

The bugs this found are kept at the end as their own minimal reproductions: select weights
whose weighted sum overflowed (a pick's final score inf, answered as null), a lone surrogate in a
multipart field (a 500 on /v1/select; two prompts answered under one key on /v1/score/relevance),
and a corpus image unreadable by the time /v1/select by ids explained its picks (the whole
request failed as the client's error).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import struct
import types
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel
from ray.exceptions import RayActorError
from serve_fakes import Remote, ingress_class
from support import (
    check_select_accounting,
    jpeg_with_scans,
    photo,
    png_declaring,
    write_pick_run,
    write_reference_collection,
    write_unit_rows,
)

from keeper_core import storage
from keeper_core.errors import DataError, StorageError
from keeper_core.models import PreprocessConfig
from keeper_core.quality import FEATURE_NAMES
from keeper_serve import api
from keeper_serve.config import (
    FeedbackArgs,
    KeeperAppArgs,
    LimitArgs,
    ReferenceArgs,
    ReviewArgs,
    SearchArgs,
    SelectArgs,
)

SPEC = "keeper-tiny:random"
SIZE = 64  # keeper-tiny's image size
DIM = 8
TOKEN = "fuzz-t0ken-" + "x" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUCKET = "keeper-fuzz"
LIMITS = LimitArgs(
    max_request_bytes=1_500_000,
    max_image_bytes=300_000,
    max_pixels=4_000_000,
    max_request_pixels=12_000_000,
    min_side=16,
    max_jpeg_scans=24,
    max_images=4,
    max_texts=4,
    max_text_chars=64,
    max_series=3,
    max_series_len=4,
    max_pick_images=8,
    max_select_images=8,
    max_select_ids=16,
    max_json_values=2048,
)
# The same config as open_clip's for keeper-tiny, built here so that no test imports torch.
PREPROCESS = PreprocessConfig(
    image_size=SIZE,
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
)
CASES = int(os.environ.get("KEEPER_FUZZ", "8"))
BASE_SEED = int(os.environ.get("KEEPER_FUZZ_SEED", "0"))
REPLAY = os.environ.get("KEEPER_FUZZ_REPLAY", "")

# ---------------------------------------------------------------------------- images


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def b64s(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ref(data: bytes) -> dict[str, Any]:
    return {"b64": b64s(data)}


PNG1 = encode(photo(96, 72, 1), "PNG")
PNG2 = encode(photo(72, 96, 2), "PNG")
JPG1 = encode(photo(96, 72, 3), "JPEG", quality=85)
JPG2 = encode(photo(80, 60, 4), "JPEG", quality=85)
JPG3 = encode(photo(64, 64, 5), "JPEG", quality=85)


def _rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(80, 48, 6), "JPEG", quality=80, exif=exif)


def _animated_gif() -> bytes:
    frames = [photo(40, 30, s).convert("P") for s in (7, 8)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


#: Images a decoder should take: odd modes, formats, orientations and sizes at the limits.
ODD_VALID: dict[str, bytes] = {
    "grey png": encode(photo(48, 40, 9).convert("L"), "PNG"),
    "rgba png": encode(photo(48, 40, 10).convert("RGBA"), "PNG"),
    "1-bit png": encode(photo(48, 40, 11).convert("1"), "PNG"),
    "16-bit png": encode(Image.fromarray(np.full((32, 40), 40000, np.uint16)), "PNG"),
    "palette gif": encode(photo(48, 40, 12).convert("P"), "GIF"),
    "animated gif": _animated_gif(),
    "webp": encode(photo(48, 40, 13), "WEBP"),
    "bmp": encode(photo(48, 40, 14), "BMP"),
    "tiff": encode(photo(48, 40, 15), "TIFF"),
    "cmyk jpeg": encode(photo(48, 40, 16).convert("CMYK"), "JPEG"),
    "progressive jpeg": encode(photo(96, 72, 17), "JPEG", progressive=True),
    "exif-rotated jpeg": _rotated(),
    "16x16 png": encode(photo(16, 16, 18), "PNG"),
    "2000x16 png": encode(photo(2000, 16, 19), "PNG"),
    "640x480 jpeg (drafted)": encode(photo(640, 480, 20), "JPEG", quality=70),
}


def _gif_declaring(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b",\0\0\0\0" + b"\x01\0\x01\0\0\x02"


def _bad_crc_png() -> bytes:
    data = bytearray(PNG1)
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


#: Bytes a decoder must refuse (4xx naming the image): empty, garbage, truncated, bombs.
BAD_IMAGES: dict[str, bytes] = {
    "empty": b"",
    "garbage": random.Random(1).randbytes(300),
    "truncated png": PNG1[: len(PNG1) // 2],
    "truncated jpeg": JPG1[: len(JPG1) * 3 // 5],
    "png header only": PNG1[:8],
    "jpeg soi only": b"\xff\xd8\xff",
    "png with a bad crc": _bad_crc_png(),
    "png declaring 100000x100000": png_declaring(100_000, 100_000),
    "png declaring 1900x1900, ~1 row of data": png_declaring(1900, 1900),
    "png declaring 8x8": png_declaring(8, 8),
    "png declaring 0x10": png_declaring(0, 10),
    "gif declaring 65535x65535": _gif_declaring(65535, 65535),
    "jpeg of 40 extra scans": jpeg_with_scans(40),
    "svg": b"<svg xmlns='http://www.w3.org/2000/svg' width='99999' height='99999'/>",
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    "html": b"<!doctype html><title>x</title>",
    "over max_image_bytes": b"\xff\xd8\xff" + b"\0" * (LIMITS.max_image_bytes + 10),
}

#: ``s3://keeper-fuzz/KEY`` as the patched storage serves it (None: no such key).
S3_OBJECTS: dict[str, bytes] = {
    f"s3://{BUCKET}/ok.jpg": JPG2,
    f"s3://{BUCKET}/garbage.bin": b"\0garbage\xff" * 10,
    f"s3://{BUCKET}/big.bin": b"\xff\xd8\xff" + b"\0" * (LIMITS.max_image_bytes + 1),
}

URIS = [
    "s3://not-allowed/x.jpg",
    "http://127.0.0.1/x.jpg",
    "https://169.254.169.254/latest/meta-data/",
    "file:///etc/passwd",
    "/etc/passwd",
    "../../etc/passwd",
    "",
    "s3://",
    "s3:///key.jpg",
    f"s3://{BUCKET}",
    f"s3://{BUCKET}/",
    f"s3://{BUCKET}/missing.jpg",
    f"s3://{BUCKET}/ok.jpg",
    f"s3://{BUCKET}/big.bin",
    f"s3://{BUCKET}/garbage.bin",
    f"S3://{BUCKET}/ok.jpg",
    f"s3://{BUCKET.upper()}/ok.jpg",
    f"s3://{BUCKET}/../etc/passwd",
    f"s3://{BUCKET}/ok.jpg?versionId=1",
    f"s3://{BUCKET}/" + "k" * 3000,
    "s3://ünïcode/x.jpg",
    "s3://a/x",
    "s3://" + "b" * 70 + "/x",
]


def _b64_variants() -> dict[str, Any]:
    good = b64s(JPG1)
    return {
        "not base64": "not base64!!",
        "bad padding": good[:-1],
        "newline inside": good[:20] + "\n" + good[20:],
        "urlsafe alphabet": base64.urlsafe_b64encode(bytes(range(256)) * 3).decode(),
        "only padding": "====",
        "empty": "",
        "non-ascii": good[:10] + "é" + good[10:],
        "over the encoded size limit": "A" * ((LIMITS.max_image_bytes + 2) // 3 * 4 + 8),
        "data: URL": "data:image/jpeg;base64," + good,
    }


def image_refs() -> list[tuple[str, Any]]:
    """(description, image reference) a request may carry in an image's place."""
    out: list[tuple[str, Any]] = [(f"b64 of {k}", ref(v)) for k, v in ODD_VALID.items()]
    out += [(f"b64 of {k}", ref(v)) for k, v in BAD_IMAGES.items()]
    out += [(f"b64 {k}", {"b64": v}) for k, v in _b64_variants().items()]
    out += [(f"uri {u[:60]!r}", {"uri": u}) for u in URIS]
    out += [
        ("both b64 and uri", {"b64": b64s(JPG1), "uri": f"s3://{BUCKET}/ok.jpg"}),
        ("neither b64 nor uri", {}),
        ("b64 null", {"b64": None}),
        ("b64 a number", {"b64": 12}),
        ("b64 a list", {"b64": [b64s(JPG1)]}),
        ("an extra key", {"b64": b64s(JPG1), "format": "jpeg"}),
        ("a bare string", b64s(JPG1)),
        ("null", None),
        ("a list", [ref(JPG1)]),
    ]
    return out


IMAGE_REFS = image_refs()

# ---------------------------------------------------------------------------- fake deployments


class Handle:
    """A real deployment class's instance behind handle-like methods."""

    def __init__(self, obj: Any, where: str, methods: tuple[str, ...]) -> None:
        for m in methods:
            setattr(self, m, Remote(getattr(obj, m), where))


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    v[:, 0] += 1e-3  # never a zero vector
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


_PROJ = np.random.default_rng(7).normal(size=(3 * 4 * 4, DIM))


def embed_pixels(px: np.ndarray) -> np.ndarray:
    if not isinstance(px, np.ndarray) or px.dtype != np.uint8 or px.shape[1:] != (3, SIZE, SIZE):
        raise DataError(f"pixels {getattr(px, 'dtype', type(px))} {np.shape(px)}: not uint8 N3SS")
    n = len(px)
    if n == 0:  # as the real ClipEncoder answers none
        return np.zeros((0, DIM), np.float32)
    coarse = px.reshape(n, 3, 4, SIZE // 4, 4, SIZE // 4).mean(axis=(3, 5)).reshape(n, -1)
    return unit((coarse - 127.5) / 127.5 @ _PROJ)


def embed_texts(texts: list[str]) -> np.ndarray:
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"texts {texts!r:.80}: a non-empty list of non-blank strings")
    seeds = [
        int(hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) for t in texts
    ]
    return unit(np.stack([np.random.default_rng(s).normal(size=DIM) for s in seeds]))


class FakeEncoder:
    def __init__(self) -> None:
        self.embed_pixels = Remote(embed_pixels, "ClipEncoder")
        self.embed_texts = Remote(embed_texts, "ClipEncoder")
        info = {
            "spec": SPEC,
            "embed_dim": DIM,
            "image_size": SIZE,
            "random_weights": True,
            "logit_scale": 100.0,
        }
        self.info = Remote(lambda: info, "ClipEncoder")


SHARP = FEATURE_NAMES.index("sharpness")


class FakeRanker:
    """``SeriesRanker`` as the ingress sees it; ``mode`` is head, fine-tuned or unavailable."""

    def __init__(self) -> None:
        self.mode = "head"
        self.rank = Remote(self._rank, "SeriesRanker")
        self.info = Remote(self._info, "SeriesRanker")

    def describe(self) -> dict[str, Any]:
        tuned = self.mode == "fine-tuned"
        return {
            "uri": "models:/keeper-ranker@champion",
            "name": "keeper-ranker",
            "version": "4" if tuned else "3",
            "alias": "champion",
            "run_id": "run-1",
            "kind": self.mode if self.mode in ("head", "fine-tuned") else "head",
            "method": "lora" if tuned else None,
            "base_spec": SPEC if tuned else None,
            "features": "embedding+quality",
            "head": "mlp",
        }

    def _info(self) -> dict[str, Any]:
        if self.mode == "unavailable":
            return {"uri": "models:/keeper-ranker@champion", "status": "unavailable", "error": "x"}
        return {**self.describe(), "status": "ready", "error": None}

    def _rank(
        self,
        embeddings: np.ndarray | None,
        quality: np.ndarray | None,
        lengths: list[int],
        pixels: np.ndarray | None = None,
    ) -> dict[str, Any]:
        if self.mode == "unavailable":
            return {"unavailable": "no ranker loaded (the fuzz fake says so)"}
        n = sum(lengths)
        if not lengths or min(lengths) < 1:
            raise DataError(f"lengths {lengths}: each series needs an image")
        if quality is None or np.shape(quality) != (n, len(FEATURE_NAMES)):
            raise DataError(f"quality {np.shape(quality)} for {n} images")
        if self.mode == "fine-tuned":
            if pixels is None:
                return {"needs": "pixels", "model": self.describe()}
            if pixels.shape != (n, 3, SIZE, SIZE):
                raise DataError(f"pixels {pixels.shape} for {n} images")
            base = pixels.reshape(n, -1).mean(axis=1) / 255
        else:
            if embeddings is None:
                return {"needs": "embeddings", "model": self.describe()}
            if embeddings.shape != (n, DIM):
                raise DataError(f"embeddings {embeddings.shape} for {n} images")
            base = embeddings @ np.linspace(-1, 1, DIM)
        scores = base + 0.01 * np.nan_to_num(quality[:, SHARP], posinf=0, neginf=0)
        series = []
        for part in np.split(scores.astype(np.float64), np.cumsum(lengths)[:-1]):
            e = np.exp(part - part.max())
            series.append((part, e / e.sum()))
        return {"model": self.describe(), "series": series}


class FakeVlm:
    """``VlmJudge``: each view's red level; ``mode`` ok, nan, lost-once or fail."""

    def __init__(self, max_side: int) -> None:
        self.mode = "ok"
        self.max_side = max_side
        keys = ("source", "architecture", "dtype", "device", "parameters", "random_weights")
        info = {**dict.fromkeys(keys), "status": "ready", "source": "tiny", "random_weights": True}
        self.info = Remote(lambda: info, "VlmJudge")
        self.relevance = Remote(self._relevance, "VlmJudge")
        self.rationale = Remote(self._rationale, "VlmJudge")

    def _check(self, im: np.ndarray) -> None:
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise DataError(f"a view of {im.dtype} {im.shape}: not HxWx3 uint8")
        if max(im.shape[:2]) > self.max_side:
            raise DataError(f"a view of {im.shape}: over vlm.max_image_side {self.max_side}")

    def _relevance(self, images: list[np.ndarray], query: str) -> np.ndarray:
        for im in images:
            self._check(im)
        if self.mode == "fail":
            raise RuntimeError("CUDA error: the fuzz fake fails on purpose")
        if self.mode == "lost-once":
            self.mode = "ok"
            raise RayActorError()
        out = np.array([im[..., 0].mean() / 255 for im in images], np.float32)
        if self.mode == "nan":
            out[::2] = np.nan
        return out

    def _rationale(self, image: np.ndarray, query: str) -> str:
        self._check(image)
        return f"{image.shape[1]}x{image.shape[0]}: asked {query[:20]!r}"


# ---------------------------------------------------------------------------- the server


def write_run(folder: Path, sizes: list[int]) -> list[str]:
    """A ``keeper pick`` output of groups of ``sizes``, every thumbnail a real JPEG."""
    return write_pick_run(
        folder, sizes, thumb=lambda i: encode(photo(32, 24, int(i[:4], 16)), "JPEG")
    )


def write_corpus(root: Path) -> tuple[str, list[str]]:
    """An embed table (the corpus and the search index's table) of 6 images with unit
    embeddings, as keeper embed writes one, and its exact index. Its 5th image's file is garbage
    and the 6th's is missing. Returns (table, image_ids)."""
    from keeper_core.corpus import read_corpus
    from keeper_core.vector_index import IndexParams, build

    files, ids = [], [f"id{i}" for i in range(6)]
    for i in range(6):
        p = root / "photos" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        if i < 4:
            p.write_bytes(encode(photo(120, 90, 30 + i), "PNG"))
        elif i == 4:
            p.write_bytes(b"not an image")
        files.append(str(p))
    table = str(root / "table")
    write_unit_rows(table, files, ids, dim=DIM, rng=np.random.default_rng(1))
    corpus = read_corpus(table)
    index = build(
        corpus.embeddings, corpus.image_uri, model_spec=SPEC, params=IndexParams(backend="exact")
    )
    index.save(f"{table}/index")
    return table, ids


@dataclasses.dataclass
class Server:
    client: Any
    inst: Any
    ranker: FakeRanker
    vlm: FakeVlm
    run_ids: list[str]
    corpus_ids: list[str]


def _fake_read_bytes(real: Callable[..., bytes]) -> Callable[..., bytes]:
    def read_bytes(uri: str, *, max_bytes: int | None = None) -> bytes:
        if not storage.is_s3(uri):
            return real(uri, max_bytes=max_bytes)
        bucket, key = storage.split_s3(uri)
        if bucket != BUCKET:
            raise AssertionError(f"the ingress read {uri!r}, outside the allow-listed bucket")
        if not key or key.endswith("/"):  # as storage._s3_object refuses it
            raise StorageError(uri, "names a bucket or prefix, not an object")
        data = S3_OBJECTS.get(uri)
        if data is None:
            raise StorageError(uri, "NoSuchKey: the specified key does not exist")
        if max_bytes is not None and len(data) > max_bytes:
            raise storage.TooLargeError(uri, max_bytes, len(data))
        return data

    return read_bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The ingress app with every optional part configured; one instance for the module."""
    import ray.serve
    from fastapi.testclient import TestClient

    from keeper_serve import ingress
    from keeper_serve.references import ReferenceCollections
    from keeper_serve.search import SearchIndex

    tmp = tmp_path_factory.mktemp("fuzz")
    table, corpus_ids = write_corpus(tmp)
    refs = tmp / "references"
    write_reference_collection(str(refs), "ref", dim=DIM, spec=SPEC, n=12)
    write_reference_collection(str(refs), "other", dim=DIM, spec="ViT-B-32:openai", n=4)
    run_ids = write_run(tmp / "run", [3, 1, 2])
    args = KeeperAppArgs(
        clip_model=SPEC,
        limits=LIMITS,
        corpus=table,
        s3_allow_buckets=[BUCKET],
        select=SelectArgs(top_n=4, top_k=2, max_top_n=6, max_top_k=4),
        search=SearchArgs(index=f"{table}/index", poll_s=0, max_k=5),
        references=ReferenceArgs(root=str(refs), poll_s=0, max_k=4),
        feedback=FeedbackArgs(
            root=str(tmp / "feedback"), max_age_s=30, max_events=32, online_poll_s=0
        ),
        review=ReviewArgs(runs={"demo": str(tmp / "run"), "broken": str(tmp / "no-run")}),
    )
    cls = ingress_class()
    search = SearchIndex.func_or_class(args.search, SPEC)
    references = ReferenceCollections.func_or_class(args.references, SPEC)
    ranker, vlm = FakeRanker(), FakeVlm(args.vlm.max_image_side)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEEPER_API_TOKEN", TOKEN)
        mp.setattr(storage, "read_bytes", _fake_read_bytes(storage.read_bytes))
        inst = cls(
            FakeEncoder(),
            ranker,
            vlm,
            args,
            Handle(search, "SearchIndex", ("search", "info")),
            Handle(references, "ReferenceCollections", ("compare", "list", "info")),
            preprocess=PREPROCESS,
        )
        for name in ("requests", "latency", "images_in", "offers_dropped"):
            setattr(inst, name, _Recorder())
        mp.setattr(
            ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=inst)
        )
        try:
            with TestClient(
                ingress.app, raise_server_exceptions=False, follow_redirects=False
            ) as client:
                yield Server(client, inst, ranker, vlm, run_ids, corpus_ids)
        finally:
            inst.__del__()  # stops the feedback flush thread
            for key, seen in sorted(STATS.items()):  # shown with -s: what the cases reached
                print(f"\n{key}: " + ", ".join(f"{k} x{n}" for k, n in sorted(seen.items())))


class _Recorder:
    """Stands in for Ray's Counter and Histogram (Ray's would need a running Ray)."""

    def inc(self, value: float = 1, tags: dict[str, str] | None = None) -> None:
        assert value > 0, f"a Counter increment of {value} raises under Ray"

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


# ---------------------------------------------------------------------------- raw JSON


class Raw:
    """A JSON text spliced into a body as it is (NaN, Infinity, huge integers, deep nesting)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


class Pairs:
    """A JSON object written from (key, value) pairs: duplicate keys allowed."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def dumps(v: Any) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Pairs | dict):
        items = v.pairs if isinstance(v, Pairs) else v.items()
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(x)}" for k, x in items) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


def nested(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a": ' * depth + "1" + "}" * depth)


WEIRD: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 5e-324, 1e308,
    -1e308, "", " ", "0", "true", "null", "a" * 5000, "\u202e\U0001f600e\u0301\x00\ufeff", [],
    {}, [[[]]], [None], [1, "a", None], {"b64": ""}, {"": None}, Raw("NaN"), Raw("Infinity"),
    Raw("-Infinity"), Raw("1" * 4400), Raw("1e400"), Raw("-1e400"), Raw("1E-400"),
    Raw('"\\ud800"'), Raw('"\\u0000"'), Raw("-0"), Raw("1.0"), Raw("100000000000000000000.5"),
]  # fmt: skip
NUMBERS: list[Any] = [
    0, -1, 1, 2, 3, 4, 5, 2**31 - 1, 2**31, 2**63, 10**30, -(10**30), 0.5, 1.5, -0.0, 5e-324,
    1e-40, 1e308, Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1" * 4400), Raw("1e400"),
    True, "1", None,
]  # fmt: skip
STRINGS: list[Any] = [
    "", " ", "\t\n", "a" * 63, "a" * 64, "a" * 65, "a" * 300, "a" * 5000, "ü" * 64, "ü" * 65,
    "\U0001f600" * 40, "e\u0301" * 33, "\x00", "a\x00b", "\u202eevil", "\ufeffbom", "null",
    Raw('"\\ud800"'), Raw('"\\udfff\\ud800"'), 5, None, ["a"], {"a": "b"},
]  # fmt: skip
CAPTURE_TIMES: list[Any] = [
    "2024-05-01T10:00:00", "2024-05-01T10:00:00.25+02:00", "2024-05-01T10:00:00Z",
    "2024-02-30T00:00:00", "2024-05-01", "10:00:00", "yesterday", "", " ", "0001-01-01T00:00:00",
    "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59.999999-12:00", "1000-01-01T00:00:00",
    "1677-09-21T00:12:43", "2262-04-11T23:47:17", "2262-04-12T00:00:00", "+002024-05-01T00:00:00",
    "2024-05-01T10:00:00+25:00", "2024-W18-3T10:00:00", "2024-05-01T10:00:00.1234567890123",
    "\u0662\u0660\u0662\u0664-\u0660\u0665-\u0660\u0661T10:00:00", 0, -1, 1714557600, 1714557600.5, 1e10, -1e10, 1e11, -1e11,
    253402300799, 253402300800, -62135596800, -62135596801, 1e300, 5e-324, 10**30,
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1" * 4400), True, [], {},
]  # fmt: skip

# ---------------------------------------------------------------------------- routes


def _check_embed(req: dict[str, Any], out: dict[str, Any]) -> None:
    assert len(out["image_embeddings"]) == len(req.get("images", []))
    assert len(out["text_embeddings"]) == len(req.get("texts", []))
    for v in out["image_embeddings"] + out["text_embeddings"]:
        assert len(v) == out["dim"]
        assert all(math.isfinite(x) for x in v)


def _check_scores(req: dict[str, Any], out: dict[str, Any]) -> None:
    assert [s["index"] for s in out["scores"]] == list(range(len(req["images"])))


def _check_relevance(req: dict[str, Any], out: dict[str, Any]) -> None:
    _check_scores(req, out)
    prompts = list(dict.fromkeys([*req["positive"], *req.get("negative", [])]))
    for s in out["scores"]:
        assert list(s["clip_score"]) == prompts
        assert list(s["softmax"]) == prompts
        assert sum(s["softmax"].values()) == pytest.approx(1.0, abs=1e-4)


def _check_rank(req: dict[str, Any], out: dict[str, Any]) -> None:
    assert len(out["series"]) == len(req["series"])
    for i, (s, got) in enumerate(zip(req["series"], out["series"], strict=True)):
        n = len(s["images"])
        assert got["id"] == (s["id"] if s.get("id") is not None else str(i))
        assert len(got["scores"]) == len(got["probabilities"]) == n
        assert 0 <= got["keeper_index"] < n
        assert got["scores"][got["keeper_index"]] == max(got["scores"])
        assert sum(got["probabilities"]) == pytest.approx(1.0, abs=1e-6)


def _check_pick(req: dict[str, Any], out: dict[str, Any]) -> None:
    n = len(req["images"])
    assert [im["index"] for im in out["images"]] == list(range(n))
    grouped = sorted(i for g in out["groups"] for i in g["images"])
    assert grouped == list(range(n)), "every image in exactly one group"
    by_id = {g["id"]: g for g in out["groups"]}
    assert len(by_id) == len(out["groups"])
    for im in out["images"]:
        assert im["index"] in by_id[im["group"]]["images"]
    for g in out["groups"]:
        keepers = [i for i in g["images"] if out["images"][i]["decision"] == "keep"]
        assert g["keeper_index"] == (keepers[0] if keepers else None)
    c = out["counts"]
    decisions = Counter(im["decision"] for im in out["images"])
    assert c["images"] == n
    assert c["groups"] == len(out["groups"])
    assert (c["keepers"], c["alternates"], c["rejects"]) == (
        decisions["keep"],
        decisions["alternate"],
        decisions["reject"],
    )
    assert c["keepers"] + c["alternates"] + c["rejects"] == n
    assert c["duplicates"] == c["exact_duplicates"] + c["near_duplicates"]
    for im in out["images"]:
        assert (im["duplicate_of"] is None) == (im["duplicate_kind"] is None)
        assert im["duplicate_of"] is None or 0 <= im["duplicate_of"] < n


def _check_select(req: dict[str, Any], out: dict[str, Any]) -> None:
    n = len(req.get("ids") or req.get("images") or [])
    check_select_accounting(out, n)
    stages, picks = out["stages"], out["picks"]
    assert len(picks) == len(set(picks))
    assert all(0 <= i < n for i in picks)
    if req.get("candidates", "all") == "all":
        assert sorted(c["index"] for c in out["candidates"]) == list(range(n))
        dropped = Counter(c["dropped_at"] for c in out["candidates"])
        assert dropped[None] == len(picks)
        for s in stages:
            assert dropped[s["name"]] == s["n_dropped"]
    for c in out["candidates"]:
        if c["dropped_at"] is None:  # a pick: ranked by its final score, which it must show
            assert c["final"] is not None, f"pick {c['index']} without a final score"
    assert out["cost"]["candidates"] == n
    if out["rationales"] is not None:
        assert [r["index"] for r in out["rationales"]] == picks


def _check_search(req: dict[str, Any], out: dict[str, Any]) -> None:
    assert len(out["results"]) <= req.get("k", 10)
    assert out["request_id"] == req.get("request_id")
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert out["index"]["count"] == 6


def _check_compare(req: dict[str, Any], out: dict[str, Any]) -> None:
    assert len(out["nearest"]) == min(req.get("k", 5), out["collection"]["images"])
    assert out["collection"]["name"] == req["collection"]
    assert out["request_id"] == req.get("request_id")


def _check_feedback(req: dict[str, Any], out: dict[str, Any]) -> None:
    assert 0 <= out["accepted"] <= len(req["events"])
    if not any(e.get("event_id") for e in req["events"]):
        assert out["accepted"] == len(req["events"])


@dataclasses.dataclass
class Route:
    """One route's valid request and what its answer must be."""

    key: str
    method: str
    path: str
    response: type[BaseModel] | None
    body: dict[str, Any] | None = None  # a POST's valid JSON body
    check: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
    multipart: bool = False
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    #: field name -> values worth trying there (besides the generic ones)
    knobs: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    media: str = "application/json"
    request: type[BaseModel] | None = None  # the request model the route parses its body into


def _pick_item(data: bytes, when: Any, camera: str | None = None) -> dict[str, Any]:
    item = {**ref(data), "capture_time": when}
    if camera is not None:
        item["camera"] = camera
    return item


IMAGE_LISTS = [[], [ref(JPG1)] * 5, [ref(JPG1)] * 9, [ref(JPG1), ref(JPG1)]]
TEXT_LISTS: list[Any] = [[], [""], [" "], ["a" * 65], ["a"] * 5, ["a", "b", "c", "d", "e"], [5]]

ROUTES: dict[str, Route] = {
    r.key: r
    for r in [
        Route("healthz", "GET", "/healthz", None),
        Route("models", "GET", "/v1/models", api.ModelsResponse),
        Route(
            "embed",
            "POST",
            "/v1/embed",
            request=api.EmbedRequest,
            response=api.EmbedResponse,
            body={"images": [ref(PNG1), ref(JPG1)], "texts": ["a cat", "a dog"]},
            check=_check_embed,
            multipart=True,
            knobs={"texts": TEXT_LISTS, "images": IMAGE_LISTS},
        ),
        Route(
            "aesthetic",
            "POST",
            "/v1/score/aesthetic",
            request=api.AestheticRequest,
            response=api.AestheticResponse,
            body={"images": [ref(PNG1), ref(JPG2)]},
            check=_check_scores,
            multipart=True,
            knobs={"images": IMAGE_LISTS},
        ),
        Route(
            "relevance",
            "POST",
            "/v1/score/relevance",
            request=api.RelevanceRequest,
            response=api.RelevanceResponse,
            body={
                "positive": ["a red scene", "a cat"],
                "negative": ["blur"],
                "images": [ref(PNG1), ref(JPG1)],
                "temperature": 0.1,
            },
            check=_check_relevance,
            multipart=True,
            knobs={
                "temperature": [1e-40, 5e-324, 10, 10.000001, 0, -1, Raw("NaN"), "0.5", None],
                "positive": [*TEXT_LISTS, ["blur"], ["a", "a", "a", "a", "a"]],
                "negative": [*TEXT_LISTS, ["a red scene"], ["a cat", "a cat", "blur", "x"]],
                "images": IMAGE_LISTS,
            },
        ),
        Route(
            "rank",
            "POST",
            "/v1/rank",
            request=api.RankRequest,
            response=api.RankResponse,
            body={
                "series": [
                    {"id": "s-0", "images": [ref(JPG1), ref(JPG2)]},
                    {"images": [ref(PNG1), {"uri": f"s3://{BUCKET}/ok.jpg"}]},
                ]
            },
            check=_check_rank,
            knobs={
                "id": [None, "", "x" * 256, "x" * 257, 5, "ü" * 10, "0", "1"],
                "series": [
                    [],
                    [{"images": [ref(JPG1)]}],
                    [{"images": [ref(JPG1)] * 5}],
                    [{"images": [ref(JPG1), ref(JPG2)]}] * 4,
                    [{"images": []}, {"images": [ref(JPG1), ref(JPG2)]}],
                    [{"id": "a", "images": [ref(JPG1), ref(JPG1)]}] * 2,
                ],
                "images": [[], [ref(JPG1)], [ref(JPG1)] * 4, [ref(JPG1)] * 5],
            },
        ),
        Route(
            "pick",
            "POST",
            "/v1/pick",
            request=api.PickRequest,
            response=api.PickResponse,
            body={
                "images": [
                    _pick_item(JPG1, "2024-05-01T10:00:00", "cam A"),
                    _pick_item(JPG1, "2024-05-01T10:00:00.5", "cam A"),
                    _pick_item(JPG3, "2024-05-01T10:00:01+02:00"),
                    _pick_item(PNG2, 1714557600.5),
                    ref(PNG1),
                ],
                "max_gap_s": 2.0,
                "min_similarity": -1,
                "alternates": 1,
            },
            check=_check_pick,
            multipart=True,
            knobs={
                "capture_time": CAPTURE_TIMES,
                "camera": ["", " ", "c" * 256, "c" * 257, None, 1, "ü", "\x00"],
                "max_gap_s": [0, 5e-324, 1e-9, 30, 30.000001, 31, Raw("NaN"), None, True],
                "min_similarity": [-1, 1, -1.000001, 1.000001, Raw("NaN"), None, "0.5"],
                "alternates": [0, 100, 101, -1, True, 1.0, 1.5, "1", None, 10**30],
                "images": [[], [ref(JPG1)] * 9, [ref(JPG1)] * 8, [ref(JPG1)]],
            },
        ),
        Route(
            "select",
            "POST",
            "/v1/select",
            request=api.SelectRequest,
            response=api.SelectResponse,
            body={
                "positive": ["a red scene"],
                "negative": ["a blurry photo"],
                "images": [ref(PNG1), ref(JPG1), ref(JPG2), ref(JPG3), ref(PNG2)],
                "top_n": 3,
                "top_k": 2,
                "gamma": 0.2,
                "rationale": True,
                "vlm_query": "is it red?",
            },
            check=_check_select,
            multipart=True,
            knobs={
                "alpha": [0, 1e308, 1e300, 5e-324, Raw("Infinity"), Raw("NaN"), -0.0, -1],
                "beta": [0, 1e308, 1e300, 5e-324, Raw("Infinity"), -1],
                "gamma": [0, 1e308, 5e-324, Raw("Infinity"), -1],
                "min_relevance": [0, 1, 1.000001, -1e-9, Raw("NaN")],
                "clip_keep": [1, 2, 10**30, 0, -1, None],
                "min_side": [0, 1, 60, 2**31 - 1, 2**31, 10**4, -1],
                "min_aspect": [5e-324, 1e308, 1, 2, 0, None, Raw("Infinity")],
                "max_aspect": [5e-324, 1e308, 1, 0.5, 0, None],
                "dedup_threshold": [None, 1, 5e-324, 0, 1.0000001, 0.5],
                "top_n": [1, 6, 7, 10**30, 0, None],
                "top_k": [1, 4, 5, 10**30, 0, None],
                "candidates": ["all", "picks", "none", "", None, 1],
                "rationale": [True, False, "yes", 1, 0, None],
                "vlm_query": ["", " ", "q" * 64, "q" * 65, None, "\x00"],
                "images": IMAGE_LISTS,
                "positive": TEXT_LISTS,
                "negative": [*TEXT_LISTS, ["a red scene"], ["a photo"]],
            },
        ),
        Route(
            "select-ids",
            "POST",
            "/v1/select",
            request=api.SelectRequest,
            response=api.SelectResponse,
            body={"positive": ["a red scene"], "ids": ["id0", "id1", "id2", "id3"], "top_k": 2},
            check=_check_select,
            multipart=True,
            knobs={
                "ids": [
                    [],
                    ["id0", "id0"],
                    ["nope"],
                    ["id0"] * 17,
                    ["id0"] * 16,
                    ["x" * 65],
                    ["id4", "id5"],  # the corpus's garbage and missing files
                    ["id4", "id5", "id0"],
                    [5],
                ],
                "beta": [0, 1],
                "rationale": [True, False],
                "top_n": [1, 6, 7],
                "images": [[ref(JPG1)]],
            },
        ),
        Route(
            "search",
            "POST",
            "/v1/search",
            request=api.SearchRequest,
            response=api.SearchResponse,
            body={
                "text": "a cat",
                "k": 3,
                "filters": {"min_width": 1, "max": {"sharpness": 10}},
                "request_id": "q-1",
            },
            check=_check_search,
            knobs={
                "k": [0, 1, 5, 6, -1, 10**30, 1.0, 1.5, "3", True, None],
                "text": ["", " ", "t" * 64, "t" * 65, None],
                "image_id": ["id0", "id5", "nope", "x" * 64, "x" * 65, "", None],
                "image": [ref(PNG1), None, {"uri": f"s3://{BUCKET}/ok.jpg"}],
                "min_width": [-1, 0, 2**31 - 1, 2**31, 10**6, None],
                "max_height": [-1, 0, 2**31 - 1, 2**31, None],
                "min": [{"nope": 1}, {"sharpness": Raw("NaN")}, {"width": 1e308}, {}, None],
                "max": [{"sharpness": Raw("-Infinity")}, {"height": 0}, {"": 1}, []],
                "filters": [None, {}, {"min": {}, "max": {}}, {"min_width": 10**6}],
                "request_id": ["", "r" * 256, "r" * 257, None, 5],
            },
        ),
        Route(
            "search-image",
            "POST",
            "/v1/search",
            request=api.SearchRequest,
            response=api.SearchResponse,
            body={"image": ref(PNG1), "k": 2},
            check=_check_search,
            knobs={"k": [1, 5, 6, 0], "text": ["a cat"], "image_id": ["id0"]},
        ),
        Route(
            "search-id",
            "POST",
            "/v1/search",
            request=api.SearchRequest,
            response=api.SearchResponse,
            body={"image_id": "id1", "k": 4, "filters": {"min": {"sharpness": 0}}},
            check=_check_search,
            knobs={"image_id": ["id0", "id5", "ID1", "id1 ", "nope", "x" * 64, "x" * 65, ""]},
        ),
        Route(
            "compare",
            "POST",
            "/v1/compare",
            request=api.CompareRequest,
            response=api.CompareResponse,
            body={"image": ref(JPG1), "collection": "ref", "k": 3, "request_id": "c-1"},
            check=_check_compare,
            knobs={
                "collection": ["ref", "other", "nope", "", "x" * 64, "x" * 65, "../ref", "ref\x00"],
                "k": [0, 1, 4, 5, -1, 10**30, 1.5, None],
                "request_id": ["", "r" * 256, "r" * 257, None],
            },
        ),
        Route("references", "GET", "/v1/references", api.ReferencesResponse),
        Route(
            "feedback",
            "POST",
            "/v1/feedback",
            request=api.FeedbackRequest,
            response=api.FeedbackResponse,
            body={
                "events": [
                    {"request_id": "r-1", "image_id": "i-1", "action": "accepted"},
                    {
                        "event_id": "e-2",
                        "request_id": "r-1",
                        "image_id": "i-2",
                        "action": "rejected",
                        "group_id": "g1",
                        "client": "me",
                    },
                ],
                "sync": False,
            },
            check=_check_feedback,
            knobs={
                "events": [
                    [],
                    [{"request_id": "r", "image_id": "i", "action": "undone"}] * 32,
                    [{"request_id": "r", "image_id": "i", "action": "undone"}] * 33,
                    [{"event_id": "same", "request_id": "r", "image_id": "i", "action": "undone"}]
                    * 3,
                ],
                "action": ["accepted", "picked-as-keeper", "keep", "", None, 1],
                "request_id": ["", "r" * 256, "r" * 257, None],
                "image_id": ["", "i" * 256, "i" * 257, None],
                "event_id": ["", "e" * 128, "e" * 129, None],
                "group_id": ["", "g" * 2048, "g" * 2049, None],
                "client": ["", "c" * 256, "c" * 257, None],
                "sync": [True, False, "yes", 1, None],
            },
        ),
        Route("review-runs", "GET", "/v1/review/runs", api.ReviewRunsResponse),
        Route(
            "review-groups",
            "GET",
            "/v1/review/runs/demo/groups",
            api.ReviewPage,
            params={"offset": "1", "limit": "50"},
        ),
        Route("review-thumb", "GET", "/v1/review/runs/demo/thumbs/{run0}", None, media="jpeg"),
        Route("corpus-thumb", "GET", "/v1/review/corpus/thumbs/id0", None, media="jpeg"),
    ]
}

# ---------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    """One request, its description and what the route may answer to it."""

    route: Route
    number: int  # its number among the route's cases: with KEEPER_FUZZ_SEED, what replays it
    seed: int
    desc: list[str]
    method: str
    path: str
    body: Any = None  # JSON tree (with Raw / Pairs) or None
    content: bytes | None = None  # set: sent as it is, instead of ``body``
    headers: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: Any = None
    files: list[Any] | None = None
    data: dict[str, Any] | None = None
    ranker: str = "head"
    vlm: str = "ok"
    #: what the ingress believes the ranker is (``_ranker_tuned``) as the case starts: a stale
    #: belief makes the ranker answer "needs" and the ingress call again (ingress._rank)
    tuned_hint: bool = False
    multipart_req: dict[str, Any] | None = None  # the request as a multipart one carries it

    def allowed_503(self) -> set[str]:
        codes = set()
        if self.ranker == "unavailable":
            codes.add("model_unavailable")
        if self.vlm == "fail":
            codes.add("vlm_unavailable")
        return codes

    def expected(self) -> dict[str, Any] | None:
        """The request as the server parsed it (its model, defaults filled in), where that is
        known: what an answer's counts are checked against."""
        model = self.route.request
        if model is None or self.method != "POST":
            return None
        try:
            if self.multipart_req is not None:
                return model.model_validate(self.multipart_req).model_dump()
            if self.files is not None:
                return None
            text = self.content if self.content is not None else dumps(self.body).encode()
            return model.model_validate_json(text).model_dump()  # as api.parse_json does
        except ValueError:  # pydantic's ValidationError too
            return None

    def send(self, client: Any) -> Any:
        headers = {**AUTH, **self.headers}
        kw: dict[str, Any] = {"headers": headers, "params": self.params}
        if self.files == [] and self.data is not None:  # the client would send urlencoded
            fields = [
                (k, str(x).encode(), None)
                for k, v in self.data.items()
                for x in (v if isinstance(v, list) else [v])
            ]
            kw["content"] = _multipart(fields, "fuzzform")
            headers["Content-Type"] = "multipart/form-data; boundary=fuzzform"
        elif self.files is not None or self.data is not None:
            kw["files"], kw["data"] = self.files, self.data
        elif self.content is not None:
            kw["content"] = self.content
        elif self.body is not None:
            kw["content"] = dumps(self.body).encode()
            headers.setdefault("Content-Type", "application/json")
        headers = {k: v for k, v in headers.items() if v is not None}
        kw["headers"] = headers
        return client.request(self.method, self.path, **kw)

    def context(self, r: Any | None = None) -> str:
        shown = self.content if self.content is not None else dumps(self.body)
        lines = [
            f"route {self.route.key} seed {self.seed}: {'; '.join(self.desc)}",
            f"  {self.method} {self.path} params={self.params!r:.200} headers={self.headers!r:.200}",
            f"  ranker={self.ranker} (believed tuned: {self.tuned_hint}) vlm={self.vlm}",
            f"  body: {shown!r:.600}",
        ]
        if self.data is not None:
            lines.append(f"  form fields: {self.data!r:.400}")
        if r is not None:
            lines.append(f"  answered {r.status_code}: {r.text[:800]!r}")
        lines.append(
            f"  replay: KEEPER_FUZZ_SEED={BASE_SEED} KEEPER_FUZZ_REPLAY={self.route.key}:{self.number}"
        )
        return "\n".join(lines)


def paths_of(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every value in a JSON tree (not inside Raw / Pairs), the root first."""
    yield prefix, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths_of(v, (*prefix, i))


def get_at(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def set_at(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``tree`` with the value at ``path`` replaced (the root replaced for an empty path)."""
    if not path:
        return value
    get_at(tree, path[:-1])[path[-1]] = value
    return tree


def is_image_ref(path: tuple[Any, ...], v: Any) -> bool:
    return isinstance(v, dict) and ("b64" in v or "uri" in v) and path[-1:] != ("filters",)


Mutator = Callable[[random.Random, Case], None]


def draw(rng: random.Random, values: list[Any]) -> Any:
    """A copy of one of ``values``: a later mutation of the case never changes the bank."""
    return copy.deepcopy(rng.choice(values))


def _pick_path(rng: random.Random, case: Case, want: Callable[[tuple[Any, ...], Any], bool]) -> Any:
    found = [p for p, v in paths_of(case.body) if want(p, v)]
    return rng.choice(found) if found else None


def m_drop(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, lambda p, v: bool(p))
    if p is None:
        return m_add_key(rng, case)
    del get_at(case.body, p[:-1])[p[-1]]
    case.desc.append(f"drop {p}")


def m_add_key(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, lambda p, v: isinstance(v, dict))
    key = rng.choice(["extra", "b64", "uri", "", "images", "__proto__", "ü", "k" * 300])
    value = draw(rng, WEIRD)
    if p is None:
        case.body = {key: value}
    else:
        get_at(case.body, p)[key] = value
    case.desc.append(f"add key {key[:20]!r}={value!r:.40} at {p}")


def m_retype(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, lambda p, v: True)
    value = draw(rng, WEIRD)
    case.body = set_at(case.body, p, value)
    case.desc.append(f"set {p} to {value!r:.60}")


def m_number(rng: random.Random, case: Case) -> None:
    numeric = _pick_path(
        rng, case, lambda p, v: bool(p) and isinstance(v, int | float) and not isinstance(v, bool)
    )
    p = numeric or _pick_path(rng, case, lambda p, v: bool(p))
    value = draw(rng, NUMBERS)
    case.body = set_at(case.body, p, value)
    case.desc.append(f"number {p} = {value!r:.60}")


def m_string(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, lambda p, v: isinstance(v, str) and p[-1:] != ("b64",))
    p = p or _pick_path(rng, case, lambda p, v: bool(p))
    value = draw(rng, STRINGS)
    case.body = set_at(case.body, p, value)
    case.desc.append(f"string {p} = {value!r:.60}")


def m_knob(rng: random.Random, case: Case) -> None:
    """A route's own field set to a value worth trying there (added where it is missing)."""
    knobs = case.route.knobs
    if not knobs or not isinstance(case.body, dict):
        return m_retype(rng, case)
    name = rng.choice(sorted(knobs))
    value = draw(rng, knobs[name])
    holders = [p for p, v in paths_of(case.body) if isinstance(v, dict) and name in v]
    if not holders:  # an optional field: where its siblings are
        holders = [
            p
            for p, v in paths_of(case.body)
            if isinstance(v, dict) and (p == () or (name in ("min", "max") and p[-1] == "filters"))
        ]
        if name in ("capture_time", "camera", "event_id", "group_id", "client", "id"):
            holders = [p for p, v in paths_of(case.body) if isinstance(v, dict) and len(p) == 2]
        if name in ("min", "max", "min_width", "max_height") and "filters" not in case.body:
            case.body["filters"] = {}
            holders = [("filters",)]
    if not holders:
        return m_retype(rng, case)
    p = rng.choice(holders)
    get_at(case.body, p)[name] = value
    case.desc.append(f"knob {name} at {p} = {dumps(value)[:80]}")


def m_nan(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, lambda p, v: bool(p) and not isinstance(v, dict | list))
    p = p or _pick_path(rng, case, lambda p, v: bool(p))
    value = Raw(rng.choice(["NaN", "Infinity", "-Infinity", "nan", "inf", "1" * 4400, "1e999"]))
    case.body = set_at(case.body, p, value)
    case.desc.append(f"raw {value!r} at {p}")


def m_dup_key(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, lambda p, v: isinstance(v, dict) and bool(v))
    if p is None:
        return m_retype(rng, case)
    obj = get_at(case.body, p)
    key = rng.choice(sorted(obj))
    other = draw(rng, [*WEIRD, obj[key]])
    pairs = list(obj.items())
    pairs.insert(rng.randrange(len(pairs) + 1), (key, other))
    case.body = set_at(case.body, p, Pairs(pairs))
    case.desc.append(f"duplicate key {key!r} (other value {other!r:.40}) at {p}")


def m_lists(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, lambda p, v: isinstance(v, list))
    if p is None:
        return m_retype(rng, case)
    items = get_at(case.body, p)
    how = rng.choice(["empty", "repeat", "grow", "many tiny", "dup one", "shuffle", "reverse"])
    if how == "empty":
        new: Any = []
    elif how == "repeat":
        new = (items or [None]) * rng.choice([2, 3, 5, 9])
    elif how == "grow":
        new = (items or [None]) * 40
    elif how == "many tiny":
        new = Raw("[" + ",".join(["0"] * rng.choice([1000, 2100, 50_000])) + "]")
    elif how == "dup one" and items:
        new = [*items, copy.deepcopy(rng.choice(items))]
    else:
        new = list(items)
        if how == "shuffle":
            rng.shuffle(new)
        else:
            new.reverse()
    case.body = set_at(case.body, p, new)
    case.desc.append(f"list {how} at {p}")


def m_image(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, is_image_ref)
    if p is None:
        return m_retype(rng, case)
    what, value = draw(rng, IMAGE_REFS)
    old = get_at(case.body, p)
    if isinstance(value, dict) and isinstance(old, dict):  # keep /v1/pick's capture fields
        value.update({k: v for k, v in old.items() if k not in ("b64", "uri")})
    case.body = set_at(case.body, p, value)
    case.desc.append(f"image {p} = {what}")


def m_many_images(rng: random.Random, case: Case) -> None:
    """Every image the same bomb or odd image, or the request's pixel budget spent."""
    paths = [p for p, v in paths_of(case.body) if is_image_ref(p, v)]
    if not paths:
        return m_retype(rng, case)
    name, data = rng.choice(
        [
            ("png declaring 1900x1900", png_declaring(1900, 1900)),
            ("png declaring 2000x2000", png_declaring(2000, 2000)),
            ("jpeg of 40 extra scans", BAD_IMAGES["jpeg of 40 extra scans"]),
            *ODD_VALID.items(),
        ]
    )
    for p in paths:
        with contextlib.suppress(LookupError, TypeError):  # inside one replaced before
            get_at(case.body, p).update(ref(data))
            get_at(case.body, p).pop("uri", None)
    case.desc.append(f"every image: {name}")


def m_deep(rng: random.Random, case: Case) -> None:
    p = _pick_path(rng, case, lambda p, v: True)
    value = nested(
        rng.choice([30, 100, 250, 600, 1023, 1500, 2100, 100_000]), rng.choice(["list", "dict"])
    )
    case.body = set_at(case.body, p, value)
    case.desc.append(f"nested {value!r} at {p}")


def m_bytes(rng: random.Random, case: Case) -> None:
    """Raw body bytes: invalid UTF-8, truncated JSON, other encodings, not an object."""
    text = dumps(case.body).encode()
    how = rng.choice(
        [
            "invalid utf-8",
            "truncated",
            "utf-16",
            "bom",
            "trailing garbage",
            "two documents",
            "not an object",
            "empty",
            "nul bytes",
            "latin-1 string",
        ]
    )
    if how == "invalid utf-8":
        at = text.find(b'"', rng.randrange(max(1, len(text) // 2))) + 1 or 1
        content = (
            text[:at] + rng.choice([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + text[at:]
        )
    elif how == "truncated":
        content = text[: rng.randrange(len(text))]
    elif how == "utf-16":
        content = text.decode().encode("utf-16")
    elif how == "bom":
        content = b"\xef\xbb\xbf" + text
    elif how == "trailing garbage":
        content = text + b" garbage"
    elif how == "two documents":
        content = text + b" " + text
    elif how == "not an object":
        content = rng.choice([b"null", b"[]", b"123", b'"x"', b"true", b"{}", b"[{}]", b"NaN"])
    elif how == "empty":
        content = rng.choice([b"", b" ", b"\n"])
    elif how == "nul bytes":
        content = b"\x00" * 16 + text
    else:
        content = '{"texts": ["caf\xe9"], "positive": ["\xe9"]}'.encode("latin-1")
    case.content = content
    case.desc.append(f"body bytes: {how}")


def m_content_type(rng: random.Random, case: Case) -> None:
    ctype = rng.choice(
        [
            "text/plain",
            "application/xml",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "multipart/form-data; boundary=zzz",
            "application/json; charset=latin-1",
            "application/JSON",
            " application/json ",
            "application/json;",
            "application/vnd.api+json",
            "image/png",
            "",
            None,
            "*/*",
            "application/json, text/plain",
        ]
    )
    case.headers["Content-Type"] = ctype
    case.content = dumps(case.body).encode()
    case.desc.append(f"Content-Type {ctype!r}")


def m_headers(rng: random.Random, case: Case) -> None:
    name, value = rng.choice(
        [
            ("X-Keeper-Client", "c" * 256),
            ("X-Keeper-Client", "c" * 257),
            ("X-Keeper-Client", "José 山田".encode()),
            ("X-Keeper-Client", b"\xff\xfe\xe9"),
            ("X-Keeper-Client", "  "),
            ("Authorization", f"Bearer {TOKEN}x"),
            ("Authorization", f"Basic {TOKEN}"),
            ("Authorization", None),
            ("Authorization", "Bearer " + "é" * 20),
            ("Content-Length", "999999999999"),
            ("Content-Length", str(LIMITS.max_request_bytes + 1)),
            ("Content-Encoding", "gzip"),
            ("Accept", "text/html"),
            ("Expect", "100-continue"),
        ]
    )
    if name == "Authorization" and isinstance(value, str) and not value.isascii():
        value = value.encode()
    case.headers[name] = value
    if name == "Content-Length":
        case.content = dumps(case.body).encode()
    case.desc.append(f"header {name}: {value!r:.40}")


def m_method(rng: random.Random, case: Case) -> None:
    other = [m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS") if m != case.method]
    case.method = rng.choice(other)
    case.desc.append(f"method {case.method}")


def m_query(rng: random.Random, case: Case) -> None:
    """Query strings: ignored by the POST routes; /v1/review's paging reads them."""
    values = [
        "-1", "0", "1", "2", "3", "4", "49", "50", "51", "200", "201", "abc", "", "1.5", "1e3",
        "9" * 30, "NaN", "-0", " 1", "0x10", "\u0661", "1_000", "+1", "\x00", "ü",
    ]  # fmt: skip
    params = case.params or []
    params = list(params.items()) if isinstance(params, dict) else list(params)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["offset", "limit", "k", "x", "offset", "limit"])
        params.append((name, rng.choice(values)))
    case.params = params
    case.desc.append(f"query {params!r:.120}")


def m_path(rng: random.Random, case: Case) -> None:
    """A path segment of the review routes changed (other routes: an unknown path, 404)."""
    # Literal "." and ".." segments are left out: the client resolves them before sending.
    segs = ["", "%2e%2e", "%2E", "demo%00", "broken", "nope", "DEMO", "démo", "d" * 300,
            "demo%2Fgroups", "a b", "%", "id0", "id4", "id5", "0" * 64, "A" * 64,
            "..%2F..%2Fetc%2Fpasswd", "%252e%252e"]  # fmt: skip
    parts = case.path.split("/")
    if case.route.key.startswith(("review-", "corpus-")) and len(parts) > 4:
        i = rng.choice([4, len(parts) - 1] if case.route.key != "review-runs" else [3])
        parts[i] = rng.choice(segs)
        case.path = "/".join(parts)
    else:
        case.path = case.path + rng.choice(["/x", "x", "%00", "%2F..%2Fv1%2Fmodels"])
    case.desc.append(f"path {case.path[:120]!r}")


def _multipart_fields(body: dict[str, Any]) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """A valid JSON body as multipart: (files, data, the request as parsed)."""
    files, data = [], {}
    images = body.get("images", [])
    images = images if isinstance(images, list) else [images]
    for i, im in enumerate(images):
        raw = dumps(im).encode()  # an item that is no image reference: its JSON as the file
        if isinstance(im, dict) and isinstance(im.get("b64"), str):
            with contextlib.suppress(ValueError):
                raw = base64.b64decode(im["b64"])
        files.append(("images", (f"{i}.img", raw, "application/octet-stream")))
    items = [im if isinstance(im, dict) else {} for im in images]
    for field, key in (("capture_times", "capture_time"), ("cameras", "camera")):
        values = [im.get(key) for im in items]
        if any(v is not None for v in values):
            data[field] = dumps(values)
    for k, v in body.items():
        if k == "images":
            continue
        if isinstance(v, str):
            data[k] = v
        elif isinstance(v, bool):
            data[k] = "true" if v else "false"
        elif v is not None:
            data[k] = dumps(v)
    return files, data, copy.deepcopy(body)


def m_multipart(rng: random.Random, case: Case) -> None:
    if not case.route.multipart or not isinstance(case.body, dict):
        case.files = [("images", ("a.png", PNG1, "image/png"))]
        case.desc.append("multipart to a JSON-only route")
        return
    files, data, req = _multipart_fields(case.body)
    how = rng.choice(
        [
            "as it is",
            "bad file",
            "unknown field",
            "repeated scalar",
            "file under another name",
            "list field not JSON",
            "list field of numbers",
            "per-image list of the wrong length",
            "images as a text field",
            "too many files",
            "deep list field",
            "no files",
            "empty file",
            "lone surrogate escape in a list field",
        ]
    )
    case.multipart_req = None
    if how == "as it is":
        case.multipart_req = req
    elif how == "bad file" and files:
        what, raw = rng.choice(list(BAD_IMAGES.items()) + list(ODD_VALID.items()))
        i = rng.randrange(len(files))
        files[i] = ("images", ("x.bin", raw, "image/jpeg"))
        how += f" {i}: {what}"
    elif how == "unknown field":
        data["colour"] = "red"
    elif how == "repeated scalar" and data:
        k = rng.choice(sorted(data))
        data[k] = [data[k], data[k]]
        how += f" {k}"
    elif how == "file under another name" and files:
        files.append(("photo", ("a.png", PNG1, "image/png")))
    elif how == "list field not JSON":
        data[rng.choice(["texts", "positive", "negative", "capture_times", "cameras"])] = "[1, "
    elif how == "list field of numbers":
        data[rng.choice(["texts", "positive", "negative", "capture_times", "cameras"])] = "[1, 2]"
    elif how == "per-image list of the wrong length":
        data[rng.choice(["capture_times", "cameras"])] = json.dumps([None] * (len(files) + 1))
    elif how == "images as a text field":
        data["images"] = b64s(PNG1)
    elif how == "too many files":
        files = files + [("images", ("a.png", PNG1, "image/png"))] * 9
    elif how == "deep list field":
        data["texts"] = "[" * rng.choice([500, 1100, 3000]) + "]" * 3
    elif how == "no files":
        files = []
    elif how == "empty file" and files:
        files[0] = ("images", ("e.png", b"", "image/png"))
    elif how == "lone surrogate escape in a list field":
        field = rng.choice(["texts", "positive", "negative", "cameras", "ids"])
        data[field] = rng.choice(['["\\ud800"]', '["a", "\\udfff b"]', '["\\ud800", "\\ud801"]'])
        how += f" {field}"
    case.files, case.data = files, data
    case.desc.append(f"multipart: {how}")


def m_multipart_raw(rng: random.Random, case: Case) -> None:
    """A multipart body that is not one."""
    boundary = "fuzzboundary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + PNG1
    bodies = {
        "garbage": b"garbage",
        "no closing boundary": part,
        "other boundary": part.replace(boundary.encode(), b"other") + b"\r\n--other--\r\n",
        "header without blank line": f"--{boundary}\r\nContent-Disposition: form-data".encode(),
        "no name": f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{boundary}--\r\n".encode(),
        "huge header": f"--{boundary}\r\nX: {'h' * 20000}\r\n\r\nx\r\n--{boundary}--\r\n".encode(),
        "non-utf8 field": f'--{boundary}\r\nContent-Disposition: form-data; name="texts"\r\n\r\n'.encode()
        + b"\xff\xfe"
        + f"\r\n--{boundary}--\r\n".encode(),
        "empty": b"",
        # +2AA- is a lone surrogate in UTF-7, which the form parser decodes with (charset=)
        "utf-7 field": f'--{boundary}\r\nContent-Disposition: form-data; name="positive"\r\n\r\n'.encode()
        + b"+2AA-\r\n"
        + part
        + f"\r\n--{boundary}--\r\n".encode(),
    }
    how = rng.choice(sorted(bodies))
    case.content = bodies[how]
    ctype = rng.choice([f"multipart/form-data; boundary={boundary}", "multipart/form-data"])
    if how == "utf-7 field":
        ctype = f"multipart/form-data; boundary={boundary}; charset=utf-7"
    case.headers["Content-Type"] = ctype
    case.desc.append(f"raw multipart: {how} ({ctype})")


JSON_MUTATORS: list[Mutator] = [
    m_drop, m_add_key, m_retype, m_number, m_string, m_knob, m_knob, m_nan, m_dup_key, m_lists,
    m_image, m_image, m_many_images, m_deep, m_bytes, m_content_type, m_headers, m_method,
    m_query, m_multipart, m_multipart_raw,
]  # fmt: skip
GET_MUTATORS: list[Mutator] = [m_query, m_query, m_path, m_path, m_method, m_headers]
#: Mutators that decide the whole body (stacking more on them would change nothing).
FINAL = {m_bytes, m_content_type, m_multipart, m_multipart_raw}


def case_seed(route: str, number: int) -> int:
    return zlib.crc32(f"{BASE_SEED}:{route}:{number}".encode())


def base_case(route: Route, server: Server, number: int = -1) -> Case:
    """The route's valid request (as case ``number``)."""
    path = route.path.replace("{run0}", server.run_ids[0])
    return Case(
        route=route,
        number=number,
        seed=case_seed(route.key, number),
        desc=[],
        method=route.method,
        path=path,
        body=copy.deepcopy(route.body),
        params=dict(route.params) or None,
    )


#: Where each route's turn through the mutation kinds starts: the next route starts 8 kinds on,
#: so at the default count every kind runs on some route.
ROTATION = 8


def make_case(route: Route, server: Server, number: int) -> Case:
    """Case ``number`` of ``route``: a function of KEEPER_FUZZ_SEED, the route and the number.

    The first ``len(mutators)`` cases take the kinds in turn (from the route's own start); later
    ones draw one to three kinds at random.
    """
    case = base_case(route, server, number)
    rng = random.Random(case.seed)
    mutators = JSON_MUTATORS if route.method == "POST" else GET_MUTATORS
    if number < len(mutators):
        same = [k for k, r in ROUTES.items() if r.method == route.method]
        chosen = [mutators[(number + same.index(route.key) * ROTATION) % len(mutators)]]
    else:
        chosen = [rng.choice(mutators) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    for m in chosen:
        m(rng, case)
        if m in FINAL:
            break
    case.ranker = rng.choices(["head", "fine-tuned", "unavailable"], [6, 3, 1])[0]
    case.vlm = rng.choices(["ok", "nan", "lost-once", "fail"], [6, 2, 1, 1])[0]
    case.tuned_hint = rng.random() < 0.5
    return case


# ---------------------------------------------------------------------------- checks


def check_error(r: Any, ctx: str) -> dict[str, Any]:
    """A non-2xx answer is keeper's JSON error envelope, specific and without internals."""
    assert r.headers.get("content-type", "").startswith("application/json"), ctx
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(f"not JSON\n{ctx}") from None
    assert isinstance(body, dict), ctx
    assert set(body) == {"error"}, ctx
    e = body["error"]
    assert isinstance(e, dict), ctx
    assert {"code", "message"} <= set(e) <= {"code", "message", "index"}, ctx
    assert isinstance(e["code"], str), ctx
    assert e["code"], ctx
    assert isinstance(e["message"], str), ctx
    assert e["message"].strip(), ctx
    assert "index" not in e or (isinstance(e["index"], int) and e["index"] >= 0), ctx
    assert e["code"] not in ("internal", "deployment_error"), ctx
    assert "Traceback" not in e["message"], ctx
    return e


def check_ok(route: Route, case: Case, r: Any, ctx: str) -> None:
    """A 2xx answer: the response model, and counts that add up with the request."""
    if route.media == "jpeg":
        assert r.headers["content-type"] == "image/jpeg", ctx
        assert r.content.startswith(b"\xff\xd8"), ctx
        return
    out = r.json()
    if route.response is None:
        assert out == {"status": "ok"}, ctx
        return
    try:
        route.response.model_validate(out)
    except Exception as e:
        raise AssertionError(f"the answer is not a {route.response.__name__}: {e}\n{ctx}") from e
    req = case.expected()
    if route.check is not None and req is not None:
        try:
            route.check(req, out)
        except (AssertionError, KeyError, TypeError) as e:
            raise AssertionError(f"counts do not add up ({e!r})\n{ctx}") from e


def check_answer(case: Case, r: Any, ctx: str) -> str:
    """Every check of one answer; returns its error code ("ok" for a 200)."""
    if 200 <= r.status_code < 300:
        assert r.status_code == 200, ctx
        check_ok(case.route, case, r, ctx)
        return "ok"
    e = check_error(r, ctx)
    if r.status_code == 503:
        assert e["code"] in case.allowed_503(), f"503 no fake caused\n{ctx}"
    else:
        assert 400 <= r.status_code < 500, ctx
    return str(e["code"])


STATS: dict[str, Counter[str]] = {}


def run_case(server: Server, case: Case) -> None:
    route = case.route
    server.ranker.mode, server.vlm.mode = case.ranker, case.vlm
    server.inst._ranker_tuned = {id(server.ranker): case.tuned_hint}  # a case is self-contained
    try:
        r = case.send(server.client)
    finally:
        server.ranker.mode, server.vlm.mode = "head", "ok"
    ctx = case.context(r)
    code = check_answer(case, r, ctx)
    STATS.setdefault(route.key, Counter())[f"{r.status_code} {code}"] += 1
    # ... and the server keeps serving: the route's valid request answers 200.
    valid = base_case(route, server, case.number)
    valid.desc.append(f"the valid request after case {case.number}")
    again = valid.send(server.client)
    assert again.status_code == 200, valid.context(again)
    check_ok(route, valid, again, valid.context(again))


def _cases() -> list[Any]:
    if REPLAY:
        key, _, number = REPLAY.partition(":")
        return [pytest.param(key, [int(number)], id=f"replay-{key}-{number}")]
    return [pytest.param(k, range(CASES), id=k) for k in ROUTES]


@pytest.mark.parametrize(("key", "numbers"), _cases())
def test_fuzz_route(server: Server, key: str, numbers: Iterable[int]) -> None:
    """KEEPER_FUZZ seeded mutations of the route's valid request (module docstring)."""
    route = ROUTES[key]
    for number in numbers:
        run_case(server, make_case(route, server, number))


def test_every_valid_request_answers_200(server: Server) -> None:
    """The base of every case: each route's valid request, with each ranker and VLM mode."""
    for route in ROUTES.values():
        for ranker, vlm in [("head", "ok"), ("fine-tuned", "nan"), ("head", "lost-once")]:
            case = base_case(route, server)
            case.ranker, case.vlm = ranker, vlm
            case.desc.append("valid")
            server.ranker.mode, server.vlm.mode = ranker, vlm
            try:
                r = case.send(server.client)
            finally:
                server.ranker.mode, server.vlm.mode = "head", "ok"
            assert r.status_code == 200, case.context(r)
            check_ok(route, case, r, case.context(r))


def test_the_multipart_form_of_each_valid_body_answers_200(server: Server) -> None:
    for route in ROUTES.values():
        if not route.multipart:
            continue
        case = base_case(route, server)
        case.files, case.data, case.multipart_req = _multipart_fields(case.body)
        case.desc.append("valid multipart")
        r = case.send(server.client)
        assert r.status_code == 200, case.context(r)
        check_ok(route, case, r, case.context(r))


# ---------------------------------------------------------------------------- bugs found
# Minimal, deterministic reproductions of the bugs the fuzzing found (each failed before its fix).


def _select_images(n: int) -> list[dict[str, Any]]:
    return [ref(b) for b in (PNG1, JPG1, JPG2, JPG3, PNG2)[:n]]


def test_select_weights_over_the_bound_are_refused(server: Server) -> None:
    body = {
        "positive": ["a red scene"],
        "images": _select_images(3),
        "alpha": 1.7e308,
        "beta": 1.7e308,
        "gamma": 1.7e308,
    }
    r = server.client.post("/v1/select", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert "alpha" in check_error(r, r.text)["message"]
    body.update(alpha=1e6, beta=1e6, gamma=1e6)  # the bound itself: every pick has a final score
    r = server.client.post("/v1/select", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    picks = [c for c in out["candidates"] if c["index"] in out["picks"]]
    assert picks, r.text
    assert all(math.isfinite(c["final"]) for c in picks), r.text


def _multipart(fields: list[tuple[str, bytes, str | None]], boundary: str = "B") -> bytes:
    out = b""
    for name, value, filename in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("vector", ["JSON escape in positive", "utf-7 vlm_query"])
def test_a_lone_surrogate_in_a_multipart_field_is_a_4xx_not_a_500(
    server: Server, vector: str
) -> None:
    if vector == "JSON escape in positive":
        fields = [("positive", b'["\\ud800"]', None)]
        ctype = "multipart/form-data; boundary=B"
    else:
        fields = [("positive", b"a red scene", None), ("vlm_query", b"+2AA-", None)]
        ctype = "multipart/form-data; boundary=B; charset=utf-7"
    body = _multipart([*fields, ("images", PNG1, "a.png")])
    r = server.client.post("/v1/select", content=body, headers={**AUTH, "Content-Type": ctype})
    assert r.status_code == 422, r.text
    e = check_error(r, r.text)
    assert (e["code"], "not valid Unicode text" in e["message"]) == ("invalid_request", True)


def test_relevance_answers_one_key_per_prompt_sent(server: Server) -> None:
    files = [("images", ("a.png", PNG1, "image/png"))]
    data = {"positive": '["\\ud800", "\\ud801"]'}
    r = server.client.post("/v1/score/relevance", files=files, data=data, headers=AUTH)
    assert r.status_code == 422, r.text
    assert "'positive'" in check_error(r, r.text)["message"]
    data = {"positive": r'["\u00e9t\u00e9", "\ud83d\udcf7"]'}  # JSON escapes of real characters
    r = server.client.post("/v1/score/relevance", files=files, data=data, headers=AUTH)
    assert r.status_code == 200, r.text
    assert set(r.json()["scores"][0]["clip_score"]) == {"été", "\U0001f4f7"}, r.text


@pytest.mark.parametrize("corpus_id", ["id4", "id5"])  # the corpus's garbage and missing files
def test_an_unreadable_corpus_image_is_not_the_clients_error(
    server: Server, corpus_id: str
) -> None:
    body = {"positive": ["a red scene"], "ids": [corpus_id, "id0"], "beta": 0, "rationale": True}
    r = server.client.post("/v1/select", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    said = {x["index"]: x for x in r.json()["rationales"]}
    assert said[0]["text"] is None, r.text
    assert said[0]["error"].startswith("corpus image "), r.text
    assert "is unreadable" in said[0]["error"], r.text
    assert isinstance(said[1]["text"], str), r.text
    assert said[1]["error"] is None, r.text
