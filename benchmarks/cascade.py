"""Selection cascade cost: a VLM judge on every candidate against the cascade's top-N, side by side.

    .venv/bin/python benchmarks/cascade.py [--candidates 1000] [--clip keeper-tiny:random] \
        [--vlms tiny,random-llava] [--threads 2] [--out benchmarks/results/cascade.json]
    # a GPU node: the same in bf16, the larger model shaped like Llava-1.5-7B (not yet run)
    .venv/bin/python benchmarks/cascade.py --gpu --clip ViT-B-32:random --shape llava-1.5-7b \
        --out benchmarks/results/cascade-gpu.json

The question (issue 13): for N candidates (1,000) and one query, what does the cascade
(``keeper_core.cascade.run_cascade``: CLIP -> heuristics -> dedup -> rerank -> VLM on the top
``--top-n`` (20) -> top ``--top-k`` (10)) save against the VLM judging every candidate, and how
often do both choose the same ten? Goal: >= 20x fewer VLM calls and >= 10x faster.

Candidates: the first N JPEGs (320x240, real photos) of a ``keeper_core.synthetic`` corpus,
generated once under ``--cache`` (shared with embed.py). The query is ``--query`` ("a cat": one
of the base photos is a cat) for the VLM, ``a photo of {query}`` against ``NEUTRAL_PROMPT`` for
CLIP, with the CLIP model's own logit scale. Measured once, shared by every judge: reading and
decoding the N files (``keeper_core.images.decode_image``) and embedding the decoded images with
``ClipEmbedder.embed_images`` (``--clip``). Then, per VLM judge (``keeper_core.vlm.load_vlm``;
relevance = VQAScore's P(yes) / (P(yes) + P(no)), batches of ``--max-batch``), in one process:

a. VLM on every candidate: decode N (the shared figure) + ``judge.relevance`` on all N +
   ranking. Its top-10s: by ``alpha * S_clip + beta * S_vlm`` (``run_cascade`` with
   ``top_n = N`` and dedup off, the judge's scores looked up: the cascade's own final formula and
   tie rule), the same with the cascade's dedup, and by ``S_vlm`` alone.
b1. cascade, embeddings precomputed (the corpus case: ``keeper embed`` already ran): the query's
   text embedding (cold: the text cache is cleared) + ``run_cascade`` with dedup on, its VLM
   callback reading and decoding only the top-N files and calling ``judge.relevance`` on them.
   Repeated ``--repeats`` times; the median is reported, with each stage's milliseconds.
b2. cascade including embedding: decode N + embed N (the shared figures) + b1. It still reads
   and decodes its top-N files, which b2 would already hold: a few ms against the cascade.

Dedup threshold: ``--dedup`` 0.99, not the cascade's default 0.95. Random CLIP weights put
nearly every image within cosine 0.95 of every other (keeper-tiny on this corpus: median 0.90
between different base photos, 0.98 within a burst), so at 0.95 only 7 of these 1,000 reach the
judge, and the cascade would look cheaper than it is; at 0.99 the full top-N do. The JSON
records how many reach the VLM stage at both (``reach_vlm_by_dedup_threshold``); a run where
fewer than top-N reached it says so. With real weights pass ``--dedup 0.95``.

The speed-up of b2 is taken against a *without* embedding: a's ``alpha * S_clip`` term needs
the same embeddings, so that understates the cascade's gain. Agreement is |A & B| / top-k.

Judges: ``tiny`` (``keeper_core.tiny_vlm.build_tiny_vlm``: 32 px vision, 2-layer Llama, ~0.3 M
parameters) and ``random-llava``, a Llava built here with random weights and the tiny judge's
tokenizer, saved as ``build_tiny_vlm`` saves (``keeper.json`` says ``random_weights``) and loaded
through ``load_vlm``. Its shape: ``--shape cpu-small`` (the CPU default: a ViT-B/32-sized CLIP
vision tower at 224 px, 49 image tokens, and an 8-layer Llama of width 768, ~146 M parameters)
or ``llava-1.5-7b`` (ViT-L/14 at 336 px, 576 image tokens, the 7B Llama), each size overridable
(``--text-layers`` ...). A real 7B judge costs ~640 ViT-B-32 embeddings an image (DESIGN.md, H200:
~52 against ~33,400 img/s); the tiny judge costs a few keeper-tiny embeddings, so on CPU its
speed-up understates the cascade's, and the script prints each judge's measured VLM/CLIP cost
ratio beside the H200's, and what DESIGN.md's H200 rates give by arithmetic (not measured).

RANDOM WEIGHTS (CLIP and VLMs): the scores and therefore the agreement figures mean nothing;
they show that the machinery agrees with itself, nothing about ranking quality. Agreement means
something only with real weights, on a GPU machine (``--gpu``, with a real ``--clip`` spec; a
real judge is not wired in here).

``--vlm-all-limit M`` judges only the first M candidates in arm a and extrapolates its VLM time
linearly to N (said in the output; agreement is then not reported). Torch runs ``--threads``
threads (default 2). Other processes' CPU share during each measurement is recorded (this
machine is shared), not waited out. About 3 minutes on a quiet 2-core machine once the corpus
exists (generating 1,000 images at 320x240 takes about a minute, once).

``--gpu``: CLIP and judges on CUDA, judges in bfloat16, max batch 16. The CLIP figure is
``embed_images`` on decoded images, its CPU transform included, so there the measured VLM/CLIP
ratio sits below the forward-only ~640x. THE --gpu PATH HAS NOT BEEN
RUN: it was written on a CPU-only machine; it refuses to start without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import CpuMonitor, machine_info, make_corpus, read_manifest, write_record

from keeper_core.cascade import NEUTRAL_PROMPT, CascadeConfig, CascadeResult, run_cascade
from keeper_core.embedding import ClipEmbedder
from keeper_core.images import decode_image
from keeper_core.vlm import VlmConfig, VlmJudge, load_vlm

#: DESIGN.md, one H200, bf16, random weights: a Llava-1.5-7B-shaped judge (batch 16) and
#: ViT-B-32 embedding (batch 1024), images/s; CPU decode + resize of 1600x1200 JPEGs with draft
#: mode on 16 cores.
H200_VLM_IMG_S = 52.0
H200_CLIP_IMG_S = 33_400.0
H200_DECODE_IMG_S = 940.0
H200_RATIO = H200_CLIP_IMG_S / H200_VLM_IMG_S  # ~640
RANDOM_NOTE = (
    "random weights (CLIP and VLM): scores are meaningless, so top-10 agreement means nothing "
    "here; it means something only with real weights on a GPU machine"
)


# --------------------------------------------------------------------------------------------
# The larger random judge


@dataclass(frozen=True)
class LlavaShape:
    """Sizes of a random Llava (vision tower, projector to the Llama, Llama)."""

    vision_width: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    vocab: int  # rows of the embedding table; ids past the tokenizer's 512 are never used

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def describe(self) -> str:
        return (
            f"ViT {self.vision_width}x{self.vision_layers} @{self.image_size}/{self.patch_size} "
            f"({self.image_tokens} image tokens), Llama {self.text_width}x{self.text_layers} "
            f"mlp {self.text_mlp}"
        )


SHAPES = {
    # ViT-B/32's vision tower at 224 px and a small Llama: ~146 M parameters, ~0.1 s an image
    # on 2 CPU cores, so 1,000 judgements fit in a few minutes.
    "cpu-small": LlavaShape(768, 12, 12, 224, 32, 768, 8, 12, 2048, 512),
    # llava-hf/llava-1.5-7b-hf's config: CLIP ViT-L/14 at 336 px and Vicuna-7B (Llama).
    "llava-1.5-7b": LlavaShape(1024, 24, 16, 336, 14, 4096, 32, 32, 11008, 32064),
}
#: CLI flag -> LlavaShape field, for overriding a preset.
SHAPE_FLAGS = {f"--{f.name.replace('_', '-')}": f.name for f in fields(LlavaShape)}


def build_random_llava(
    dest: Path, shape: LlavaShape, *, seed: int, device: str, dtype: torch.dtype, init_std: float
) -> Path:
    """Write a random-weight Llava of ``shape`` that ``load_vlm`` loads, as ``build_tiny_vlm``
    writes its model: weights, processor, chat template and ``keeper.json``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    from keeper_core import tiny_vlm

    tokenizer = tiny_vlm._train_tokenizer()  # its answer words are single tokens (checked)
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessor(
            size={"shortest_edge": shape.image_size},
            crop_size={"height": shape.image_size, "width": shape.image_size},
        ),
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=tiny_vlm.CHAT_TEMPLATE,
    )
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny_vlm.SPECIAL_TOKENS}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_width,
            intermediate_size=4 * shape.vision_width,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            initializer_range=init_std,
        ),
        text_config=LlamaConfig(
            vocab_size=max(shape.vocab, len(tokenizer)),
            hidden_size=shape.text_width,
            intermediate_size=shape.text_mlp,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            num_key_value_heads=shape.text_heads,
            max_position_embeddings=4096,
            initializer_range=init_std,
            bos_token_id=special["<s>"],
            eos_token_id=special["</s>"],
            pad_token_id=special["<pad>"],
        ),
        image_token_index=special[tiny_vlm.IMAGE_TOKEN],
        image_seq_length=shape.image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # a 7B model is initialised on the GPU, not in 28 GB of CPU RAM
        model: Any = LlavaForConditionalGeneration(config)
    model.to(dtype).eval()
    model.generation_config.pad_token_id = special["<pad>"]
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    meta = {
        "random_weights": True,
        "builder": "benchmarks/cascade.py build_random_llava",
        "shape": asdict(shape),
        "seed": seed,
        "note": "random weights: every score from this model is meaningless",
    }
    (dest / tiny_vlm.KEEPER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return dest


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Arm:
    """One way to get the top-k for the query: its wall time and what it spent it on."""

    name: str
    wall_s: float
    vlm_calls: int
    parts_s: dict[str, float]
    picks: list[int] | None
    foreign_cpu_share: float
    extrapolated: bool = False


@dataclass
class JudgeRun:
    """Everything measured for one VLM judge."""

    name: str
    shape: str
    judge: dict[str, Any]
    build_s: float
    load_s: float
    arms: list[Arm]
    agreement: dict[str, float | None]
    stages: list[dict[str, Any]]
    cascade_walls_s: list[float]
    vlm_ms_per_image: float
    clip_ms_per_image: float
    vlm_clip_ratio: float
    vlm_all_images: int
    s_vlm_std: float
    s_vlm_same_images_max_abs_diff: float
    notes: list[str] = field(default_factory=list)


@dataclass
class Shared:
    """What every judge's arms share: the candidates, decoded and embedded once."""

    uris: list[str]
    images: list[Any]
    emb: np.ndarray
    decode_s: float
    embed_s: float
    decode_foreign: float
    embed_foreign: float


def read_decode(uri: str) -> Any:
    return decode_image(Path(uri).read_bytes(), source=uri)


def prepare(uris: list[str], embedder: ClipEmbedder, mon: CpuMonitor) -> Shared:
    """Decode every candidate, then embed them: each timed once."""
    cpu: dict[str, Any] = {}
    with mon.section(cpu):
        t = time.perf_counter()
        images = [read_decode(u) for u in uris]
        decode_s = time.perf_counter() - t
    decode_foreign = cpu["cpu"]["foreign_share"]
    embedder.embed_images(images[:8])  # warm-up: first-call allocations
    with mon.section(cpu):
        t = time.perf_counter()
        emb = embedder.embed_images(images)
        embed_s = time.perf_counter() - t
    return Shared(uris, images, emb, decode_s, embed_s, decode_foreign, cpu["cpu"]["foreign_share"])


def logit_scale(embedder: ClipEmbedder) -> float:
    return float(embedder.clip.model.logit_scale.detach().exp())


def dedup_probe(shared: Shared, embedder: ClipEmbedder, args: argparse.Namespace) -> dict[str, int]:
    """How many candidates reach the VLM stage at the cascade's default dedup threshold and at
    ``--dedup`` (no judge is called)."""
    pos, neg = query_embeddings(embedder, args.query)
    out = {}
    for th in dict.fromkeys((CascadeConfig().dedup_threshold, args.dedup)):
        cfg = CascadeConfig(
            top_n=args.top_n,
            top_k=args.top_k,
            dedup_threshold=th,
            logit_scale=logit_scale(embedder),
        )
        res = run_cascade(shared.emb, pos, neg, config=cfg)
        out[str(th)] = res.stages[4].n_in  # STAGES[4] == "vlm"
    return out


def query_embeddings(embedder: ClipEmbedder, query: str) -> tuple[np.ndarray, np.ndarray]:
    # A request's query is new to the server: time its text embedding cold.
    embedder._text_cache.clear()
    emb = embedder.embed_texts([f"a photo of {query}", NEUTRAL_PROMPT])  # one forward
    return emb[:1], emb[1:]


def ranked(scores: np.ndarray, k: int) -> list[int]:
    """Top ``k`` indices by score descending, ties to the lower index (the cascade's rule)."""
    idx = np.arange(len(scores))
    return idx[np.lexsort((idx, -scores))][:k].tolist()


def overlap(a: list[int] | None, b: list[int] | None, k: int) -> float | None:
    return None if a is None or b is None else len(set(a) & set(b)) / k


def bench_judge(
    name: str,
    shape: str,
    judge: VlmJudge,
    build_s: float,
    load_s: float,
    shared: Shared,
    embedder: ClipEmbedder,
    args: argparse.Namespace,
    mon: CpuMonitor,
) -> JudgeRun:
    """Arms a, b1 and b2 for one judge (module docstring)."""
    n = len(shared.uris)
    m = n if args.vlm_all_limit is None else min(args.vlm_all_limit, n)
    config = CascadeConfig(
        top_n=args.top_n,
        top_k=args.top_k,
        dedup_threshold=args.dedup,
        logit_scale=logit_scale(embedder),
    )
    judge.relevance(shared.images[:2], args.query)  # warm-up

    # a. The judge on every candidate (or the first m, extrapolated).
    print(f"  {name}: VLM on {m} candidates ...", flush=True)
    cpu: dict[str, Any] = {}
    with mon.section(cpu):
        t = time.perf_counter()
        s_all = judge.relevance(shared.images[:m], args.query)
        vlm_s = time.perf_counter() - t
    vlm_foreign = cpu["cpu"]["foreign_share"]
    extrapolated = m < n
    vlm_all_s = vlm_s * n / m
    picks_formula = picks_dedup = picks_vlm = None
    rank_s = 0.0
    if not extrapolated:
        t = time.perf_counter()
        pos, neg = query_embeddings(embedder, args.query)

        def lookup(idx: np.ndarray) -> np.ndarray:
            return s_all[idx]

        everything = config.model_copy(update={"top_n": n, "dedup_threshold": None})
        picks_formula = run_cascade(shared.emb, pos, neg, config=everything, vlm=lookup).picks
        rank_s = time.perf_counter() - t
        with_dedup = config.model_copy(update={"top_n": n})
        picks_dedup = run_cascade(shared.emb, pos, neg, config=with_dedup, vlm=lookup).picks
        picks_vlm = ranked(s_all.astype(np.float64), args.top_k)
    arm_a = Arm(
        name="VLM on every candidate",
        wall_s=shared.decode_s + vlm_all_s + rank_s,
        vlm_calls=n,
        parts_s={"decode": shared.decode_s, "vlm": vlm_all_s, "rank": rank_s},
        picks=picks_formula,
        foreign_cpu_share=vlm_foreign,
        extrapolated=extrapolated,
    )

    # b1. The cascade on precomputed embeddings; its judge decodes only what it is asked about.
    print(f"  {name}: cascade x{args.repeats} ...", flush=True)
    runs: list[tuple[float, float, CascadeResult, dict[str, float]]] = []
    for _ in range(args.repeats):
        parts: dict[str, float] = {"decode": 0.0, "vlm": 0.0}

        def score(idx: np.ndarray, parts: dict[str, float] = parts) -> np.ndarray:
            t0 = time.perf_counter()
            imgs = [read_decode(shared.uris[i]) for i in idx]
            t1 = time.perf_counter()
            out = judge.relevance(imgs, args.query)
            parts["decode"] += t1 - t0
            parts["vlm"] += time.perf_counter() - t1
            return out

        with mon.section(cpu):
            t = time.perf_counter()
            pos, neg = query_embeddings(embedder, args.query)
            text_s = time.perf_counter() - t
            res = run_cascade(shared.emb, pos, neg, config=config, vlm=score)
            wall = time.perf_counter() - t
        parts["query_text"] = text_s
        runs.append((wall, cpu["cpu"]["foreign_share"], res, parts))
    walls = [r[0] for r in runs]
    mid = sorted(range(len(runs)), key=lambda i: walls[i])[len(runs) // 2]
    wall, foreign, res, parts = runs[mid]
    if any(r[2].picks != res.picks for r in runs):
        raise AssertionError(f"{name}: the cascade's picks differ between repeats")
    arm_b1 = Arm(
        name="cascade, embeddings precomputed",
        wall_s=wall,
        vlm_calls=res.vlm_calls,
        parts_s={**parts, "cascade_other": wall - sum(parts.values())},
        picks=res.picks,
        foreign_cpu_share=foreign,
    )
    arm_b2 = Arm(
        name="cascade incl. decode + embedding",
        wall_s=shared.decode_s + shared.embed_s + wall,
        vlm_calls=res.vlm_calls,
        parts_s={"decode_all": shared.decode_s, "embed_all": shared.embed_s, "cascade": wall},
        picks=res.picks,
        foreign_cpu_share=max(shared.decode_foreign, shared.embed_foreign, foreign),
    )

    judged = np.flatnonzero(~np.isnan(res.candidates.vlm))
    in_a = judged[judged < m]
    diff = float(np.max(np.abs(res.candidates.vlm[in_a] - s_all[in_a]))) if in_a.size else 0.0
    stages = [
        {
            "name": s.name,
            "n_in": s.n_in,
            "n_kept": s.n_kept,
            "ms_median": statistics.median(r[2].stages[i].ms for r in runs),
            "skipped": s.skipped,
        }
        for i, s in enumerate(res.stages)
    ]
    k = args.top_k
    notes = []
    if res.vlm_calls < args.top_n:
        notes.append(
            f"only {res.vlm_calls} candidates survived dedup at {args.dedup}: the cascade "
            f"judged fewer than top_n = {args.top_n}, which flatters it"
        )
    if extrapolated:
        notes.append(
            f"arm a judged the first {m} of {n} candidates; its VLM time is extrapolated "
            f"linearly to {n} ({vlm_s:.1f} s measured) and agreement is not reported"
        )
    return JudgeRun(
        name=name,
        shape=shape,
        judge={
            key: judge.describe()[key]
            for key in ("architecture", "parameters", "dtype", "device", "max_batch")
        }
        | {"random_weights": judge.random_weights},
        build_s=build_s,
        load_s=load_s,
        arms=[arm_a, arm_b1, arm_b2],
        agreement={
            "formula": overlap(res.picks, picks_formula, k),
            "formula_dedup": overlap(res.picks, picks_dedup, k),
            "vlm_only": overlap(res.picks, picks_vlm, k),
        },
        stages=stages,
        cascade_walls_s=walls,
        vlm_ms_per_image=vlm_s / m * 1e3,
        clip_ms_per_image=shared.embed_s / n * 1e3,
        vlm_clip_ratio=(vlm_s / m) / (shared.embed_s / n),
        vlm_all_images=m,
        s_vlm_std=float(np.std(s_all)),
        s_vlm_same_images_max_abs_diff=diff,
        notes=notes,
    )


def build_judge(
    name: str, args: argparse.Namespace, shape: LlavaShape, workdir: Path
) -> tuple[str, VlmConfig]:
    """Write judge ``name`` into ``workdir``: its description and the config that loads it."""
    from keeper_core.tiny_vlm import build_tiny_vlm

    device = "cuda" if args.gpu else "cpu"
    dest = workdir / name
    if name == "tiny":
        build_tiny_vlm(dest)
        desc = "build_tiny_vlm: 32 px vision, 2-layer Llama of width 64"
    else:
        dest.mkdir()
        dtype = torch.bfloat16 if args.gpu else torch.float32
        build_random_llava(
            dest, shape, seed=args.seed, device=device, dtype=dtype, init_std=args.init_std
        )
        desc = f"{args.shape}: {shape.describe()}"
    dtype_name = "bfloat16" if args.gpu else "float32"
    cfg = VlmConfig(source=str(dest), device=device, dtype=dtype_name, max_batch=args.max_batch)
    return desc, cfg


# --------------------------------------------------------------------------------------------
# Report


def h200_arithmetic(n: int, top_n: int) -> dict[str, Any]:
    """What DESIGN.md's H200 rates give for the three arms (arithmetic, not a measurement)."""
    decode_all = n / H200_DECODE_IMG_S
    a = decode_all + n / H200_VLM_IMG_S
    b1 = top_n / H200_DECODE_IMG_S + top_n / H200_VLM_IMG_S
    b2 = decode_all + n / H200_CLIP_IMG_S + top_n / H200_VLM_IMG_S
    return {
        "note": "arithmetic from DESIGN.md's H200 rates (Llava-1.5-7B-shaped judge 52 img/s, "
        "ViT-B-32 33,400 img/s, CPU draft decode of 1600x1200 JPEGs 940 img/s on 16 cores), "
        "not measured; cascade stages and query embedding (milliseconds) left out",
        "vlm_all_s": round(a, 2),
        "cascade_precomputed_s": round(b1, 3),
        "cascade_with_embedding_s": round(b2, 3),
        "speedup_precomputed": round(a / b1, 1),
        "speedup_with_embedding": round(a / b2, 1),
    }


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(r: JudgeRun, n: int) -> str:
    a = r.arms[0]
    lines = [
        f"### {r.name} ({r.shape}; {r.judge['parameters']:,} parameters, "
        f"{r.judge['dtype']}, {r.judge['device']})",
        "",
        "| arm | wall s | VLM calls | speed-up | call reduction | top-10 agreement: formula "
        "| + dedup | S_vlm alone | others' CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    agree = r.agreement
    for arm in r.arms:
        first = arm is a
        wall = f"{arm.wall_s:.2f}" + (" (extrapolated)" if arm.extrapolated else "")
        lines.append(
            f"| {arm.name} | {wall} | {arm.vlm_calls:,} "
            f"| {'1.0' if first else f'{a.wall_s / arm.wall_s:.1f}'} "
            f"| {'1' if first else f'{n / max(arm.vlm_calls, 1):.0f}'} "
            f"| {'-' if first else fmt(agree['formula'], '.1f')} "
            f"| {'-' if first else fmt(agree['formula_dedup'], '.1f')} "
            f"| {'-' if first else fmt(agree['vlm_only'], '.1f')} "
            f"| {arm.foreign_cpu_share:.0%} |"
        )
    b1 = r.arms[1]
    parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in b1.parts_s.items())
    lines += [
        "",
        f"- arm a: decode {a.parts_s['decode']:.2f} s + VLM {a.parts_s['vlm']:.2f} s "
        f"+ ranking {a.parts_s['rank'] * 1e3:.0f} ms; cascade (median of "
        f"{len(r.cascade_walls_s)}: {', '.join(f'{w:.2f}' for w in r.cascade_walls_s)} s): "
        f"{parts}",
        f"- per image: VLM {r.vlm_ms_per_image:.2f} ms, CLIP embedding {r.clip_ms_per_image:.2f} "
        f"ms: VLM/CLIP = {r.vlm_clip_ratio:,.0f}x (H200, Llava-1.5-7B vs ViT-B-32: "
        f"~{H200_RATIO:,.0f}x)",
        f"- S_vlm std over the candidates {r.s_vlm_std:.3f}; the cascade's S_vlm equal arm a's on "
        f"the same images to {r.s_vlm_same_images_max_abs_diff:.1e}",
        "",
        "| stage | n in | n kept | ms (median) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for s in r.stages:
        skipped = " (skipped)" if s["skipped"] else ""
        lines.append(
            f"| {s['name']}{skipped} | {s['n_in']:,} | {s['n_kept']:,} | {s['ms_median']:.2f} |"
        )
    lines += [f"- {note}" for note in r.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, LlavaShape]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", type=int, default=1000, help="N, candidates for the query")
    p.add_argument("--query", default="a cat")
    p.add_argument("--top-n", type=int, default=20, help="the cascade's VLM budget")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument(
        "--dedup",
        type=float,
        default=0.99,
        help="the cascade's dedup threshold (0.99: random weights, see the module docstring)",
    )
    p.add_argument("--clip", default="keeper-tiny:random", help="CLIP ModelSpec")
    p.add_argument("--clip-batch", type=int, default=64)
    p.add_argument(
        "--vlms",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=["tiny", "random-llava"],
        help="judges to run: tiny, random-llava",
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-llava's preset")
    for flag, name in SHAPE_FLAGS.items():
        p.add_argument(flag, type=int, default=None, help=f"random-llava {name} (preset's)")
    p.add_argument("--init-std", type=float, default=0.02, help="random-llava's init std")
    p.add_argument("--max-batch", type=int, default=None, help="judge batch (8 CPU, 16 GPU)")
    p.add_argument("--vlm-all-limit", type=int, default=None, help="arm a judges only this many")
    p.add_argument("--repeats", type=int, default=3, help="cascade runs per judge (median)")
    p.add_argument("--size", type=parse_size, default=(320, 240), help="WIDTHxHEIGHT of the JPEGs")
    p.add_argument("--cache", type=Path, default=Path("/tmp/keeper-bench"), help="corpus cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--gpu", action="store_true", help="CLIP and judges on CUDA, judges in bf16")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cascade.json"))
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device; none is visible")
    bad = sorted(set(args.vlms) - {"tiny", "random-llava"})
    if bad or not args.vlms:
        p.error(f"--vlms: unknown or no judges {bad}; choose from tiny, random-llava")
    if args.candidates < max(args.top_n, args.top_k, 2):
        p.error("--candidates must be at least --top-n and --top-k")
    if args.vlm_all_limit is not None and args.vlm_all_limit < 1:
        p.error("--vlm-all-limit must be >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.shape = args.shape or ("llava-1.5-7b" if args.gpu else "cpu-small")
    args.max_batch = args.max_batch or (16 if args.gpu else 8)
    over = {name: getattr(args, name) for name in SHAPE_FLAGS.values()}
    shape = replace(SHAPES[args.shape], **{k: v for k, v in over.items() if v is not None})
    if shape.image_size % shape.patch_size:
        p.error("--image-size must be a multiple of --patch-size")
    return args, shape


def main(argv: Sequence[str] | None = None) -> int:
    args, shape = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # shard-writing bars would garble the log; no work change
    t_start = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    manifest = make_corpus(args.cache, args.candidates, args.size)
    uris = read_manifest(manifest)
    n = len(uris)
    device = "cuda" if args.gpu else "cpu"
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "random_llava_shape": asdict(shape),
            "manifest": str(manifest),
            "cascade": "run_cascade, dedup on, alpha = beta = 0.5, min_relevance 0, "
            "logit scale = the CLIP model's",
        },
        "machine": machine_info() | {"transformers": version("transformers")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": os.getloadavg(),
        "notes": [RANDOM_NOTE],
    }
    mon = CpuMonitor()
    try:
        print(f"{n} candidates; decoding and embedding with {args.clip} ...", flush=True)
        embedder = ClipEmbedder(args.clip, device=device, batch_size=args.clip_batch)
        shared = prepare(uris, embedder, mon)
        report["shared"] = {
            "decode_s": shared.decode_s,
            "decode_ms_per_image": shared.decode_s / n * 1e3,
            "decode_foreign_cpu_share": shared.decode_foreign,
            "embed_s": shared.embed_s,
            "embed_ms_per_image": shared.embed_s / n * 1e3,
            "embed_foreign_cpu_share": shared.embed_foreign,
            "clip_logit_scale": logit_scale(embedder),
            "reach_vlm_by_dedup_threshold": dedup_probe(shared, embedder, args),
        }
        runs: list[JudgeRun] = []
        with tempfile.TemporaryDirectory(dir=args.cache, prefix="cascade-vlms-") as tmp:
            for name in args.vlms:
                print(f"building and loading the {name} judge ...", flush=True)
                t = time.perf_counter()
                desc, cfg = build_judge(name, args, shape, Path(tmp))
                build_s = time.perf_counter() - t
                judge = load_vlm(cfg)
                load_s = time.perf_counter() - t - build_s
                runs.append(
                    bench_judge(name, desc, judge, build_s, load_s, shared, embedder, args, mon)
                )
                del judge
    finally:
        mon.stop()
    report["judges"] = [asdict(r) for r in runs]
    report["h200_arithmetic"] = h200_arithmetic(n, args.top_n)
    report["loadavg_end"] = os.getloadavg()
    report["runtime_s"] = round(time.perf_counter() - t_start, 1)

    s = report["shared"]
    print(
        f"\n{n} candidates ({args.size[0]}x{args.size[1]} JPEGs), query {args.query!r}, cascade "
        f"top_n={args.top_n} top_k={args.top_k} dedup={args.dedup}; torch threads "
        f"{args.threads}, {device}\nshared: read + decode {s['decode_s']:.2f} s "
        f"({s['decode_ms_per_image']:.2f} ms/img), {args.clip} embedding {s['embed_s']:.2f} s "
        f"({s['embed_ms_per_image']:.2f} ms/img)\n"
    )
    for r in runs:
        print(table(r, n) + "\n")
    probe = ", ".join(f"{k}: {v}" for k, v in s["reach_vlm_by_dedup_threshold"].items())
    print(f"candidates reaching the VLM stage by dedup threshold: {probe}")
    h = report["h200_arithmetic"]
    print(
        f"H200 arithmetic (DESIGN.md rates, not measured): VLM on {n} {h['vlm_all_s']} s, "
        f"cascade {h['cascade_precomputed_s']} s precomputed ({h['speedup_precomputed']}x), "
        f"{h['cascade_with_embedding_s']} s with decode + embedding "
        f"({h['speedup_with_embedding']}x)"
    )
    print(f"NOTE: {RANDOM_NOTE}.")
    print(f"benchmark runtime {report['runtime_s']:.0f} s")
    write_record(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
