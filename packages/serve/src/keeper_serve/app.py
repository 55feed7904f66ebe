"""``build_app(args)``: keeper's Serve application (import path ``keeper_serve.app:build_app``).

Three deployments always: ``KeeperIngress`` (FastAPI) composes ``ClipEncoder`` and
``SeriesRanker`` through deployment handles. Bound only when the args ask for them: ``VlmJudge``
(``/v1/select``'s VLM stage) when ``vlm.source`` is set (without it ``/v1/select`` ranks by CLIP
and the reranker and says so, and no idle replica holds torch for nothing), ``SearchIndex``
(``/v1/search``) only when ``args.search`` is set,
``ReferenceCollections`` (``/v1/compare``, ``/v1/references``) only when ``args.references``
is, ``ChallengerRanker`` (a second ``SeriesRanker``, following ``ab.model_uri``) only when
``args.ab`` is, and ``OnlineFigures`` (the per-version online figures as Prometheus gauges, one
replica) only when ``args.feedback`` is with ``online_poll_s`` > 0. No replica counts, batch-independent concurrency or resources
here: those come from the Serve config's ``deployments`` section (clusters/serve/*.yaml), or
from :func:`bind` for local runs.
"""

from collections.abc import Mapping
from typing import Any

from ray.serve import Application

from keeper_core.models import preprocess_config
from keeper_serve.config import (
    CHALLENGER,
    ENCODER,
    INGRESS,
    ONLINE,
    RANKER,
    REFERENCES,
    SEARCH,
    VLM,
    KeeperAppArgs,
)
from keeper_serve.encoder import ClipEncoder
from keeper_serve.ingress import KeeperIngress
from keeper_serve.online import OnlineFigures
from keeper_serve.ranker import SeriesRanker
from keeper_serve.references import ReferenceCollections
from keeper_serve.search import SearchIndex
from keeper_serve.vlm import VlmJudge

DEPLOYMENTS = (INGRESS, ENCODER, RANKER)
#: Bound only when the app's args ask for them (``args.vlm.source``, ``args.search``,
#: ``args.references``, ``args.ab``, ``args.feedback`` with ``online_poll_s`` > 0).
OPTIONAL_DEPLOYMENTS = (VLM, SEARCH, REFERENCES, CHALLENGER, ONLINE)


def bind(
    args: KeeperAppArgs, options: Mapping[str, Mapping[str, Any]] | None = None
) -> Application:
    """The bound application, with per-deployment options (``Deployment.options`` keywords).

    Raises:
        ValueError: options for a deployment that is not one of ``DEPLOYMENTS`` (or of
            ``OPTIONAL_DEPLOYMENTS`` the args bind).
    """
    opts = {k: dict(v) for k, v in (options or {}).items()}
    unknown = set(opts) - set(DEPLOYMENTS) - set(OPTIONAL_DEPLOYMENTS)
    if unknown:
        raise ValueError(
            f"no deployments named {sorted(unknown)}; keeper has {DEPLOYMENTS + OPTIONAL_DEPLOYMENTS}"
        )
    # An optional deployment's options without the args that bind it: Serve would never use them.
    unbound = {
        VLM: ("args.vlm.source", args.vlm.source),
        SEARCH: ("args.search", args.search),
        REFERENCES: ("args.references", args.references),
        CHALLENGER: ("args.ab", args.ab),
    }
    for name, (field, value) in unbound.items():
        if name in opts and value is None:
            raise ValueError(f"options for {name}, but {field} is null: it is not deployed")
    online = args.feedback is not None and args.feedback.online_poll_s > 0
    if ONLINE in opts and not online:
        raise ValueError(
            f"options for {ONLINE}, but args.feedback is null or its online_poll_s 0: it is not "
            "deployed"
        )
    if ONLINE in opts and (
        opts[ONLINE].get("num_replicas", 1) != 1 or "autoscaling_config" in opts[ONLINE]
    ):
        raise ValueError(f"{ONLINE} runs one replica: more would export the same figures twice")
    encoder = ClipEncoder.options(name=ENCODER, **opts.get(ENCODER, {})).bind(
        args.clip_model, args.encoder
    )
    ranker = SeriesRanker.options(name=RANKER, **opts.get(RANKER, {})).bind(
        args.ranker, args.clip_model, args.tracking_uri, args.data_dir
    )
    # The A/B's challenger: the same deployment class, its own replicas and alias.
    challenger = (
        SeriesRanker.options(name=CHALLENGER, **opts.get(CHALLENGER, {})).bind(
            args.ab.ranker_args(args.ranker), args.clip_model, args.tracking_uri, args.data_dir
        )
        if args.ab is not None
        else None
    )
    vlm = (
        VlmJudge.options(name=VLM, **opts.get(VLM, {})).bind(args.vlm)
        if args.vlm.source is not None
        else None
    )
    search = (
        SearchIndex.options(name=SEARCH, **opts.get(SEARCH, {})).bind(args.search, args.clip_model)
        if args.search is not None
        else None
    )
    # The ingress scores the query with args.aesthetic_config: members are scored with it too.
    references = (
        ReferenceCollections.options(name=REFERENCES, **opts.get(REFERENCES, {})).bind(
            args.references, args.clip_model, args.aesthetic_config
        )
        if args.references is not None
        else None
    )
    figures = (
        OnlineFigures.options(name=ONLINE, **opts.get(ONLINE, {})).bind(args.feedback)
        if online
        else None
    )
    ingress: Application = KeeperIngress.options(name=INGRESS, **opts.get(INGRESS, {})).bind(
        encoder,
        ranker,
        vlm,
        args,
        search,
        references,
        challenger=challenger,
        online=figures,
        # read from open_clip's configs here, once: the ingress replicas import no torch
        preprocess=preprocess_config(args.clip_model),
    )
    return ingress


# No ``from __future__ import annotations`` in this module: Serve validates a config's ``args``
# into the builder's parameter type only when the annotation is a class, not a string.
def build_app(args: KeeperAppArgs) -> Application:
    """The Serve config's builder: Serve validates ``args`` into KeeperAppArgs first."""
    if not isinstance(args, KeeperAppArgs):  # a caller outside Serve passing a plain dict
        args = KeeperAppArgs.model_validate(args)
    return bind(args)
