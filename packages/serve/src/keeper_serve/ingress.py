"""``KeeperIngress``: the FastAPI front door. Auth, limits, validation, then composition.

The ingress decodes and resizes images itself (on a worker thread, so its event loop keeps
taking requests) and sends uint8 pixels to ``ClipEncoder``, whose replicas batch them; it sends
quality features to ``SeriesRanker`` with what the current ranker version scores from: the
encoder's embeddings for a head, the same uint8 pixels for a fine-tuned ranker (its own tower;
``/v1/rank`` then skips the encoder). Which one it is, the ingress learns from the ranker's
answers; after a promotion changes the kind, the ranker answers "needs" and the call is made once
more with both, so no request fails (``_rank``). Scoring (aesthetic prompts, relevance)
is keeper_core's, computed here from the embeddings; so is culling (``/v1/pick`` runs
``keeper_core.culling.cull`` on a worker thread, its scorer calling ``SeriesRanker`` back on the
event loop). ``/v1/search`` embeds its query here (a text, or an image prepared as ``/v1/rank``'s)
and asks ``SearchIndex`` (bound only when ``args.search`` is set) for the top k; ``/v1/compare``
prepares and embeds its image the same way (with quality features) and asks
``ReferenceCollections`` (bound only when ``args.references`` is set) where it sits in a
collection. With ``args.feedback``, ``/v1/feedback`` appends people's decisions to a
``FeedbackLog`` and every answer of ``/v1/rank``, ``/v1/pick`` and ``/v1/select`` appends what it
offered to an ``OfferLog`` (keeper_core.feedback), both buffered here and written as Parquet parts
by a timer thread, on ``sync``, and on a graceful shutdown. With ``args.ab``, ``/v1/rank`` and
``/v1/pick`` answer a share of clients with ``ChallengerRanker`` instead (keeper_core.ab.assign on
``X-Keeper-Client``, else the request id); the answer and its offer rows name the ``arm``, and a
challenger that cannot answer hands the request to the champion, counted
(``keeper_ab_fallbacks``) and recorded as the champion's. Errors are JSON
``{"error": {"code", "message", "index"?}}``; see docs/http-api.md.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import ipaddress
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Literal, Protocol, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keeper_core import storage
from keeper_core.ab import Arm
from keeper_core.cascade import (
    NEUTRAL_PROMPT,
    CascadeLimits,
    CascadeStageError,
    QueryRules,
    VlmScorer,
    VlmScores,
    check_limits,
    run_cascade,
)
from keeper_core.contact_sheet import THUMB_SIZE, thumbnail_jpeg
from keeper_core.corpus import Corpus, read_corpus
from keeper_core.errors import (
    ConfigError,
    DataError,
    ImageDecodeError,
    KeeperError,
    StorageError,
    brief,
    client_message,
    client_text,
    remote_cause,
)
from keeper_core.feedback import FeedbackBackpressure, FeedbackLog, OfferLog, PartLog
from keeper_core.images import decode_image
from keeper_core.models import PreprocessConfig
from keeper_core.scoring import (
    AestheticConfig,
    aesthetic_scores,
    clip_score,
    prompt_softmax,
    relevance_score,
)
from keeper_serve import api
from keeper_serve.api import ApiError, ImageRef
from keeper_serve.config import KeeperAppArgs, vlm_disabled_info
from keeper_serve.local import HAPROXY_FLAG
from keeper_serve.references import CollectionUnusable, UnknownCollection
from keeper_serve.review import (
    MAX_THUMB_BYTES,
    ReviewRun,
    ReviewRuns,
    RunUnusable,
    UnknownImage,
    UnknownRun,
)
from keeper_serve.search import UnknownImageId

log = logging.getLogger("keeper.serve")

#: The review page's files: public (they hold no data; every call they make sends the token).
UI_FILES = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
}
PUBLIC_PATHS = frozenset({"/healthz", *UI_FILES})
#: The page's Content-Security-Policy: its own script and style, thumbnails as blob: URLs.
UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
DOC_PATHS = frozenset({"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})

app = FastAPI(
    title="keeper",
    version="1",
    summary=(
        "Find the keepers: CLIP embeddings, aesthetic and relevance scores, series ranking, "
        "culling."
    ),
    description=(
        "Every route but `/healthz` needs `Authorization: Bearer <token>`. Images travel as "
        'base64 in JSON (`{"b64": ...}`), as `s3://` URIs in allow-listed buckets '
        '(`{"uri": ...}`), or as multipart uploads. Errors: '
        '`{"error": {"code", "message", "index"?}}`.'
    ),
)


def _json_body(model: type[Any]) -> dict[str, Any]:
    """OpenAPI for a route that reads its body itself (size limit, JSON or multipart).

    The schema itself goes into ``components`` (:func:`_openapi`), where the reference points.
    """
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    }
    if model not in _JSON_ONLY:
        content["multipart/form-data"] = {"schema": {"type": "object"}}
    return {"requestBody": {"required": True, "content": content}}


#: Bodies taken as JSON only (no multipart form).
_JSON_ONLY: tuple[type[Any], ...] = (
    api.RankRequest,
    api.SearchRequest,
    api.CompareRequest,
    api.FeedbackRequest,
)

#: Bodies the routes parse themselves: their schemas are added to the OpenAPI components.
REQUEST_MODELS = (
    api.EmbedRequest,
    api.AestheticRequest,
    api.RelevanceRequest,
    api.RankRequest,
    api.PickRequest,
    api.SelectRequest,
    api.SearchRequest,
    api.CompareRequest,
    api.FeedbackRequest,
)


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the request models (and the models they nest)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


# Middleware and handlers are registered before the class: @serve.ingress freezes (pickles) the
# app when it decorates the class.


# ------------------------------------------------------------------------------ middleware


def error_response(
    status: int, code: str, message: str, *, retry_after: int | None = None
) -> JSONResponse:
    """keeper's JSON error body with its status (and Retry-After where retrying helps)."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        status_code=status, content=ApiError(status, code, message).body(), headers=headers
    )


#: Whom an open API (``auth.insecure_local``, no token) answers (:func:`open_to_whom`).
OpenTo = Literal["loopback", "nobody"]

#: Why an open API refused a client (403 ``open_api_loopback_only``), by whom it answers.
OPEN_REFUSALS: dict[OpenTo, str] = {
    "loopback": "this API runs open (auth.insecure_local) and answers loopback clients only, "
    "naming a loopback host (localhost, 127.0.0.1, [::1]) from no other origin; set a token to "
    "serve others",
    "nobody": "this API runs open (auth.insecure_local) behind Serve's HAProxy on a host that "
    "is not loopback, where every client looks local: it answers no one; set a token, or bind "
    "http_options.host to loopback",
}


def _loopback_ip(host: str) -> bool:
    """127.0.0.0/8, ::1 or IPv4-mapped ::ffff:127.x (which Python 3.11 does not call loopback)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def loopback_client(client: object) -> bool:
    """Whether an ASGI scope's ``client`` (``(host, port)``) is a loopback address.

    None (the server did not say), a name (Starlette's TestClient sends "testclient") or a unix
    socket path is not: an open API fails closed.
    """
    if not isinstance(client, tuple | list) or not client:
        return False
    return _loopback_ip(str(client[0]))


def loopback_name(value: str | None) -> bool:
    """Whether a Host header (``localhost``, ``127.0.0.1:8000``, ``[::1]:8000``) or an Origin
    (``http://localhost:8000``) names this machine by a loopback name or address."""
    if not value:
        return False
    host = value.split("://", 1)[-1].rsplit("@", 1)[-1]
    if host.startswith("["):  # [::1]:8000
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".").lower()
    return host == "localhost" or host.endswith(".localhost") or _loopback_ip(host)


def local_request(request: Request) -> bool:
    """A request an open API may answer: from a loopback client, naming a loopback host, and
    from no page of another origin. A page on ``rebind.attacker.example``, once that name
    resolves to 127.0.0.1, reaches the API from the developer's own browser (DNS rebinding):
    its requests come from loopback, but name the attacker's host (and send its origin)."""
    if not loopback_client(request.scope.get("client")):
        return False
    host = request.headers.get("host")  # none: no browser's request (HTTP/1.0 from a script)
    if host is not None and not loopback_name(host):
        return False
    origin = request.headers.get("origin")  # "null": a sandboxed frame of any page, refused
    return origin is None or loopback_name(origin)


def open_to_whom(haproxy: bool, http_host: Callable[[], str | None]) -> OpenTo:
    """Whom an open API answers: loopback clients, unless their address says nothing.

    Serve's Python proxy puts the client's own address into the scope (uvicorn takes
    X-Forwarded-For only from a loopback peer). Under Serve's HAProxy every request reaches the
    replica from HAProxy's loopback connection and X-Forwarded-For is whatever the client sent,
    so there only a loopback ``http_options.host`` (which ``keeper serve`` enforces; HAProxy,
    its fallback proxy and the replicas' own ports all bind it) keeps the clients local;
    elsewhere, or when the host cannot be read, nobody is answered.

    Args:
        haproxy: ``RAY_SERVE_ENABLE_HA_PROXY`` is set where this replica runs.
        http_host: Serve's HTTP host, or None when it cannot be read (asked only under HAProxy).
    """
    if not haproxy:
        return "loopback"
    host = http_host()
    if host is not None and (host == "localhost" or _loopback_ip(host)):
        return "loopback"
    log.error(
        "keeper API running OPEN (auth.insecure_local) behind Serve's HAProxy on host %s: every "
        "client's address is HAProxy's, so no request is answered (403). Set a token, or bind "
        "http_options.host to loopback.",
        host or "(unknown)",
    )
    return "nobody"


def _serve_http_host() -> str | None:
    """The host of Serve's HTTP options, from its controller; None outside Ray or on failure."""
    import ray

    if not ray.is_initialized():  # Serve's lookup would start a Ray to find out
        return None
    try:
        # Private, but the one place a replica learns the HTTP options; failing here refuses all.
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else client.http_config.host
    except Exception:
        log.exception("keeper API: cannot read Serve's HTTP host")
        return None


def _refusal(ingress: _Front | None, request: Request) -> Response | None:
    """The answer to a request that must not reach its route, or None to let it through.

    Fails closed: without this replica's ingress instance there is no token to check against,
    so every route but the public ones is refused (503), never served unauthenticated. An open
    API (no token) refuses every client it cannot tell is on loopback (403).
    """
    path = request.url.path
    if path in PUBLIC_PATHS:
        return None
    if ingress is None:
        log.error("keeper API: no ingress instance in this replica; refusing %s", path)
        return error_response(
            503, "auth_unavailable", "the server cannot check credentials; retry", retry_after=1
        )
    if ingress.open_to is not None:
        if ingress.open_to == "loopback" and local_request(request):
            return None
        return error_response(403, "open_api_loopback_only", OPEN_REFUSALS[ingress.open_to])
    if not ingress._authorised(request):
        response = error_response(401, "unauthorized", "a valid bearer token is required")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    return None


class _AuthAndMetrics:
    """Auth on every route but the public ones, then count and time the request.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs
    each request's route in a task group of its own and streams the body and the response
    through memory channels, a cost every request pays (``benchmarks/asgi_middleware.py``).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ingress = _ingress()
        path: str = scope["path"]
        t0 = time.perf_counter()
        status = 500
        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            refusal = _refusal(ingress, Request(scope))
            if refusal is not None:
                status = refusal.status_code
                await refusal(scope, receive, send)
                return
            try:
                await self.app(scope, receive, send_status)
            except asyncio.CancelledError:  # the client left (or the replica stops)
                if not started:
                    status = 499  # counted as nginx's "client closed request", not a 500
                raise
            except Exception as exc:  # answered (and counted) here, not by Starlette's outer layer
                if started:  # the answer has begun: nothing more can be sent (counted as begun)
                    raise
                log.exception("keeper API: unhandled error on %s", path)
                name = type(remote_cause(exc)).__name__
                response = error_response(500, "internal", f"internal error ({name})")
                status = response.status_code
                await response(scope, receive, send)
        finally:
            if ingress is not None:
                route = _route_label(path)
                ingress.requests.inc(tags={"route": route, "status": str(status)})
                ingress.latency.observe((time.perf_counter() - t0) * 1000, tags={"route": route})


app.add_middleware(_AuthAndMetrics)


#: Routes named in metrics (anything else counts as "other": no unbounded label values).
ROUTES = frozenset(
    {
        "/healthz",
        "/v1/models",
        "/v1/embed",
        "/v1/score/aesthetic",
        "/v1/score/relevance",
        "/v1/rank",
        "/v1/pick",
        "/v1/select",
        "/v1/search",
        "/v1/compare",
        "/v1/references",
        "/v1/feedback",
        "/v1/review/runs",
        *UI_FILES,
        *DOC_PATHS,
    }
)


def _route_label(path: str) -> str:
    """A request's route in metrics: a known route, the review's templated ones, or "other"."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/review/runs/"):
        tail = path.rsplit("/", 2)
        if tail[-1] == "groups":
            return "/v1/review/runs/{name}/groups"
        if tail[-2] == "thumbs":
            return "/v1/review/runs/{name}/thumbs/{image_id}"
    if path.startswith("/v1/review/corpus/thumbs/"):
        return "/v1/review/corpus/thumbs/{image_id}"
    return "other"


def _tag_keys(*keys: str) -> tuple[str]:
    """Metric tag keys as Ray annotates them (``Tuple[str]``, though it takes any number)."""
    return cast("tuple[str]", keys)


class _Front(Protocol):
    """What the middleware needs of this replica's ``KeeperIngress``."""

    requests: Counter
    latency: Histogram
    open_to: OpenTo | None  # None: a token is required

    def _authorised(self, request: Request) -> bool: ...


def _ingress() -> _Front | None:
    """This replica's KeeperIngress instance; None outside a replica or before it is built."""
    try:
        obj = serve.get_replica_context().servable_object
    except Exception:  # RayServeException: not inside a replica
        return None
    # Anything else (None while the replica initialises) cannot check a token.
    return cast(_Front, obj) if hasattr(obj, "_authorised") else None


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body())


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return error_response(422, "invalid_request", f"{where}: {first.get('msg')}")


@app.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = error_response(exc.status_code, code, str(exc.detail))
    response.headers.update(getattr(exc, "headers", None) or {})
    return response


@app.exception_handler(KeeperError)
async def _keeper(request: Request, exc: KeeperError) -> JSONResponse:
    """A KeeperError raised here refuses the request's input (400); one raised in another
    deployment (its routes catch those a client can cause) is the server's failure (500), named
    by type and one scrubbed line, the whole remote traceback logged."""
    if isinstance(exc, RayTaskError):
        log.error("keeper API: a deployment failed on %s:\n%s", request.url.path, exc)
        return error_response(500, "deployment_error", f"a deployment failed: {brief(exc)}")
    return error_response(400, "bad_input", str(exc))


@app.exception_handler(BackPressureError)
async def _busy(request: Request, exc: BackPressureError) -> JSONResponse:
    """A deployment behind the ingress is full (its max_queued_requests): retry later."""
    return error_response(
        503, "overloaded", "the server is at capacity; retry shortly", retry_after=2
    )


@app.exception_handler(RayActorError)
async def _replica_lost(request: Request, exc: RayActorError) -> JSONResponse:
    """A replica died with this request in flight (Serve replaces it): retry shortly."""
    return error_response(
        503, "replica_unavailable", "a model replica was lost; retry", retry_after=1
    )


@app.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("keeper API: unhandled error on %s", request.url.path)
    return error_response(500, "internal", f"internal error ({type(remote_cause(exc)).__name__})")


#: What ranks /v1/select's candidates, as its offer rows name it (and "+vlm:SOURCE" after a VLM).
SELECT_MODEL = "aesthetic-rerank"
#: Why a candidate the VlmJudge scored NaN leaves /v1/select (``vlm_failed: <this>``).
VLM_NONFINITE = "the VLM gave no finite score for this image (non-finite logits)"


def vlm_answer(
    idx: np.ndarray, scores: np.ndarray, failed: Mapping[int, str]
) -> np.ndarray | VlmScores:
    """The cascade's VLM answer for candidates ``idx`` from what the VlmJudge returned.

    Args:
        idx: the candidates asked about, in the cascade's order.
        scores: one per ``idx``; NaN for one not sent (in ``failed``) or one the model gave no
            finite answer for (``VlmJudge.relevance``).
        failed: candidate -> why it was not sent (its image unreadable).

    Returns:
        ``scores`` when every candidate was judged, else ``VlmScores`` naming the failed ones:
        a NaN becomes that candidate's failure (``VLM_NONFINITE``), never the request's, so the
        rest are ranked and the response holds no NaN.
    """
    out = dict(failed)
    for j in np.flatnonzero(np.isnan(scores)).tolist():
        out.setdefault(int(idx[j]), VLM_NONFINITE)
    return VlmScores(scores, out) if out else scores


#: Multipart fields holding one value each (the request model refuses those not its own).
_SCALAR_FIELDS = frozenset(
    {"temperature", "max_gap_s", "min_similarity", "alternates", "vlm_query", "candidates"}
    | (set(api.SelectRequest.model_fields) - {"positive", "negative", "images", "ids"})
)
#: /v1/pick's multipart fields holding one JSON value per uploaded image -> the item's key.
_PICK_LISTS = {"capture_times": "capture_time", "cameras": "camera"}


@functools.cache
def _ui_bytes(name: str) -> bytes:
    return (resources.files("keeper_serve") / "ui" / name).read_bytes()


def _thumb_response(data: bytes) -> Response:
    # Named by the image's SHA-256 (or corpus id): the bytes behind a URL do not change.
    headers = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
    return Response(data, media_type="image/jpeg", headers=headers)


def _ui_file(path: str) -> Response:
    name, media_type = UI_FILES[path]
    return Response(
        _ui_bytes(name),
        media_type=media_type,
        headers={
            "Content-Security-Policy": UI_CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


@serve.deployment
@serve.ingress(app)
class KeeperIngress:
    def __init__(
        self,
        encoder: DeploymentHandle,
        ranker: DeploymentHandle,
        vlm: DeploymentHandle | None,
        args: KeeperAppArgs,
        search: DeploymentHandle | None = None,
        references: DeploymentHandle | None = None,
        *,
        challenger: DeploymentHandle | None = None,
        online: DeploymentHandle | None = None,
        preprocess: PreprocessConfig | None = None,
    ) -> None:
        if (challenger is None) != (args.ab is None):
            raise ConfigError("the ChallengerRanker handle is given exactly when args.ab is set")
        self.args = args
        self.encoder = encoder
        self.ranker = ranker
        self.challenger = challenger  # None: no A/B, every answer is the champion's (arm null)
        self.vlm = vlm  # None (vlm.source null): /v1/select has no VLM stage and says so
        self.search_index = search  # None: /v1/search answers 404
        self.references = references  # None: /v1/compare and /v1/references answer 404
        self.online = online  # OnlineFigures: /v1/models shows its figures; None: not deployed
        self.token = args.auth.token()  # no usable token and not insecure: the replica fails
        self.open_to: OpenTo | None = None
        if self.token is None:
            self.open_to = open_to_whom(os.environ.get(HAPROXY_FLAG) == "1", _serve_http_host)
            if self.open_to == "loopback":  # else open_to_whom said why it answers no one
                log.warning(
                    "keeper API running OPEN (auth.insecure_local): it answers loopback clients "
                    "only (others get 403). For local development only."
                )
        # With the builder's preprocess config this replica never imports torch or open_clip.
        self.images = api.ImagePreparer(args, preprocess)
        self.aesthetic = (
            AestheticConfig.from_yaml(args.aesthetic_config)
            if args.aesthetic_config
            else AestheticConfig.default()
        )
        self._prompts: dict[str, np.ndarray] = {}
        self._clip_info: dict[str, Any] | None = None
        self._vlm_info: dict[str, Any] | None = None
        # /v1/select by image_id: the corpus's embeddings in this replica (N x D float32).
        self.corpus: Corpus | None = None
        self._corpus_rows: dict[str, int] = {}
        if args.corpus is not None:
            self.corpus = read_corpus(args.corpus)  # a bad table fails the replica, loudly
            if self.corpus.spec != args.clip_model:
                raise ConfigError(
                    f"corpus {args.corpus} was embedded with {self.corpus.spec}, the app serves "
                    f"{args.clip_model}: its text prompts would not be comparable"
                )
            self._corpus_rows = {k: i for i, k in enumerate(self.corpus.image_id)}
            log.info("corpus %s: %d images for /v1/select", args.corpus, len(self.corpus))
        # Per ranker handle (id: the replica's handles live as long as it does), what its last
        # answer said it is (a hint: _rank copes when it is stale).
        self._ranker_tuned: dict[int, bool] = {}
        self._fallback_reason: str | None = None  # the challenger's last "unavailable", logged once
        self.requests = Counter(
            "keeper_requests",
            description="keeper API requests by route and status code",
            tag_keys=_tag_keys("route", "status"),
        )
        self.latency = Histogram(
            "keeper_request_latency_ms",
            description="keeper API latency by route (ms), ingress view",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
            tag_keys=("route",),
        )
        self.images_in = Counter(
            "keeper_images", description="images accepted by route", tag_keys=("route",)
        )
        self.offers_dropped = Counter(
            "keeper_offers_dropped",
            description="offer rows not logged (the offers log refused them: storage failing)",
            tag_keys=("route",),
        )
        self.ab_answers = Counter(
            "keeper_ab_answers",
            description="A/B answers by route, arm and the registered version that ranked",
            tag_keys=_tag_keys("route", "arm", "model"),
        )
        self.ab_fallbacks = Counter(
            "keeper_ab_fallbacks",
            description="challenger-arm requests the champion answered (challenger unavailable)",
            tag_keys=("route",),
        )
        self.review = ReviewRuns(args.review)
        # Corpus thumbnails the review page asked for (a /v1/select answer's): decoded on demand,
        # the last 1,024 kept (~10 KB each).
        self._corpus_thumbs: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._corpus_thumbs_lock = threading.Lock()
        self._review_offered: set[tuple[str, int]] = set()  # (run request_id, group) logged
        self.feedback_log: FeedbackLog | None = None
        self.offer_log: OfferLog | None = None
        self._stop_flusher = threading.Event()
        self._flusher: threading.Thread | None = None
        if args.feedback is not None:
            self._start_feedback(args)

    # ----------------------------------------------------------------------------- feedback

    def _start_feedback(self, args: KeeperAppArgs) -> None:
        """This replica's feedback and offers logs, and the thread that writes them when due."""
        fb = args.feedback
        assert fb is not None
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # RayServeException: built outside a replica (a test)
            replica = uuid.uuid4().hex[:12]
        # Unique per replica (and per start of one): part names never collide across writers.
        writer = f"ingress-{replica}-{uuid.uuid4().hex[:6]}"
        kw: dict[str, Any] = {
            "writer": writer,
            "max_rows": fb.max_rows,
            "max_age_s": fb.max_age_s,
            "max_pending": fb.max_pending,
        }
        # Storage that refuses writes fails the replica now, loudly, rather than every event
        # later (Serve retries the start; the deploy shows the cause).
        probe = storage.join(fb.root, f".write-probe-{writer}")
        try:
            storage.write_bytes(probe, b"keeper feedback write probe\n", durable=False)
            storage.delete(probe)
        except StorageError as e:
            raise ConfigError(f"feedback.root {fb.root} cannot be written: {e}") from e
        self.feedback_log = FeedbackLog(storage.join(fb.root, "events"), **kw)
        if fb.offers:
            self.offer_log = OfferLog(storage.join(fb.root, "offers"), **kw)
        self._flusher = threading.Thread(
            target=self._flush_loop, args=(min(1.0, fb.max_age_s),), name="keeper-feedback",
            daemon=True,
        )  # fmt: skip
        self._flusher.start()
        log.info("feedback: events and offers under %s (writer %s)", fb.root, writer)

    def _logs(self) -> list[PartLog]:
        return [x for x in (self.feedback_log, self.offer_log) if x is not None]

    def _flush_loop(self, every_s: float) -> None:
        while not self._stop_flusher.wait(every_s):
            for part_log in self._logs():
                try:
                    part_log.flush_due()  # a failed write keeps its rows and says so
                except Exception:
                    log.exception("feedback: flushing %s failed", part_log.root)

    def __del__(self) -> None:
        """Serve calls this on a graceful replica shutdown: write what is buffered."""
        if getattr(self, "_flusher", None) is None:  # __init__ failed, or no feedback
            return
        self._stop_flusher.set()
        assert self._flusher is not None
        self._flusher.join(timeout=5)
        for part_log in self._logs():
            try:
                part_log.flush()
                if part_log.pending:
                    log.error(
                        "feedback: %d rows of %s not written at shutdown: %s",
                        part_log.pending, part_log.root, part_log.last_error,
                    )  # fmt: skip
            except Exception:
                log.exception("feedback: final flush of %s failed", part_log.root)

    def _client(self, request: Request) -> str | None:
        return api.client_key(request.headers.get(api.CLIENT_HEADER))

    def _offer(
        self,
        request: Request,
        route: Literal["rank", "pick", "select"],
        request_id: str,
        model: str,
        clip: dict[str, Any],
        arm: Arm | None = None,
    ) -> api.Offer | None:
        """What this answer's offer rows share; None when offers are not logged."""
        if self.offer_log is None:
            return None
        assert self.args.feedback is not None
        return api.Offer(
            request_id=request_id,
            route=route,
            client=self._client(request),
            model=model,
            model_spec=str(clip["spec"]),
            vectors=self.args.feedback.offer_embeddings,
            arm=arm,
        )

    async def _log_offers(self, route: str, build: Callable[[], list[dict[str, Any]]]) -> None:
        """Append an answer's offer rows (on a worker thread: the append may write a part).

        Never fails the answer: rows the log refuses (storage failing past max_pending) are
        counted in ``keeper_offers_dropped`` and logged.
        """
        offer_log = self.offer_log
        if offer_log is None:
            return

        def append() -> int:
            rows = build()
            try:
                offer_log.append_rows(rows)
            except FeedbackBackpressure as e:
                log.warning("offers: %d rows of %s dropped: %s", len(rows), route, e)
                return len(rows)
            except DataError:  # rows that do not fit the log's schema (a bug): all of them
                log.exception("offers: %d rows of %s do not fit the log", len(rows), route)
                return len(rows)
            return 0

        try:
            dropped = await asyncio.to_thread(append)
        except Exception:  # a bug in building the rows: the answer still goes out (counted once)
            log.exception("offers: rows of %s not logged", route)
            dropped = 1
        if dropped:
            self.offers_dropped.inc(dropped, tags={"route": route})

    # ----------------------------------------------------------------------------- plumbing

    def _authorised(self, request: Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        )

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 past the limit before it is all read."""
        limit = self.args.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        # A non-numeric Content-Length never gets here (Serve's HTTP server answers a plain-text
        # 400 first); under any other server the counted read below still enforces the limit.
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "request_too_large", f"{declared} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "request_too_large", f"over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(
        self, request: Request, model: type[Any], image_key: str = "images"
    ) -> tuple[Any, list[ImageRef | bytes]]:
        """JSON or multipart -> (request model, image references in order)."""
        body = await self._body(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("application/json", ""):
            # On a worker thread: validating a large body takes its time, the loop serves on.
            req = await asyncio.to_thread(
                api.parse_json, body, model, self.args.limits.max_json_values
            )
            return req, list(getattr(req, image_key, []) or [])
        if ctype == "multipart/form-data" and model not in _JSON_ONLY:
            return await self._parse_multipart(request, body, model)
        accepted = "JSON" if model in _JSON_ONLY else "JSON or multipart"
        raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype!r}: send {accepted}")

    async def _parse_multipart(
        self, request: Request, body: bytes, model: type[Any]
    ) -> tuple[Any, list[ImageRef | bytes]]:
        limits = self.args.limits

        async def replay() -> dict[str, Any]:  # the body was read (and size-checked) already
            return {"type": "http.request", "body": body, "more_body": False}

        pick = model is api.PickRequest
        max_images = {
            api.PickRequest: limits.max_pick_images,
            api.SelectRequest: limits.max_select_images,
        }.get(model, limits.max_images)
        try:
            form = await Request(request.scope, replay).form(
                max_files=max_images + 1, max_fields=limits.max_texts + 16
            )
        except Exception as e:  # starlette raises MultiPartException / HTTPException
            raise ApiError(400, "bad_multipart", f"cannot parse the multipart body: {e}") from e
        files: list[ImageRef | bytes] = []
        fields: dict[str, Any] = {}
        per_image: dict[str, list[Any]] = {}
        n_values = 0  # JSON values in the text fields, counted as a JSON body's are
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key != "images":
                    raise ApiError(422, "invalid_request", f"file field {key!r}: use 'images'")
                files.append(await value.read())
                continue
            value = api.form_text(value, f"form field {key!r}")
            n_values += api.json_values(value) + 1
            api.check_json_values(n_values, limits.max_json_values)
            if key in ("texts", "positive", "negative", "ids"):
                fields.setdefault(key, []).extend(api.form_list(value, key))
            elif key in _SCALAR_FIELDS and key not in fields:
                fields[key] = value  # the model refuses those that are not its own
            elif pick and key in _PICK_LISTS and key not in per_image:
                per_image[key] = api.form_values(value, key)
            else:
                raise ApiError(422, "invalid_request", f"unknown or repeated form field {key!r}")
        # The model validates the image count (non-empty where required): stand-ins for the
        # uploaded files, which are returned as bytes; /v1/pick's carry each file's time/camera.
        items: list[dict[str, Any]] = [{"b64": ""} for _ in files]
        for key, values in per_image.items():
            if len(values) != len(files):
                raise ApiError(
                    422,
                    "invalid_request",
                    f"form field {key!r}: {len(values)} values for {len(files)} images",
                )
            for item, v in zip(items, values, strict=True):
                item[_PICK_LISTS[key]] = v
        fields["images"] = items
        req = await asyncio.to_thread(api.parse_fields, fields, model)
        return req, files

    async def _prepare(self, refs: list[ImageRef | bytes], *, quality: bool) -> api.Prepared:
        self.images.check_count(len(refs))
        return await asyncio.to_thread(self.images.prepare, refs, quality=quality)

    async def _request_images(
        self, request: Request, model: type[Any], route: str
    ) -> tuple[Any, api.Prepared]:
        """Parse the body, then fetch, check and resize its images (counted per route)."""
        req, refs = await self._parse(request, model)
        self.images.check_texts(req.checked_texts(), req.texts_label)
        prepared = await self._prepare(refs, quality=False)
        self._count_images(len(refs), route)
        return req, prepared

    def _count_images(self, n: int, route: str) -> None:
        if n:  # Ray's Counter.inc raises on 0 (texts-only /v1/embed has no images)
            self.images_in.inc(n, tags={"route": route})

    async def _embed(self, prepared: api.Prepared) -> np.ndarray:
        emb: np.ndarray = await self.encoder.embed_pixels.remote(prepared.pixels)
        return emb

    async def _texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), np.float32)
        emb: np.ndarray = await self.encoder.embed_texts.remote(texts)
        return emb

    async def _prompt_embeddings(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The aesthetic prompt set's embeddings, fetched once per replica."""
        missing = [p for p in prompts if p not in self._prompts]
        if missing:
            for p, e in zip(missing, await self._texts(missing), strict=True):
                self._prompts[p] = e
        return {p: self._prompts[p] for p in prompts}

    def _tuned(self, handle: DeploymentHandle) -> bool:
        return self._ranker_tuned.get(id(handle), False)

    def _arm(self, request: Request, request_id: str) -> Arm | None:
        """The A/B arm for this request (None: no A/B); sticky per ``X-Keeper-Client``."""
        return api.ab_arm(self.args.ab, self._client(request), request_id)

    def _handle(self, arm: Arm | None) -> DeploymentHandle:
        if arm == "challenger":
            assert self.challenger is not None  # args.ab is set exactly when it is bound
            return self.challenger
        return self.ranker

    async def _rank_arm(
        self,
        arm: Arm | None,
        route: str,
        prepared: api.Prepared,
        lengths: list[int],
        embeddings: np.ndarray | None = None,
    ) -> tuple[dict[str, Any], Arm | None]:
        """:meth:`_rank` by the arm's deployment, and the arm that answered.

        A challenger that answers "unavailable" (no alias, a refused load) or fails (its replica
        lost, its queue full, an error while it ranks) hands the request to the champion, which
        answers as the champion: logged, counted in ``keeper_ab_fallbacks``, and the returned arm
        says so, so the offers never credit the challenger with it. An experiment's arm never
        turns its clients' requests into errors the champion would have answered. The encoder's
        embeddings a head challenger needs are taken first: an encoder failure is no
        challenger's, and fails the request as it would without an A/B.
        """
        if arm == "challenger":
            handle = self._handle(arm)
            if embeddings is None and not self._tuned(handle):
                embeddings = await self._embed(prepared)  # the champion reuses them
            try:
                out = await self._rank(handle, prepared, lengths, embeddings)
            except Exception as e:  # not CancelledError (a BaseException): the client went away
                log.debug("A/B: the challenger failed", exc_info=True)
                out = {"unavailable": f"the challenger failed: {brief(e)}"}
            if "unavailable" not in out:
                self._fallback_reason = None  # a later failure is logged again
                return out, arm
            reason = str(out["unavailable"])
            if reason != self._fallback_reason:  # once per distinct cause, not per request
                log.warning("A/B: the challenger cannot answer (%s); the champion answers", reason)
                self._fallback_reason = reason
            self.ab_fallbacks.inc(tags={"route": route})
            arm = "champion"
        return await self._rank(self.ranker, prepared, lengths, embeddings), arm

    def _count_ab(self, route: str, arm: Arm | None, model: str) -> None:
        if arm is not None:
            self.ab_answers.inc(tags={"route": route, "arm": arm, "model": model})

    async def _rank(
        self,
        handle: DeploymentHandle,
        prepared: api.Prepared,
        lengths: list[int],
        embeddings: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """``SeriesRanker.rank`` (of ``handle``: the champion's deployment or the challenger's)
        for series laid end to end, sent what its version scores from.

        A head gets the encoder's embeddings (``embeddings``, else embedded here); a fine-tuned
        ranker gets the pixels, and no embeddings are computed for it. When the version changed
        kind since the last answer, the ranker answers ``{"needs": ...}`` and the call is made
        once more with both: at most two calls, and no request fails over a promotion.
        """
        tuned = self._tuned(handle)
        if embeddings is None and not tuned:
            embeddings = await self._embed(prepared)
        out = await self._call_ranker(
            handle, embeddings, prepared.quality, lengths, prepared.pixels if tuned else None
        )
        if "needs" in out:
            if embeddings is None:
                embeddings = await self._embed(prepared)
            out = await self._call_ranker(
                handle, embeddings, prepared.quality, lengths, prepared.pixels
            )
        if "model" in out:
            self._ranker_tuned[id(handle)] = out["model"].get("kind") == "fine-tuned"
        if "needs" in out:  # both were sent: cannot happen, but never a KeyError on "series"
            return {"unavailable": f"the ranker asked for {out['needs']} it was sent"}
        return out

    async def _call_ranker(
        self,
        handle: DeploymentHandle,
        embeddings: np.ndarray | None,
        quality: np.ndarray | None,
        lengths: list[int],
        pixels: np.ndarray | None,
    ) -> dict[str, Any]:
        args = (embeddings, quality, lengths) + (() if pixels is None else (pixels,))
        out: dict[str, Any] = await handle.rank.remote(*args)
        return out

    async def _clip(self) -> dict[str, Any]:
        """The encoder's model (fixed for the app's lifetime: asked once per replica)."""
        if self._clip_info is None:
            self._clip_info = await self.encoder.info.remote()
        return self._clip_info

    async def _vlm(self) -> dict[str, Any]:
        """The VlmJudge's model, or ``{"status": "disabled"}`` (fixed for the app's lifetime)."""
        if self._vlm_info is None:
            self._vlm_info = (
                await self.vlm.info.remote() if self.vlm is not None else vlm_disabled_info()
            )
        return self._vlm_info

    def _judge(self, view: Callable[[int], np.ndarray], query: str) -> VlmScorer:
        """The cascade's VLM callback (called on a worker thread): the VlmJudge deployment.

        ``view(i)`` gives candidate ``i``'s image for the VLM; one that cannot be read (a corpus
        image gone since it was embedded), or that the model gives no finite score for
        (``vlm_answer``), leaves the cascade as ``vlm_failed`` with its reason.
        A replica lost mid-call (RayActorError: Serve replaces it) is retried once on another;
        a second failure propagates, and the cascade answers it as its ``vlm`` stage failing.
        """
        loop = asyncio.get_running_loop()
        vlm = self.vlm
        assert vlm is not None  # called only when _vlm() said "ready"

        async def call(images: list[np.ndarray]) -> np.ndarray:
            try:
                out: np.ndarray = await vlm.relevance.remote(images, query)
            except RayActorError:
                log.warning("VlmJudge replica lost during /v1/select; retrying once")
                out = await vlm.relevance.remote(images, query)
            return out

        def judge(idx: np.ndarray) -> np.ndarray | VlmScores:
            images, ok, failed = [], np.ones(len(idx), bool), {}
            for j, i in enumerate(idx.tolist()):
                try:
                    images.append(view(i))
                except (KeeperError, ApiError) as e:
                    ok[j], failed[i] = False, str(e)
            scores = np.full(len(idx), np.nan)
            if images:
                scores[ok] = asyncio.run_coroutine_threadsafe(call(images), loop).result()
            return vlm_answer(idx, scores, failed)

        return judge

    async def _rationales(
        self, picks: list[int], view: Callable[[int], np.ndarray], query: str
    ) -> list[dict[str, Any]]:
        """The VLM's words on each pick; a pick whose image cannot be read any more (a corpus
        file changed since it was indexed: with ``beta`` 0 no VLM stage read it) gets ``text``
        null and the reason, as the VLM stage's ``vlm_failed`` does, not an error for the
        whole request."""
        assert self.vlm is not None

        def read(i: int) -> tuple[np.ndarray | None, str | None]:
            try:
                return view(i), None
            except (KeeperError, ApiError) as e:
                return None, str(e)

        shown = await asyncio.to_thread(lambda: [read(i) for i in picks])
        texts = await asyncio.gather(
            *(self.vlm.rationale.remote(v, query) for v, _ in shown if v is not None)
        )
        said = iter(texts)
        return [
            {"index": i, "text": None, "error": why}
            if v is None
            else {"index": i, "text": next(said)}
            for i, (v, why) in zip(picks, shown, strict=True)
        ]

    def _corpus_view(self, rows: np.ndarray) -> Callable[[int], np.ndarray]:
        """Candidate i -> corpus row ``rows[i]``'s image, read and decoded as a request's are."""
        assert self.corpus is not None
        uris, side = self.corpus.image_uri, self.args.vlm.max_image_side
        cap = self.args.limits.max_image_bytes  # as a request's image: never read whole past it

        def view(i: int) -> np.ndarray:
            uri = uris[int(rows[i])]
            try:
                # the server's own table: not a client's URI
                data = storage.read_bytes(uri, max_bytes=cap)
            except StorageError as e:
                log.warning("/v1/select: corpus image %s is unreadable: %s", uri, e.cause)
                raise KeeperError(
                    client_text(f"corpus image {uri} is unreadable: {e.cause}")
                ) from e
            try:
                decoded = self.images.preparation.decode(data)
            except ImageDecodeError as e:  # changed since it was embedded: not the client's image
                log.warning("/v1/select: corpus image %s no longer decodes: %s", uri, e.detail)
                raise KeeperError(
                    client_text(f"corpus image {uri} is unreadable: {e.detail}")
                ) from e
            return api.vlm_view(decoded.image, side)

        return view

    def _corpus_candidates(self, ids: list[str]) -> np.ndarray:
        """Corpus rows for ``ids`` (400 naming an unknown one; 400 when there is no corpus)."""
        if self.corpus is None:
            raise ApiError(400, "no_corpus", "this server has no corpus: send images, not ids")
        limit = self.args.limits.max_select_ids
        if len(ids) > limit:
            raise ApiError(400, "too_many_ids", f"{len(ids)} ids; the limit is {limit}")
        rows = np.empty(len(ids), np.int64)
        for j, k in enumerate(ids):
            if k not in self._corpus_rows:
                raise ApiError(
                    400, "unknown_id", f"ids[{j}] {api.short_id(k)} is not in the corpus", index=j
                )
            rows[j] = self._corpus_rows[k]
        return rows

    # ----------------------------------------------------------------------------- routes

    @app.get("/healthz", include_in_schema=True, summary="liveness (no auth)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=api.ModelsResponse, summary="what is being served")
    async def models(self) -> dict[str, Any]:
        clip, ranker, vlm = await asyncio.gather(
            self._clip(), self.ranker.info.remote(), self._vlm()
        )
        if ranker.get("kind"):
            self._ranker_tuned[id(self.ranker)] = ranker["kind"] == "fine-tuned"
        out = {"clip": clip, "ranker": ranker, "vlm": vlm}
        if self.challenger is not None and self.args.ab is not None:
            challenger = await self.challenger.info.remote()
            if challenger.get("kind"):
                self._ranker_tuned[id(self.challenger)] = challenger["kind"] == "fine-tuned"
            out["challenger"] = challenger
            out["ab"] = {"share": self.args.ab.share, "salt": self.args.ab.salt}
        if self.online is not None:
            out["online"] = await self.online.info.remote()
        return out

    @app.post(
        "/v1/embed",
        response_model=api.EmbedResponse,
        openapi_extra=_json_body(api.EmbedRequest),
        summary="images and/or texts -> L2-normalised embeddings",
    )
    async def embed(self, request: Request) -> dict[str, Any]:
        req, prepared = await self._request_images(request, api.EmbedRequest, "/v1/embed")
        img_emb, txt_emb, clip = await asyncio.gather(
            self._embed(prepared), self._texts(req.texts), self._clip()
        )
        return {
            "model": clip["spec"],
            "random_weights": clip["random_weights"],
            "dim": clip["embed_dim"],
            "image_embeddings": img_emb.tolist(),
            "text_embeddings": txt_emb.tolist() if len(req.texts) else [],
        }

    @app.post(
        "/v1/score/aesthetic",
        response_model=api.AestheticResponse,
        openapi_extra=_json_body(api.AestheticRequest),
        summary="per image: aesthetic total in [0, 1] and one score per dimension",
    )
    async def score_aesthetic(self, request: Request) -> dict[str, Any]:
        _, prepared = await self._request_images(
            request, api.AestheticRequest, "/v1/score/aesthetic"
        )
        emb, prompts, clip = await asyncio.gather(
            self._embed(prepared),
            self._prompt_embeddings(self.aesthetic.all_prompts()),
            self._clip(),
        )
        scores = aesthetic_scores(emb, prompts, self.aesthetic)
        return {
            "model": clip["spec"],
            "random_weights": clip["random_weights"],
            "scores": [
                {
                    "index": i,
                    "total": float(scores.total[i]),
                    "dimensions": {k: float(v[i]) for k, v in scores.dimensions.items()},
                }
                for i in range(len(emb))
            ],
        }

    @app.post(
        "/v1/score/relevance",
        response_model=api.RelevanceResponse,
        openapi_extra=_json_body(api.RelevanceRequest),
        summary="relevance to positive/negative prompts: S, CLIPScore and a prompt softmax",
    )
    async def score_relevance(self, request: Request) -> dict[str, Any]:
        req, prepared = await self._request_images(
            request, api.RelevanceRequest, "/v1/score/relevance"
        )
        prompts = req.checked_texts()
        emb, txt, clip = await asyncio.gather(
            self._embed(prepared), self._texts(prompts), self._clip()
        )
        by_text = dict(zip(prompts, txt, strict=True))
        pos = np.stack([by_text[t] for t in req.positive])
        neg = np.stack([by_text[t] for t in req.negative]) if req.negative else None
        s = relevance_score(emb, pos, neg)
        cs = clip_score(emb, txt)
        sm = prompt_softmax(emb, txt, req.temperature)
        return {
            "model": clip["spec"],
            "random_weights": clip["random_weights"],
            "scores": [
                {
                    "index": i,
                    "S": float(s[i]),
                    "clip_score": {t: float(cs[i, j]) for j, t in enumerate(prompts)},
                    "softmax": {t: float(sm[i, j]) for j, t in enumerate(prompts)},
                }
                for i in range(len(emb))
            ],
        }

    @app.post(
        "/v1/rank",
        response_model=api.RankResponse,
        openapi_extra=_json_body(api.RankRequest),
        summary="series of images -> per-image scores, probabilities and the keeper",
    )
    async def rank(self, request: Request) -> dict[str, Any]:
        request_id = api.new_request_id()
        arm = self._arm(request, request_id)  # a bad X-Keeper-Client fails before any work
        req, _ = await self._parse(request, api.RankRequest, image_key="series")
        limits = self.args.limits
        if len(req.series) > limits.max_series:
            raise ApiError(
                400,
                "too_many_series",
                f"{len(req.series)} series; the limit is {limits.max_series}",
            )
        for i, s in enumerate(req.series):
            if len(s.images) < 2:
                raise ApiError(
                    400,
                    "series_too_short",
                    f"series {i} has {len(s.images)} image(s); a series needs at least 2",
                    index=i,
                )
            if len(s.images) > limits.max_series_len:
                raise ApiError(
                    400,
                    "series_too_long",
                    f"series {i} has {len(s.images)} images; the limit is {limits.max_series_len}",
                    index=i,
                )
        refs: list[ImageRef | bytes] = [im for s in req.series for im in s.images]
        lengths = [len(s.images) for s in req.series]
        prepared = await self._prepare(refs, quality=True)
        self._count_images(len(refs), "/v1/rank")
        want_vectors = self.offer_log is not None and self._offer_vectors()
        embeddings: np.ndarray | None = None
        if want_vectors and not self._tuned(self._handle(arm)):
            embeddings = await self._embed(prepared)  # a head needs them anyway: no extra cost
        if want_vectors and embeddings is None:  # a fine-tuned ranker scores pixels: embed too
            (out, arm), clip, embeddings = await asyncio.gather(
                self._rank_arm(arm, "/v1/rank", prepared, lengths),
                self._clip(),
                self._embed(prepared),
            )
        else:
            (out, arm), clip = await asyncio.gather(
                self._rank_arm(arm, "/v1/rank", prepared, lengths, embeddings), self._clip()
            )
        if "unavailable" in out:
            raise ApiError(503, "model_unavailable", out["unavailable"])
        model = out["model"]
        answer = {
            "request_id": request_id,
            "arm": arm,
            "model": {
                "uri": model["uri"],
                "name": model["name"],
                "version": model["version"],
                "alias": model["alias"],
                "kind": model["kind"],
                "method": model["method"],
                "base_spec": model["base_spec"],
                "clip_model": clip["spec"],
                "random_weights": clip["random_weights"],
            },
            "series": [
                {
                    "id": s.id if s.id is not None else str(i),
                    "keeper_index": int(np.argmax(scores)),
                    "scores": [float(x) for x in scores],
                    "probabilities": [float(x) for x in probs],
                }
                for i, (s, (scores, probs)) in enumerate(
                    zip(req.series, out["series"], strict=True)
                )
            ],
        }
        registered = api.registered_model(model)
        self._count_ab("/v1/rank", arm, registered)
        offer = self._offer(request, "rank", request_id, registered, clip, arm)
        if offer is not None:
            uris = api.ref_uris(refs)
            await self._log_offers(
                "/v1/rank",
                lambda: api.rank_offers(
                    offer, answer, prepared.image_ids, uris, embeddings, prepared.quality
                ),
            )
        return answer

    def _offer_vectors(self) -> bool:
        return self.args.feedback is not None and self.args.feedback.offer_embeddings

    @app.post(
        "/v1/pick",
        response_model=api.PickResponse,
        openapi_extra=_json_body(api.PickRequest),
        summary="a shoot's images -> bursts/scenes, duplicates, and keep / alternate / reject",
    )
    async def pick(self, request: Request) -> dict[str, Any]:
        request_id = api.new_request_id()
        # One arm per request: after a challenger fallback, every group of it is the champion's.
        arm: list[Arm | None] = [self._arm(request, request_id)]
        req, refs = await self._parse(request, api.PickRequest)
        self.images.check_count(len(refs), self.args.limits.max_pick_images)
        given = api.given_captures(req.images)  # a bad time fails before any image is read
        images = await asyncio.to_thread(self.images.prepare_pick, refs, req.images, given)
        self._count_images(len(refs), "/v1/pick")
        emb, clip = await asyncio.gather(self._embed(images), self._clip())
        frame = api.pick_frame(images, emb)
        loop = asyncio.get_running_loop()

        def rank(
            embeddings: np.ndarray, quality: np.ndarray, lengths: list[int],
            pixels: np.ndarray | None = None, /,
        ) -> dict[str, Any]:  # fmt: skip
            # cull runs on a worker thread; the handle is awaited on this replica's event loop.
            assert pixels is not None  # cull_request is given the request's pixels below
            prepared = api.Prepared(pixels, quality)
            call = self._rank_arm(arm[0], "/v1/pick", prepared, lengths, embeddings)
            out, arm[0] = asyncio.run_coroutine_threadsafe(call, loop).result()
            return out

        result, ranker = await asyncio.to_thread(
            api.cull_request,
            frame,
            rank,
            grouping=req.grouping(),
            picking=req.picking(),
            pixels=images.pixels,
        )
        answer = {**api.pick_response(result, ranker, clip, request_id), "arm": arm[0]}
        registered = api.registered_model(ranker.model_dump())
        self._count_ab("/v1/pick", arm[0], registered)
        offer = self._offer(request, "pick", request_id, registered, clip, arm[0])
        if offer is not None:
            uris = api.ref_uris(refs)
            await self._log_offers(
                "/v1/pick",
                lambda: api.pick_offers(offer, answer, images.image_ids, uris, emb, images.quality),
            )
        return answer

    @app.post(
        "/v1/select",
        response_model=api.SelectResponse,
        openapi_extra=_json_body(api.SelectRequest),
        summary="a query and candidates -> the best, by CLIP, heuristics, dedup, reranker, VLM",
    )
    async def select(self, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        request_id = api.new_request_id()
        self._client(request)
        req, refs = await self._parse(request, api.SelectRequest)
        limits = self.args.limits
        self.images.check_count(len(refs), limits.max_select_images)
        prompts = req.checked_texts()
        self.images.check_texts(prompts, req.texts_label)
        clip, vlm_info = await asyncio.gather(self._clip(), self._vlm())
        sel = self.args.select
        config = req.cascade(clip["logit_scale"], sel.top_n, sel.top_k)
        n = len(req.ids) or len(refs)
        try:
            check_limits(
                config,
                n,
                CascadeLimits(
                    max_candidates=max(limits.max_select_images, limits.max_select_ids),
                    # dedup compares each candidate with at most top_n kept ones, head or not
                    max_clip_keep=None,
                    max_top_n=sel.max_top_n,
                    max_top_k=sel.max_top_k,
                ),
            )
        except DataError as e:
            raise ApiError(400, "over_limit", str(e)) from e
        query = req.vlm_query or req.positive[0]
        if vlm_info["status"] == "ready" and (config.beta > 0 or req.rationale):
            # The judge's own rules, before any image is read: refused there, the query would
            # fail this request's VLM stage as a 503, after all the work before it.
            req.check_vlm_query(QueryRules.from_info(vlm_info))
        texts = list(dict.fromkeys([*prompts, NEUTRAL_PROMPT]))
        if req.ids:
            rows = self._corpus_candidates(req.ids)
            assert self.corpus is not None
            emb = self.corpus.embeddings[rows]
            widths, heights = self.corpus.width[rows], self.corpus.height[rows]
            view = self._corpus_view(rows)
            image_ids = [self.corpus.image_id[int(r)] for r in rows]
            uris: list[str | None] = [self.corpus.image_uri[int(r)] for r in rows]
            quality = None  # the corpus holds embeddings, not quality features
            txt, aesthetic_prompts = await asyncio.gather(
                self._texts(texts), self._prompt_embeddings(self.aesthetic.all_prompts())
            )
        else:
            images = await asyncio.to_thread(
                self.images.prepare_select,
                refs,
                self.args.vlm.max_image_side,
                quality=self.offer_log is not None and self._offer_vectors(),
            )
            image_ids, uris, quality = images.image_ids, api.ref_uris(refs), images.quality
            self._count_images(len(refs), "/v1/select")
            widths, heights, views = images.widths, images.heights, images.views
            view = views.__getitem__
            emb, txt, aesthetic_prompts = await asyncio.gather(
                self._embed(api.Prepared(images.pixels, None)),
                self._texts(texts),
                self._prompt_embeddings(self.aesthetic.all_prompts()),
            )
        by_text = dict(zip(texts, txt, strict=True))
        pos = np.stack([by_text[t] for t in req.positive])
        neg = np.stack([by_text[t] for t in dict.fromkeys([*req.negative, NEUTRAL_PROMPT])])
        head = aesthetic_scores(emb, aesthetic_prompts, self.aesthetic).total
        judge = self._judge(view, query) if vlm_info["status"] == "ready" else None
        try:
            result = await asyncio.to_thread(
                run_cascade,
                emb,
                pos,
                neg,
                config=config,
                widths=widths,
                heights=heights,
                head_scores=np.clip(head, 0.0, 1.0),
                vlm=judge,
            )
        except CascadeStageError as e:
            log.error("/v1/select: %s", e, exc_info=e)  # the cause's traceback, remote or not
            raise ApiError(
                503,
                f"{e.stage}_unavailable",
                f"the {e.stage} stage failed: {api.stage_cause(e)}; retry",
            ) from e
        out = result.as_dict(dropped=req.candidates == "all")
        rationales = None
        if req.rationale and judge is not None and self.vlm is not None and result.picks:
            rationales = await self._rationales(result.picks, view, query)
        answer = {
            "request_id": request_id,
            "picks": out["picks"],
            "rationales": rationales,
            "stages": out["stages"],
            "candidates": out["candidates"],
            "cost": {
                "candidates": n,
                "vlm_calls": result.vlm_calls,
                "ms": (time.perf_counter() - t0) * 1000,
            },
            "models": {
                "clip_model": clip["spec"],
                "clip_random_weights": clip["random_weights"],
                "logit_scale": clip["logit_scale"],
                "reranker": "aesthetic (CLIP prompt pairs, keeper_core.scoring.aesthetic_scores)",
                "vlm": {**vlm_info, "query": query} if judge is not None else vlm_info,
            },
        }
        model = SELECT_MODEL + (f"+vlm:{vlm_info.get('source')}" if judge is not None else "")
        offer = self._offer(request, "select", request_id, model, clip)
        if offer is not None:
            await self._log_offers(
                "/v1/select",
                lambda: api.select_offers(offer, query, result, image_ids, uris, emb, quality),
            )
        return answer

    @app.post(
        "/v1/search",
        response_model=api.SearchResponse,
        openapi_extra=_json_body(api.SearchRequest),
        summary="a text, an image or an indexed image_id -> the k nearest indexed images",
    )
    async def search(self, request: Request) -> dict[str, Any]:
        if self.search_index is None:
            raise ApiError(
                404, "search_not_configured", "this server has no search index (args.search)"
            )
        assert self.args.search is not None
        req, _ = await self._parse(request, api.SearchRequest)
        req.check(self.args.search.max_k)
        self.images.check_texts(req.checked_texts(), req.texts_label)
        query: np.ndarray | str
        if req.image_id is not None:
            query = req.image_id
        elif req.text is not None:
            query = (await self._texts([req.text]))[0]
        else:
            prepared = await self._prepare([req.image], quality=False)
            self._count_images(1, "/v1/search")
            query = (await self._embed(prepared))[0]
        try:
            hits, clip = await asyncio.gather(
                self.search_index.search.remote(query, req.k, req.filters), self._clip()
            )
        except UnknownImageId as e:
            raise ApiError(400, "unknown_id", client_message(e)) from e
        return {
            "request_id": req.request_id,
            "model": clip["spec"],
            "index": {"count": hits.count, "updated_at": hits.updated_at},
            "results": [
                {"image_id": i, "image_uri": u, "score": s, "width": w, "height": h}
                for i, u, s, w, h in zip(
                    hits.image_id, hits.image_uri, hits.score, hits.width, hits.height, strict=True
                )
            ],
            "truncated_by_filters": hits.truncated_by_filters,
        }

    def _references(self) -> DeploymentHandle:
        if self.references is None:
            raise ApiError(
                404,
                "references_not_configured",
                "this server has no reference collections (args.references)",
            )
        return self.references

    @app.post(
        "/v1/compare",
        response_model=api.CompareResponse,
        openapi_extra=_json_body(api.CompareRequest),
        summary="an image against a reference collection: its nearest and its percentiles",
    )
    async def compare(self, request: Request) -> dict[str, Any]:
        references = self._references()
        assert self.args.references is not None
        req, _ = await self._parse(request, api.CompareRequest)
        req.check(self.args.references.max_k)
        prepared = await self._prepare([req.image], quality=True)
        self._count_images(1, "/v1/compare")
        emb, prompts, clip = await asyncio.gather(
            self._embed(prepared),
            self._prompt_embeddings(self.aesthetic.all_prompts()),
            self._clip(),
        )
        features = api.quality_features(prepared.quality)
        try:
            got = await references.compare.remote(req.collection, emb[0], features, prompts, req.k)
        # Raised in the replica, these arrive as Ray's copy of the error (its str() is a
        # traceback): the message is the original's.
        except UnknownCollection as e:
            raise ApiError(404, "unknown_collection", client_message(e)) from e
        except CollectionUnusable as e:
            raise ApiError(409, "collection_unusable", client_message(e)) from e
        return {
            "request_id": req.request_id,
            "model": clip["spec"],
            "random_weights": clip["random_weights"],
            "collection": api.collection_info(got.meta),
            **api.comparison_body(got.comparison),
        }

    @app.get(
        "/v1/references",
        response_model=api.ReferencesResponse,
        summary="the reference collections /v1/compare answers for, and those it refused",
    )
    async def list_references(self) -> dict[str, Any]:
        listed = await self._references().list.remote()
        return {
            "collections": [
                {
                    **api.collection_info(c["meta"]),
                    "created_at": c["meta"].created_at,
                    "failed": c["meta"].failed,
                    "error": c["error"],
                }
                for c in listed["collections"]
            ],
            "refused": listed["refused"],
        }

    @app.post(
        "/v1/feedback",
        response_model=api.FeedbackResponse,
        openapi_extra=_json_body(api.FeedbackRequest),
        summary="people's decisions on images of earlier answers, appended to the feedback log",
    )
    async def feedback(self, request: Request) -> Any:
        feedback_log = self.feedback_log
        if feedback_log is None:  # before the body is read: nothing here would keep it
            raise ApiError(
                404, "feedback_not_configured", "this server has no feedback log (args.feedback)"
            )
        assert self.args.feedback is not None
        client = self._client(request)
        req, _ = await self._parse(request, api.FeedbackRequest)
        limit = self.args.feedback.max_events
        if len(req.events) > limit:
            raise ApiError(
                400, "too_many_events", f"{len(req.events)} events; the limit is {limit}"
            )
        events = [
            e if e.client is not None or client is None else e.model_copy(update={"client": client})
            for e in req.events
        ]
        try:
            receipt = await asyncio.to_thread(feedback_log.append, events, sync=req.sync)
        except FeedbackBackpressure as e:
            return error_response(503, "feedback_backpressure", str(e), retry_after=5)
        return {
            "accepted": receipt.accepted,
            "durable": receipt.durable,
            "pending": receipt.pending,
            "writer": feedback_log.writer,
            "last_error": receipt.last_error,
        }

    # ----------------------------------------------------------------------------- review

    @app.get("/ui", include_in_schema=False)
    async def ui_page(self) -> Response:
        return _ui_file("/ui")

    @app.get("/ui/app.js", include_in_schema=False)
    async def ui_script(self) -> Response:
        return _ui_file("/ui/app.js")

    @app.get("/ui/app.css", include_in_schema=False)
    async def ui_style(self) -> Response:
        return _ui_file("/ui/app.css")

    def _review_run(self, name: str) -> ReviewRun:
        try:
            return self.review.get(name)
        except UnknownRun as e:
            raise ApiError(404, "unknown_run", str(e)) from e
        except RunUnusable as e:
            log.warning("review run %r is unusable: %s", name, e)
            raise ApiError(409, "run_unusable", client_text(f"review run {name!r}: {e}")) from e

    @app.get(
        "/v1/review/runs",
        response_model=api.ReviewRunsResponse,
        summary="the keeper pick runs the review page shows (args.review.runs)",
    )
    async def review_runs(self) -> dict[str, Any]:
        return {
            "runs": await asyncio.to_thread(self.review.listing),
            "select": {
                "corpus_images": len(self.corpus) if self.corpus is not None else None,
                "search": self.search_index is not None,
            },
        }

    @app.get(
        "/v1/review/runs/{name}/groups",
        response_model=api.ReviewPage,
        summary="one page of a run's groups, in time order, with their images",
    )
    async def review_groups(
        self, request: Request, name: str, offset: int = 0, limit: int = 50
    ) -> dict[str, Any]:
        run = await asyncio.to_thread(self._review_run, name)  # 404 first: no such run
        assert self.args.review is not None  # a run was found
        most = self.args.review.max_page_groups
        if offset < 0 or not 1 <= limit <= most:
            raise ApiError(
                400,
                "invalid_page",
                f"offset {offset}, limit {limit}: offset >= 0, 1 <= limit <= {most}",
            )
        if offset > len(run.groups):
            raise ApiError(
                400, "invalid_page", f"offset {offset} is past the run's {len(run.groups)} groups"
            )
        page = run.page(offset, limit)
        # What the page showed, as offers (once per group and replica): decisions join them.
        shown = range(offset, min(offset + limit, len(run.groups)))
        new = [g for g in shown if (run.request_id, g) not in self._review_offered]
        if new and self.offer_log is not None:
            self._review_offered.update((run.request_id, g) for g in new)
            client = self._client(request)
            vectors = self.args.feedback is not None and self.args.feedback.offer_embeddings

            def rows() -> list[dict[str, Any]]:
                embeddings = None
                if vectors:
                    try:
                        embeddings = run.embeddings()
                    except KeeperError as e:  # logged; feedback-export counts them no_embedding
                        log.warning("review %s: offers without embeddings: %s", name, e)
                return run.offer_rows(new, client, embeddings)

            await self._log_offers("review", rows)
        return page

    @app.get(
        "/v1/review/runs/{name}/thumbs/{image_id}",
        summary="an image's contact-sheet thumbnail (JPEG)",
        response_class=Response,
    )
    async def review_thumb(self, name: str, image_id: str) -> Response:
        run = await asyncio.to_thread(self._review_run, name)
        try:
            uri = run.thumbnail_uri(image_id)
            data = await asyncio.to_thread(storage.read_bytes, uri, max_bytes=MAX_THUMB_BYTES)
        except UnknownImage as e:
            raise ApiError(404, "unknown_image", str(e)) from e
        except StorageError as e:
            log.warning("review run %s: thumbnail %s is unreadable: %s", name, e.uri, e.cause)
            raise ApiError(
                404, "unknown_image", client_text(f"thumbnail of {image_id} unreadable: {e}")
            ) from e
        return _thumb_response(data)

    def _corpus_thumbnail(self, image_id: str) -> bytes:
        """The thumbnail of a corpus image (``args.corpus``), decoded from its file on demand."""
        with self._corpus_thumbs_lock:
            if image_id in self._corpus_thumbs:
                self._corpus_thumbs.move_to_end(image_id)
                return self._corpus_thumbs[image_id]
        if self.corpus is None:
            raise ApiError(404, "no_corpus", "this server has no corpus (args.corpus)")
        row = self._corpus_rows.get(image_id)
        if row is None:
            raise ApiError(404, "unknown_image", f"the corpus has no image {image_id[:80]!r}")
        uri = self.corpus.image_uri[row]
        limits = self.args.limits
        try:
            # Capped: an image over the limit is refused without being read whole first.
            data = storage.read_bytes(uri, max_bytes=limits.max_image_bytes)
            image = decode_image(
                data,
                limits=limits.decode_limits(),
                source=uri,
                draft_size=(THUMB_SIZE, THUMB_SIZE),
            )
        except storage.TooLargeError as e:
            size = f"{e.size} bytes" if e.size is not None else f"more than {e.max_bytes} bytes"
            raise ApiError(
                413,
                "image_too_large",
                client_text(f"{uri}: {size} > {limits.max_image_bytes}"),
            ) from e
        except KeeperError as e:  # gone or changed since it was embedded
            log.warning("corpus thumbnail: image %s is unreadable: %s", uri, e)
            raise ApiError(
                404, "unknown_image", client_text(f"corpus image {uri} is unreadable: {e}")
            ) from e
        thumb = thumbnail_jpeg(image)
        with self._corpus_thumbs_lock:
            self._corpus_thumbs[image_id] = thumb
            while len(self._corpus_thumbs) > 1024:
                self._corpus_thumbs.popitem(last=False)
        return thumb

    @app.get(
        "/v1/review/corpus/thumbs/{image_id}",
        summary="a corpus image's thumbnail (JPEG), for a /v1/select answer by ids",
        response_class=Response,
    )
    async def review_corpus_thumb(self, image_id: str) -> Response:
        return _thumb_response(await asyncio.to_thread(self._corpus_thumbnail, image_id))
