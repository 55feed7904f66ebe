"""Turn people's decisions on keeper's answers into training data for ``keeper train-head``.

    keeper feedback-export --feedback s3://bucket/feedback --output s3://bucket/fb-2026-06
    keeper train-head --embeddings s3://bucket/fb-2026-06 --series s3://bucket/fb-2026-06/series.csv \
        --register keeper-ranker
    python -m keeper_train.jobs.feedback_export feedback=ROOT output=OUT since=2026-06-01T00:00:00Z

A feedback root holds ``events/`` (``keeper_core.feedback.FeedbackLog``: what people did) and
``offers/`` (``OfferLog``: what the server offered, with each image's embedding and quality
features). The standing decisions (``decisions``: latest wins, ``undone`` takes one back) are
joined to the offers on ``(request_id, image_id)`` and grouped by ``(request_id, group_id,
client)``: what one person decided about one group of one answer.

- A group with exactly one ``picked-as-keeper`` becomes one series: every offered image of the
  group with an embedding is a row, the keeper ``is_best``.
- With ``pairs``, a group without a keeper gives accepted-vs-rejected pairs, each a series of two
  with the accepted image best; pairs in a group are disjoint and at most ``max_pairs_per_group``.

A series manifest names each image once (``keeper_core.series.validate_series``), so an image
already in an exported series is not exported again: keeper series go first, then pairs, newest
decision first. Every standing decision ends in exactly one count: used, or skipped with a reason
(``SKIP_REASONS``); ``_SUMMARY.json`` holds them and they add up to ``decisions``.

OUTPUT is laid out as ``keeper embed`` writes it, so train-head, evaluate and promote read it
unchanged: ``embeddings/part-00000.parquet`` (``embed.embedding_table``'s schema),
``_KEEPER_TABLE.json``, plus ``series.csv`` and ``_SUMMARY.json``. An image keeps the URI it was
offered under (``s3://``, or an absolute corpus path); one offered as bytes is named
``OUTPUT/images/<image_id>``, a name for the join only: no pixels are written there, so only an
export whose ``finetune_ready`` is true can feed ``keeper finetune``; ``pixels`` makes one, by
exporting only images offered at a URI (the others skipped as ``no_image_uri``).

A table holds one model spec: offers of two specs are refused unless ``model_spec`` picks one
(the others counted as ``other_model_spec``); export each spec to its own OUTPUT.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from keeper_core import run_lock, storage
from keeper_core.embedding import check_same_spec
from keeper_core.errors import DataError
from keeper_core.feedback import decisions, read_feedback, read_offers
from keeper_core.models import TABLE_META, embed_dim, spec_field
from keeper_core.quality import FEATURE_NAMES
from keeper_train.config import TimeWindow, job_main
from keeper_train.table import list_parts

EMBEDDINGS, PART = "embeddings", "part-00000.parquet"
SERIES, SUMMARY, IMAGES = "series.csv", "_SUMMARY.json", "images"
KEEPER, ACCEPTED, REJECTED = "picked-as-keeper", "accepted", "rejected"

Route = Literal["rank", "pick", "select", "review"]
ROUTE_NAMES: tuple[Route, ...] = ("rank", "pick", "select", "review")  # keeper_core.feedback.ROUTES

#: Why a standing decision is not in the output; every one is counted under exactly one reason.
SKIP_REASONS: dict[str, str] = {
    "outside_window": "decided before since, or at or after until",
    "no_offers": "its request_id has no offers logged (unknown, or the server logged no offers)",
    "not_offered": "the request's offers do not include the image",
    "other_route": "offered by a route not in routes",
    "other_model_spec": "embedded with another model spec than model_spec",
    "no_embedding": "its offer has no usable embedding (none, a non-finite value, or not the "
    "model spec's width) or no quality features",
    "no_image_uri": "with pixels: its image was offered as bytes, not at a URI",
    "several_keepers": "its group has more than one picked-as-keeper",
    "keeper_no_embedding": "its group's keeper has no usable embedding or no quality features",
    "keeper_no_image_uri": "with pixels: its group's keeper was offered as bytes",
    "group_too_small": "its group has fewer than min_group_size usable images",
    "unpaired": "no keeper in its group and no partner of the other verdict left (or pairs off)",
    "image_in_other_series": "the image is already in an exported series (a manifest names an "
    "image once)",
}


class FeedbackExportConfig(TimeWindow):
    """Everything the export takes. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    feedback: str = Field(description="feedback root: ROOT/events and ROOT/offers (or s3://)")
    output: str = Field(description="folder or s3:// prefix to write (keeper embed's layout)")
    pairs: bool = Field(True, description="accepted-vs-rejected pairs from groups with no keeper")
    since: datetime | None = Field(None, description="only decisions made at or after (ISO)")
    until: datetime | None = Field(None, description="only decisions made before (ISO)")
    min_group_size: int = Field(2, ge=2, description="usable images a keeper series needs")
    max_pairs_per_group: int = Field(
        8, ge=1, description="so one big group does not dominate the pairs"
    )
    routes: list[Route] = Field(default_factory=lambda: list(ROUTE_NAMES), min_length=1)
    model_spec: str | None = Field(None, description="export only offers of this spec")
    pixels: bool = Field(
        False,
        description="only images offered at a URI, so keeper finetune can read every row",
    )

    @field_validator("model_spec")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        # As embed's model: an unknown arch or tag, or no ARCH[:WEIGHTS], fails here, before the
        # logs are read (else every offer would be counted other_model_spec); canonical, so
        # ViT-B-32 and ViT-B-32:random compare as the offers' specs do. Loads no weights.
        return None if v is None else spec_field(v)


class FeedbackExportSummary(BaseModel):
    """What an export read and wrote; ``decisions == used + sum(skipped.values())``."""

    feedback: str
    output: str
    model_spec: str
    events: int = Field(description="events read (each event_id once)")
    decisions: int = Field(description="standing decisions (after undo)")
    used: int = Field(description="decisions whose image is a row of an exported series")
    skipped: dict[str, int] = Field(description="decisions not used, by reason (SKIP_REASONS)")
    series: int = Field(description="keeper series")
    pairs: int = Field(description="two-image accepted-vs-rejected series")
    images: int = Field(description="rows of the table and of series.csv (one per image)")
    undecided_images: int = Field(description="rows of keeper series nobody decided on")
    offers_left_out: int = Field(
        description="offered images of exported keeper groups left out: no embedding or "
        "quality features (or, with pixels, no URI)"
    )
    images_without_uri: int = Field(description="rows named OUTPUT/images/<image_id> (no pixels)")
    finetune_ready: bool = Field(description="every row has the URI its pixels were offered at")


# --------------------------------------------------------------------------------------------
# Plan: decisions joined to offers, grouped


@dataclass
class _Decision:
    row: dict[str, Any]
    offer: dict[str, Any] | None = None
    status: str = ""  # "used" or a SKIP_REASONS key, once decided


@dataclass
class _Group:
    request_id: str
    group_id: str | None
    client: str | None
    members: list[dict[str, Any]]  # the group's offers, one per image, in offer order
    decided: list[_Decision] = field(default_factory=list)

    @property
    def latest(self) -> datetime:
        return max(d.row["received_at"] for d in self.decided)


@dataclass
class _Series:
    series_id: str
    kind: Literal["keeper", "pair"]
    group: _Group
    rows: list[dict[str, Any]]  # offers; rows[0] is the best
    verdicts: dict[str, str]  # image_id -> the decision on it


def _has_features(offer: dict[str, Any]) -> bool:
    emb, q = offer["embedding"], offer["quality"]
    return (
        emb is not None
        and len(emb) > 0
        and q is not None
        and len(q) == len(FEATURE_NAMES)
        and all(v is not None and math.isfinite(v) for v in [*emb, *q])
    )


@dataclass
class _Names:
    """What each image is called in the table and series.csv, and whether it may be a row."""

    uri: dict[str, str]  # image_id -> URI (absolute, same_key'd)
    at_uri: set[str]  # image_ids offered at a URI (the others are named under OUTPUT/images)
    pixels: bool
    dim: int | None = None  # the spec's embedding width (None: no spec, no offers)

    def of(self, offer: dict[str, Any]) -> str:
        return self.uri[offer["image_id"]]

    def why_not(self, offer: dict[str, Any]) -> str | None:
        """None when the offer may be a row, else its skip reason."""
        if not _has_features(offer) or (
            self.dim is not None and len(offer["embedding"]) != self.dim
        ):
            return "no_embedding"
        if self.pixels and offer["image_id"] not in self.at_uri:
            return "no_image_uri"
        return None


def _join(
    cfg: FeedbackExportConfig, dec: list[dict[str, Any]], offers: list[dict[str, Any]]
) -> tuple[list[_Decision], list[_Group], str]:
    """Each decision with its offer (or its skip reason), the groups, and the one model spec."""
    by_request: dict[str, dict[tuple[str | None, str], dict[str, Any]]] = {}
    for o in offers:  # an answer logged twice (a retried flush) counts once per image and group
        by_request.setdefault(o["request_id"], {}).setdefault((o["group_id"], o["image_id"]), o)
    out = [_Decision(r) for r in dec]
    for d in out:
        at, req = d.row["received_at"], d.row["request_id"]
        if (cfg.since and at < cfg.since) or (cfg.until and at >= cfg.until):
            d.status = "outside_window"
        elif req not in by_request:
            d.status = "no_offers"
        else:
            d.offer = _offer_of(by_request[req], d.row)
            if d.offer is None:
                d.status = "not_offered"
            elif d.offer["route"] not in cfg.routes:
                d.status = "other_route"
    live = [d for d in out if not d.status]
    spec = _one_spec(cfg, live)
    for d in live:
        if d.offer is not None and _spec(d.offer) not in (spec, None):
            d.status = "other_model_spec"
    groups: dict[tuple[str, str | None, str | None], _Group] = {}
    for d in out:
        if d.status:
            continue
        assert d.offer is not None
        req, gid, client = d.row["request_id"], d.offer["group_id"], d.row["client"]
        if (req, gid, client) not in groups:
            members = [
                o for (g, _), o in by_request[req].items() if g == gid and _spec(o) in (spec, None)
            ]
            groups[(req, gid, client)] = _Group(req, gid, client, members)
        groups[(req, gid, client)].decided.append(d)
    return out, list(groups.values()), spec


def _offer_of(
    offers: dict[tuple[str | None, str], dict[str, Any]], row: dict[str, Any]
) -> dict[str, Any] | None:
    """The offer a decision is about: the one in the group it names, else the image's first."""
    if row["group_id"] is not None and (row["group_id"], row["image_id"]) in offers:
        return offers[(row["group_id"], row["image_id"])]
    return next((o for (_, i), o in offers.items() if i == row["image_id"]), None)


@functools.cache
def _canonical(spec: str) -> str:
    return check_same_spec(spec)


def _spec(offer: dict[str, Any]) -> str | None:
    """The offer's model spec, canonical; None for an offer logged without one (no embedding)."""
    return None if offer["model_spec"] is None else _canonical(str(offer["model_spec"]))


def _one_spec(cfg: FeedbackExportConfig, live: list[_Decision]) -> str:
    specs = Counter(s for d in live if d.offer is not None and (s := _spec(d.offer)))
    if cfg.model_spec is not None:
        return _canonical(cfg.model_spec)
    if not specs:
        return ""
    if len(specs) > 1:
        raise DataError(
            f"the decisions' offers were embedded with {len(specs)} model specs "
            f"({dict(specs.most_common())}); a table holds one: set model_spec=SPEC and export "
            "each spec to its own output",
            source=cfg.feedback,
        )
    return next(iter(specs))


# --------------------------------------------------------------------------------------------
# Execute: groups -> series and pairs, each image in one series


def _names(offers: list[dict[str, Any]], cfg: FeedbackExportConfig) -> _Names:
    """Each image's one URI, used on both sides of train-head's join (``storage.same_key``)."""
    base = storage.join(storage.same_key(cfg.output), IMAGES)
    uri: dict[str, str] = {}
    for o in offers:  # the first offer that came with a URI names the image
        if o["image_uri"] and o["image_id"] not in uri:
            uri[o["image_id"]] = storage.same_key(o["image_uri"])
    at_uri = set(uri)
    for o in offers:
        if o["image_id"] not in uri:
            uri[o["image_id"]] = storage.join(base, _safe_name(o["image_id"]))
    return _Names(uri, at_uri, cfg.pixels)


def _safe_name(image_id: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9._-]{1,128}", image_id) and image_id not in (".", ".."):
        return image_id
    return hashlib.sha256(image_id.encode()).hexdigest()  # an id that is no safe file name


def build_series(cfg: FeedbackExportConfig, groups: list[_Group], names: _Names) -> list[_Series]:
    """Keeper groups first, then pairs; newest decision first; sets each decision's status."""
    used: set[str] = set()  # URIs already in an exported series
    out: list[_Series] = []
    keeper_groups = [g for g in groups if any(d.row["action"] == KEEPER for d in g.decided)]
    pair_groups = [g for g in groups if g not in keeper_groups]
    for g in sorted(keeper_groups, key=lambda g: g.latest, reverse=True):
        s = _keeper_series(cfg, g, names, used)
        if s is not None:
            out.append(s)
    for g in sorted(pair_groups, key=lambda g: g.latest, reverse=True):
        out.extend(_pairs(cfg, g, names, used))
    return out


def _sid(g: _Group) -> str:
    return f"{g.request_id}/{g.group_id or '-'}/{g.client or '-'}"


def _keeper_series(
    cfg: FeedbackExportConfig, g: _Group, names: _Names, used: set[str]
) -> _Series | None:
    keepers = [d for d in g.decided if d.row["action"] == KEEPER]
    if len(keepers) > 1:
        _skip_all(g, "several_keepers")
        return None
    keeper = keepers[0]
    assert keeper.offer is not None
    why = names.why_not(keeper.offer)
    if why is not None:
        _skip_all(g, f"keeper_{why}")
        return None
    if names.of(keeper.offer) in used:
        _skip_all(g, "image_in_other_series")
        return None
    rows, seen = [keeper.offer], {names.of(keeper.offer)}
    for o in g.members:
        u = names.of(o)
        if names.why_not(o) is None and u not in used and u not in seen:
            rows.append(o)
            seen.add(u)
    if len(rows) < cfg.min_group_size:
        _skip_all(g, "group_too_small")
        return None
    in_series = {o["image_id"] for o in rows}
    for d in g.decided:
        assert d.offer is not None
        if d.offer["image_id"] in in_series:
            d.status = "used"
        else:
            d.status = names.why_not(d.offer) or "image_in_other_series"
    used.update(seen)
    verdicts = {str(d.row["image_id"]): str(d.row["action"]) for d in g.decided}
    return _Series(_sid(g), "keeper", g, rows, verdicts)


def _skip_all(g: _Group, reason: str) -> None:
    for d in g.decided:
        d.status = reason


def _pairs(cfg: FeedbackExportConfig, g: _Group, names: _Names, used: set[str]) -> list[_Series]:
    sides: dict[str, list[_Decision]] = {ACCEPTED: [], REJECTED: []}
    for d in sorted(g.decided, key=lambda d: d.row["received_at"]):
        assert d.offer is not None
        why = names.why_not(d.offer)
        if why is not None:
            d.status = why
        elif names.of(d.offer) in used:
            d.status = "image_in_other_series"
        elif cfg.pairs:
            sides[str(d.row["action"])].append(d)
    out: list[_Series] = []
    taken: set[str] = set()
    # Disjoint pairs: a manifest names an image once, so an image is in one pair at most.
    for a, r in zip(sides[ACCEPTED], sides[REJECTED], strict=False):
        assert a.offer is not None
        assert r.offer is not None
        ua, ur = names.of(a.offer), names.of(r.offer)
        if len(out) == cfg.max_pairs_per_group or ua == ur or {ua, ur} & taken:
            continue
        a.status = r.status = "used"
        taken |= {ua, ur}
        verdicts = {str(a.row["image_id"]): ACCEPTED, str(r.row["image_id"]): REJECTED}
        out.append(_Series(f"{_sid(g)}/pair-{len(out)}", "pair", g, [a.offer, r.offer], verdicts))
    for d in g.decided:
        d.status = d.status or "unpaired"
    used.update(taken)
    return out


# --------------------------------------------------------------------------------------------
# Write: the table, the manifest, the summary


def _check_output(output: str) -> None:
    """Refuse an OUTPUT whose table holds parts this job did not write (a keeper embed table)."""
    others = [p for p in list_parts(storage.join(output, EMBEDDINGS)) if not p.endswith("/" + PART)]
    if others:
        raise DataError(
            f"{storage.join(output, EMBEDDINGS)} holds {len(others)} parts feedback-export did "
            f"not write (e.g. {others[0]}): choose another output",
            source=output,
        )


def write_output(
    cfg: FeedbackExportConfig, series: list[_Series], names: _Names, spec: str
) -> None:
    """The table, ``_KEEPER_TABLE.json`` and ``series.csv`` under ``cfg.output``."""
    import pandas as pd

    from keeper_train.jobs.embed import embedding_table

    rows = [(s, o) for s in series for o in s.rows]
    emb = [np.asarray(o["embedding"], dtype=np.float32) for _, o in rows]
    dims = {len(e) for e in emb}
    if len(dims) != 1:
        raise DataError(f"embeddings of widths {sorted(dims)} under one spec {spec!r}")
    q = np.asarray([o["quality"] for _, o in rows], dtype=np.float64)
    batch: dict[str, np.ndarray] = {
        "image_id": np.asarray([o["image_id"] for _, o in rows], dtype=object),
        "image_uri": np.asarray([names.of(o) for _, o in rows], dtype=object),
        "embedding": np.stack(emb),
    }
    for i, name in enumerate(FEATURE_NAMES):
        col = q[:, i]
        batch[name] = np.rint(col).astype(np.int64) if name in ("width", "height") else col
    table = embedding_table(batch, spec)
    storage.write_parquet(table, storage.join(cfg.output, EMBEDDINGS, PART))
    meta = {
        "model_spec": spec,
        "embed_dim": dims.pop(),
        "format": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": f"keeper feedback-export {cfg.feedback}",
    }
    storage.write_bytes(storage.join(cfg.output, TABLE_META), json.dumps(meta, indent=2).encode())
    manifest = pd.DataFrame(
        {
            "series_id": [s.series_id for s, _ in rows],
            "image_uri": batch["image_uri"],
            "is_best": [int(o is s.rows[0]) for s, o in rows],
            "kind": [s.kind for s, _ in rows],
            "request_id": [s.group.request_id for s, _ in rows],
            "group_id": [s.group.group_id or "" for s, _ in rows],
            "client": [s.group.client or "" for s, _ in rows],
            "decision": [s.verdicts.get(o["image_id"], "") for s, o in rows],
        }
    )
    storage.write_bytes(storage.join(cfg.output, SERIES), manifest.to_csv(index=False).encode())


@dataclass
class _Plan:
    events: int
    decisions: list[_Decision]
    groups: list[_Group]
    spec: str
    names: _Names


def plan(cfg: FeedbackExportConfig) -> _Plan:
    """Read the logs; each decision joined to its offer (or skipped), grouped, and named."""
    events = read_feedback(storage.join(cfg.feedback, "events"))
    dec = decisions(events)
    offers = read_offers(storage.join(cfg.feedback, "offers"))
    # Only the answers someone decided on become Python rows: most offers get no decision.
    decided = pc.is_in(offers.column("request_id"), value_set=pc.unique(dec.column("request_id")))
    rows = offers.filter(decided).to_pylist()
    joined, groups, spec = _join(cfg, dec.to_pylist(), rows)
    names = _names(rows, cfg)
    # The spec's own width: an offer of another (a corrupt or foreign log row) is skipped as
    # no_embedding, as a non-finite one is, instead of failing the whole export.
    names.dim = embed_dim(spec) if spec else None  # "": no decision reached an offer
    return _Plan(events.num_rows, joined, groups, spec, names)


def summarise(cfg: FeedbackExportConfig, p: _Plan, series: list[_Series]) -> FeedbackExportSummary:
    """The counts; every decision is used or skipped for one reason.

    Raises:
        DataError: no series at all (naming why the decisions were skipped).
    """
    skipped = Counter(d.status for d in p.decisions if d.status != "used")
    assert all(d.status for d in p.decisions)
    assert set(skipped) <= set(SKIP_REASONS)
    if not series:
        raise DataError(
            f"nothing to export: none of {len(p.decisions)} decisions forms a series "
            f"(skipped: {dict(skipped.most_common())})",
            source=cfg.feedback,
        )
    rows = [(s, o) for s in series for o in s.rows]
    no_uri = sum(o["image_id"] not in p.names.at_uri for _, o in rows)
    keeper_groups = [s.group for s in series if s.kind == "keeper"]
    return FeedbackExportSummary(
        feedback=cfg.feedback,
        output=cfg.output,
        model_spec=p.spec,
        events=p.events,
        decisions=len(p.decisions),
        used=sum(d.status == "used" for d in p.decisions),
        skipped={k: skipped.get(k, 0) for k in SKIP_REASONS},
        series=len(keeper_groups),
        pairs=len(series) - len(keeper_groups),
        images=len(rows),
        undecided_images=sum(
            s.kind == "keeper" and o["image_id"] not in s.verdicts for s, o in rows
        ),
        offers_left_out=sum(
            p.names.why_not(o) is not None for g in keeper_groups for o in g.members
        ),
        images_without_uri=no_uri,
        finetune_ready=no_uri == 0,
    )


def run(cfg: FeedbackExportConfig) -> FeedbackExportSummary:
    """``keeper feedback-export``, holding the output's lock (``run_lock``: one run per output at a time;
    ``BusyError`` where another holds it)."""
    with run_lock.holding(cfg.output, job="keeper feedback-export"):
        return _run(cfg)


def _run(cfg: FeedbackExportConfig) -> FeedbackExportSummary:
    """Plan, build the series and pairs, write OUTPUT (``_SUMMARY.json`` last); the summary.

    Raises:
        StorageError: ROOT/events or ROOT/offers cannot be read, or OUTPUT cannot be written.
        DataError: mixed model specs (without model_spec), nothing to export, or an OUTPUT
            that holds another table.
    """
    p = plan(cfg)
    series = build_series(cfg, p.groups, p.names)
    summary = summarise(cfg, p, series)
    _check_output(cfg.output)
    write_output(cfg, series, p.names, p.spec)
    storage.write_bytes(
        storage.join(cfg.output, SUMMARY), summary.model_dump_json(indent=2).encode()
    )
    return summary


def describe(s: FeedbackExportSummary) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in s.skipped.items() if v) or "none"
    finetune = (
        "every row has a URI"
        if s.finetune_ready
        else f"not this output: {s.images_without_uri} images were offered as bytes (pixels=true)"
    )
    return (
        f"keeper feedback-export: {s.events} events, {s.decisions} decisions -> {s.series} "
        f"series + {s.pairs} pairs, {s.images} images of {s.model_spec} -> {s.output}\n"
        f"  used {s.used}; skipped: {skipped}\n"
        f"  keeper finetune: {finetune}\n"
        f"  keeper train-head --embeddings {s.output} "
        f"--series {storage.join(s.output, SERIES)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        job="feedback_export",
        description="Turn people's decisions (a feedback root) into series for keeper train-head",
        model=FeedbackExportConfig,
        run=run,
        describe=describe,
        exit_code=lambda _: 0,
        example="feedback=ROOT output=OUT since=2026-06-01T00:00:00Z",
    )


if __name__ == "__main__":
    sys.exit(main())
