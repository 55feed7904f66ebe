"""The typed arguments of keeper's Serve application (``build_app(args)``).

Everything here is *what* the app serves and *what it accepts*; how many replicas run, how
many requests each takes and what resources they hold belong to the Serve config
(``clusters/serve/*.yaml``, section ``deployments``), never to code. A Serve config's
``applications[].args`` is validated against :class:`KeeperAppArgs` by Serve itself (the
builder's argument is annotated) and by ``tests/unit/serve/test_cluster_configs.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from keeper_core.errors import ConfigError

if TYPE_CHECKING:
    from keeper_core.images import DecodeLimits

#: Deployment names, as the Serve config's ``deployments[].name`` must spell them.
INGRESS, ENCODER, RANKER, VLM = "KeeperIngress", "ClipEncoder", "SeriesRanker", "VlmJudge"
#: Bound only when ``args.search`` is set (``/v1/search``).
SEARCH = "SearchIndex"
#: Bound only when ``args.references`` is set (``/v1/compare``, ``/v1/references``).
REFERENCES = "ReferenceCollections"
#: Bound only when ``args.ab`` is set: a second ``SeriesRanker`` following the challenger.
CHALLENGER = "ChallengerRanker"
#: Bound only when ``args.feedback`` is set with ``online_poll_s`` > 0: the online figures.
ONLINE = "OnlineFigures"

DEFAULT_TOKEN_ENV = "KEEPER_API_TOKEN"

# Hard ceilings of the request models' lists (``keeper_serve.api``, pydantic ``max_length``): a
# configured maximum may not exceed its ceiling (``LimitArgs`` refuses it), so a list longer than
# the ceiling can never be served and is refused while the body is validated (422), before the
# route's own count check (400 ``too_many_*``) against the configured maximum.
#: images in one request, any route (``max_images``, ``max_pick_images``, ``max_select_images``)
IMAGES_CEILING = 4096
#: texts, or positive / negative prompts, in one request (``max_texts``)
TEXTS_CEILING = 1024
#: series in one /v1/rank request (``max_series``) and images in one series (``max_series_len``)
SERIES_CEILING = 1024
#: corpus image_ids in one /v1/select request (``max_select_ids``)
SELECT_IDS_CEILING = 1_000_000
#: events in one /v1/feedback request (``feedback.max_events``)
EVENTS_CEILING = 100_000
#: keeper's image ids: the sha256 of an image's bytes, 64 hex digits (``keeper embed``, requests)
IMAGE_ID_CHARS = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def describe(e: ValidationError) -> str:
    """A ``ValidationError`` as one line, ``field: message`` per error joined by ``; `` (as
    keeper_train's configs say it): no pydantic dump, no errors.pydantic.dev links."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {' '.join(msg.split())}")
    return "; ".join(parts)


#: The validation context under which ``KeeperAppArgs`` checks ``clip_model`` against open_clip's
#: configs (``KeeperAppArgs.checked``).
CHECK_MODEL = "check_clip_model"


class AuthArgs(_Strict):
    """Bearer-token authentication of every route but ``/healthz``.

    The token comes from ``token_file`` when given, else from the environment variable
    ``token_env`` (read in each ingress replica: set it in the Serve config's
    ``runtime_env.env_vars`` or the cluster's environment, never in the YAML itself).
    ``insecure_local`` serves without a token; ``keeper serve --insecure-local`` sets it and
    binds to loopback only.
    """

    token_env: str = DEFAULT_TOKEN_ENV
    token_file: str | None = None
    insecure_local: bool = False

    def token(self) -> str | None:
        """The expected token, or None when running open.

        Raises:
            ConfigError: auth is on and no token is configured (an empty token is no token).
        """
        if self.insecure_local:
            return None
        if self.token_file:
            try:
                token = Path(self.token_file).expanduser().read_text("utf-8").strip()
            except OSError as e:
                raise ConfigError(f"cannot read the API token file {self.token_file}: {e}") from e
            source = f"file {self.token_file}"
        else:
            token = os.environ.get(self.token_env, "").strip()
            source = f"environment variable {self.token_env}"
        if len(token) < 16:
            raise ConfigError(
                f"no usable API token in the {source} (need >= 16 characters); set one, "
                "or run open for local development with keeper serve --insecure-local"
            )
        return token


class LimitArgs(_Strict):
    """What one request may carry. Over a limit: 413 (size) or 400 (counts, pixels)."""

    max_request_bytes: int = Field(32 * 1024 * 1024, gt=0, description="whole body (413)")
    max_image_bytes: int = Field(16 * 1024 * 1024, gt=0, description="one encoded image")
    max_pixels: int = Field(40_000_000, gt=0, description="one image, from its header")
    # Images are decoded one at a time and each is released once its model pixels and quality
    # features are taken, so a request's memory holds one full-size decode (<= max_pixels) per
    # worker thread whatever its count; this budget bounds the decode work of one request. Counted
    # from every image's header before any is decoded (an s3:// image: when it is fetched, before
    # it is decoded), as the pixels the decode allocates: a JPEG that is draft-decoded counts its
    # draft's (a 24 MP camera JPEG about 0.4 MP), any other format its full size (a flat
    # 8000 x 5000 PNG of 127 KB decodes to 40 MP, 120 MB of RGB, in ~0.35 s).
    # 1,000 MP: ~80 phone photos in HEIC or PNG (12 MP each), every drafted JPEG of a /v1/pick
    # shoot, and about 9 s of decoding at most; a platform sending larger HEIC shoots raises it.
    max_request_pixels: int = Field(
        1_000_000_000,
        gt=0,
        description="decoded pixels of all of one request's images together, from their headers",
    )
    min_side: int = Field(16, ge=1, description="smallest accepted image side")
    max_jpeg_scans: int = Field(
        256, gt=0, description="scans in one JPEG (encoders write ~10; each is a full pass)"
    )
    max_images: int = Field(
        64, ge=1, le=IMAGES_CEILING, description="images in one request, all series together"
    )
    max_texts: int = Field(
        64, ge=1, le=TEXTS_CEILING, description="texts (or prompts) in one request"
    )
    max_text_chars: int = Field(1000, ge=1)
    max_series: int = Field(
        16, ge=1, le=SERIES_CEILING, description="series in one /v1/rank request"
    )
    max_series_len: int = Field(32, ge=2, le=SERIES_CEILING, description="images in one series")
    # A shoot to cull is larger than a request to score: a burst alone can be 30 frames, so
    # /v1/pick has its own count (its bytes and pixels are still bounded by the limits above).
    max_pick_images: int = Field(
        256, ge=1, le=IMAGES_CEILING, description="images in one /v1/pick request"
    )
    # /v1/select's candidates: a search's worth, each embedded; only top_n reach the VLM.
    max_select_images: int = Field(
        256, ge=1, le=IMAGES_CEILING, description="candidates in one /v1/select request"
    )
    # Candidates named by image_id cost no decode (only the VLM's top_n are read).
    max_select_ids: int = Field(
        100_000, ge=1, le=SELECT_IDS_CEILING, description="corpus image_ids in one /v1/select"
    )
    # pydantic validates every item of a list before it compares the list's length with its
    # max_length, so a 32 MiB body of 2.9 M tiny items cost 3-5 s and ~1.5 GB even with the
    # caps; this count, taken from the body's bytes (commas, brackets and braces: a comma inside
    # a string counts too), refuses such a body before it is parsed. Must exceed what the other
    # limits admit (max_select_ids ids plus max_texts texts full of commas).
    max_json_values: int = Field(
        200_000,
        ge=1024,
        description="values (array items, object members) in one JSON body, from its bytes",
    )

    @model_validator(mode="after")
    def _consistent(self) -> LimitArgs:
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(
                "limits.max_request_pixels must be >= limits.max_pixels (one image at the "
                "limit could never be served)"
            )
        need = self.max_select_ids + self.max_texts * self.max_text_chars + 1024
        if self.max_json_values < need:
            raise ValueError(
                f"limits.max_json_values must be >= {need} (max_select_ids + max_texts x "
                "max_text_chars + 1024), or a JSON body the other limits admit is refused"
            )
        return self

    def decode_limits(self) -> DecodeLimits:
        """What ``decode_image`` enforces for one image of a request."""
        from keeper_core.images import DecodeLimits  # PIL and numpy: not for the CLI's import

        return DecodeLimits(
            max_pixels=self.max_pixels,
            min_side=self.min_side,
            max_bytes=self.max_image_bytes,
            max_jpeg_scans=self.max_jpeg_scans,
        )


class EncoderArgs(_Strict):
    """The ClipEncoder's model and dynamic batching (replica counts live in the Serve config)."""

    max_batch_size: int = Field(16, ge=1, description="images per forward pass")
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        description="under load, how long a batch not full when the model frees up waits for "
        "more calls (a call that finds the model idle runs at once)",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "intra-op threads on CPU; None: the replica's num_cpus (Ray sets OMP_NUM_THREADS to "
            "it, 1 for a fractional CPU)"
        ),
    )
    device: str | None = Field(None, description="torch device; None: CUDA when present")
    text_cache_size: int = Field(4096, ge=0, description="prompt embeddings kept (LRU)")
    cache_dir: str | None = Field(None, description="where s3:// weights are cached")


def check_model_uri(v: str | None, field: str, *, nullable: bool = True) -> str | None:
    """A ranker's model URI, refused when it can never name a model (an empty one, a
    ``models:/`` URI without a version, an alias or a logged model's id), as
    ``keeper_core.registry.resolve_model`` would refuse it in every replica after the deploy.
    Surrounding blanks are dropped. None (no ranker) passes.

    Raises:
        ValueError: the URI is malformed (named, with the forms that are taken).
    """
    if v is None:
        return None
    uri = v.strip()
    forms = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a model folder"
    if not uri:
        raise ValueError(
            f"{field} is empty: give {forms}" + (", or null for none" if nullable else "")
        )
    if uri.startswith("models:/"):
        path = uri.removeprefix("models:/").strip("/")
        name, at, alias = path.partition("@")
        if at:
            ok = bool(name) and bool(alias) and "/" not in alias and "@" not in alias
        else:  # NAME/VERSION (or NAME/STAGE), or a logged model's id (models:/m-...)
            ok = bool(path) and ("/" in path.strip("/") or path.startswith("m-"))
        if not ok:
            raise ValueError(f"{field} {v!r} names no model: give {forms}")
    return uri


class RankerArgs(_Strict):
    """The series ranker: which registered model, and how often to look for a new version."""

    model_uri: str | None = Field(
        "models:/keeper-ranker@champion",
        description="models:/NAME@ALIAS (followed), models:/NAME/VERSION, runs:/...; None: off",
    )
    poll_s: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="how often the alias is re-resolved"
    )

    @field_validator("model_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return check_model_uri(v, "ranker.model_uri")


class VlmArgs(_Strict):
    """The VlmJudge: which vision-language model, and its dynamic batching.

    ``source: null`` runs no VLM: the app does not deploy a ``VlmJudge`` at all, and
    ``/v1/select`` skips its VLM stage, saying so (``vlm_disabled_info``). Replica counts and ``num_gpus`` (fractional on a shared GPU) live in the
    Serve config's ``deployments`` section, like the encoder's.
    """

    source: str | None = Field(
        None, description="a local directory, s3://bucket/prefix or a hub id; None: no VLM"
    )
    device: str | None = Field(None, description="torch device; None: CUDA when present")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    max_batch_size: int = Field(8, ge=1, description="(image, query) pairs per forward pass")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long a batch waits to fill")
    torch_threads: int | None = Field(None, ge=1, description="as EncoderArgs.torch_threads")
    cache_dir: str | None = Field(None, description="where s3:// and hub models are cached")
    max_image_side: int = Field(
        448, ge=32, description="longest side of the copy of each candidate the VLM is sent"
    )


#: What ``VlmJudge.info()`` reports of its judge (``keeper_core.vlm.VlmJudge.describe()`` has more).
VLM_INFO_KEYS = (
    "source",
    "architecture",
    "dtype",
    "device",
    "parameters",
    "random_weights",
    "relevance_template",
)


def vlm_disabled_info() -> dict[str, Any]:
    """``/v1/models``' and ``/v1/select``'s ``vlm`` when no VLM is deployed: the same keys."""
    return {"status": "disabled", **dict.fromkeys(VLM_INFO_KEYS)}


class SelectArgs(_Strict):
    """``/v1/select``: what a request gets when it does not say, and the most it may ask for."""

    top_n: int = Field(20, ge=1, description="VLM judgements when the request gives no top_n")
    top_k: int = Field(10, ge=1, description="picks when the request gives no top_k")
    max_top_n: int = Field(32, ge=1, description="VLM judgements per request")
    max_top_k: int = Field(32, ge=1, description="picks per request")

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> SelectArgs:
        if self.top_n > self.max_top_n or self.top_k > self.max_top_k:
            raise ValueError("select.top_n/top_k must not exceed select.max_top_n/max_top_k")
        return self


class SearchArgs(_Strict):
    """``/v1/search``: the vector index ``keeper index`` wrote, and how often to look for a newer one.

    The index's ids are its table's ``image_uri``; results carry the table's ``image_id``,
    sizes and quality features, read from ``table`` (default: the index folder's parent, where
    ``keeper index`` writes ``TABLE/index``).
    """

    index: str = Field(description="keeper index's output folder (local or s3://), TABLE/index")
    table: str | None = Field(None, description="keeper embed's output; None: index's parent")
    poll_s: float = Field(
        30.0, ge=0, description="how often index.json is checked for a newer index; 0: never"
    )
    max_k: int = Field(100, ge=1, description="results per request")
    # Filters are applied after the search: the index is over-fetched (k * 4, then x4 again while
    # too few survive), never past this many rows per request.
    max_fetch: int = Field(4096, ge=1, description="rows one filtered search may look at")

    def table_uri(self) -> str:
        """``table``, or the index folder's parent."""
        if self.table is not None:
            return self.table
        parent = self.index.rstrip("/").rpartition("/")[0]
        if not parent or parent.endswith(":/"):  # "index" alone, or s3://bucket
            raise ConfigError(f"search.index {self.index!r} has no parent folder: set search.table")
        return parent


class ReferenceArgs(_Strict):
    """``/v1/compare``: the folder ``keeper reference add`` writes collections under.

    Every ``ROOT/NAME/`` holding a ``reference.json`` is a collection (keeper_core.references);
    the root is listed again every ``poll_s`` seconds, so collections added, replaced or removed
    are followed without a restart.
    """

    root: str = Field(description="the folder (local or s3://) holding ROOT/NAME collections")
    poll_s: float = Field(
        30.0, ge=0, description="how often the root is listed for changed collections; 0: never"
    )
    max_k: int = Field(20, ge=1, description="nearest references per request")


class FeedbackArgs(_Strict):
    """``POST /v1/feedback`` and the log of what ``/v1/rank``, ``/v1/pick`` and ``/v1/select``
    offered: both buffered in each ingress replica and written as Parquet parts under ``root``
    (``ROOT/events``, ``ROOT/offers``; keeper_core.feedback).

    A part is written when ``max_rows`` rows are buffered or the oldest is ``max_age_s`` old (a
    timer looks every ``min(1, max_age_s)`` s), at once for a ``sync`` request, and when a
    replica shuts down gracefully; a killed replica loses what it had not written, which is
    exactly what its answers said was not durable.
    """

    root: str = Field(description="folder or s3:// prefix: ROOT/events and ROOT/offers")
    max_rows: int = Field(500, ge=1, description="rows buffered before a part is written")
    max_age_s: float = Field(2.0, gt=0, description="oldest buffered row's age before a write")
    # Rows a replica holds while storage fails; past it, /v1/feedback answers 503 and offers
    # are dropped (counted), so a storage outage never grows a replica without bound.
    max_pending: int = Field(100_000, ge=1, description="unwritten rows a replica holds at most")
    max_events: int = Field(
        1000, ge=1, le=EVENTS_CEILING, description="events in one /v1/feedback request"
    )
    offers: bool = Field(True, description="log what /v1/rank, /v1/pick and /v1/select offered")
    offer_embeddings: bool = Field(
        True,
        description=(
            "offers carry each image's embedding and quality features (what keeper "
            "feedback-export trains on); false: ids, ranks and scores only"
        ),
    )
    online_poll_s: float = Field(
        60.0,
        ge=0,
        description=(
            "how often OnlineFigures recomputes the per-version online figures (Prometheus "
            "gauges) from ROOT's logs; 0: no OnlineFigures deployment"
        ),
    )
    online_window_s: float = Field(
        7 * 86400.0, gt=0, description="the online figures count answers of this many seconds"
    )

    @model_validator(mode="after")
    def _pending_fits(self) -> FeedbackArgs:
        if self.max_pending < self.max_rows:
            raise ValueError("feedback.max_pending must be >= feedback.max_rows")
        return self


class ABArgs(_Strict):
    """An A/B of champion and challenger on ``/v1/rank`` and ``/v1/pick`` (keeper_core.ab).

    A ``share`` of clients (keyed by ``X-Keeper-Client``, else per request) is answered by a
    second ranker deployment, ``ChallengerRanker``, that follows ``model_uri``; the rest by the
    champion (``ranker.model_uri``). Every answer and offer row names its ``arm``.
    """

    share: float = Field(ge=0.0, le=1.0, description="the challenger's share of clients, [0, 1]")
    salt: str = Field(
        "keeper-ab", min_length=1, description="hash salt: change it to start a new experiment"
    )
    model_uri: str = Field(
        "models:/keeper-ranker@challenger", description="what ChallengerRanker follows"
    )
    poll_s: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="how often the alias is re-resolved"
    )

    @field_validator("model_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        uri = check_model_uri(v, "ab.model_uri", nullable=False)
        assert uri is not None
        return uri

    def ranker_args(self, champion: RankerArgs) -> RankerArgs:
        """The ChallengerRanker's arguments: the champion's, following ``model_uri``."""
        return champion.model_copy(update={"model_uri": self.model_uri, "poll_s": self.poll_s})


class ReviewArgs(_Strict):
    """The review page (``/ui``): ``keeper pick`` runs people triage in a browser.

    Each run is a ``keeper pick`` output folder (local or ``s3://``: ``picks.parquet``,
    ``thumbs/``, ``_SUMMARY.json``), named in the page by its key. A run is read when first
    asked for and read again when its ``_SUMMARY.json`` changed (a new pick into the same
    folder). Decisions go to ``/v1/feedback``, so ``args.feedback`` must be set too.
    """

    runs: dict[str, str] = Field(
        min_length=1, description="name -> keeper pick output folder (local or s3://)"
    )
    max_page_groups: int = Field(
        200, ge=50, description="groups one page of a run may ask for (the page asks 50)"
    )
    check_s: float = Field(
        10.0, ge=0, description="a run's _SUMMARY.json is re-read at most this often"
    )

    @field_validator("runs")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, folder in v.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(
                    f"review run name {name!r}: letters, digits, '.', '_', '-' (at most 64)"
                )
            if not folder:
                raise ValueError(f"review run {name!r} names no folder")
        return v


class KeeperAppArgs(_Strict):
    """``build_app(args)``: the whole application."""

    clip_model: str = Field("keeper-tiny:random", description="ModelSpec ARCH[:WEIGHTS]")
    tracking_uri: str | None = Field(
        None, description="MLflow; None: MLFLOW_TRACKING_URI, else sqlite under data_dir"
    )
    data_dir: str = Field("keeper-data", description="the embedded MLflow store's folder")
    aesthetic_config: str | None = Field(None, description="prompt YAML; None: the built-in")
    corpus: str | None = Field(
        None,
        description=(
            "keeper embed's output folder (local or s3://), embedded with clip_model: /v1/select "
            "candidates may name its image_ids; loaded when an ingress replica starts"
        ),
    )
    s3_allow_buckets: list[str] = Field(
        default_factory=list, description="buckets whose s3:// URIs requests may name"
    )
    draft: bool = Field(True, description="JPEG draft decode, as keeper embed does")
    auth: AuthArgs = Field(default_factory=AuthArgs)
    limits: LimitArgs = Field(default_factory=LimitArgs)
    encoder: EncoderArgs = Field(default_factory=EncoderArgs)
    ranker: RankerArgs = Field(default_factory=RankerArgs)
    vlm: VlmArgs = Field(default_factory=VlmArgs)
    select: SelectArgs = Field(default_factory=SelectArgs)
    search: SearchArgs | None = Field(None, description="/v1/search's index; None: no search")
    references: ReferenceArgs | None = Field(
        None, description="/v1/compare's reference collections; None: no /v1/compare"
    )
    feedback: FeedbackArgs | None = Field(
        None, description="/v1/feedback and the offers log; None: no /v1/feedback, no offers"
    )
    ab: ABArgs | None = Field(
        None, description="champion/challenger A/B on /v1/rank and /v1/pick; None: no split"
    )
    review: ReviewArgs | None = Field(
        None, description="the review page's keeper pick runs; None: /ui lists none"
    )

    @classmethod
    def checked(cls, data: Any) -> KeeperAppArgs:
        """``data`` validated, ``clip_model`` included: an unknown architecture or pretrained tag
        fails here, as it does in keeper embed's config, instead of in a replica. Imports
        open_clip (and torch: seconds) but loads no weights.

        Raises:
            ValidationError: as ``model_validate``.
        """
        return cls.model_validate(data, context={CHECK_MODEL: True})

    @field_validator("clip_model")
    @classmethod
    def _spec(cls, v: str, info: ValidationInfo) -> str:
        # ARCH[:WEIGHTS], canonical (ViT-B-32 is ViT-B-32:random), as keeper embed's model. The
        # architecture and tag are looked up (preprocess_config: open_clip's configs, no
        # weights) only under CHECK_MODEL: building the args must not import torch where an
        # ingress replica or a test makes them.
        from keeper_core.models import spec_field

        return spec_field(v, look_up=bool((info.context or {}).get(CHECK_MODEL)))

    @field_validator("s3_allow_buckets")
    @classmethod
    def _bucket_names(cls, v: list[str]) -> list[str]:
        for b in v:
            if not b or "/" in b or b.startswith("s3:"):
                raise ValueError(f"s3_allow_buckets takes bare bucket names, got {b!r}")
        return v

    @model_validator(mode="after")
    def _limits_fit(self) -> KeeperAppArgs:
        if self.limits.max_image_bytes > self.limits.max_request_bytes:
            raise ValueError("limits.max_image_bytes exceeds limits.max_request_bytes")
        if self.ab is not None and self.ranker.model_uri is None:
            raise ValueError("ab is set but ranker.model_uri is null: no champion to compare with")
        if self.ab is not None and self.ab.model_uri == self.ranker.model_uri:
            raise ValueError(
                f"ab.model_uri is ranker.model_uri ({self.ab.model_uri}): both arms would serve "
                "the same version, and the A/B would compare nothing"
            )
        if self.review is not None and self.feedback is None:
            raise ValueError("review is set but feedback is null: decisions would go nowhere")
        # An event is an object of at most 6 members: 8 values with its braces and comma.
        if self.feedback is not None and self.feedback.max_events * 8 + 1024 > (
            self.limits.max_json_values
        ):
            raise ValueError(
                "limits.max_json_values must be >= feedback.max_events x 8 + 1024, or a "
                "/v1/feedback body of max_events events is refused"
            )
        return self


def encoder_memory_shortfall(clip_model: str, actor_options: Mapping[str, Any]) -> str | None:
    """Why ``ClipEncoder``'s ``ray_actor_options.memory`` is too small for ``clip_model``, or None.

    The need is what ``keeper embed``'s model actors reserve for the same model
    (``keeper_core.models.actor_memory_request``: 1.25 x (1 GiB + fp32 weights); measured peaks
    in docs/benchmarks.md). None when no memory is set (nothing reserved: the shipped configs'
    test asks for it) or it suffices. Builds the model on torch's meta device (no weights).
    """
    from keeper_core.models import actor_memory_request, parameter_count

    memory = actor_options.get("memory")
    if not isinstance(memory, int | float):
        return None
    need = actor_memory_request(4 * parameter_count(clip_model))
    if memory >= need:
        return None
    return (
        f"{ENCODER}: ray_actor_options.memory {memory / 2**30:.2f} GiB < {need / 2**30:.2f} GiB "
        f"that {clip_model} needs (keeper_core.models.actor_memory_request): Ray may place more "
        "replicas on a node than its memory holds"
    )
