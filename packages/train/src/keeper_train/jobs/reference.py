"""Add images to a reference collection: embed them with keeper embed, then publish reference.json.

    keeper reference add portfolio --input s3://bucket/ana/ --root s3://bucket/references \
        [--model ViT-B-32:laion2b_s34b_b79k] [--description "Ana's 2026 portfolio"]
    python -m keeper_train.jobs.reference --config FILE root=... name=... input=...  # the same
    keeper reference list --root ROOT [--json]       # no Ray (keeper_train.commands)
    keeper reference remove NAME --root ROOT

A collection is ``ROOT/NAME/``: keeper embed's table of its images and ``reference.json``
(``keeper_core.references``), written last. An add runs the embed job (Ray Data, resumable) on
INPUT into ``ROOT/NAME/``; a second add with another folder embeds only the images not there yet
and appends the folder to ``sources``. A collection holds one model spec: an add with another is
refused before any work.

Failures: embed's verdict (failed share of the table above ``embed.max_failure_fraction``, or
images lost) exits 3. For a new collection reference.json is then not written, so the folder is no
collection until an add succeeds (running it again resumes). For an existing collection it is
rewritten, counts and all: the new rows are in its table already and every server loading it
reads them, so its reference.json must say so.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keeper_core import storage
from keeper_core.errors import DataError
from keeper_core.models import TABLE_META, embed_dim, spec_field
from keeper_core.references import (
    ReferenceMeta,
    check_name,
    collection_uri,
    list_collections,
    meta_uri,
    now,
    read_meta,
    remove_collection,
    write_meta,
)
from keeper_train.config import job_main

if TYPE_CHECKING:  # the embed job imports torch (seconds): only an add needs it
    from keeper_train.jobs.embed import EmbedConfig, EmbedSummary

EXIT_EMBED_FAILED = 3  # keeper embed's EXIT_TOO_MANY_FAILURES (test_reference_cli checks)
#: The spec of a new collection when none is given (EmbedConfig's default: tests, offline demo).
DEFAULT_MODEL = "keeper-tiny:random"
# Fields of EmbedConfig this job sets itself: never in ``embed``.
_OWN = ("input", "output", "model", "ray_address")


class ReferenceAddConfig(BaseModel):
    """Everything keeper reference add takes. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="folder or s3:// prefix holding the collections")
    name: str = Field(description="the collection: 1-64 letters, digits, '.', '_', '-'")
    input: str = Field(description="folder, s3:// prefix or manifest of images (as keeper embed)")
    model: str | None = Field(
        None,
        description="ModelSpec (default: the collection's own spec if it exists, else "
        f"{DEFAULT_MODEL})",
    )
    description: str | None = Field(None, description="replaces the stored one when given")
    ray_address: str | None = None
    embed: dict[str, Any] = Field(
        default_factory=dict,
        description="other EmbedConfig fields (batch_size, concurrency, max_failure_fraction, ...)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)  # a DataError is a ValueError: pydantic names the field

    @field_validator("root", "input")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @field_validator("model")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        return None if v is None else spec_field(v)  # an unknown arch or tag fails here

    @field_validator("embed")
    @classmethod
    def _embed_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        own = sorted(set(v) & set(_OWN))
        if own:
            raise ValueError(f"{own} are set by the add itself (root/name, model, ray_address)")
        from keeper_train.jobs.embed import EmbedConfig

        try:  # a typo fails here, before a cluster is touched
            EmbedConfig(input="-", output="-", **v)
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ValueError(bad) from None
        return v

    def embed_config(self, model: str) -> EmbedConfig:
        from keeper_train.jobs.embed import EmbedConfig

        return EmbedConfig(
            input=self.input,
            output=collection_uri(self.root, self.name),
            model=model,
            ray_address=self.ray_address,
            **self.embed,
        )


@dataclass(frozen=True)
class ReferenceAdd:
    """An add's outcome: the collection as published (None: not published) and embed's summary."""

    meta: ReferenceMeta | None
    embedded: EmbedSummary
    uri: str
    new: bool

    @property
    def ok(self) -> bool:
        return self.embedded.status == "ok"


def resolve_model(cfg: ReferenceAddConfig, existing: ReferenceMeta | None) -> str:
    """The spec this add embeds with.

    Raises:
        DataError: the collection, or an unfinished add in its folder, holds another spec.
    """
    if existing is not None:
        if cfg.model is not None and cfg.model != existing.model_spec:
            raise DataError(
                f"collection {cfg.name!r} holds {existing.model_spec} embeddings; this add "
                f"uses {cfg.model}. A collection holds one model: add with --model "
                f"{existing.model_spec}, or into another name",
                source=collection_uri(cfg.root, cfg.name),
            )
        return existing.model_spec
    spec = cfg.model or DEFAULT_MODEL
    table_meta = storage.join(collection_uri(cfg.root, cfg.name), TABLE_META)
    if storage.exists(table_meta):  # a new or failed add left a table and no reference.json
        held = json.loads(storage.read_bytes(table_meta)).get("model_spec")
        if held != spec:
            raise DataError(
                f"{collection_uri(cfg.root, cfg.name)} holds an unfinished add of {held} "
                f"embeddings; this add uses {spec}: finish it with --model {held}, or "
                f"`keeper reference remove {cfg.name}` first",
                source=table_meta,
            )
    return spec


def run(cfg: ReferenceAddConfig) -> ReferenceAdd:
    """Embed ``cfg.input`` into the collection and publish its reference.json.

    Raises:
        DataError: another model spec than the collection's (before any work); a malformed
            reference.json there; a new collection of which no image could be embedded.
        ConfigError, StorageError, ModelLoadError: from the embed job.
    """
    from keeper_train.jobs import embed

    existing = read_meta(cfg.root, cfg.name)
    spec = resolve_model(cfg, existing)
    uri = collection_uri(cfg.root, cfg.name)
    summary = embed.run(cfg.embed_config(spec))
    images, failed = summary.table["embedded"], summary.table["failed"]
    if existing is None and summary.status != "ok":
        return ReferenceAdd(None, summary, uri, new=True)
    if existing is None and images == 0:
        raise DataError(
            f"no image of {cfg.input} could be embedded ({failed} failed): collection "
            f"{cfg.name!r} not created",
            source=uri,
        )
    source = storage.same_key(cfg.input)  # a local folder recorded absolute
    sources = list(existing.sources) if existing else []
    stamp = now()
    meta = ReferenceMeta(
        name=cfg.name,
        model_spec=spec,
        embed_dim=embed_dim(spec),
        images=images,
        failed=failed,
        sources=sources if source in sources else [*sources, source],
        description=cfg.description
        if cfg.description is not None
        else (existing.description if existing else ""),
        created_at=existing.created_at if existing else stamp,
        updated_at=stamp,
    )
    write_meta(cfg.root, meta)
    return ReferenceAdd(meta, summary, uri, new=existing is None)


def describe(r: ReferenceAdd) -> str:
    from keeper_train.jobs import embed

    c = r.embedded.counts
    lines = [embed.format_summary(r.embedded)]
    if r.meta is None:
        lines.append(
            f"keeper reference add: NOT published: {r.uri} is no collection (the embed "
            "failed its limits; fix the inputs or raise --max-failure-fraction "
            "(embed.max_failure_fraction), then run again: it resumes)"
        )
        return "\n".join(lines)
    m = r.meta
    verb = "created" if r.new else "updated"
    lines.append(
        f"keeper reference add: {verb} {m.name!r}: {m.images} images ({c.embedded} added), "
        f"{m.failed} failed, {m.model_spec} -> {r.uri}"
    )
    if not r.ok:
        lines.append(
            "  the embed failed its limits (exit 3): reference.json counts what the table holds"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# keeper reference list / remove: no Ray, no model


@dataclass(frozen=True)
class Listed:
    """A collection under a root: its reference.json, or why it could not be read."""

    name: str
    meta: ReferenceMeta | None
    error: str | None = None


def list_references(root: str) -> list[Listed]:
    """Every collection under ``root``, sorted by name; an unreadable one is listed with why.

    Raises:
        StorageError: the root could not be listed.
    """
    out = []
    for name in list_collections(root):
        try:
            meta = read_meta(root, name)
        except DataError as e:
            out.append(Listed(name, None, str(e)))
            continue
        if meta is not None:  # None: removed since the listing
            out.append(Listed(name, meta))
    return out


def format_list(root: str, rows: Sequence[Listed]) -> str:
    """A table: name, model spec, images, failed, last update (one line a collection)."""
    if not rows:
        return f"no reference collections under {root}"
    head = ("NAME", "MODEL", "IMAGES", "FAILED", "UPDATED")
    cells = [
        (r.name, r.meta.model_spec, str(r.meta.images), str(r.meta.failed), r.meta.updated_at)
        for r in rows
        if r.meta is not None
    ]
    w = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    lines = [
        f"{c[0]:<{w[0]}}  {c[1]:<{w[1]}}  {c[2]:>{w[2]}}  {c[3]:>{w[3]}}  {c[4]}"
        for c in [head, *cells]
    ]
    lines += [f"{r.name:<{w[0]}}  UNREADABLE: {r.error}" for r in rows if r.meta is None]
    return "\n".join(lines)


def list_json(rows: Sequence[Listed]) -> str:
    """The listing as a JSON list: each reference.json, or ``{"name", "error"}``."""
    items = [
        r.meta.model_dump() if r.meta is not None else {"name": r.name, "error": r.error}
        for r in rows
    ]
    return json.dumps(items, indent=2)


def remove(root: str, name: str) -> int:
    """Delete collection ``name`` (or what an unfinished add left there); returns files removed.

    Raises:
        DataError: a bad name, or nothing by that name under ``root``.
        StorageError: a delete failed (run the remove again to finish it).
    """
    published = storage.exists(meta_uri(root, name))
    if not published and not storage.exists(collection_uri(root, name)):
        raise DataError(f"no reference collection {name!r} under {root}")
    return remove_collection(root, name) + published  # remove_collection counts the table


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        job="reference",
        description="Add images to a reference collection (embed, then publish reference.json)",
        model=ReferenceAddConfig,
        run=run,
        describe=describe,
        exit_code=lambda r: 0 if r.ok else EXIT_EMBED_FAILED,
        example="root=refs/ name=portfolio input=photos/ embed.batch_size=32",
    )


if __name__ == "__main__":
    sys.exit(main())
