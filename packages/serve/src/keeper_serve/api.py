"""The HTTP API's request and response models, its errors, and request-side image handling.

Nothing here imports Ray: the ingress deployment uses it, and so do unit tests. Every error a
client can cause is an :class:`ApiError`, rendered as ``{"error": {"code", "message", "index"?}}``
with a 4xx status; ``index`` names the offending image (its position in the request, counting
across all series for ``/v1/rank``) or series.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keeper_core import storage
from keeper_core.errors import ImageDecodeError, StorageError
from keeper_core.images import DecodeLimits
from keeper_core.preparation import DecodedImage, ImagePreparation
from keeper_serve.config import KeeperAppArgs, LimitArgs

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


#: decode_image's reasons -> (HTTP status, API code).
DECODE_STATUS: dict[str, tuple[int, str]] = {
    "empty": (400, "empty_image"),
    "too_large": (413, "image_too_large"),
    "not_image": (415, "not_an_image"),
    "unsupported": (415, "unsupported_image_format"),
    "truncated": (400, "undecodable_image"),
    "too_many_pixels": (400, "too_many_pixels"),
    "too_small": (400, "image_too_small"),
}


def validation_error(e: ValidationError) -> ApiError:
    """A pydantic error as one 422 naming the first bad field."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return ApiError(422, "invalid_request", f"{where}: {first['msg']}{more}")


# ----------------------------------------------------------------------------------- requests


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
    images: list[ImageRef] = Field(default_factory=list)
    texts: list[str] = Field(default_factory=list)

    def checked_texts(self) -> list[str]:
        return self.texts

    @model_validator(mode="after")
    def _something(self) -> EmbedRequest:
        if not self.images and not self.texts:
            raise ValueError("give at least one image or text")
        return self


class AestheticRequest(_Req):
    images: list[ImageRef] = Field(min_length=1)


class RelevanceRequest(_Req):
    positive: list[str] = Field(min_length=1, description="what is wanted")
    negative: list[str] = Field(default_factory=list, description="what is not wanted")
    images: list[ImageRef] = Field(min_length=1)
    temperature: float = Field(0.01, gt=0, le=10, description="softmax over the prompts")

    texts_label: ClassVar[str] = "prompts"

    def checked_texts(self) -> list[str]:
        """Positive then negative prompts, each once (the order of the response's keys)."""
        return list(dict.fromkeys([*self.positive, *self.negative]))


class SeriesIn(_Req):
    id: str | None = Field(None, max_length=256, description="echoed back; default: position")
    images: list[ImageRef]


class RankRequest(_Req):
    series: list[SeriesIn] = Field(min_length=1)


# ----------------------------------------------------------------------------------- responses


class ClipInfo(BaseModel):
    spec: str
    embed_dim: int
    image_size: int
    random_weights: bool = Field(description="true: scores from this model mean nothing")


class RankerInfo(BaseModel):
    uri: str | None = Field(description="as configured, e.g. models:/keeper-ranker@champion")
    status: str = Field(description="ready | unavailable | disabled")
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    features: str | None = None
    head: str | None = None
    error: str | None = None


class ModelsResponse(BaseModel):
    clip: ClipInfo
    ranker: RankerInfo


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
    clip_model: str
    random_weights: bool


class RankResponse(BaseModel):
    model: RankModel
    series: list[RankedSeries]


# ----------------------------------------------------------------------------------- bodies


def parse_json(body: bytes, model: type[BaseModel]) -> Any:
    """Body -> request model; malformed JSON or schema violations are 422."""
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


def form_list(value: str) -> list[str]:
    """A multipart text field: a JSON list of strings, or one string."""
    value = value.strip()
    if value.startswith("["):
        try:
            out = json.loads(value)
        except json.JSONDecodeError as e:
            raise ApiError(422, "invalid_request", f"form field: invalid JSON list: {e}") from e
        if not isinstance(out, list) or not all(isinstance(x, str) for x in out):
            raise ApiError(422, "invalid_request", "form field: expected a list of strings")
        return out
    return [value]


# ----------------------------------------------------------------------------------- images


@dataclass
class Prepared:
    """Request images ready for the encoder (and the ranker's quality features)."""

    pixels: np.ndarray  # (N, 3, S, S) uint8: the model's resize + crop, normalised on device
    quality: np.ndarray | None  # (N, F) float32, keeper_core.quality.FEATURE_NAMES order


class ImagePreparer:
    """Fetches and checks request images, then prepares them as ``keeper embed`` does.

    Decode, resize/crop and quality features are keeper_core's :class:`ImagePreparation`, the
    one path ``keeper embed`` runs too, so a series scored over HTTP gets the features its
    ranker was trained on. This class adds what only a request has: base64 and allow-listed
    S3 references, counts, and errors as :class:`ApiError`.
    """

    def __init__(self, args: KeeperAppArgs) -> None:
        self.limits: LimitArgs = args.limits
        self.preparation = ImagePreparation(
            args.clip_model,
            limits=DecodeLimits(
                max_pixels=args.limits.max_pixels,
                min_side=args.limits.min_side,
                max_bytes=args.limits.max_image_bytes,
            ),
            draft=args.draft,
        )
        self.allowed = frozenset(args.s3_allow_buckets)

    def check_count(self, n: int) -> None:
        if n > self.limits.max_images:
            raise ApiError(
                400,
                "too_many_images",
                f"{n} images in one request; the limit is {self.limits.max_images}",
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
            bucket, _ = storage.split_s3(uri)
        except Exception as e:
            raise ApiError(400, "unsupported_uri", f"image {index}: {e}", index=index) from e
        if bucket not in self.allowed:
            raise ApiError(
                403,
                "uri_not_allowed",
                f"image {index}: bucket {bucket!r} is not in the server's s3_allow_buckets",
                index=index,
            )
        try:
            size = storage.object_info(uri).size
            if size > cap:
                raise ApiError(
                    413, "image_too_large", f"image {index}: {size} bytes > {cap}", index=index
                )
            return storage.read_bytes(uri)
        except StorageError as e:
            raise ApiError(400, "unreadable_uri", f"image {index}: {e}", index=index) from e

    def decode(self, data: bytes, index: int) -> DecodedImage:
        """One image through keeper_core's decode; its refusal as the API's status and code."""
        try:
            return self.preparation.decode(data)
        except ImageDecodeError as e:
            status, code = DECODE_STATUS[e.reason]
            raise ApiError(status, code, f"image {index}: {e.detail}", index=index) from e

    def prepare(self, refs: Sequence[ImageRef | bytes], *, quality: bool) -> Prepared:
        """Every image or the first failure (an ApiError naming its index): a request is whole."""
        self.check_count(len(refs))
        decoded: list[DecodedImage] = []
        for i, ref in enumerate(refs):
            data = ref if isinstance(ref, bytes) else self.image_bytes(ref, i)
            if len(data) > self.limits.max_image_bytes:
                raise ApiError(
                    413,
                    "image_too_large",
                    f"image {i}: {len(data)} bytes > {self.limits.max_image_bytes}",
                    index=i,
                )
            decoded.append(self.decode(data, i))
        feats = self.preparation.quality(decoded) if quality and decoded else None
        return Prepared(pixels=self.preparation.pixels(decoded), quality=feats)
