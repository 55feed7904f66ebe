"""Select the images that match a text query from an embedding table: the cascade, in batch.

    keeper select --table keeper-demo/embeddings --queries queries.yaml --output keeper-demo/select
    python -m keeper_train.jobs.select --config packages/train/configs/select.yaml \
        table=s3://bucket/emb/vit-b-32/ output=s3://bucket/select/ vlm.source=s3://models/llava

The last line is the ``ray job submit ... --`` and KubeRay RayJob entrypoint. Each query runs
``keeper_core.cascade.run_cascade`` (what ``POST /v1/select`` runs) over every row of a table
written by ``keeper embed``: cheap CLIP stages on all rows, the VLM judge only on the few left.

    plan      read the table (one model spec, refused when mixed), load the queries, embed their
              prompts with that spec's CLIP (the negatives get NEUTRAL_PROMPT appended), take
              ``logit_scale`` from the model unless the config sets it, and run stages 1-4
              (clip, heuristics, dedup, rerank) of every query in the driver: the survivors
    judge     ONE Ray Data actor-pool pass over the survivors of every query (the VLM is loaded
              once per actor, not once per query): read each image, decode it safely, score
              its relevance to its query, and make its thumbnail. An image that cannot be read
              or decoded, or that the VLM gives no finite score for (non-finite logits), is
              answered "failed, because ..." and the rest go on
    finish    per query, run the cascade again with a judge that answers from that pass (stages
              1-4 are pure functions of the same inputs: the same survivors, in milliseconds),
              so stages 5-6 and every score come from the one core implementation; write
              OUTPUT/<query>/scored.parquet and index.html, OUTPUT/failed.csv and
              OUTPUT/_SUMMARY.json

Why plan everything before judging: a VLM costs ~640 ViT-B-32 embeddings per image and minutes
to load; one pass over all queries' survivors fills the actors' batches and loads it once.
Running stages 1-4 twice costs a matmul and a bounded dedup per query, nothing beside the VLM.

Counts always add up: per query, rows = picked + dropped, and per stage in = kept + dropped (the
summary says ``lost`` when not, and the job exits 1). Every output is written atomically and
rebuilt whole on every run; an OUTPUT holding the results of a query this run does not have
(``<name>/scored.parquet`` or ``<name>/index.html`` of an earlier run with other queries) is
refused before any work, as they would sit beside this run's as if part of it. Exit codes:
0 done, 1 rows lost (a bug), 2 bad config or input (a missing or mixed table, a bad query file,
an OUTPUT holding other queries' results, a VLM that cannot load, a VLM stage failure).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from keeper_core import htmltext, run_lock, storage
from keeper_core.cascade import (
    NEUTRAL_PROMPT,
    CascadeConfig,
    CascadeResult,
    CascadeStageError,
    QueryRules,
    VlmScores,
    run_cascade,
)
from keeper_core.corpus import Corpus, read_corpus
from keeper_core.errors import (
    ConfigError,
    DataError,
    ImageDecodeError,
    KeeperError,
    ModelLoadError,
    StorageError,
)
from keeper_core.images import decode_image, read_image_bytes
from keeper_core.models import ModelSpec
from keeper_core.report import thumbnail_data_uri
from keeper_core.vlm import VlmConfig, source_kind
from keeper_core.vlm import actor_memory as vlm_actor_memory
from keeper_core.vlm import query_rules as vlm_query_rules
from keeper_train.jobs import embed
from keeper_train.table import ErrorRows

log = logging.getLogger("keeper.select")

SUMMARY, FAILED, SCORED, INDEX = "_SUMMARY.json", "failed.csv", "scored.parquet", "index.html"
EXIT_LOST = 1
#: Columns read from the embedding table (keeper embed writes all of them).
#: A query's name is its output folder: one path segment, never hidden, never ``_SUMMARY``.
QUERY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
#: The run's own files in OUTPUT (and a query's in OUTPUT/<name>/): no query may be named one,
#: in any case (a case-blind disk): OUTPUT/failed.csv/ would stop failed.csv being written.
RESERVED_NAMES = (SUMMARY, run_lock.LOCK_NAME, FAILED, SCORED, INDEX)
THUMB_PX = 160
#: How an image's error starts when the judge gave it no finite score.
NON_FINITE = "judge: non-finite logits"
_STAGES_BEFORE_VLM = ("clip", "heuristics", "dedup", "rerank")
_EXAMPLES = 3  # file names shown per (stage, reason) row of the dropped summary
#: index.html's bounds. Its thumbnails are inline data URIs (~5 KB each, every one decoded when
#: the page opens: loading='lazy' does nothing for them), and top_n / top_k are not bounded here
#: as the server bounds them per request (a batch may judge thousands), so the page bounds itself:
#: a card with a thumbnail for each of the first PAGE_PICKS picks; in the top-N table thumbnails
#: on those of the first PAGE_ROW_THUMBS rows with no card (a card's row links to it), text up
#: to PAGE_ROWS rows, and a count of the rest (every row is in scored.parquet).
PAGE_PICKS = 200
PAGE_ROW_THUMBS = 200
PAGE_ROWS = 1_000


class Query(BaseModel):
    """One query: what is wanted, what is not, and what the VLM is asked.

    Attributes:
        name: names its output folder (letters, digits, ``._-``; unique in a run).
        positive: prompts describing what is wanted (CLIP takes the best match).
        negative: prompts describing what is not wanted; ``NEUTRAL_PROMPT`` is always added.
        vlm_query: the ``{query}`` of the VLM's relevance question; default the first positive.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(default_factory=list)
    vlm_query: str | None = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not re.fullmatch(QUERY_NAME, v):
            raise ValueError(
                f"{v!r}: it names the output folder: 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if v.lower() in {n.lower() for n in RESERVED_NAMES}:
            raise ValueError(
                f"{v!r}: it names the output folder, and the run writes a file of that name "
                f"(in any case): choose a name other than {', '.join(RESERVED_NAMES)}"
            )
        return v

    @field_validator("vlm_query")
    @classmethod
    def _vlm_query(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("empty: give the VLM's question, or leave vlm_query out")
        if not storage.valid_utf8(v):
            raise ValueError("not valid UTF-8")
        return v.strip()  # what the VLM is asked, and what its length limit counts

    @field_validator("positive", "negative")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        bad = [i for i, p in enumerate(v) if not p.strip()]
        if bad:
            raise ValueError(f"empty prompt(s) at position(s) {bad}")
        bad = [i for i, p in enumerate(v) if not storage.valid_utf8(p)]
        if bad:  # a lone surrogate from a JSON/YAML file: no page or table could hold it
            raise ValueError(f"prompt(s) at position(s) {bad} are not valid UTF-8")
        return [p.strip() for p in v]

    @property
    def negatives(self) -> list[str]:
        """The negatives the cascade is given: the query's own, then the neutral anchor."""
        return list(dict.fromkeys([*self.negative, NEUTRAL_PROMPT]))

    @property
    def vlm_text(self) -> str:
        return (self.vlm_query or self.positive[0]).strip()


class SelectJobConfig(BaseModel):
    """Everything ``keeper select`` takes. Unknown keys are errors (a typo fails before any work)."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="keeper embed's output folder or s3:// prefix")
    queries: Annotated[
        Annotated[list[Query], Tag("inline")] | Annotated[str, Tag("file")],
        Discriminator(lambda v: "file" if isinstance(v, str) else "inline"),
    ] = Field(
        description="the queries, or a YAML/JSON file (local or s3://) holding a list of them "
        "(or a mapping with a 'queries' list)"
    )
    output: str = Field(description="folder or s3:// prefix: OUTPUT/<query>/, _SUMMARY.json")
    cascade: CascadeConfig = Field(
        default_factory=CascadeConfig,
        description="the cascade's knobs; logit_scale defaults to the CLIP model's own",
    )
    vlm: VlmConfig | None = Field(
        None, description="the VLM judge (VlmConfig fields); source null: no VLM stage"
    )
    batch_size: int = Field(16, ge=1, description="survivors per VLM actor batch")
    concurrency: int = Field(1, ge=1, description="VLM actors")
    num_gpus_per_vlm: float = Field(0.0, ge=0, description="GPUs per VLM actor")
    num_cpus_per_vlm: float = Field(1.0, gt=0, description="CPUs per VLM actor")
    vlm_threads: int | None = Field(
        None, ge=1, description="torch threads per VLM actor (default: Ray's, its CPUs)"
    )
    decode_side: int | None = Field(
        672,
        ge=16,
        description="JPEGs more than twice this on both sides are decoded downscaled (DCT "
        "draft, never below it): 2x Llava-1.5's 336 px input, and LLaVA-NeXT's 672 px tiles. "
        "null: full decode",
    )
    ray_address: str | None = None

    @field_validator("vlm", mode="before")
    @classmethod
    def _vlm_off(cls, v: Any) -> Any:
        if isinstance(v, dict) and "source" in v and v["source"] is None:
            # No VLM stage; the other keys are still checked, so a typo fails here too.
            try:
                VlmConfig.model_validate({**v, "source": "unused"})
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
            return None
        return v

    @field_validator("table", "output")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return storage.utf8_path(v.strip().rstrip("/"))  # the summary and pages name them

    @model_validator(mode="after")
    def _consistent(self) -> SelectJobConfig:
        if isinstance(self.queries, list):
            check_queries(self.queries)
        elif not self.queries.strip():
            raise ValueError("queries: give a list of queries or a file holding them")
        if self.cascade.gamma > 0:
            raise ValueError(
                "cascade.gamma weighs a learned head's score; keeper select takes no head: "
                "leave gamma at 0"
            )
        if self.vlm is not None:
            if self.vlm.device == "cuda" and self.num_gpus_per_vlm == 0:
                raise ValueError("vlm.device=cuda needs num_gpus_per_vlm > 0 (Ray hides GPUs)")
            if self.vlm.device == "cpu" and self.num_gpus_per_vlm > 0:
                raise ValueError(
                    "num_gpus_per_vlm > 0 reserves GPUs the judge would not use: vlm.device=cuda"
                )
        return self

    @property
    def vlm_active(self) -> bool:
        """Whether stage 5 runs: a judge is configured and its score has weight."""
        return self.vlm is not None and self.cascade.beta > 0


def check_queries(queries: Sequence[Query]) -> None:
    """At least one query, and names that are distinct folders (also on case-blind disks).

    Raises:
        ValueError: none, or two names that differ only in case.
    """
    if not queries:
        raise ValueError("queries: at least one query is needed")
    seen: dict[str, str] = {}
    for q in queries:
        if q.name.lower() in seen:
            raise ValueError(f"queries: names {seen[q.name.lower()]!r} and {q.name!r} collide")
        seen[q.name.lower()] = q.name


def load_queries(source: list[Query] | str) -> list[Query]:
    """The queries of a config: given inline, or read from a YAML/JSON file (local or s3://).

    Raises:
        ConfigError: the file cannot be read or parsed, or a query is invalid (named).
    """
    if isinstance(source, list):
        return source
    try:
        data = yaml.safe_load(storage.read_bytes(source))  # JSON is YAML
    except (StorageError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read queries {source}: {e}") from e
    if isinstance(data, dict) and set(data) == {"queries"}:
        data = data["queries"]
    if not isinstance(data, list):
        raise ConfigError(
            f"queries {source}: expected a list of queries, got {type(data).__name__}"
        )
    queries: list[Query] = []
    bad: list[tuple[int, ValidationError]] = []
    for i, q in enumerate(data):
        try:
            queries.append(Query.model_validate(q))
        except ValidationError as e:
            bad.append((i, e))
    if bad:
        first, error = bad[0]
        others = len(bad) - 1
        more = f" (and {others} more invalid quer{'y' if others == 1 else 'ies'})" if others else ""
        raise ConfigError(
            f"queries {source}: queries[{first}]: {_query_errors(error)}{more}"
        ) from None
    try:
        check_queries(queries)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return queries


def _query_errors(e: ValidationError) -> str:
    """Every error of one query in one line, unknown keys first (a typo explains a missing key):
    ``positiv: unknown field; positive: Field required``."""
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
    parts = []
    for err in errors:
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# plan: the table, the queries' prompts, stages 1-4


@dataclass
class Candidates(Corpus):
    """Every row of the embedding table (keeper_core.corpus), and what keeper embed could not read."""

    table_errors: int = 0  # images keeper embed could not read: never candidates


def load_candidates(table: str) -> Candidates:
    """The rows of keeper embed's table at ``table`` (``table/embeddings``).

    Raises:
        DataError: as ``keeper_core.corpus.read_corpus``.
    """
    corpus = read_corpus(table)
    errors = ErrorRows.read(storage.join(table, embed.ERRORS)).rows()
    return Candidates(**vars(corpus), table_errors=int(errors["image_uri"].nunique()))


@dataclass
class PreparedQuery:
    """A query with its prompt embeddings, and the indices stages 1-4 left for the VLM."""

    query: Query
    positive: np.ndarray  # (P, D)
    negative: np.ndarray  # (Q, D): the query's negatives + NEUTRAL_PROMPT
    survivors: np.ndarray  # int64, in rerank order


@dataclass
class Plan:
    """What the job will do, decided in the driver before any image is read."""

    cfg: SelectJobConfig
    candidates: Candidates
    queries: list[PreparedQuery]
    cascade: CascadeConfig  # logit_scale resolved
    logit_scale_source: Literal["model", "config"]
    seconds: dict[str, float]


def check_vlm_source(vlm: VlmConfig) -> None:
    """Cheap checks of the VLM source in the driver, before Ray starts (the actors load it).

    Raises:
        ModelLoadError: not a folder, s3:// prefix or hub id; a local folder that does not exist.
    """
    kind = source_kind(vlm.source)
    if kind == "local":
        folder = Path(vlm.source.removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(vlm.source, f"no such directory: {folder}")


def prompt_embeddings(
    spec: str, queries: Sequence[Query], cascade: CascadeConfig
) -> tuple[dict[str, np.ndarray], CascadeConfig, Literal["model", "config"]]:
    """Embed every prompt with the table's CLIP model; resolve ``logit_scale``.

    The text tower runs on the driver's CPU: a few prompts, and the driver's GPU (if any) is the
    actors'. ``cascade.logit_scale`` is the model's ``logit_scale.exp()`` unless set; a
    SigLIP-style model's logit bias cancels in the cascade's two-way relevance (keeper_core.cascade).

    Raises:
        ModelLoadError: the spec does not load.
    """
    from keeper_core.embedding import ClipEmbedder

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # open_clip narrates every load at INFO
    try:
        embedder = ClipEmbedder(spec, device="cpu")
    finally:
        root.setLevel(level)
    texts = list(dict.fromkeys(t for q in queries for t in (*q.positive, *q.negatives)))
    table = embedder.prompt_embeddings(texts)
    if "logit_scale" in cascade.model_fields_set:
        return table, cascade, "config"
    value = embedder.logit_scale  # ModelLoadError without one: cascade.logit_scale sets it
    return table, CascadeConfig(**{**cascade.model_dump(), "logit_scale": value}), "model"


def cascade_for(
    c: Candidates, q: PreparedQuery, cascade: CascadeConfig, vlm: Any = None
) -> CascadeResult:
    """``run_cascade`` of one query over every candidate (with ``vlm``, stages 5-6 too)."""
    return run_cascade(
        c.embeddings,
        q.positive,
        q.negative,
        config=cascade,
        widths=c.width,
        heights=c.height,
        vlm=vlm,
    )


def survivors(result: CascadeResult) -> np.ndarray:
    """The candidates a cascade run without a judge sent to stage 5, in rerank order."""
    fate = result.candidates.dropped_at
    idx = np.array([i for i, d in enumerate(fate) if d not in _STAGES_BEFORE_VLM], np.int64)
    score = result.candidates.rerank
    return idx[np.lexsort((idx, -score[idx]))] if len(idx) else idx


def refuse_other_queries(output: str, queries: Sequence[Query]) -> None:
    """Refuse an OUTPUT that holds the results of queries this run does not have.

    A re-run with other queries (one renamed, one removed) would leave the old ones'
    ``<name>/scored.parquet`` and ``<name>/index.html`` beside this run's, read as if they
    were part of it; nothing of this run's would tell them apart but ``_SUMMARY.json``.

    Raises:
        ConfigError: such files are there (named).
    """
    if not storage.is_s3(output) and not Path(output.removeprefix("file://")).is_dir():
        return
    prefix = output.rstrip("/") + "/"
    ours = {q.name for q in queries}
    stale = []
    for f in storage.list_files(output, suffixes=[f"/{SCORED}", f"/{INDEX}"]):
        folder, _, name = f.removeprefix(prefix).partition("/")
        if name in (SCORED, INDEX) and re.fullmatch(QUERY_NAME, folder) and folder not in ours:
            stale.append(f)
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise ConfigError(
            f"output: {output} holds the results of queries this run does not have ({shown}); "
            "they would sit beside this run's as if part of it. Select into an empty output, "
            "or remove them first"
        )


def check_vlm_queries(queries: Sequence[Query], rules: QueryRules) -> None:
    """Refuse the queries whose VLM question the judge would refuse, by its own rules.

    Raises:
        ConfigError: naming each such query and why.
    """
    bad = [(q, why) for q in queries if (why := rules.problem(q.vlm_text)) is not None]
    if bad:
        said = "; ".join(
            f"query {q.name!r}: the VLM question {_clip_text(q.vlm_text)!r} is refused: {why}"
            for q, why in bad
        )
        raise ConfigError(f"{said} (the VLM judge's rules; set vlm_query to another question)")


def _clip_text(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plan(cfg: SelectJobConfig) -> Plan:
    """Read the table and queries, embed the prompts, and run stages 1-4 of every query.

    Raises:
        DataError: a missing or mixed table. ConfigError: bad queries, a VLM question the judge
            would refuse (by its rules, read from the checkpoint's processor). ModelLoadError:
            the CLIP spec, the VLM source or its processor.
    """
    t0 = time.perf_counter()
    queries = load_queries(cfg.queries)
    refuse_other_queries(cfg.output, queries)
    if cfg.vlm_active and cfg.vlm is not None:
        check_vlm_source(cfg.vlm)
        check_vlm_queries(queries, vlm_query_rules(cfg.vlm))
    cands = load_candidates(cfg.table)
    seconds = {"load_table": time.perf_counter() - t0}
    t0 = time.perf_counter()
    table, cascade, source = prompt_embeddings(cands.spec, queries, cfg.cascade)
    seconds["embed_prompts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = []
    for q in queries:
        pq = PreparedQuery(
            q,
            np.stack([table[t] for t in q.positive]),
            np.stack([table[t] for t in q.negatives]),
            np.zeros(0, np.int64),
        )
        pq.survivors = survivors(cascade_for(cands, pq, cascade))
        prepared.append(pq)
    seconds["stages_1_4"] = time.perf_counter() - t0
    return Plan(cfg, cands, prepared, cascade, source, seconds)


# --------------------------------------------------------------------------------------------
# judge: one Ray Data pass over every query's survivors


class SurvivorStage:
    """The actor-pool stage: read, decode, judge and thumbnail the survivors of stages 1-4.

    A plain callable class (Ray Data runs it; a test can call it). The judge is loaded once
    per actor; without one (no VLM stage) the actor only makes thumbnails. An image that
    cannot be read or decoded, or that the judge scores NaN (non-finite logits: that image's,
    not the batch's), or whose query the judge refuses (its own rows, never the other queries'
    in the batch), gets ``error`` (its reason) and no score. A judge that cannot load, or
    that fails on a batch (a KeeperError), answers every row with ``fatal``: raised
    in the actor, Ray would restart it again and again and print each try on the driver's
    screen; answered, the driver raises it once, by name.
    """

    def __init__(
        self, vlm: VlmConfig | None, decode_side: int | None, threads: int | None = None
    ) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)  # Ray pins a CPU actor's threads to its num_cpus
        from keeper_core.vlm import load_vlm

        self.judge = None
        self.rules: QueryRules | None = None  # the loaded judge's: what it refuses as a query
        self.fatal = ""
        if vlm is not None:
            try:
                self.judge = load_vlm(vlm)
                self.rules = self.judge.query_rules
            except ModelLoadError as e:
                self.fatal = f"load: {e.cause}"
        self.info = json.dumps(self.judge.describe()) if self.judge is not None else ""
        self.draft = (decode_side, decode_side) if decode_side else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        uris = [str(u) for u in batch["image_uri"]]
        n = len(uris)
        score = np.full(n, np.nan)
        error = [""] * n
        thumbs = [""] * n
        fatal = self.fatal
        images, judged = [], []
        for i, uri in enumerate([] if fatal else uris):
            try:
                image = decode_image(read_image_bytes(uri), source=uri, draft_size=self.draft)
            except StorageError as e:
                error[i] = f"unreadable: {e}"
            except ImageDecodeError as e:
                error[i] = f"{e.reason}: {e.detail}"
            except Exception as e:  # one image must never take the job down: say why, go on
                error[i] = f"internal: {type(e).__name__}: {e}"
            else:
                images.append(image)
                judged.append(i)
                try:
                    thumbs[i] = thumbnail_data_uri(image, size=THUMB_PX)
                except Exception as e:  # the page shows a placeholder; the score stands
                    log.warning("no thumbnail for %s: %s", uri, e)
        if self.judge is not None and images:
            texts = [str(batch["vlm_query"][i]) for i in judged]
            # plan() refused such questions by the judge's own rules; one that got here anyway
            # fails its own rows, never the other queries' of this batch
            for i, text in zip(judged, texts, strict=True):
                why = None if self.rules is None else self.rules.problem(text)
                if why is not None:
                    error[i] = f"judge: the VLM question is refused: {why}"
            ok = [k for k, i in enumerate(judged) if not error[i]]
            judged = [judged[k] for k in ok]
            try:
                if judged:
                    score[judged] = self.judge.relevance(
                        [images[k] for k in ok], [texts[k] for k in ok]
                    )
            except KeeperError as e:
                fatal = f"judge: {e}"
            else:  # NaN: the model gave no finite answer for this image; the others stand
                dtype = str(self.judge.dtype).removeprefix("torch.")
                for i in judged:
                    if math.isnan(score[i]):
                        error[i] = (
                            f"{NON_FINITE} (dtype {dtype}): the VLM gave no finite score for "
                            "this image"
                        )
        return {
            "query": np.asarray(batch["query"], np.int64),
            "index": np.asarray(batch["index"], np.int64),
            "vlm": score,
            "error": np.array(error, dtype=object),
            "thumbnail": np.array(thumbs, dtype=object),
            "judge": np.array([self.info] * n, dtype=object),
            "fatal": np.array([fatal] * n, dtype=object),
        }


@dataclass
class Judged:
    """What the survivors pass returned."""

    answers: dict[tuple[int, int], tuple[float, str]]  # (query, index) -> (score, error)
    thumbnails: dict[int, str]  # index -> data URI
    judge: dict[str, Any] | None  # VlmJudge.describe() from an actor; None without a VLM
    rows: int
    seconds: float


def _keeper_cause(e: BaseException) -> BaseException | None:
    """The KeeperError inside a Ray error chain, if any."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, KeeperError):
            return x
        inner = getattr(x, "cause", None)  # RayTaskError keeps the worker's exception here
        stack += [x.__cause__, x.__context__, inner if isinstance(inner, BaseException) else None]
    return None


def judge_survivors(p: Plan) -> Judged:
    """One Ray Data actor-pool pass over the survivors of every query.

    Raises:
        ModelLoadError: the VLM's config cannot be read, or the VLM does not load in an actor.
        CascadeStageError: the judge failed on a batch.
        KeeperError: the pass failed otherwise (named by the cause).
    """
    cfg = p.cfg
    rows = [
        {
            "query": qi,
            "index": int(i),
            "image_uri": p.candidates.image_uri[int(i)],
            "vlm_query": q.query.vlm_text,
        }
        for qi, q in enumerate(p.queries)
        for i in q.survivors
    ]
    if not rows:
        return Judged({}, {}, None, 0, 0.0)
    import ray.data

    from keeper_train.cluster import actor_pool_released, init_ray

    t0 = time.perf_counter()
    vlm = cfg.vlm if cfg.vlm_active else None
    # A VLM actor asks for the memory its weights take (read from the config: no weights
    # loaded here), so Ray places no more of them on a node than it holds; a config that cannot
    # be read fails here, before any actor starts.
    memory = vlm_actor_memory(vlm) if vlm is not None else None
    init_ray(cfg.ray_address)
    blocks = max(1, min(len(rows) // cfg.batch_size, 1000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        SurvivorStage,
        fn_constructor_kwargs={
            "vlm": vlm,
            "decode_side": cfg.decode_side,
            "threads": cfg.vlm_threads,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=cfg.num_gpus_per_vlm if vlm is not None else 0,
        num_cpus=cfg.num_cpus_per_vlm,
        memory=memory,
    )
    try:
        with actor_pool_released(SurvivorStage):  # the VLM actors (and GPUs) go with the pass
            out = ds.to_pandas()
    except Exception as e:
        cause = _keeper_cause(e)
        what = "the VLM pass" if vlm is not None else "the thumbnail pass"
        if isinstance(cause, ModelLoadError):
            raise ModelLoadError(cause.spec, cause.cause) from e
        detail = str(cause) if cause is not None else f"{type(e).__name__}: {e}"
        raise KeeperError(f"{what} failed: {detail}") from e
    fatal = sorted({str(f) for f in out["fatal"] if f})
    if fatal:
        kind, _, why = fatal[0].partition(": ")
        if kind == "load" and vlm is not None:
            raise ModelLoadError(vlm.source, why)
        raise CascadeStageError("vlm", why)
    keys = list(zip(out["query"].astype(int), out["index"].astype(int), strict=True))
    answers = {
        (int(q), int(i)): (float(v), str(err))
        for (q, i), v, err in zip(keys, out["vlm"], out["error"], strict=True)
    }
    if len(answers) != len(rows):
        raise DataError(f"the survivors pass answered {len(answers)} of {len(rows)} rows")
    thumbs = {i: str(t) for (_, i), t in zip(keys, out["thumbnail"], strict=True) if t}
    infos = [str(j) for j in out["judge"] if j]
    judge = json.loads(infos[0]) if infos else None
    return Judged(answers, thumbs, judge, len(rows), time.perf_counter() - t0)


def check_judged(judged: Judged) -> None:
    """One image the VLM gives no finite score is that image's failure; every image it was
    sent is the model's (a dtype that overflows on all of them), not a run of "could not be
    judged" rows.

    Raises:
        CascadeStageError: no image sent to the VLM got a finite score.
    """
    sent = [err for _, err in judged.answers.values() if not err or err.startswith(NON_FINITE)]
    if sent and all(err.startswith(NON_FINITE) for err in sent):
        raise CascadeStageError(
            "vlm",
            f"the VLM gave no finite score for any of the {len(sent)} images it judged; "
            "try dtype float32",
        )


def answer_from(judged: Judged, query: int, expected: np.ndarray) -> Any:
    """The judge ``run_cascade`` calls for ``query``: answers from the shared pass.

    It checks it is asked about exactly the survivors the plan sent (the cascade is a pure
    function; anything else is a bug, and fails the stage).
    """

    def judge(idx: np.ndarray) -> VlmScores:
        if sorted(idx.tolist()) != sorted(expected.tolist()):
            raise DataError("stages 1-4 chose other survivors than when planned")
        got = [judged.answers[(query, int(i))] for i in idx]
        failed = {int(i): err for i, (_, err) in zip(idx, got, strict=True) if err}
        return VlmScores(scores=np.array([s for s, _ in got]), failed=failed)

    return judge


# --------------------------------------------------------------------------------------------
# finish: stages 5-6 per query, the outputs


class StageLine(BaseModel):
    """One stage of one query: ``n_in == n_kept + n_dropped``."""

    name: str
    n_in: int
    n_kept: int
    n_dropped: int
    ms: float = Field(
        description="wall ms; vlm: this query's share (by calls) of the one pass over all "
        "queries' survivors, start-up included"
    )
    skipped: bool


class PickLine(BaseModel):
    rank: int
    index: int
    image_id: str
    image_uri: str
    final: float
    clip: float
    vlm: float | None


class QuerySummary(BaseModel):
    """One query's outcome, as _SUMMARY.json holds it."""

    name: str
    positive: list[str]
    negative: list[str] = Field(description="as used: the query's own, then the anchor")
    vlm_query: str | None
    rows: int
    picked: int
    dropped: int
    lost: int
    stages: list[StageLine]
    vlm_calls: int
    vlm_failed: int
    dropped_by_reason: dict[str, int] = Field(description="'stage: reason' -> count")
    picks: list[PickLine]
    outputs: dict[str, str]


class SelectSummary(BaseModel):
    """A run's outcome; written to OUTPUT/_SUMMARY.json."""

    status: Literal["ok", "failed"]
    table: str
    output: str
    rows: int
    table_errors: int = Field(description="images keeper embed could not read (not candidates)")
    clip_model: str
    clip_random_weights: bool
    logit_scale: float
    logit_scale_source: Literal["model", "config"]
    vlm: dict[str, Any] | None = Field(description="the judge as an actor loaded it")
    vlm_random_weights: bool | None
    vlm_note: str
    cascade: dict[str, Any]
    queries: list[QuerySummary]
    totals: dict[str, int]
    seconds: dict[str, float]
    outputs: dict[str, str]
    finished: str

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


def _num(a: np.ndarray) -> pa.Array:
    return pa.array(a, pa.float64(), from_pandas=True)  # NaN -> null: "never scored"


def scored_table(c: Candidates, res: CascadeResult) -> pa.Table:
    """One row per candidate: its scores, fate and pick rank (``scored.parquet``)."""
    k = res.candidates
    n = len(c)
    rank = np.zeros(n, np.int32)
    rank[np.asarray(res.picks, np.int64)] = np.arange(1, len(res.picks) + 1, dtype=np.int32)
    dup: list[str | None] = [None] * n
    for i, r in enumerate(k.reason):
        if r is not None and r.startswith("near_duplicate_of:"):
            dup[i] = c.image_uri[int(r.split(":", 1)[1])]
    return pa.table(
        {
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "image_id": pa.array(c.image_id, pa.string()),
            "image_uri": pa.array(c.image_uri, pa.string()),
            "width": _num(c.width),
            "height": _num(c.height),
            "clip_raw": _num(k.clip_raw),
            "clip": _num(k.clip),
            "rerank": _num(k.rerank),
            "vlm": _num(k.vlm),
            "final": _num(k.final),
            "dropped_at": pa.array(k.dropped_at, pa.string()),
            "reason": pa.array(k.reason, pa.string()),
            "duplicate_of": pa.array(dup, pa.string()),
            "pick_rank": pa.array(rank, pa.int32(), mask=rank == 0),
        }
    )


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _f(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass
class QueryOutcome:
    summary: QuerySummary
    failed: list[dict[str, Any]]


def finish_query(
    p: Plan, qi: int, judged: Judged, vlm_note: str, vlm_info: dict[str, Any] | None
) -> QueryOutcome:
    """Stages 1-6 of one query (the VLM answered from the shared pass); write its outputs."""
    cfg, c, q = p.cfg, p.candidates, p.queries[qi]
    judge = answer_from(judged, qi, q.survivors) if cfg.vlm_active else None
    res = cascade_for(c, q, p.cascade, vlm=judge)
    k = res.candidates
    stages = [StageLine(**vars(s)) for s in res.stages]
    total_calls = sum(len(x.survivors) for x in p.queries)
    if cfg.vlm_active and total_calls:
        # The lookup took no time; the real cost is this query's share of the one shared pass.
        vlm = stages[4]
        stages[4] = vlm.model_copy(update={"ms": judged.seconds * 1e3 * vlm.n_in / total_calls})
    reasons = Counter(
        f"{s}: {_reason_kind(r)}" for s, r in zip(k.dropped_at, k.reason, strict=True) if s and r
    )
    dropped = sum(1 for s in k.dropped_at if s is not None)
    failed = [
        {
            "query": q.query.name,
            "index": i,
            "image_uri": c.image_uri[i],
            "stage": "vlm",
            "reason": str(k.reason[i]).removeprefix("vlm_failed: "),
        }
        for i in range(len(c))
        if k.dropped_at[i] == "vlm"
    ]
    if not cfg.vlm_active:  # no stage drops them, but the page cannot show them either
        failed += [
            {
                "query": q.query.name,
                "index": int(i),
                "image_uri": c.image_uri[int(i)],
                "stage": "thumbnail",
                "reason": judged.answers[(qi, int(i))][1],
            }
            for i in q.survivors
            if judged.answers.get((qi, int(i)), (0.0, ""))[1]
        ]
    picks = [
        PickLine(
            rank=r + 1,
            index=i,
            image_id=c.image_id[i],
            image_uri=c.image_uri[i],
            final=float(k.final[i]),
            clip=float(k.clip[i]),
            vlm=_f(k.vlm[i]),
        )
        for r, i in enumerate(res.picks)
    ]
    folder = storage.join(cfg.output, q.query.name)
    outputs = {"scored": storage.join(folder, SCORED), "html": storage.join(folder, INDEX)}
    summary = QuerySummary(
        name=q.query.name,
        positive=q.query.positive,
        negative=q.query.negatives,
        vlm_query=q.query.vlm_text if cfg.vlm_active else None,
        rows=len(c),
        picked=len(res.picks),
        dropped=dropped,
        lost=len(c) - len(res.picks) - dropped,
        stages=stages,
        vlm_calls=res.vlm_calls,
        vlm_failed=sum(1 for s in k.dropped_at if s == "vlm"),
        dropped_by_reason=dict(sorted(reasons.items())),
        picks=picks,
        outputs=outputs,
    )
    storage.write_parquet(scored_table(c, res), outputs["scored"])
    page = render_query_html(p, q, res, summary, judged, vlm_note, vlm_info)
    storage.write_bytes(outputs["html"], page.encode())
    return QueryOutcome(summary, failed)


def _failed_csv(rows: list[dict[str, Any]]) -> bytes:
    import pandas as pd

    cols = ["query", "index", "image_uri", "stage", "reason"]
    return pd.DataFrame(rows, columns=cols).to_csv(index=False).encode()


# --------------------------------------------------------------------------------------------
# The page: picks, the top-N with every stage's score, the accounting; the dropped summarised

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px} h2{font-size:16px;margin-top:24px}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;margin:8px 0}
table.m{border-collapse:collapse;margin:8px 0;font-size:13px}
table.m td,table.m th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
table.m td.n{text-align:right;font-variant-numeric:tabular-nums}
.picks{display:flex;flex-wrap:wrap;gap:12px} .pick{width:170px;font-size:12px}
.pick img,.nothumb{width:160px;height:120px;object-fit:contain;background:#eee;display:block}
img.s{width:64px;height:48px;object-fit:contain;background:#eee}
.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
"""


_e = htmltext.escape  # the page's text and attribute values: escaped, bidi controls shown


def _n(x: float | None, fmt: str = ".3f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _name(uri: str) -> str:
    return "/".join(uri.rstrip("/").split("/")[-2:])  # the folder too: bursts reuse names


def _thumb(judged: Judged, i: int, cls: str = "") -> str:
    uri = judged.thumbnails.get(i)
    c = f" class='{cls}'" if cls else ""
    if not uri:
        return f"<span class='nothumb'{c}>no thumbnail</span>" if not cls else ""
    return f"<img{c} alt='' src='{_e(uri)}'>"


def models_html(p: Plan, vlm_note: str, vlm_info: dict[str, Any] | None) -> str:
    """The models, named, with random weights said out loud."""
    spec = p.candidates.spec
    random_clip = bool(spec) and ModelSpec.parse(spec).is_random
    rows = [
        ("CLIP", spec or "(empty table)", "RANDOM WEIGHTS" if random_clip else "pretrained"),
        (
            "logit_scale",
            f"{p.cascade.logit_scale:.4g}",
            "the model's logit_scale.exp()"
            if p.logit_scale_source == "model"
            else "set in the config",
        ),
    ]
    if vlm_info is not None:
        rw = vlm_info.get("random_weights")
        desc = (
            f"{vlm_info.get('architecture', '?')}, {vlm_info.get('parameters', 0):,} parameters, "
            f"{vlm_info.get('dtype', '?')} on {vlm_info.get('device', '?')}"
        )
        rows.append(("VLM", str(vlm_info.get("source")), ("RANDOM WEIGHTS; " if rw else "") + desc))
    else:
        rows.append(("VLM", "none", vlm_note))
    body = "".join(
        f"<tr><th>{_e(a)}</th><td class='mono'>{_e(b)}</td><td>{_e(c)}</td></tr>"
        for a, b, c in rows
    )
    return f"<table class='m' id='models'>{body}</table>"


def render_query_html(
    p: Plan,
    q: PreparedQuery,
    res: CascadeResult,
    s: QuerySummary,
    judged: Judged,
    vlm_note: str,
    vlm_info: dict[str, Any] | None,
) -> str:
    """OUTPUT/<query>/index.html: self-contained (thumbnails inlined), small at any N.

    Lists the picks and the top-N (what reached the VLM stage), each bounded (``PAGE_PICKS``,
    ``PAGE_ROW_THUMBS``, ``PAGE_ROWS``: at most 400 thumbnails, each inlined once, whatever
    top_n and top_k are); the candidates dropped before it are counted by stage and reason with
    a few examples, never listed one by one.
    """
    c, k = p.candidates, res.candidates
    title = f"keeper select: {q.query.name}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
    ]
    for note in _notes(p, vlm_note, vlm_info):
        parts.append(f"<div class='warn'>{_e(note)}</div>")
    neg = ", ".join(f"{t} (anchor)" if t == NEUTRAL_PROMPT else t for t in q.query.negatives)
    parts.append(
        "<table class='m' id='query'>"
        f"<tr><th>positive</th><td>{_e(' | '.join(q.query.positive))}</td></tr>"
        f"<tr><th>negative</th><td>{_e(neg)}</td></tr>"
        + (f"<tr><th>VLM asked</th><td>{_e(s.vlm_query)}</td></tr>" if s.vlm_query else "")
        + f"<tr><th>table</th><td class='mono'>{_e(p.cfg.table)}</td></tr></table>"
    )
    parts.append("<h2>Models</h2>" + models_html(p, vlm_note, vlm_info))

    parts.append(
        f"<h2>Stages</h2><p>{s.rows:,} candidates = {s.picked:,} picked + {s.dropped:,} dropped"
        + (f" + <b>{s.lost:,} LOST</b>" if s.lost else "")
        + f"; VLM calls: {s.vlm_calls:,}"
        + (f" ({s.vlm_failed:,} could not be judged)" if s.vlm_failed else "")
        + "</p><table class='m' id='stages'><tr><th>stage</th><th>in</th><th>kept</th>"
        "<th>dropped</th><th>ms</th><th></th></tr>"
    )
    for st in s.stages:
        note = "skipped" if st.skipped else ""
        if st.name == "vlm" and p.cfg.vlm_active and not st.skipped:
            note = "ms: this query's share (by calls) of one pass over all queries, start-up in"
        parts.append(
            f"<tr><td>{_e(st.name)}</td><td class='n'>{st.n_in:,}</td>"
            f"<td class='n'>{st.n_kept:,}</td><td class='n'>{st.n_dropped:,}</td>"
            f"<td class='n'>{st.ms:.1f}</td><td>{_e(note)}</td></tr>"
        )
    parts.append("</table>")

    parts.append(f"<h2>Picks: {len(res.picks):,}</h2><div class='picks' id='picks'>")
    for r, i in enumerate(res.picks[:PAGE_PICKS]):
        parts.append(
            f"<div class='pick' id='pick{r + 1}'>{_thumb(judged, i)}<b>#{r + 1}</b> "
            f"<span class='mono'>{_e(_name(c.image_uri[i]))}</span><br>final {_n(k.final[i])}"
            f" · clip {_n(k.clip[i])}"
            + (f" · vlm {_n(k.vlm[i])}" if p.cfg.vlm_active else "")
            + "</div>"
        )
    parts.append("</div>")
    if len(res.picks) > PAGE_PICKS:
        parts.append(
            f"<p id='more-picks'>... and {len(res.picks) - PAGE_PICKS:,} more picks without a card "
            "(all in scored.parquet, by pick_rank).</p>"
        )

    rank = {i: r + 1 for r, i in enumerate(res.picks)}
    top = q.survivors.tolist()
    parts.append(f"<h2>Top-N: {len(top):,} reached the VLM stage (rerank order)</h2>")
    if len(top) > PAGE_ROW_THUMBS:
        listed = f"; the first {PAGE_ROWS:,} rows are listed" if len(top) > PAGE_ROWS else ""
        parts.append(
            f"<p id='topn-bounds'>Thumbnails on the first {PAGE_ROW_THUMBS:,} rows (a pick's row "
            f"links to its card above instead){listed}.</p>"
        )
    parts.append(
        "<table class='m' id='topn'><tr><th></th><th>#</th><th>image</th><th>clip_raw</th>"
        "<th>clip</th><th>rerank</th><th>vlm</th><th>final</th><th>fate</th></tr>"
    )
    for n, i in enumerate(top[:PAGE_ROWS], 1):
        pick = rank.get(i)
        fate = f"pick #{pick}" if pick else str(k.reason[i])
        if pick and pick <= PAGE_PICKS:  # its thumbnail is on its card: inlined once
            cell = f"<a href='#pick{pick}'>#{pick}</a>"
        else:
            cell = _thumb(judged, i, "s") if n <= PAGE_ROW_THUMBS else ""
        parts.append(
            f"<tr><td>{cell}</td><td class='n'>{n}</td>"
            f"<td class='mono' title='{_e(c.image_uri[i])}'>{_e(_name(c.image_uri[i]))}</td>"
            f"<td class='n'>{_n(k.clip_raw[i], '.4f')}</td><td class='n'>{_n(k.clip[i])}</td>"
            f"<td class='n'>{_n(k.rerank[i])}</td><td class='n'>{_n(k.vlm[i])}</td>"
            f"<td class='n'>{_n(k.final[i])}</td><td>{_e(fate)}</td></tr>"
        )
    parts.append("</table>")
    if len(top) > PAGE_ROWS:
        parts.append(
            f"<p id='more-topn'>... and {len(top) - PAGE_ROWS:,} more (all in scored.parquet).</p>"
        )

    examples: dict[str, list[str]] = {}
    for i, (stage, why) in enumerate(zip(k.dropped_at, k.reason, strict=True)):
        if stage in _STAGES_BEFORE_VLM and why:
            ex = examples.setdefault(f"{stage}: {_reason_kind(why)}", [])
            if len(ex) < _EXAMPLES:
                ex.append(_name(c.image_uri[i]))
    parts.append(
        "<h2>Dropped before the VLM stage</h2><table class='m' id='dropped'><tr><th>stage: "
        "reason</th><th>count</th><th>e.g.</th></tr>"
    )
    for key, count in s.dropped_by_reason.items():
        if key.split(":", 1)[0] in _STAGES_BEFORE_VLM:
            parts.append(
                f"<tr><td>{_e(key)}</td><td class='n'>{count:,}</td>"
                f"<td class='mono'>{_e(', '.join(examples.get(key, [])))}</td></tr>"
            )
    parts.append(
        "</table><p>Every candidate's scores and reason: <a href='scored.parquet'>"
        "scored.parquet</a>.</p>"
    )
    cfg_json = json.dumps(p.cascade.model_dump(), indent=1)
    parts.append(f"<h2>Cascade config</h2><pre class='mono'>{_e(cfg_json)}</pre></body></html>")
    return "".join(parts)


def _notes(p: Plan, vlm_note: str, vlm_info: dict[str, Any] | None) -> list[str]:
    notes = []
    spec = p.candidates.spec
    if spec and ModelSpec.parse(spec).is_random:
        notes.append(
            f"Random CLIP weights ({spec}): its similarities, and so the CLIP scores, dedup and "
            "rerank, carry no meaning beyond tests."
        )
    if vlm_info is not None and vlm_info.get("random_weights"):
        notes.append(
            f"Random VLM weights ({vlm_info.get('source')}): its relevance scores carry no "
            "meaning beyond tests."
        )
    if not p.cfg.vlm_active:
        notes.append(vlm_note)
    return notes


# --------------------------------------------------------------------------------------------
# The job: plan -> judge -> finish


def _vlm_note(cfg: SelectJobConfig, judged: Judged) -> str:
    if cfg.vlm is None:
        return "No VLM stage (vlm.source is null): final score = the rerank score."
    if cfg.cascade.beta == 0:
        return "No VLM stage (cascade.beta = 0): final score = the rerank score."
    if judged.judge is None:
        return f"VLM {cfg.vlm.source} not loaded: no candidate reached the VLM stage."
    return f"VLM stage: {judged.rows} judgement(s) in one pass over all queries."


def run(cfg: SelectJobConfig) -> SelectSummary:
    """``keeper select``, holding the output's lock (``run_lock``: one run per output at a time;
    ``BusyError`` where another holds it)."""
    with run_lock.holding(cfg.output, job="keeper select"):
        return _run(cfg)


def _run(cfg: SelectJobConfig) -> SelectSummary:
    """Run ``keeper select``; returns the summary (also written to OUTPUT/_SUMMARY.json)."""
    t_start = time.perf_counter()
    p = plan(cfg)
    log.info(
        "%d candidates (%s), %d queries: %d survivor(s) for the VLM stage",
        len(p.candidates),
        p.candidates.spec,
        len(p.queries),
        sum(len(q.survivors) for q in p.queries),
    )
    judged = judge_survivors(p)
    check_judged(judged)
    seconds = {**p.seconds, "survivors_pass": judged.seconds}
    vlm_note = _vlm_note(cfg, judged)
    vlm_info = judged.judge
    t0 = time.perf_counter()
    outcomes = [finish_query(p, qi, judged, vlm_note, vlm_info) for qi in range(len(p.queries))]
    failed = [row for o in outcomes for row in o.failed]
    outputs = {"summary": storage.join(cfg.output, SUMMARY)}
    outputs["failed"] = storage.join(cfg.output, FAILED)
    storage.write_bytes(outputs["failed"], _failed_csv(failed))
    seconds["finish_write"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    qs = [o.summary for o in outcomes]
    spec = p.candidates.spec
    summary = SelectSummary(
        status="ok" if all(q.lost == 0 for q in qs) else "failed",
        table=cfg.table,
        output=cfg.output,
        rows=len(p.candidates),
        table_errors=p.candidates.table_errors,
        clip_model=spec,
        clip_random_weights=bool(spec) and ModelSpec.parse(spec).is_random,
        logit_scale=p.cascade.logit_scale,
        logit_scale_source=p.logit_scale_source,
        vlm=vlm_info,
        vlm_random_weights=None if vlm_info is None else bool(vlm_info.get("random_weights")),
        vlm_note=vlm_note,
        cascade=p.cascade.model_dump(),
        queries=qs,
        totals={
            "queries": len(qs),
            "rows": len(p.candidates),
            "picked": sum(q.picked for q in qs),
            "vlm_calls": sum(q.vlm_calls for q in qs),
            "vlm_failed": sum(q.vlm_failed for q in qs),
            "lost": sum(q.lost for q in qs),
        },
        seconds={k: round(v, 3) for k, v in seconds.items()},
        outputs=outputs,
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    storage.write_bytes(outputs["summary"], summary.to_json())
    return summary


def format_summary(s: SelectSummary) -> str:
    """The one-screen summary printed at the end of a run: per query, per stage."""
    lines = [
        f"keeper select  {s.status.upper()}",
        f"  table     {s.table}  ({s.rows:,} rows; {s.table_errors:,} unreadable at embed)",
        f"  clip      {s.clip_model}  logit_scale {s.logit_scale:.4g} ({s.logit_scale_source})",
        f"  vlm       {s.vlm['source'] if s.vlm else 'none'}  {s.vlm_note}",
    ]
    for q in s.queries:
        lines.append(
            f"  query {q.name}: {q.rows:,} = {q.picked} picked + {q.dropped:,} dropped"
            + (f" + {q.lost} LOST" if q.lost else "")
            + f"; {q.vlm_calls} VLM calls"
            + (f", {q.vlm_failed} failed" if q.vlm_failed else "")
        )
        lines.append(
            "    "
            + "  ".join(
                f"{st.name} {st.n_in}->{st.n_kept}" + (" (skipped)" if st.skipped else "")
                for st in q.stages
            )
        )
    lines += [
        f"  output    {s.output}/<query>/{SCORED}, {INDEX}; {s.outputs['failed']}",
        "  seconds   " + "  ".join(f"{k} {v:.1f}" for k, v in s.seconds.items()),
    ]
    if s.clip_random_weights:
        lines.append("  NOTE      random CLIP weights: scores carry no meaning beyond tests")
    if s.vlm_random_weights:
        lines.append("  NOTE      random VLM weights: its scores carry no meaning beyond tests")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.select --config FILE [key=value ...]``."""
    from keeper_train.config import job_main

    return job_main(
        argv,
        job="select",
        description=__doc__.split("\n")[0],
        model=SelectJobConfig,
        run=run,
        describe=format_summary,
        exit_code=lambda s: 0 if s.status == "ok" else EXIT_LOST,
        example="cascade.top_n=50",
    )


if __name__ == "__main__":
    # Re-import by module name so Ray pickles SurvivorStage by reference.
    from keeper_train.jobs import select

    sys.exit(select.main())
