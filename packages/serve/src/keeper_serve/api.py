"""The HTTP API's request and response models, its errors, and request-side image handling.

Nothing here imports Ray: the ingress deployment uses it, and so do unit tests. Every error a
client can cause is an :class:`ApiError`, rendered as ``{"error": {"code", "message", "index"?}}``
with a 4xx status; ``index`` names the offending image (its position in the request, counting
across all series for ``/v1/rank``) or series.

``/v1/pick`` is ``keeper pick`` on one request's images: :func:`pick_frame` builds the frame
``keeper_core.culling.cull`` takes (the batch job's columns, capture metadata from each image's
EXIF or the client), and :func:`cull_request` runs ``cull`` with the ranker deployment's scores,
or with the zero-shot rule, named as such, when the app has no ranker loaded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from keeper_core import errors, storage
from keeper_core.ab import Arm, assign
from keeper_core.capture import CAPTURE_COLUMNS, Capture, capture_row, given_capture, read_capture
from keeper_core.cascade import (
    MAX_WEIGHT,
    STAGES,
    CascadeConfig,
    CascadeResult,
    CascadeStageError,
    QueryRules,
)
from keeper_core.culling import CullResult, cull
from keeper_core.embedded_xmp import file_ids
from keeper_core.errors import ConfigError, DataError, ImageDecodeError, StorageError
from keeper_core.feedback import FeedbackEvent
from keeper_core.grouping import GroupingConfig, dhash
from keeper_core.images import heif_coded_sizes, image_size, raw_preview
from keeper_core.models import PreprocessConfig
from keeper_core.picking import PickConfig
from keeper_core.preparation import DecodedImage, ImagePreparation
from keeper_core.quality import FEATURE_NAMES
from keeper_core.references import Comparison, ReferenceMeta, Standing
from keeper_serve.config import (
    EVENTS_CEILING,
    IMAGE_ID_CHARS,
    IMAGES_CEILING,
    SELECT_IDS_CEILING,
    SERIES_CEILING,
    TEXTS_CEILING,
    ABArgs,
    KeeperAppArgs,
    LimitArgs,
)

T = TypeVar("T")

# ----------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the API refuses: HTTP status, stable machine code, human message."""

    def __init__(self, status: int, code: str, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.index = status, code, message, index

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.index is not None:
            err["index"] = self.index
        return {"error": err}


def stage_cause(e: CascadeStageError) -> str:
    """Why a cascade stage failed, as a client may read it: the error the stage's callback
    raised, by type and one scrubbed line (``client_text``), else the stage's own words."""
    raised = e.__cause__
    if raised is None:
        return errors.client_text(e.cause)
    cause = errors.remote_cause(raised)
    try:
        message = errors.client_text(str(cause))
    except Exception:  # a broken __str__ must not turn a 503 into a 500
        message = ""
    what = type(cause).__name__ + (f": {message}" if message else "")
    return f"the VLM scorer raised {what}" if e.stage == "vlm" else what


#: decode_image's reasons -> (HTTP status, API code).
DECODE_STATUS: dict[str, tuple[int, str]] = {
    "empty": (400, "empty_image"),
    "too_large": (413, "image_too_large"),
    "not_image": (415, "not_an_image"),
    "unsupported": (415, "unsupported_image_format"),
    "truncated": (400, "undecodable_image"),
    "too_many_pixels": (400, "too_many_pixels"),
    "too_many_scans": (400, "too_many_scans"),
    "too_small": (400, "image_too_small"),
}


def validation_error(e: ValidationError) -> ApiError:
    """A pydantic error as one 422 naming the first bad field."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return ApiError(422, "invalid_request", f"{where}: {first['msg']}{more}")


# ----------------------------------------------------------------------------------- requests

#: A bound on image sides a request may name (filters, /v1/select's min_side): far above any
#: image keeper decodes, and small enough for every comparison with numpy's int64 / float64.
MAX_SIDE = 2**31 - 1
#: An image_id a request names: keeper's are 64 hex digits (the sha256 of the image's bytes).
ImageId = Annotated[str, Field(max_length=IMAGE_ID_CHARS)]
#: Characters of a client's id an error message repeats.
_ECHO_CHARS = 16


def short_id(value: str) -> str:
    """A client's id as an error message may repeat it: quoted, at most a short prefix."""
    return repr(value if len(value) <= _ECHO_CHARS else value[:_ECHO_CHARS] + "...")


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: What the request's texts are called in errors ("texts[2] is empty").
    texts_label: ClassVar[str] = "texts"

    def checked_texts(self) -> list[str]:
        """The texts the server embeds for this request (checked against the text limits)."""
        return []


class ImageRef(_Req):
    """One image: base64 bytes, or an ``s3://`` URI in an allow-listed bucket."""

    b64: str | None = Field(None, description="the encoded image (JPEG, PNG, WebP, ...), base64")
    uri: str | None = Field(None, description="s3://BUCKET/KEY; BUCKET must be allow-listed")

    @model_validator(mode="after")
    def _one_of(self) -> ImageRef:
        if (self.b64 is None) == (self.uri is None):
            raise ValueError("give exactly one of b64 or uri")
        return self


class EmbedRequest(_Req):
    images: list[ImageRef] = Field(default_factory=list, max_length=IMAGES_CEILING)
    texts: list[str] = Field(default_factory=list, max_length=TEXTS_CEILING)

    def checked_texts(self) -> list[str]:
        return self.texts

    @model_validator(mode="after")
    def _something(self) -> EmbedRequest:
        if not self.images and not self.texts:
            raise ValueError("give at least one image or text")
        return self


class AestheticRequest(_Req):
    images: list[ImageRef] = Field(min_length=1, max_length=IMAGES_CEILING)


class RelevanceRequest(_Req):
    positive: list[str] = Field(
        min_length=1, max_length=TEXTS_CEILING, description="what is wanted"
    )
    negative: list[str] = Field(
        default_factory=list, max_length=TEXTS_CEILING, description="what is not wanted"
    )
    images: list[ImageRef] = Field(min_length=1, max_length=IMAGES_CEILING)
    temperature: float = Field(0.01, gt=0, le=10, description="softmax over the prompts")

    texts_label: ClassVar[str] = "prompts"

    def checked_texts(self) -> list[str]:
        """Positive then negative prompts, each once (the order of the response's keys)."""
        return list(dict.fromkeys([*self.positive, *self.negative]))


class SeriesIn(_Req):
    id: str | None = Field(None, max_length=256, description="echoed back; default: position")
    images: list[ImageRef] = Field(max_length=SERIES_CEILING)


class RankRequest(_Req):
    series: list[SeriesIn] = Field(min_length=1, max_length=SERIES_CEILING)


#: Bounds of /v1/pick's knobs, from the server's grouping: a gap longer than a group may span
#: (``max_group_s``) could join nothing more, and a group never has more alternates than shots.
_GROUPING = GroupingConfig()


def _time_value(v: Any) -> Any:
    # One message for a wrong type (a union reports one error per member), and no bool as 1.0.
    if v is None or (isinstance(v, str | int | float) and not isinstance(v, bool)):
        return v
    raise ValueError(f"an ISO 8601 string or epoch seconds, not {v!r}")


CaptureTime = Annotated[str | int | float | None, BeforeValidator(_time_value)]


class PickImage(ImageRef):
    """One image to cull, with what the client knows of its capture (else read from its EXIF)."""

    capture_time: CaptureTime = Field(
        None,
        description="ISO 8601 ('2024-05-01T10:00:00.25+02:00'; without an offset: the camera's "
        "local clock, as EXIF) or epoch seconds; replaces the EXIF time",
    )
    camera: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="camera key: shots of different cameras never share a group; replaces the "
        "EXIF Make/Model/serial",
    )


class PickRequest(_Req):
    images: list[PickImage] = Field(min_length=1, max_length=IMAGES_CEILING)
    max_gap_s: float | None = Field(
        None,
        gt=0,
        le=_GROUPING.max_group_s,
        description=f"shots further apart never share a group (default {_GROUPING.max_gap_s})",
    )
    min_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="neighbours with a lower embedding cosine never share a group; -1: time "
        f"only (default {_GROUPING.min_similarity})",
    )
    alternates: int | None = Field(
        None,
        ge=0,
        le=_GROUPING.max_group_len,
        description=f"at most this many alternates per group (default {PickConfig().alternates})",
    )

    def grouping(self) -> GroupingConfig:
        """The server's grouping with this request's knobs."""
        knobs = {"max_gap_s": self.max_gap_s, "min_similarity": self.min_similarity}
        return GroupingConfig(**{k: v for k, v in knobs.items() if v is not None})

    def picking(self) -> PickConfig:
        """The server's decision rules with this request's ``alternates``."""
        return PickConfig() if self.alternates is None else PickConfig(alternates=self.alternates)


# ----------------------------------------------------------------------------------- responses


class SelectRequest(_Req):
    """``/v1/select``: a query and its candidates; the cascade's knobs, within server limits."""

    positive: list[str] = Field(
        min_length=1, max_length=TEXTS_CEILING, description="what is wanted"
    )
    negative: list[str] = Field(
        default_factory=list,
        max_length=TEXTS_CEILING,
        description='what is not wanted; "a photo" always joins them',
    )
    images: list[ImageRef] = Field(
        default_factory=list, max_length=IMAGES_CEILING, description="the candidates"
    )
    ids: list[ImageId] = Field(
        default_factory=list,
        max_length=SELECT_IDS_CEILING,
        description="or: image_ids of the server's embedded corpus",
    )
    min_relevance: float = Field(0.0, ge=0, le=1, description="stage 1: calibrated CLIP cut")
    clip_keep: int | None = Field(None, ge=1, description="stage 1: at most this many go on")
    min_side: int = Field(0, ge=0, le=MAX_SIDE, description="stage 2: shorter side, pixels")
    min_aspect: float | None = Field(None, gt=0, description="stage 2: width / height")
    max_aspect: float | None = Field(None, gt=0, description="stage 2: width / height")
    dedup_threshold: float | None = Field(
        0.95, gt=0, le=1, description="stage 3: cosine of near duplicates; null: off"
    )
    top_n: int | None = Field(
        None, ge=1, description="stage 4: candidates the VLM judges; null: the server's default"
    )
    top_k: int | None = Field(None, ge=1, description="stage 6: picks; null: the server's default")
    alpha: float = Field(
        0.5, ge=0, le=MAX_WEIGHT, description="weight of the calibrated CLIP relevance"
    )
    beta: float = Field(
        0.5, ge=0, le=MAX_WEIGHT, description="weight of the VLM relevance; 0: no VLM stage"
    )
    gamma: float = Field(
        0.0, ge=0, le=MAX_WEIGHT, description="weight of the aesthetic score (the reranker)"
    )
    vlm_query: str | None = Field(
        None, description="what the VLM is asked about; default: the first positive prompt"
    )
    candidates: Literal["all", "picks"] = Field(
        "all", description="all: every candidate's scores and fate; picks: the picks only"
    )
    rationale: bool = Field(
        False, description="the VLM explains each pick in a few words (one generation per pick)"
    )

    texts_label: ClassVar[str] = "prompts"

    def checked_texts(self) -> list[str]:
        """Positive then negative prompts, each once, and the VLM's query."""
        texts = [*self.positive, *self.negative]
        return list(dict.fromkeys(texts + ([self.vlm_query] if self.vlm_query else [])))

    @model_validator(mode="after")
    def _candidates(self) -> SelectRequest:
        if bool(self.images) == bool(self.ids):
            raise ValueError("give the candidates as images or as ids (not both, not neither)")
        return self

    def check_vlm_query(self, rules: QueryRules | None) -> None:
        """Refuse a VLM question the judge would refuse (``QueryRules``, from its info):
        ``vlm_query``, or the first positive prompt when there is none. None: the judge did not
        say (it still refuses such a query itself).

        Raises:
            ApiError: 422 ``invalid_request`` naming the field and the judge's reason.
        """
        why = None if rules is None else rules.problem(self.vlm_query or self.positive[0])
        if why is None:
            return
        if self.vlm_query:
            raise ApiError(422, "invalid_request", f"vlm_query: the VLM judge refuses it: {why}")
        raise ApiError(
            422,
            "invalid_request",
            f"positive.0: the VLM judge is asked it (no vlm_query given) and refuses it: {why}; "
            "give a vlm_query",
            index=0,
        )

    def cascade(self, logit_scale: float, top_n: int, top_k: int) -> CascadeConfig:
        """The request's knobs as keeper_core's CascadeConfig (422 when they do not agree).

        ``top_n`` and ``top_k`` are the server's defaults for a request that gives none.
        """
        knobs = self.model_dump(include=set(CascadeConfig.model_fields) - {"logit_scale"})
        knobs["top_n"] = self.top_n or top_n
        knobs["top_k"] = self.top_k or top_k
        try:
            return CascadeConfig(**knobs, logit_scale=logit_scale)
        except ValidationError as e:
            raise validation_error(e) from e


#: Quality features a /v1/search filter may bound (keeper embed's columns).
SEARCH_FEATURES: tuple[str, ...] = FEATURE_NAMES


class SearchFilters(_Req):
    """Bounds on a result's original size and quality features (inclusive)."""

    min_width: int | None = Field(None, ge=0, le=MAX_SIDE)
    max_width: int | None = Field(None, ge=0, le=MAX_SIDE)
    min_height: int | None = Field(None, ge=0, le=MAX_SIDE)
    max_height: int | None = Field(None, ge=0, le=MAX_SIDE)
    min: dict[str, float] = Field(
        default_factory=dict, description="feature -> lowest value kept (keeper_core.quality)"
    )
    max: dict[str, float] = Field(default_factory=dict, description="feature -> highest kept")

    @model_validator(mode="after")
    def _known_features(self) -> SearchFilters:
        for side in (self.min, self.max):
            unknown = sorted(set(side) - set(SEARCH_FEATURES))
            if unknown:
                raise ValueError(f"unknown feature(s) {unknown}; known: {list(SEARCH_FEATURES)}")
        return self

    def bounds(self) -> dict[str, tuple[float, float]]:
        """feature -> (low, high), infinite where unbounded; only the bounded features."""
        lo = {**self.min}
        hi = {**self.max}
        for name, low, high in (
            ("width", self.min_width, self.max_width),
            ("height", self.min_height, self.max_height),
        ):
            if low is not None:
                lo[name] = max(lo.get(name, -np.inf), float(low))
            if high is not None:
                hi[name] = min(hi.get(name, np.inf), float(high))
        return {f: (lo.get(f, -np.inf), hi.get(f, np.inf)) for f in sorted({*lo, *hi})}


class SearchRequest(_Req):
    """``/v1/search``: one query (a text, an image, or an indexed image's id) and its top-k."""

    text: str | None = Field(None, description="a text query, embedded by the ClipEncoder")
    image: ImageRef | None = Field(None, description="an image query, prepared as /v1/rank's")
    image_id: ImageId | None = Field(None, description="an indexed image's image_id: its embedding")
    k: int = Field(10, description="results, 1..search.max_k")
    filters: SearchFilters | None = None
    request_id: str | None = Field(None, max_length=256, description="echoed back")

    texts_label: ClassVar[str] = "text"

    def checked_texts(self) -> list[str]:
        return [self.text] if self.text is not None else []

    def check(self, max_k: int) -> None:
        """Exactly one query kind, and ``k`` in 1..max_k (400 otherwise, naming the fields)."""
        given = [f for f in ("text", "image", "image_id") if getattr(self, f) is not None]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise ApiError(
                400, "one_query", f"give exactly one of text, image or image_id (got {got})"
            )
        if not 1 <= self.k <= max_k:
            raise ApiError(400, "k_out_of_range", f"k={self.k}: this server answers 1..{max_k}")


class SearchHit(BaseModel):
    image_id: str
    image_uri: str
    score: float = Field(description="cosine between the query and the image's embedding")
    width: int
    height: int


class SearchIndexInfo(BaseModel):
    count: int = Field(description="vectors in the index that answered")
    updated_at: str = Field(description="its index.json updated_at (ISO 8601 UTC)")


class SearchResponse(BaseModel):
    request_id: str | None
    model: str
    index: SearchIndexInfo
    results: list[SearchHit] = Field(description="best first")
    truncated_by_filters: bool = Field(
        description="true: the filters left fewer than k results within search.max_fetch rows"
    )


class CompareRequest(_Req):
    """``/v1/compare``: one image against one reference collection."""

    image: ImageRef = Field(description="the image, prepared as /v1/rank's")
    collection: str = Field(
        min_length=1, max_length=64, description="a collection's name (GET /v1/references)"
    )
    k: int = Field(5, description="nearest references returned, 1..references.max_k")
    request_id: str | None = Field(None, max_length=256, description="echoed back")

    def check(self, max_k: int) -> None:
        """``k`` in 1..max_k (400 ``k_out_of_range`` otherwise)."""
        if not 1 <= self.k <= max_k:
            raise ApiError(400, "k_out_of_range", f"k={self.k}: this server answers 1..{max_k}")


class Percentile(BaseModel):
    value: float | None = Field(description="the image's score or feature (null: not a number)")
    percentile: float | None = Field(
        description=(
            "0..100: the share of the collection's members below the value plus half of those "
            "equal to it; null: nothing to compare with"
        )
    )


class ReferenceHit(BaseModel):
    image_id: str
    image_uri: str
    score: float = Field(description="cosine between the image and the reference's embedding")


class CollectionInfo(BaseModel):
    name: str
    images: int = Field(description="members: the collection's embedded images")
    model_spec: str = Field(description="the ModelSpec its members were embedded with")
    updated_at: str = Field(description="its reference.json updated_at (ISO 8601 UTC)")
    description: str


class CompareResponse(BaseModel):
    request_id: str | None
    model: str
    random_weights: bool = Field(description="true: scores from this model mean nothing")
    collection: CollectionInfo = Field(description="the collection version that answered")
    nearest: list[ReferenceHit] = Field(description="the k most similar members, best first")
    aesthetic: dict[str, Percentile] = Field(
        description='"total" first, then each aesthetic dimension (as /v1/score/aesthetic)'
    )
    quality: dict[str, Percentile] = Field(description="each quality feature keeper embed records")


class ListedCollection(CollectionInfo):
    created_at: str
    failed: int = Field(description="inputs that could not be embedded when it was added")
    error: str | None = Field(
        description="a newer version on storage that could not be loaded (this one serves)"
    )


class RefusedCollection(BaseModel):
    name: str
    reason: str = Field(description="why it cannot be compared against (e.g. another model)")


class ReferencesResponse(BaseModel):
    collections: list[ListedCollection] = Field(description="by name")
    refused: list[RefusedCollection] = Field(description="collections /v1/compare answers 409 for")


# ------------------------------------------------------------------------------------- review


class ReviewRunInfo(BaseModel):
    name: str
    request_id: str | None = Field(description="what the run's feedback events refer to")
    groups: int
    images: int
    ranker: str = Field(description="what ranked the run ('NAME vN (URI)' or the zero-shot rule)")
    clip_model: str
    random_weights: bool = Field(description="true: made with random weights, scores are noise")
    finished: str | None
    error: str | None = Field(description="why the run cannot be reviewed; null: it can")


class ReviewSelect(BaseModel):
    corpus_images: int | None = Field(
        description="images of args.corpus (a /v1/select by ids, thumbnails from "
        "/v1/review/corpus/thumbs); null: no corpus"
    )
    search: bool = Field(description="true: /v1/search answers (args.search)")


class ReviewRunsResponse(BaseModel):
    runs: list[ReviewRunInfo] = Field(description="args.review.runs, in config order")
    select: ReviewSelect = Field(description="what the page's query mode can use")


class ReviewImage(BaseModel):
    image_id: str
    file_name: str
    rank: int = Field(description="1 = the model's first choice in its group")
    decision: Literal["keep", "alternate", "reject"] = Field(description="keeper pick's")
    rating: int
    label: str | None
    score: float
    reasons: list[str]
    capture_time: str | None
    duplicate_of: str | None
    thumb: str | None = Field(description="its thumbnail's path (GET with the token); null: none")


class ReviewGroup(BaseModel):
    group_id: str
    size: int
    keeper: str | None = Field(description="image_id keeper pick kept; null: none")
    images: list[ReviewImage] = Field(description="in capture order")


class ReviewPage(BaseModel):
    run: str
    request_id: str = Field(description="feedback events on these images refer to it")
    total: int = Field(description="groups in the run")
    offset: int
    limit: int
    groups: list[ReviewGroup] = Field(description="in time order")


def collection_info(meta: ReferenceMeta) -> dict[str, Any]:
    """A collection's ``reference.json`` as responses show it."""
    return {
        "name": meta.name,
        "images": meta.images,
        "model_spec": meta.model_spec,
        "updated_at": meta.updated_at,
        "description": meta.description,
    }


def _standing(s: Standing) -> dict[str, float | None]:
    finite = bool(np.isfinite(s.value))  # JSON has no NaN: a feature that is none is null
    return {"value": float(s.value) if finite else None, "percentile": s.percentile}


def comparison_body(comparison: Comparison) -> dict[str, Any]:
    """``nearest``, ``aesthetic`` (``total`` first) and ``quality`` of a comparison, as JSON."""
    return {
        "nearest": [
            {"image_id": n.image_id, "image_uri": n.image_uri, "score": n.score}
            for n in comparison.nearest
        ],
        "aesthetic": {d: _standing(s) for d, s in comparison.aesthetic.items()},
        "quality": {f: _standing(s) for f, s in comparison.quality.items()},
    }


def quality_features(quality: np.ndarray | None) -> dict[str, float] | None:
    """One prepared image's quality row ((1, F), FEATURE_NAMES order) as ``{feature: value}``."""
    if quality is None:
        return None
    return {f: float(v) for f, v in zip(FEATURE_NAMES, np.asarray(quality)[0], strict=True)}


class ClipInfo(BaseModel):
    spec: str
    embed_dim: int
    image_size: int
    random_weights: bool = Field(description="true: scores from this model mean nothing")
    logit_scale: float = Field(description="exp of the model's learned logit scale")
    logit_bias: float | None = Field(
        default=None,
        description="a SigLIP-style model's learned logit bias; null for CLIP (it cancels in "
        "/v1/select's two-way relevance)",
    )


#: What a served ranker is: a head over the encoder's embeddings, or a fine-tuned ranker that
#: scores pixels with its own adapted vision tower (keeper_core.finetune.TunedRanker).
RankerKind = Literal["head", "fine-tuned"]
_KIND = "head: over the encoder's embeddings; fine-tuned: its own adapted vision tower"
_METHOD = "fine-tuned: lora | last-blocks | last-blocks+lora; null for a head"
_BASE = "fine-tuned: the ModelSpec its tower was tuned from; null for a head"


class RankerInfo(BaseModel):
    uri: str | None = Field(description="as configured, e.g. models:/keeper-ranker@champion")
    status: str = Field(description="ready | unavailable | disabled")
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    kind: RankerKind | None = Field(None, description=_KIND)
    method: str | None = Field(None, description=_METHOD)
    base_spec: str | None = Field(None, description=_BASE)
    features: str | None = None
    head: str | None = None
    error: str | None = None


class ModelsResponse(BaseModel):
    clip: ClipInfo
    ranker: RankerInfo
    vlm: dict[str, Any] = Field(
        description='the VlmJudge: status "ready" (and what it is) or "disabled"'
    )
    challenger: RankerInfo | None = Field(
        None, description="with args.ab: the ChallengerRanker's version (the A/B's other arm)"
    )
    ab: dict[str, Any] | None = Field(
        None, description="with args.ab: the challenger's share of clients and the salt"
    )
    online: dict[str, Any] | None = Field(
        None,
        description=(
            "with args.feedback (online_poll_s > 0): OnlineFigures' last computation, per arm "
            "(model '*') and per (arm, model version), its time and the last read error"
        ),
    )


class EmbedResponse(BaseModel):
    model: str
    random_weights: bool
    dim: int
    image_embeddings: list[list[float]]
    text_embeddings: list[list[float]]


class AestheticScore(BaseModel):
    index: int
    total: float
    dimensions: dict[str, float]


class AestheticResponse(BaseModel):
    model: str
    random_weights: bool
    scores: list[AestheticScore]


class RelevanceScore(BaseModel):
    index: int
    S: float = Field(description="max cos to positives - max cos to negatives")
    clip_score: dict[str, float] = Field(description="per prompt: max(100 cos, 0)")
    softmax: dict[str, float] = Field(description="per prompt, over positives and negatives")


class RelevanceResponse(BaseModel):
    model: str
    random_weights: bool
    scores: list[RelevanceScore]


class RankedSeries(BaseModel):
    id: str
    keeper_index: int = Field(description="position of the pick within the series")
    scores: list[float]
    probabilities: list[float]


class RankModel(BaseModel):
    uri: str | None
    name: str | None
    version: str | None
    alias: str | None
    kind: RankerKind = Field(description=_KIND)
    method: str | None = Field(description=_METHOD)
    base_spec: str | None = Field(description=_BASE)
    clip_model: str
    random_weights: bool


#: Every answer of /v1/rank, /v1/pick and /v1/select: the id its feedback refers to.
_REQUEST_ID = "made by the server for this answer: what POST /v1/feedback events refer to"


def new_request_id() -> str:
    """A server-made request id (uuid4, 32 hex digits)."""
    return uuid.uuid4().hex


#: The ``arm`` of /v1/rank and /v1/pick answers.
_ARM = (
    "with an A/B (args.ab): champion or challenger, the arm that answered (the champion when the "
    "challenger could not); null: no A/B"
)


class RankResponse(BaseModel):
    request_id: str = Field(description=_REQUEST_ID)
    arm: Arm | None = Field(None, description=_ARM)
    model: RankModel
    series: list[RankedSeries]


class PickRanker(BaseModel):
    kind: Literal["model", "zero-shot"] = Field(
        description="model: the app's ranker scored every group; zero-shot: none was loaded"
    )
    label: str = Field(description="'NAME vN (URI)', or keeper_core.picking.ZERO_SHOT_RULE")
    uri: str | None = None
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    model_kind: RankerKind | None = Field(None, description=f"kind model: {_KIND}")
    method: str | None = Field(None, description=_METHOD)
    base_spec: str | None = Field(None, description=_BASE)
    reason: str | None = Field(None, description="zero-shot: why no ranker was used")


class PickedGroup(BaseModel):
    id: str
    images: list[int] = Field(description="request indices, in capture order")
    keeper_index: int | None = Field(description="null: no keeper (a flawed single, duplicates)")


class PickedImage(BaseModel):
    index: int
    group: str
    rank: int = Field(description="1 = best of its group; duplicates rank last")
    score: float
    prob: float = Field(description="softmax of the scores over the group's non-duplicates")
    decision: Literal["keep", "alternate", "reject"]
    reasons: list[str]
    rating: int
    label: str | None
    duplicate_of: int | None = Field(description="index of the copy that stays in competition")
    duplicate_kind: Literal["exact", "near"] | None
    capture_time: str | None
    time_source: str = Field(description="exif_offset | exif | given | none")
    camera: str


class SelectStage(BaseModel):
    name: str = Field(description="clip | heuristics | dedup | rerank | vlm | top_k")
    n_in: int
    n_kept: int
    n_dropped: int
    ms: float
    skipped: bool


class SelectCandidate(BaseModel):
    index: int = Field(description="position in the request")
    clip_raw: float | None = Field(description="max cos(positives) - max cos(negatives)")
    clip: float | None = Field(description="calibrated CLIP relevance in [0, 1]")
    head: float | None = Field(description="the reranker's score (aesthetic total) in [0, 1]")
    rerank: float | None = Field(description="alpha * clip + gamma * head")
    vlm: float | None = Field(description="VLM relevance P(yes) / (P(yes) + P(no))")
    final: float | None = Field(description="alpha * clip + beta * vlm + gamma * head")
    dropped_at: str | None = Field(description="the stage that dropped it; null: a pick")
    reason: str | None


class SelectModels(BaseModel):
    clip_model: str
    clip_random_weights: bool
    logit_scale: float = Field(description="the CLIP model's, used to calibrate relevance")
    reranker: str
    vlm: dict[str, Any] = Field(description='VlmJudge.info(): status "ready" or "disabled"')


class SelectCost(BaseModel):
    candidates: int
    vlm_calls: int = Field(description="candidates the VLM judged")
    ms: float = Field(description="the whole request, server side")


class SelectRationale(BaseModel):
    index: int
    text: str | None = Field(
        description="the VLM's words (bounded generation); random weights: noise; null: the "
        "pick's image could not be read (error says why)"
    )
    error: str | None = Field(None, description="why there is no text")


class SelectResponse(BaseModel):
    request_id: str = Field(description=_REQUEST_ID)
    picks: list[int] = Field(description="request indices, best first")
    rationales: list[SelectRationale] | None = Field(
        description="with rationale: true and a VLM: one per pick, in pick order; else null"
    )
    stages: list[SelectStage]
    candidates: list[SelectCandidate]
    cost: SelectCost
    models: SelectModels


class PickResponse(BaseModel):
    request_id: str = Field(description=_REQUEST_ID)
    arm: Arm | None = Field(None, description=_ARM)
    clip_model: str
    random_weights: bool
    ranker: PickRanker
    counts: dict[str, int]
    groups: list[PickedGroup] = Field(description="in time order")
    images: list[PickedImage] = Field(description="in request order")


# ----------------------------------------------------------------------------------- feedback

#: Header naming the caller (an app's user, a reviewer): recorded on offers and events.
CLIENT_HEADER = "X-Keeper-Client"
MAX_CLIENT_CHARS = 256


class FeedbackRequest(_Req):
    """``/v1/feedback``: people's decisions on images of earlier answers."""

    events: list[FeedbackEvent] = Field(
        min_length=1, max_length=EVENTS_CEILING, description="1 to feedback.max_events decisions"
    )
    sync: bool = Field(
        False, description="write them before answering (durable: true unless storage failed)"
    )


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="events of this request now held by the server")
    durable: bool = Field(description="true: every event of this request is on storage")
    pending: int = Field(description="rows this replica holds that are not on storage yet")
    writer: str = Field(description="the replica's writer name (in part names and rows)")
    last_error: str | None = Field(
        description="the last failed write's cause; null after a good one"
    )


def client_key(value: str | None) -> str | None:
    """The ``X-Keeper-Client`` header's value (None: not given); 400 past 256 characters.

    HTTP carries a header as bytes and Starlette hands them over decoded as latin-1: a UTF-8
    id ("José", a CJK name) is decoded as UTF-8 again here, so the offers record it, the A/B
    hashes it and the limit counts its characters as the client sent them.
    """
    if value is None:
        return None
    with contextlib.suppress(UnicodeError):  # not UTF-8 bytes (or already text): as it came
        value = value.encode("latin-1").decode("utf-8")
    value = value.strip()
    if len(value) > MAX_CLIENT_CHARS:
        raise ApiError(
            400,
            "invalid_client",
            f"{CLIENT_HEADER} has {len(value)} characters; the limit is {MAX_CLIENT_CHARS}",
        )
    return value or None


def ab_key(client: str | None, request_id: str) -> str:
    """What the A/B assigns an arm by: the ``X-Keeper-Client`` value (sticky: the same client
    always gets the same arm), else the request id (a fresh draw per request)."""
    return client if client is not None else request_id


def ab_arm(ab: ABArgs | None, client: str | None, request_id: str) -> Arm | None:
    """The arm that should answer a /v1/rank or /v1/pick request; None without an A/B."""
    if ab is None:
        return None
    return assign(ab_key(client, request_id), ab.share, ab.salt)


@dataclass(frozen=True)
class Offer:
    """What every offer row of one answer shares (keeper_core.feedback.OFFERS_SCHEMA)."""

    request_id: str
    route: Literal["rank", "pick", "select"]
    client: str | None
    model: str  # a registered version (models:/NAME/VERSION), or the rule's name
    model_spec: str  # the CLIP spec of the embeddings
    vectors: bool  # embeddings and quality features on the rows (feedback.offer_embeddings)
    arm: Arm | None = None  # the A/B arm that answered; None: no A/B (or /v1/select)

    def rows(
        self,
        *,
        groups: Sequence[str],
        ranks: Sequence[int],
        scores: Sequence[float],
        offered: Sequence[str],
        image_ids: Sequence[str],
        image_uris: Sequence[str | None],
        embeddings: np.ndarray | None,
        quality: np.ndarray | None,
    ) -> list[dict[str, Any]]:
        """One row per image, in request order (``position``)."""
        sizes = pd.Series(list(groups)).value_counts().to_dict()
        emb = embeddings if self.vectors else None
        qual = quality if self.vectors else None
        return [
            {
                "request_id": self.request_id,
                "route": self.route,
                "client": self.client,
                "arm": self.arm,
                "model": self.model,
                "model_spec": self.model_spec,
                "group_id": str(g),
                "group_size": int(sizes[g]),
                "image_id": image_ids[i],
                "image_uri": image_uris[i],
                "position": i,
                "rank": int(ranks[i]),
                "score": None if not math.isfinite(scores[i]) else float(scores[i]),
                "offered": offered[i],
                "embedding": None if emb is None else np.asarray(emb[i], np.float32).tolist(),
                "quality": None if qual is None else np.asarray(qual[i], np.float32).tolist(),
            }
            for i, g in enumerate(groups)
        ]


def ref_uris(refs: Sequence[ImageRef | bytes]) -> list[str | None]:
    """Each request image's URI when it came as ``{"uri"}`` (None: base64 or an upload)."""
    return [r.uri if isinstance(r, ImageRef) else None for r in refs]


def registered_model(model: dict[str, Any]) -> str:
    """The version that ranked: ``models:/NAME/VERSION`` (an alias moves; a version does not)."""
    if model.get("name") and model.get("version"):
        return f"models:/{model['name']}/{model['version']}"
    return str(model.get("uri") or model.get("label"))


def rank_offers(
    offer: Offer,
    answer: dict[str, Any],
    image_ids: Sequence[str],
    image_uris: Sequence[str | None],
    embeddings: np.ndarray | None,
    quality: np.ndarray | None,
) -> list[dict[str, Any]]:
    """``/v1/rank``'s offers: a group per series, ``keeper`` its pick, the rest ``candidate``."""
    groups: list[str] = []
    ranks: list[int] = []
    scores: list[float] = []
    offered: list[str] = []
    for s in answer["series"]:
        order = np.lexsort((np.arange(len(s["scores"])), -np.asarray(s["scores"])))
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        groups += [s["id"]] * len(order)
        ranks += rank.tolist()
        scores += s["scores"]
        offered += ["keeper" if j == s["keeper_index"] else "candidate" for j in range(len(order))]
    return offer.rows(
        groups=groups, ranks=ranks, scores=scores, offered=offered, image_ids=image_ids,
        image_uris=image_uris, embeddings=embeddings, quality=quality,
    )  # fmt: skip


def pick_offers(
    offer: Offer,
    answer: dict[str, Any],
    image_ids: Sequence[str],
    image_uris: Sequence[str | None],
    embeddings: np.ndarray | None,
    quality: np.ndarray | None,
) -> list[dict[str, Any]]:
    """``/v1/pick``'s offers: its groups, rank 0 the best (the answer's rank 1), ``offered`` the
    decision (keep | alternate | reject)."""
    images = answer["images"]
    return offer.rows(
        groups=[im["group"] for im in images],
        ranks=[im["rank"] - 1 for im in images],
        scores=[im["score"] for im in images],
        offered=[im["decision"] for im in images],
        image_ids=image_ids, image_uris=image_uris, embeddings=embeddings, quality=quality,
    )  # fmt: skip


def select_offers(
    offer: Offer,
    query: str,
    result: CascadeResult,
    image_ids: Sequence[str],
    image_uris: Sequence[str | None],
    embeddings: np.ndarray | None,
    quality: np.ndarray | None,
) -> list[dict[str, Any]]:
    """``/v1/select``'s offers: one group (the query); the picks first, in pick order, then the
    rest by the last stage each reached and the last score it got there (final, rerank, clip)."""
    c = result.candidates
    n = len(c.reason)
    score = np.full(n, np.nan)
    for col in (c.clip, c.rerank, c.final):  # later stages' scores replace earlier ones
        score = np.where(np.isnan(col), score, col)
    depth = np.array([len(STAGES) if d is None else STAGES.index(d) for d in c.dropped_at])
    picks = list(result.picks)
    rest = [i for i in range(n) if i not in set(picks)]
    rest.sort(key=lambda i: (-depth[i], -np.nan_to_num(score[i], nan=-np.inf), i))
    rank = np.empty(n, np.int64)
    rank[picks + rest] = np.arange(n)
    chosen = set(picks)
    return offer.rows(
        groups=[query] * n,
        ranks=rank.tolist(),
        scores=score.tolist(),
        offered=["pick" if i in chosen else "candidate" for i in range(n)],
        image_ids=image_ids, image_uris=image_uris, embeddings=embeddings, quality=quality,
    )  # fmt: skip


# ----------------------------------------------------------------------------------- bodies


def json_values(text: bytes | str) -> int:
    """An upper bound of the values in a JSON text's arrays and objects, from its characters.

    An array of n items has n - 1 commas, an object of n members too, so the values are at
    most the commas plus the brackets and braces: a count at memory speed, taken before the
    text is parsed. A comma, bracket or brace inside a string counts as well (base64 has none).
    """
    if isinstance(text, str):
        return text.count(",") + text.count("[") + text.count("{")
    return text.count(b",") + text.count(b"[") + text.count(b"{")


def check_json_values(n: int, limit: int) -> None:
    """400 ``too_many_json_values`` when a body holds more than ``limit`` values."""
    if n > limit:
        raise ApiError(
            400,
            "too_many_json_values",
            f"the body holds up to {n} JSON values (commas, brackets and braces counted); "
            f"the limit is {limit}",
        )


def parse_json(body: bytes, model: type[BaseModel], max_values: int | None = None) -> Any:
    """Body -> request model; malformed JSON or schema violations are 422.

    ``max_values``: refuse (400) a body of more JSON values before it is parsed: pydantic builds
    every item of a list before it compares the list's length with its ``max_length``.
    """
    if max_values is not None:
        check_json_values(json_values(body), max_values)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise ApiError(422, "invalid_json", f"the body is not valid JSON: {_first(e)}") from e
        raise validation_error(e) from e


def parse_fields(fields: dict[str, Any], model: type[BaseModel]) -> Any:
    """Form fields (already collected) -> request model, 422 on violations."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from e


def _first(e: ValidationError) -> str:
    return str(e.errors()[0].get("msg", e))


def form_text(value: str, where: str) -> str:
    """A multipart text field as it arrived; 422 for a lone surrogate, which no UTF-8 answer can
    hold (a form part in another charset decodes to one: ``charset=utf-7``'s ``+2AA-``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            422, "invalid_request", f"{where}: not valid Unicode text ({e.reason})"
        ) from e
    return value


def _form_json(value: str, where: str) -> Any:
    """A multipart field's JSON; 422 naming the field for anything ``json`` refuses.

    Besides malformed JSON (JSONDecodeError, a ValueError), ``json`` raises ValueError for an
    integer of more than 4,300 digits and RecursionError for deeply nested arrays. ``json``
    takes a lone surrogate's escape (``"\\ud800"``) where a JSON body's parser refuses it: it
    is refused here too, as the body's ``invalid_json`` would be.
    """
    try:
        out = json.loads(value)
        form_text(json.dumps(out, ensure_ascii=False), where)
    except RecursionError as e:
        raise ApiError(422, "invalid_request", f"{where}: JSON nested too deeply") from e
    except ValueError as e:
        reason = str(e).split(";")[0][:120]
        raise ApiError(422, "invalid_request", f"{where}: invalid JSON ({reason})") from e
    return out


def form_list(value: str, field: str) -> list[str]:
    """A multipart text field: a JSON list of strings, or one string."""
    value = value.strip()
    if value.startswith("["):
        out = _form_json(value, f"form field {field!r} (a JSON list)")
        if not isinstance(out, list) or not all(isinstance(x, str) for x in out):
            raise ApiError(
                422, "invalid_request", f"form field {field!r}: expected a list of strings"
            )
        return out
    return [value]


def form_values(value: str, field: str) -> list[Any]:
    """A multipart field holding one JSON list (``capture_times``, ``cameras``)."""
    out = _form_json(value, f"form field {field!r}")
    if not isinstance(out, list):
        raise ApiError(422, "invalid_request", f"form field {field!r}: expected a JSON list")
    return out


# ----------------------------------------------------------------------------------- images


@dataclass
class Prepared:
    """Request images ready for the encoder (and the ranker's quality features)."""

    pixels: np.ndarray  # (N, 3, S, S) uint8: the model's resize + crop, normalised on device
    quality: np.ndarray | None  # (N, F) float32, keeper_core.quality.FEATURE_NAMES order
    image_ids: list[str] = field(default_factory=list)  # sha256 of each image's bytes


@dataclass
class PickImages(Prepared):
    """Request images ready for ``cull``: what ``keeper embed`` records of a file, too."""

    image_ids: list[str]  # sha256 of the bytes: the same file twice is an exact duplicate
    captures: list[Capture]
    hashes: list[int]  # keeper_core.grouping.dhash, the near-duplicate pixel guard
    #: keeper_core.embedded_xmp.file_ids: a JPEG's hash without its metadata segments, so one
    #: sent twice, once with a rating saved into it, is an exact duplicate too
    content_ids: list[str]


def vlm_view(image: Image.Image, max_side: int) -> np.ndarray:
    """What the VLM is sent of a decoded image: RGB uint8, longest side at most ``max_side``."""
    view = image.copy()
    view.thumbnail((max_side, max_side))
    return np.asarray(view.convert("RGB"), dtype=np.uint8)


@dataclass
class SelectImages:
    """Request candidates ready for the cascade: CLIP pixels, sizes and the VLM's copies."""

    pixels: np.ndarray  # (N, 3, S, S) uint8
    widths: np.ndarray  # (N,) original displayed widths
    heights: np.ndarray
    views: list[np.ndarray]  # (H, W, 3) uint8, longest side <= vlm.max_image_side
    image_ids: list[str]  # sha256 of each image's bytes
    quality: np.ndarray | None  # (N, F) when asked for (the offers log), else None


class ImagePreparer:
    """Fetches and checks request images, then prepares them as ``keeper embed`` does.

    Decode, resize/crop and quality features are keeper_core's :class:`ImagePreparation`, the
    one path ``keeper embed`` runs too, so a series scored over HTTP gets the features its
    ranker was trained on. This class adds what only a request has: base64 and allow-listed
    S3 references, counts, and errors as :class:`ApiError`.
    """

    def __init__(self, args: KeeperAppArgs, preprocess: PreprocessConfig | None = None) -> None:
        self.limits: LimitArgs = args.limits
        self.preparation = ImagePreparation(
            args.clip_model,
            limits=args.limits.decode_limits(),
            draft=args.draft,
            preprocess=preprocess,  # None: read from open_clip's configs (imports torch)
        )
        self.allowed = frozenset(args.s3_allow_buckets)

    def check_count(self, n: int, limit: int | None = None) -> None:
        """``n`` images against ``limit`` (default ``max_images``): 400 over it."""
        limit = self.limits.max_images if limit is None else limit
        if n > limit:
            raise ApiError(
                400, "too_many_images", f"{n} images in one request; the limit is {limit}"
            )

    def check_texts(self, texts: Sequence[str], what: str = "texts") -> None:
        if len(texts) > self.limits.max_texts:
            raise ApiError(
                400, "too_many_texts", f"{len(texts)} {what}; the limit is {self.limits.max_texts}"
            )
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(422, "invalid_request", f"{what}[{i}] is empty", index=i)
            if len(t) > self.limits.max_text_chars:
                raise ApiError(
                    400,
                    "text_too_long",
                    f"{what}[{i}] has {len(t)} characters; the limit is "
                    f"{self.limits.max_text_chars}",
                    index=i,
                )

    def image_bytes(self, ref: ImageRef, index: int) -> bytes:
        """The encoded bytes of one reference: base64, or an allow-listed S3 object."""
        cap = self.limits.max_image_bytes
        if ref.b64 is not None:
            if len(ref.b64) > (cap + 2) // 3 * 4 + 4:
                raise ApiError(
                    413, "image_too_large", f"image {index} exceeds {cap} bytes", index=index
                )
            try:
                return base64.b64decode(ref.b64, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ApiError(
                    400, "invalid_base64", f"image {index}: not valid base64 ({e})", index=index
                ) from e
        uri = str(ref.uri)
        if not storage.is_s3(uri):
            raise ApiError(
                400,
                "unsupported_uri",
                f"image {index}: only s3:// URIs in allow-listed buckets are fetched, not {uri!r}",
                index=index,
            )
        try:
            bucket, key = storage.split_s3(uri)
        except Exception as e:
            raise ApiError(400, "unsupported_uri", f"image {index}: {e}", index=index) from e
        if any(part in (".", "..") for part in key.split("/")):
            # S3 keeps "a/../b" as it is, but a proxy or store that normalises paths before the
            # bucket would read another bucket's object: the allow-list names buckets.
            raise ApiError(
                400, "unsupported_uri", f"image {index}: a key with . or .. segments", index=index
            )
        if bucket not in self.allowed:
            raise ApiError(
                403,
                "uri_not_allowed",
                f"image {index}: bucket {bucket!r} is not in the server's s3_allow_buckets",
                index=index,
            )
        try:
            # One ranged GET of at most cap + 1 bytes: an object swapped for a larger one after
            # a size check could not be read whole, as it could with a HEAD and then a GET.
            return storage.read_bytes(uri, max_bytes=cap)
        except storage.TooLargeError as e:
            size = f"{e.size} bytes" if e.size is not None else f"more than {cap} bytes"
            raise ApiError(
                413, "image_too_large", f"image {index}: {size} > {cap}", index=index
            ) from e
        except StorageError as e:
            raise ApiError(400, "unreadable_uri", f"image {index}: {e}", index=index) from e

    def decode(self, data: bytes, index: int) -> DecodedImage:
        """One image through keeper_core's decode; its refusal as the API's status and code."""
        try:
            return self.preparation.decode(data)
        except ImageDecodeError as e:
            status, code = DECODE_STATUS[e.reason]
            raise ApiError(status, code, f"image {index}: {e.detail}", index=index) from e

    def fetch(self, ref: ImageRef | bytes, index: int) -> bytes:
        """The bytes of one image (an upload as it is), checked against ``max_image_bytes``."""
        data = ref if isinstance(ref, bytes) else self.image_bytes(ref, index)
        if len(data) > self.limits.max_image_bytes:
            raise ApiError(
                413,
                "image_too_large",
                f"image {index}: {len(data)} bytes > {self.limits.max_image_bytes}",
                index=index,
            )
        return data

    def decoded_pixels(self, data: bytes) -> int | None:
        """The pixels decoding ``data`` allocates, from its header alone (nothing is decoded).

        A JPEG (a camera RAW's preview too) that ``decode`` drafts counts its draft's size,
        reduced by 1/2, 1/4 or 1/8 as PIL's ``JpegImageFile.draft`` reduces it; any other image
        its full size (a HEIF/AVIF its largest coded image: libheif decodes that whole before
        the crop its header shows). None when the image fails on its own (an unreadable header, over
        ``max_pixels``, under ``min_side``): its decode then refuses it, naming why.
        """
        limits = self.preparation.limits
        try:
            preview = raw_preview(data, limits=limits)
            w, h = image_size(preview if preview is not None else data)
        except ImageDecodeError:
            return None
        if w * h > limits.max_pixels or min(w, h) < limits.min_side:
            return None
        draft = self.preparation.draft_size
        jpeg = preview is not None or data[:3] == b"\xff\xd8\xff"  # JPEG and MPO
        if draft is not None and jpeg:
            # draft() takes the largest of 8, 4, 2 that leaves both sides >= the draft size.
            scale = min(w // draft[0], h // draft[1])
            s = next((f for f in (8, 4, 2) if scale >= f), 1)
            w, h = -(-w // s), -(-h // s)
        if preview is None and data[4:8] == b"ftyp":  # HEIF / AVIF: its header shows a crop
            coded = max((cw * ch for cw, ch in heif_coded_sizes(data)), default=0)
            return None if coded > limits.max_pixels else max(w * h, coded)
        return w * h

    def _over_budget(self, total: int, *, at_least: bool = False) -> ApiError:
        limit = self.limits.max_request_pixels
        what = "at least " if at_least else ""
        return ApiError(
            400,
            "too_many_request_pixels",
            f"the request's images decode to {what}{total} pixels together; the limit is {limit} "
            "(limits.max_request_pixels): send fewer or smaller images per request",
        )

    def _each(
        self, refs: Sequence[ImageRef | bytes], take: Callable[[int, bytes, DecodedImage], T]
    ) -> list[T]:
        """``take(index, bytes, decoded)`` of every image, in order, within the pixel budget.

        Before any image is decoded, every image the request itself carries (base64, uploads)
        is read and its decoded pixels counted from its header (:meth:`decoded_pixels`): a total
        over ``max_request_pixels`` is refused (400 ``too_many_request_pixels``) without a
        decode. An ``s3://`` image is counted when it is fetched, before it is decoded, so no
        decode ever passes the budget. The count stops at the first image that fails on its own
        (bad base64, too large, a bad header): that one is refused in its turn, as before, so a
        request still reports its first failing image.

        Each decoded image is released once ``take`` has measured it: the request holds one
        full-size image at a time, never all of them.
        """
        limit = self.limits.max_request_pixels
        data: list[bytes | None] = [None] * len(refs)
        total = 0
        for i, ref in enumerate(refs):
            if isinstance(ref, ImageRef) and ref.uri is not None:
                continue  # fetched (and counted) in its turn
            try:
                got = self.fetch(ref, i)
            except ApiError:
                break  # refused in its turn, after the images before it
            px = self.decoded_pixels(got)
            if px is None:
                break
            data[i], total = got, total + px
        if total > limit:
            raise self._over_budget(total)
        out: list[T] = []
        for i, ref in enumerate(refs):
            raw = data[i]
            data[i] = None  # the bytes go with the image
            if raw is None:
                raw = self.fetch(ref, i)
                px = self.decoded_pixels(raw)
                total += px or 0  # None: the decode below refuses it
                if total > limit:
                    raise self._over_budget(total, at_least=True)
            decoded = self.decode(raw, i)
            out.append(take(i, raw, decoded))
            del decoded, raw  # before the next decode: one full-size image at a time
        return out

    def _pixels(self, rows: list[np.ndarray]) -> np.ndarray:
        """(N, 3, S, S) uint8 of per-image rows (an empty request keeps its shape)."""
        return np.stack(rows) if rows else self.preparation.pixels([])

    def _quality(self, decoded: DecodedImage) -> np.ndarray:
        """One image's quality row, (F,) float32."""
        row: np.ndarray = self.preparation.quality([decoded])[0]
        return row

    def prepare(self, refs: Sequence[ImageRef | bytes], *, quality: bool) -> Prepared:
        """Every image or the first failure (an ApiError naming its index): a request is whole."""
        self.check_count(len(refs))

        def take(i: int, data: bytes, d: DecodedImage) -> tuple[np.ndarray, Any, str]:
            feats = self._quality(d) if quality else None
            return self.preparation.resize(d), feats, hashlib.sha256(data).hexdigest()

        got = self._each(refs, take)
        return Prepared(
            pixels=self._pixels([g[0] for g in got]),
            quality=np.stack([g[1] for g in got]) if quality and got else None,
            image_ids=[g[2] for g in got],
        )

    def prepare_select(
        self, refs: Sequence[ImageRef | bytes], max_side: int, *, quality: bool = False
    ) -> SelectImages:
        """``prepare`` plus sizes and a copy of each image at most ``max_side`` for the VLM
        (and quality features when ``quality``)."""
        self.check_count(len(refs), self.limits.max_select_images)

        def take(i: int, data: bytes, d: DecodedImage) -> tuple[Any, ...]:
            feats = self._quality(d) if quality else None
            view = vlm_view(d.image, max_side)
            sha = hashlib.sha256(data).hexdigest()
            return self.preparation.resize(d), d.width, d.height, view, sha, feats

        got = self._each(refs, take)
        return SelectImages(
            pixels=self._pixels([g[0] for g in got]),
            widths=np.array([g[1] for g in got], np.float64),
            heights=np.array([g[2] for g in got], np.float64),
            views=[g[3] for g in got],
            image_ids=[g[4] for g in got],
            quality=np.stack([g[5] for g in got]) if quality and got else None,
        )

    def prepare_pick(
        self,
        refs: Sequence[ImageRef | bytes],
        images: Sequence[PickImage],
        given: Sequence[Capture | None],
    ) -> PickImages:
        """``prepare`` plus what culling needs: content hash, capture metadata, dHash.

        Args:
            refs: the images (references, or uploaded bytes), in request order.
            images: the request's items (for uploads, stand-ins carrying the form's times and
                cameras): what the client said of each capture.
            given: :func:`given_captures` of ``images``.
        """
        self.check_count(len(refs), self.limits.max_pick_images)

        def take(i: int, data: bytes, d: DecodedImage) -> tuple[Any, ...]:
            return (
                self.preparation.resize(d),
                self._quality(d),
                file_ids(data),
                request_capture(data, images[i], given[i]),
                dhash(d.image),  # on the decoded pixels, as keeper embed takes it
            )

        got = self._each(refs, take)
        n_features = len(FEATURE_NAMES)
        return PickImages(
            pixels=self._pixels([g[0] for g in got]),
            quality=np.stack([g[1] for g in got]) if got else np.zeros((0, n_features), np.float32),
            image_ids=[g[2][0] for g in got],
            captures=[g[3] for g in got],
            hashes=[g[4] for g in got],
            content_ids=[g[2][1] for g in got],
        )


# ----------------------------------------------------------------------------------- /v1/pick

#: The pick frame's column holding each row's position in the request.
REQUEST_INDEX = "request_index"
#: What ``cull`` is told the scorer is; the response names the version that answered instead.
_RANKER_DEPLOYMENT = "the app's SeriesRanker"


class RankCall(Protocol):
    """``SeriesRanker.rank`` as a blocking call: (embeddings, quality, series lengths[, pixels])
    -> its answer. ``pixels`` (rows as the other arrays') is given when the request's are known:
    a fine-tuned ranker scores them."""

    def __call__(
        self, embeddings: np.ndarray, quality: np.ndarray, lengths: list[int],
        pixels: np.ndarray | None = None, /,
    ) -> dict[str, Any]: ...  # fmt: skip


def given_captures(images: Sequence[PickImage]) -> list[Capture | None]:
    """What the client gave of each capture (None: nothing), checked before any image is read.

    Raises:
        ApiError: 422 ``invalid_capture_time`` naming the first image whose time is not an ISO
            8601 date-time or a finite epoch within datetime's years (1-9999).
    """
    out: list[Capture | None] = []
    for i, im in enumerate(images):
        if im.capture_time is None and im.camera is None:
            out.append(None)
            continue
        try:
            out.append(given_capture(im.capture_time, im.camera))
        except ConfigError as e:
            raise ApiError(422, "invalid_capture_time", f"image {i}: {e}", index=i) from e
        except (OverflowError, ValueError) as e:  # a number no float or date can hold
            raise ApiError(
                422,
                "invalid_capture_time",
                f"image {i}: capture time is not a finite epoch in range ({type(e).__name__})",
                index=i,
            ) from e
    return out


def request_capture(data: bytes, image: PickImage, given: Capture | None) -> Capture:
    """One request image's capture: its EXIF, with the client's time and camera in their place.

    Never a file modification time: over HTTP that is the client's copy, not the shot. An image
    with neither an EXIF nor a given time has ``time_source`` "none" (a group of its own).
    """
    exif = read_capture(data)
    if given is None:
        return exif
    out = exif
    if image.capture_time is not None:
        out = replace(out, time=given.time, timestamp=given.timestamp, time_source="given")
    if image.camera is not None:
        out = replace(out, make=None, model=given.model, serial=None)
    return out


def image_name(index: int, n: int) -> str:
    """A request image's name in the frame and in reasons: ``image-07`` is index 7.

    Zero-padded to the request's width, so names sort as indices (``cull`` breaks time ties by
    name) and are unique (the same URI may be sent twice).
    """
    return f"image-{index:0{len(str(max(n - 1, 0)))}d}"


def pick_frame(images: PickImages, embeddings: np.ndarray) -> pd.DataFrame:
    """The frame ``cull`` takes, one row per request image (the batch job's columns).

    Raises:
        DataError: embeddings or quality features that do not fit the images.
    """
    n = len(images.image_ids)
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n or images.quality is None:
        raise DataError(f"{n} images but embeddings {emb.shape} / quality features missing")
    rows = [capture_row(c) for c in images.captures]
    frame = pd.DataFrame(
        {
            REQUEST_INDEX: np.arange(n, dtype=np.int64),
            "image_uri": [image_name(i, n) for i in range(n)],
            "image_id": images.image_ids,
            "content_id": images.content_ids,
            "embedding": list(emb),
            "dhash": np.asarray(images.hashes, dtype=np.int64),
        }
    )
    for j, name in enumerate(FEATURE_NAMES):
        frame[name] = images.quality[:, j]
    for name in CAPTURE_COLUMNS:
        frame[name] = pd.Series([r[name] for r in rows], dtype=object)
    frame["capture_ts"] = np.array(
        [np.nan if r["capture_ts"] is None else r["capture_ts"] for r in rows], dtype=np.float64
    )
    return frame


class _NoRanker(Exception):
    """The ranker deployment answered "unavailable": nothing loaded (the reason is the message)."""


def group_scorer(
    rank: RankCall, served: dict[str, Any], pixels: np.ndarray | None = None
) -> Callable[[pd.DataFrame], np.ndarray]:
    """``cull``'s scorer over the ranker deployment: every group one series, groups of one too.

    A group of one gets the head's score like any other (its prob is 1 whatever it is), so one
    call scores a request and a single shot's score means what a burst's does.
    ``served`` receives the version that answered (its ``describe()``). ``pixels``: the request's
    images in request order (:class:`Prepared`), passed on in the rows' order.
    """

    def score(df: pd.DataFrame) -> np.ndarray:
        ids = df["series_id"].astype(str).to_numpy()
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        lengths = np.diff(np.r_[starts, len(ids)]).tolist()
        if len(set(ids)) != len(lengths):  # cull gives each group's rows together
            raise DataError("a group's rows are not contiguous")
        emb = np.stack([np.asarray(e, dtype=np.float32) for e in df["embedding"]])
        quality = df[list(FEATURE_NAMES)].to_numpy(dtype=np.float32)
        if pixels is None:
            out = rank(emb, quality, lengths)
        else:
            out = rank(emb, quality, lengths, pixels[df[REQUEST_INDEX].to_numpy(dtype=np.int64)])
        if "unavailable" in out:
            raise _NoRanker(str(out["unavailable"]))
        served.update(out["model"])
        return np.concatenate([np.asarray(s, dtype=np.float64) for s, _ in out["series"]])

    return score


def cull_request(
    frame: pd.DataFrame, rank: RankCall, *, grouping: GroupingConfig, picking: PickConfig,
    pixels: np.ndarray | None = None,
) -> tuple[CullResult, PickRanker]:  # fmt: skip
    """``keeper_core.culling.cull`` on a request, ranked by the app's ranker when it has one.

    When the ranker deployment has no version loaded, the request is culled with the zero-shot
    rule instead, and the returned :class:`PickRanker` says so (kind, label and the reason):
    never a silent switch. ``pixels``: the request's, for a fine-tuned ranker (``group_scorer``).
    """
    served: dict[str, Any] = {}
    try:
        result = cull(
            frame,
            scorer=group_scorer(rank, served, pixels),
            ranker=_RANKER_DEPLOYMENT,
            grouping=grouping,
            picking=picking,
        )
    except _NoRanker as e:
        result = cull(frame, scorer=None, grouping=grouping, picking=picking)
        return result, PickRanker(kind="zero-shot", label=result.ranker, reason=str(e))
    name, uri = served.get("name"), served.get("uri")
    # As keeper pick labels a registered ranker: "NAME vN (URI)".
    label = f"{name} v{served.get('version')} ({uri})" if name else str(uri)
    ranker = PickRanker(
        kind="model",
        label=label,
        uri=uri,
        name=name,
        version=served.get("version"),
        alias=served.get("alias"),
        model_kind=served.get("kind"),
        method=served.get("method"),
        base_spec=served.get("base_spec"),
    )
    return result, ranker


def _text(value: Any) -> str | None:
    """A nullable text cell (pandas may hold None or NaN) as str or None."""
    return value if isinstance(value, str) else None


def pick_response(
    result: CullResult, ranker: PickRanker, clip: dict[str, Any], request_id: str | None = None
) -> dict[str, Any]:
    """``/v1/pick``'s answer (a :class:`PickResponse`): groups in time order, images by index.
    ``request_id``: the answer's (None: a new one)."""
    picks = result.picks
    index = picks[REQUEST_INDEX].to_numpy(dtype=np.int64)
    dup = picks["duplicate_of"].to_numpy(dtype=np.int64)
    images: list[dict[str, Any]] = [{} for _ in range(len(picks))]
    for pos, row in enumerate(picks.to_dict("records")):
        images[index[pos]] = {
            "index": int(index[pos]),
            "group": str(row["group_id"]),
            "rank": int(row["rank"]),
            "score": float(row["score"]),
            "prob": float(row["prob"]),
            "decision": row["decision"],
            "reasons": [str(r) for r in row["reasons"]],
            "rating": int(row["rating"]),
            "label": _text(row["label"]),
            "duplicate_of": int(index[dup[pos]]) if dup[pos] >= 0 else None,
            "duplicate_kind": _text(row["duplicate_kind"]),
            "capture_time": _text(row["capture_time"]),
            "time_source": str(row["time_source"]),
            "camera": str(row["camera"]),
        }
    groups = []
    # Rows come in group order, each group's in capture order; group ids sort as group order.
    for gid, rows in picks.groupby("group_id", sort=True):
        keep = rows.loc[rows["decision"] == "keep", REQUEST_INDEX]
        groups.append(
            {
                "id": str(gid),
                "images": [int(i) for i in rows[REQUEST_INDEX]],
                "keeper_index": int(keep.iloc[0]) if len(keep) else None,
            }
        )
    return {
        "request_id": request_id or new_request_id(),
        "clip_model": clip["spec"],
        "random_weights": clip["random_weights"],
        "ranker": ranker.model_dump(),
        "counts": result.counts(),
        "groups": groups,
        "images": images,
    }
