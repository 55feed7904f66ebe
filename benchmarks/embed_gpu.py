"""Embedding throughput on one GPU: keeper's job with CPU or GPU decode against the model's ceiling.

    python3 benchmarks/embed_gpu.py [--budget-s 420] [--sizes 512x384,1600x1200,4000x3000] \
        [--images 512x384=80000,1600x1200=24000,4000x3000=8000] [--rows ROW,...] [--out FILE]
    .venv/bin/python benchmarks/embed_gpu.py --device cpu --smoke --out /tmp/embed-gpu-smoke.json

Issue 14's goals, ViT-B-32 in steady state on one H200 with 16 cores (``GOALS``): 15,000 img/s
at 512x384, 4,000 at 1600x1200, 600 at 12 MP (4000x3000). For each size, in one Ray session, on
the same JPEGs:

1. ceiling: ``ClipEmbedder.embed_pixels`` (bf16 autocast on CUDA) on uint8 tensors already on the
   device, at each of ``--ceiling-batches``, best kept. Measured once: it does not depend on the
   image size. On CUDA also at the best batch from host memory, pageable (as a model actor gets
   its batches from Ray Data) and pinned: the share of the ceiling the copy to the device takes,
   and what pinned staging would give back.
2. keeper, decode tasks (``tasks-cpu``): CPU decode with JPEG draft, ``decode_num_cpus=1``, one
   model actor on one GPU.
3. keeper, ``decode=gpu`` (``gpu-c{C}-calls{K}``): each model actor reads, nvJPEG-decodes,
   resizes and measures its batches on its GPU (``decode_placement=actor``), K batches decoding
   while one embeds; C actors sharing the GPU (``num_gpus_per_worker`` 1/C).
   ``nvimgcodec-c{C}-calls{K}``: the same with ``decode=nvimgcodec`` (NVIDIA nvImageCodec: the
   GPU's hardware JPEG decoder where it has one, as A100/H100-class GPUs do).

Keeper rows run as ``benchmarks/embed.py``'s: a probe run (its start-up: Ray's init when Ray is
not up yet, plus the seconds to the first written part), then N and 2N images (fresh outputs,
``batch_size`` images a part); steady state = N / (t_2N - t_N) over pipeline seconds, end to end =
2N / t_2N. N is chosen from the probe's rate to take about ``--steady-s`` seconds (at most the
size's ``--images``), in whole batches. Decode tasks start at once and decode ahead while the model
actor starts (CUDA, model build): for their rows N also covers what they decode meanwhile, or t_N
would be start-up alone and the steady state too high (flagged in the row's status when
t_2N - t_N is still shorter than that start-up). Rows run in ``--rows`` order, most wanted first.

Budget: ``--budget-s`` (less ``RESERVE_S`` for shutdown and the table) bounds everything
(generating the corpora too). The ceiling comes first; each size then gets an equal share of
what is left, and what a size leaves over goes to the sizes after it. Before every run its
seconds are estimated (the probe's from the last probe, N from the probe, 2N from N); a run that
does not fit is not started, N is cut to fit, and what is left out is recorded as
"not measured: budget". The JSON is written after every run: a run cut off by a timeout keeps
what it measured. Without CUDA the GPU rows are "not measured: no CUDA" (the job refuses
``decode=gpu`` without GPUs) and decode tasks feed a CPU model actor.

Corpus: ``--corpus grained`` (default) is ``benchmarks/decode.py``'s JPEGs (the six colour photos
upscaled, mirrored, with a camera-like grain, quality 90: the decode cost of camera JPEGs, and the
files behind the decode figures); ``synthetic`` is ``benchmarks/embed.py``'s ``make_corpus``
(keeper_core.synthetic bursts: smooth upscaled photos, cheaper to decode at 12 MP, slow to make).
Either is generated once per size into ``--cache``, and the N and 2N images are distinct file names
hard-linked to those few files (decode and measurement cost the same per name; the JSON says how
many distinct contents there are).

``--smoke`` (with ``--device cpu`` on a machine without a GPU) runs the same control flow small:
keeper-tiny:random, 24 images of 256x192, batch 4.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

# benchmarks/ is sys.path[0] when this runs as a script (tests put it there).
from decode import make_jpegs
from embed import (
    CORES,
    machine_info,
    make_corpus,
    parse_overrides,
    parse_size,
    read_manifest,
    run_job,
)

from keeper_core.embedding import ClipEmbedder

#: Issue 14: ViT-B-32 steady-state images/s on one H200 with 16 cores.
GOALS: dict[str, float] = {"512x384": 15_000.0, "1600x1200": 4_000.0, "4000x3000": 600.0}
NO_CUDA = "not measured: no CUDA"
NO_BUDGET = "not measured: budget"
RESERVE_S = 10.0  # Ray's shutdown, the table and the last write, after the last run
MARGIN = 1.15  # on every run's estimate: start-up time varies from run to run
# A first probe's seconds before anything is known: Ray's init, a GPU actor's CUDA context and
# model build, two batches. Later probes are estimated from the last one.
FIRST_PROBE_S = {"cuda": 40.0, "cpu": 30.0}


@dataclass(frozen=True)
class RowSpec:
    name: str
    what: str
    cuda_only: bool
    overrides: dict[str, Any]


def _gpu_row(actors: int, calls: int, decode: str = "gpu") -> RowSpec:
    return RowSpec(
        f"{decode}-c{actors}-calls{calls}",
        f"decode={decode} in {actors} actor(s) at {1 / actors:g} GPU, {calls} decoding call(s)",
        True,
        {
            "decode": decode,
            "decode_placement": "actor",
            "actor_decode_calls": calls,
            "concurrency": actors,
            "num_gpus_per_worker": 1.0 / actors,
        },
    )


ROWS: dict[str, RowSpec] = {
    r.name: r
    for r in (
        _gpu_row(1, 2),
        _gpu_row(1, 2, "nvimgcodec"),  # the GPU's hardware JPEG decoder, where it has one
        RowSpec(
            "tasks-cpu",
            "CPU decode tasks (draft, 1 CPU each) -> 1 model actor",
            False,
            {
                "decode": "cpu",
                "decode_placement": "tasks",
                "draft": True,
                "decode_num_cpus": 1,
                "concurrency": 1,
                "num_gpus_per_worker": 1.0,
            },
        ),
        _gpu_row(1, 1),
        _gpu_row(2, 2),
        _gpu_row(2, 1),
    )
}
#: Most wanted first: with a short budget, the GPU-decode job against the goals, then the CPU
#: decode it replaces, then the variants.
DEFAULT_ROWS = tuple(ROWS)
# Most N per size: ~4 s at the goal for the GPU rows, and for decode tasks their ~12 s of start-up
# plus steady seconds at 16 cores' CPU decode rate (~5,000, ~940, ~500 img/s). Hard links: cheap.
DEFAULT_IMAGES = {"512x384": 80_000, "1600x1200": 24_000, "4000x3000": 8_000}


# --------------------------------------------------------------------------------------------
# Results (written as JSON after every run)


@dataclass
class KeeperRun:
    images: int
    run_wall_s: float
    pipeline_s: float
    ray_init_s: float
    seconds_to_first_part: float
    images_per_s: float
    worker_seconds: dict[str, float]
    seconds: dict[str, float]


@dataclass
class RowResult:
    name: str
    what: str
    config: dict[str, Any]
    status: str = "not run"
    runs: dict[str, KeeperRun] = field(default_factory=dict)  # probe, N, 2N
    n: int | None = None
    steady_images_per_s: float | None = None
    e2e_images_per_s: float | None = None
    #: the probe's: Ray's init (the first row only) + seconds to its first written part
    startup_s: float | None = None
    #: the N and 2N runs' seconds to their first part (Ray up, new actors)
    warm_startup_s: list[float] = field(default_factory=list)
    per_image_ms: dict[str, float] = field(default_factory=dict)
    vs_ceiling: float | None = None
    vs_goal: float | None = None
    cluster: str = ""
    #: decode tasks: images decoded during a start-up (estimated), added to N
    decode_ahead_images: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Ceiling:
    spec: str
    device: str
    dtype: str
    status: str = "not run"
    by_batch: dict[str, float] = field(default_factory=dict)
    batch_size: int | None = None
    images_per_s: float | None = None
    #: CUDA, at the best batch: the same uint8 batch handed over in host memory, as a model
    #: actor gets it from Ray Data (pageable), and pinned: what the copy to the device costs
    from_host: dict[str, float] = field(default_factory=dict)


@dataclass
class Corpus:
    kind: str
    folder: str
    distinct_files: int
    distinct_contents: int
    mean_bytes: int
    generate_s: float
    names: int = 0  # hard-linked names made so far
    note: str = "N and 2N are distinct names hard-linked to the distinct files"


@dataclass
class SizeResult:
    size: str
    goal_images_per_s: float | None
    images_cap: int
    allowance_s: float
    used_s: float = 0.0
    ceiling_vs_goal: float | None = None
    corpus: Corpus | None = None
    rows: list[RowResult] = field(default_factory=list)


@dataclass
class Report:
    command: str
    config: dict[str, Any]
    machine: dict[str, Any]
    started: str
    ceiling: Ceiling
    sizes: list[SizeResult] = field(default_factory=list)
    status: str = "running"
    failures: int = 0
    runtime_s: float = 0.0


# --------------------------------------------------------------------------------------------
# Corpus


class CorpusFiles:
    """A size's distinct JPEGs, and manifests of ``n`` distinct names hard-linked to them."""

    def __init__(self, cache: Path, kind: str, size: tuple[int, int], distinct: int) -> None:
        t0 = time.perf_counter()
        w, h = size
        if kind == "grained":
            folder = cache / f"embed-gpu-grained-{w}x{h}-d{distinct}"
            if not (folder / "DONE").exists():  # written last: the folder is whole
                print(f"  generating {distinct} grained JPEGs at {w}x{h} ...", flush=True)
                folder.mkdir(parents=True, exist_ok=True)
                for i, data in enumerate(make_jpegs(distinct, size)):
                    (folder / f"{i:04d}.jpg").write_bytes(data)
                (folder / "DONE").write_text("")
            files = sorted(folder.glob("*.jpg"))
        else:
            manifest = make_corpus(cache, distinct, size)
            folder = manifest.parent
            files = [Path(u) for u in read_manifest(manifest)]
        self.files = files
        self.names = cache / f"embed-gpu-names-{folder.name}-{len(files)}"
        self.names.mkdir(parents=True, exist_ok=True)
        sizes = [f.stat().st_size for f in files]
        self.info = Corpus(
            kind=kind,
            folder=str(folder),
            distinct_files=len(files),
            distinct_contents=len({hashlib.sha1(f.read_bytes()).digest() for f in files}),
            mean_bytes=int(sum(sizes) / len(sizes)),
            generate_s=round(time.perf_counter() - t0, 2),
        )

    def manifest(self, n: int) -> Path:
        """A manifest of ``n`` distinct file names (made once, kept in the cache)."""
        for i in range(n):
            name = self.names / f"{i:07d}.jpg"
            if not name.exists():
                os.link(self.files[i % len(self.files)], name)
        self.info.names = max(self.info.names, n)
        out = self.names / f"names-{n}.csv"
        if not out.exists():
            rows = "\n".join(str(self.names / f"{i:07d}.jpg") for i in range(n))
            tmp = out.with_suffix(".tmp")
            tmp.write_text(f"image_uri\n{rows}\n")
            tmp.replace(out)  # a run killed while writing leaves no short manifest behind
        return out


# --------------------------------------------------------------------------------------------
# 1: the model's ceiling


def bench_ceiling(
    spec: str, device: str, batches: Sequence[int], seconds: float, deadline: float
) -> Ceiling:
    """embed_pixels on uint8 tensors already on ``device``; images/s at each batch size."""
    dtype = "bf16 autocast" if device == "cuda" else "float32"
    res = Ceiling(spec=spec, device=device, dtype=dtype)
    # Model build and CUDA's start, then per batch size a warm-up and ``seconds`` timed.
    runs = len(batches) + (2 if device == "cuda" else 0)  # + pageable and pinned on CUDA
    if time.perf_counter() + 15 + runs * (seconds + 2) > deadline:
        res.status = NO_BUDGET
        return res
    embedder = ClipEmbedder(spec, device=device, batch_size=max(batches))
    s = embedder.clip.image_size
    for bs in batches:
        x = torch.randint(0, 256, (bs, 3, s, s), dtype=torch.uint8, device=device)
        embedder.batch_size = bs
        for _ in range(3):  # kernels chosen and memory allocated before timing
            embedder.embed_pixels(x)
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds or n < 3 * bs:
            embedder.embed_pixels(x)  # returns numpy: synchronised with the device
            n += bs
        res.by_batch[str(bs)] = round(n / dt, 1)
        print(f"  ceiling  batch {bs:4d}: {n / dt:9.1f} img/s", flush=True)
    best = max(res.by_batch, key=lambda k: res.by_batch[k])
    res.batch_size, res.images_per_s = int(best), res.by_batch[best]
    if device == "cuda":
        bs = res.batch_size
        embedder.batch_size = bs
        on_host = torch.randint(0, 256, (bs, 3, s, s), dtype=torch.uint8)
        for kind, batch in (("pageable", on_host.numpy()), ("pinned", on_host.pin_memory())):
            for _ in range(2):
                embedder.embed_pixels(batch)
            n, t0 = 0, time.perf_counter()
            while (dt := time.perf_counter() - t0) < seconds or n < 3 * bs:
                embedder.embed_pixels(batch)
                n += bs
            res.from_host[kind] = round(n / dt, 1)
            print(f"  ceiling  batch {bs:4d} from {kind} host memory: {n / dt:9.1f} img/s")
    res.status = "measured"
    del embedder, x
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the model actors want the memory
    return res


# --------------------------------------------------------------------------------------------
# 2, 3: keeper's job


def keeper_run(
    manifest: Path, n: int, workdir: Path, spec: str, batch_size: int, overrides: dict[str, Any]
) -> tuple[KeeperRun, str]:
    """One run of the job on the first ``n`` images; fresh output, removed after."""
    s, wall, _ = run_job(spec, manifest, n, batch_size, workdir, **overrides)
    r = KeeperRun(
        images=n,
        run_wall_s=round(wall, 3),
        pipeline_s=s.seconds["pipeline"],
        ray_init_s=s.seconds.get("ray_init", 0.0),
        seconds_to_first_part=s.seconds_to_first_part or 0.0,
        images_per_s=s.images_per_s or 0.0,
        worker_seconds=s.worker_seconds,
        seconds=s.seconds,
    )
    print(
        f"    {n:6d} images: pipeline {r.pipeline_s:6.1f}s ({r.images_per_s:8.1f} img/s), "
        f"ray init {r.ray_init_s:.1f}s, first part {r.seconds_to_first_part:.1f}s, "
        f"wall {wall:.1f}s",
        flush=True,
    )
    return r, s.cluster


def flow_seconds(r: KeeperRun, batch_size: int) -> float:
    """Seconds per image once the first part is out (pipeline full), from one run."""
    flowing = r.pipeline_s - r.seconds_to_first_part
    after = r.images - min(batch_size, r.images - 1)
    return max(flowing, 1e-3) / max(after, 1)


def decode_slots(model: str, config: dict[str, Any]) -> int | None:
    """Decode tasks that run at once on this one-node Ray; None where the actors decode."""
    from keeper_train.jobs.embed import EmbedConfig

    cfg = EmbedConfig(input="-", output="-", model=model, **config)
    if cfg.placement != "tasks":
        return None
    cpus = cfg.stage_cpus()
    slots = int((CORES - cfg.concurrency * cpus.actor) // cpus.decode)
    return max(1, min(slots, cfg.decode_concurrency or slots))


def choose_n(
    *,
    per_image_s: float,
    overhead_s: float,
    left_s: float,
    steady_s: float,
    batch_size: int,
    cap: int,
    cover: int = 0,
) -> int | None:
    """N for the N and 2N runs: ``cover`` images plus about ``steady_s`` seconds of images, whole
    batches, at most ``cap``; cut so that both runs fit ``left_s`` (each costs ``overhead_s`` +
    its images); None when even the smallest N (two batches, or ``cap``) does not fit."""
    smallest = min(2 * batch_size, cap)
    want = min(cap, max(smallest, cover + math.ceil(steady_s / per_image_s)))
    fits = int((left_s / MARGIN - 2 * overhead_s) / (3 * per_image_s))
    n = min(want, fits)
    if n < smallest:
        return None
    whole = n // batch_size * batch_size
    return whole if whole >= smallest else n  # a cap under two batches: all of it


class Bench:
    """The keeper rows of every size, in one Ray session, under one budget."""

    def __init__(self, args: argparse.Namespace, report: Report, out: Path, workdir: Path):
        self.args, self.report, self.out, self.workdir = args, report, out, workdir
        self.last_probe_s: float | None = None

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.report), indent=2) + "\n")
        tmp.replace(self.out)  # a reader (or a kill) never sees half a file

    def row_config(self, spec: RowSpec) -> dict[str, Any]:
        """The row's EmbedConfig settings here (batch_size included)."""
        overrides = dict(spec.overrides)
        if self.args.device == "cpu" and not spec.cuda_only:
            overrides["num_gpus_per_worker"] = 0.0  # the model actor on the CPU
        return {"batch_size": self.args.batch_size, **overrides, **self.args.keeper_set}

    def probe_fits(self, res: RowResult, deadline: float) -> bool:
        """Whether the row's probe run fits; if not, the row is marked so."""
        left = deadline - time.perf_counter()
        need = MARGIN * (self.last_probe_s or FIRST_PROBE_S[self.args.device])
        if need <= left:
            return True
        res.status = NO_BUDGET
        print(f"  {res.name}: {NO_BUDGET} ({left:.0f}s left, ~{need:.0f}s needed)", flush=True)
        return False

    def row(self, res: RowResult, size: SizeResult, corpus: CorpusFiles, deadline: float) -> None:
        print(f"  {res.name}: {res.what}", flush=True)
        try:
            self._measure(
                res, corpus, size, min(2 * self.args.batch_size, size.images_cap), deadline
            )
        except Exception as e:  # one failing row must not cost the others: recorded, exit 1
            res.status = f"failed: {type(e).__name__}: {str(e)[:2000]}"
            self.report.failures += 1
            print(f"    FAILED {res.status}", flush=True)

    def _measure(
        self, res: RowResult, corpus: CorpusFiles, size: SizeResult, probe_n: int, deadline: float
    ) -> None:
        a, bs = self.args, self.args.batch_size
        cfg = {k: v for k, v in res.config.items() if k != "batch_size"}

        def one(n: int, key: str) -> KeeperRun:
            r, res.cluster = keeper_run(corpus.manifest(n), n, self.workdir, a.model, bs, cfg)
            res.runs[key] = r
            self.save()
            return r

        probe = one(probe_n, "probe")
        res.status = "partial: probe only"
        self.last_probe_s = probe.run_wall_s - probe.ray_init_s
        res.startup_s = round(probe.ray_init_s + probe.seconds_to_first_part, 3)
        per_image = flow_seconds(probe, bs)
        if self.report.ceiling.images_per_s:  # no faster than the model alone
            per_image = max(per_image, 1 / self.report.ceiling.images_per_s)
        slots = decode_slots(a.model, cfg)
        if slots is not None:
            # Decode tasks start at once and run ahead while the model actor starts: had N
            # images all been decoded by then, t_N would be start-up alone and the difference
            # t_2N - t_N too short. So N also covers what decode does during a start-up, at
            # the rate its tasks can reach (the probe's flow, measured after its start-up
            # drained that backlog, runs too fast for an estimate).
            decode_s = probe.worker_seconds["read_decode_features"] / probe_n
            per_image = max(per_image, decode_s / slots)
            res.decode_ahead_images = math.ceil(probe.seconds_to_first_part / per_image)
        n = choose_n(
            per_image_s=per_image,
            # what a run costs besides its images after the first part: start-up, the first
            # batch, planning and the summary
            overhead_s=probe.run_wall_s - probe.ray_init_s - (probe_n - bs) * per_image,
            left_s=deadline - time.perf_counter(),
            steady_s=a.steady_s,
            batch_size=bs,
            cap=size.images_cap,
            cover=res.decode_ahead_images,
        )
        if n is None:
            res.status = f"partial: probe only; N and 2N {NO_BUDGET}"
            return
        res.n = n
        first = one(n, "N")
        res.warm_startup_s.append(first.seconds_to_first_part)
        # 2N: the N run again plus N more images at the N run's flowing rate
        est = MARGIN * (first.run_wall_s + n * flow_seconds(first, bs))
        if est > deadline - time.perf_counter():
            res.status = f"partial: probe and N; 2N {NO_BUDGET} (needs ~{est:.0f}s)"
            return
        second = one(2 * n, "2N")
        res.warm_startup_s.append(second.seconds_to_first_part)
        dt = second.pipeline_s - first.pipeline_s
        res.e2e_images_per_s = round(2 * n / second.pipeline_s, 1)
        w = second.worker_seconds
        res.per_image_ms = {k: round(1000 * v / (2 * n), 3) for k, v in w.items()}
        if dt <= 0:  # noise swamped the difference: it estimates nothing
            res.status = "measured; steady state not estimable (t_2N <= t_N)"
            return
        res.steady_images_per_s = round(n / dt, 1)
        res.status = "measured"
        if slots is not None and dt < first.seconds_to_first_part:
            res.status = (
                "measured; steady may be too high: t_2N - t_N is shorter than the N run's "
                "start-up, while decode tasks ran ahead (N too small: raise --images)"
            )
        ceiling = self.report.ceiling.images_per_s
        res.vs_ceiling = round(res.steady_images_per_s / ceiling, 3) if ceiling else None
        goal = size.goal_images_per_s
        res.vs_goal = round(res.steady_images_per_s / goal, 3) if goal else None
        print(
            f"    steady {res.steady_images_per_s:.1f} img/s (vs ceiling {res.vs_ceiling}, "
            f"vs goal {res.vs_goal}), end to end {res.e2e_images_per_s:.1f}",
            flush=True,
        )

    def size(self, size: tuple[int, int], deadline: float) -> SizeResult:
        a = self.args
        key = f"{size[0]}x{size[1]}"
        goal = GOALS.get(key)
        ceiling = self.report.ceiling.images_per_s
        res = SizeResult(
            size=key,
            goal_images_per_s=goal,
            images_cap=a.images.get(key, a.default_images),
            allowance_s=round(deadline - time.perf_counter(), 1),
            ceiling_vs_goal=round(ceiling / goal, 3) if ceiling and goal else None,
        )
        self.report.sizes.append(res)
        print(f"\n== {key}: goal {fmt(goal, '.0f')} img/s, {res.allowance_s:.0f}s of budget")
        t0 = time.perf_counter()
        corpus: CorpusFiles | None = None
        for name in a.rows:
            spec = ROWS[name]
            row = RowResult(name, spec.what, self.row_config(spec))
            res.rows.append(row)
            if a.device == "cpu" and not spec.cuda_only:
                row.notes.append("no CUDA: the model actor runs on the CPU")
            if spec.cuda_only and a.device != "cuda":
                row.status = NO_CUDA
            elif self.probe_fits(row, deadline):
                if corpus is None:  # made only for a size where a row runs
                    corpus = CorpusFiles(a.cache, a.corpus, size, a.distinct)
                    res.corpus = corpus.info
                if self.probe_fits(row, deadline):  # the corpus took its time
                    self.row(row, res, corpus, deadline)
            res.used_s = round(time.perf_counter() - t0, 1)
            self.save()
        res.used_s = round(time.perf_counter() - t0, 1)
        self.save()
        return res


# --------------------------------------------------------------------------------------------
# Driver


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(report: Report) -> str:
    """Each size's rows as a Markdown table (pasted into docs/benchmarks.md as is)."""
    c = report.ceiling
    lines = [
        f"{c.spec} on {report.machine.get('gpu') or 'CPU'}, {report.machine['cores']} cores; "
        f"ceiling {c.status}: {fmt(c.images_per_s)} img/s "
        f"({c.device}, {c.dtype}, batch {c.batch_size}; {c.by_batch}"
        + (f"; from host memory {c.from_host}" if c.from_host else "")
        + ")",
    ]
    for s in report.sizes:
        corpus = s.corpus
        about = (
            f"{corpus.kind} JPEGs, {corpus.distinct_contents} distinct, "
            f"mean {corpus.mean_bytes / 1024:.0f} KiB"
            if corpus
            else "no corpus made"
        )
        lines += [
            "",
            f"### {s.size}: goal {fmt(s.goal_images_per_s, '.0f')} img/s; {about}; "
            f"{s.used_s:.0f} of {s.allowance_s:.0f}s",
            "",
            "| row | steady img/s | vs ceiling | vs goal | end to end img/s | start-up s "
            "| N | status |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            f"| ceiling (model only) | {fmt(c.images_per_s)} | 1.00 | "
            f"{fmt(s.ceiling_vs_goal, '.2f')} | | | | {c.status} |",
        ]
        for r in s.rows:
            lines.append(
                f"| {r.name} | {fmt(r.steady_images_per_s)} | {fmt(r.vs_ceiling, '.2f')} | "
                f"{fmt(r.vs_goal, '.2f')} | {fmt(r.e2e_images_per_s)} | "
                f"{fmt(r.startup_s)} | {r.n or '-'} | {r.status} |"
            )
    lines += ["", *(f"- {r.name}: {r.what}" for r in map(ROWS.get, report.config["rows"]) if r)]
    return "\n".join(lines)


def cuda_info() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"cuda": None}
    p = torch.cuda.get_device_properties(0)
    return {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device_name": p.name,
        "device_count": torch.cuda.device_count(),
        "capability": f"{p.major}.{p.minor}",
        "device_memory_gib": round(p.total_memory / 2**30, 1),
        "bf16": torch.cuda.is_bf16_supported(),
    }


def parse_images(text: str) -> dict[str, int]:
    """``WxH=N,...`` -> {"WxH": N}."""
    out = {}
    for k, v in parse_overrides(text).items():
        w, h = parse_size(k)
        out[f"{w}x{h}"] = int(v)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny model and corpus: the control flow")
    p.add_argument("--budget-s", type=float, help="seconds for everything (default 420; smoke 150)")
    p.add_argument(
        "--sizes",
        type=lambda s: [parse_size(x) for x in s.split(",") if x.strip()],
        help="WxH,... (default 512x384,1600x1200,4000x3000; smoke 256x192)",
    )
    p.add_argument(
        "--images",
        type=parse_images,
        help=f"most images N per size, WxH=N,... (2N are embedded; default {DEFAULT_IMAGES}, "
        "4000 for a size not named; smoke 12)",
    )
    p.add_argument("--steady-s", type=float, help="seconds of images N aims at (default 4)")
    p.add_argument(
        "--rows",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(DEFAULT_ROWS),
        help=f"keeper rows, in the order they run (default {','.join(DEFAULT_ROWS)})",
    )
    p.add_argument("--model", help="default ViT-B-32:random; smoke keeper-tiny:random")
    p.add_argument("--batch-size", type=int, help="keeper's batch size (default 512; smoke 4)")
    p.add_argument(
        "--ceiling-batches",
        type=lambda s: [int(x) for x in s.split(",")],
        help="default 256,512; smoke 4,8",
    )
    p.add_argument("--ceiling-s", type=float, help="timed seconds per batch size (default 2)")
    p.add_argument("--corpus", choices=("grained", "synthetic"), default="grained")
    p.add_argument("--distinct", type=int, default=12, help="distinct JPEGs made per size")
    p.add_argument("--cache", type=Path, default=Path("/tmp/keeper-bench"), help="corpus cache")
    p.add_argument(
        "--keeper-set",
        type=parse_overrides,
        default={},
        help="EmbedConfig overrides for every keeper row, e.g. decode_batch_size=64",
    )
    p.add_argument("--out", type=Path, help="default $OUT/embed-gpu.json, else benchmarks/results")
    a = p.parse_args(argv)
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    smoke = a.smoke
    pick = {  # (default, smoke default) of the options left unset
        "budget_s": (420.0, 150.0),
        "sizes": ([(512, 384), (1600, 1200), (4000, 3000)], [(256, 192)]),
        "steady_s": (4.0, 10.0),
        "model": ("ViT-B-32:random", "keeper-tiny:random"),
        "batch_size": (512, 4),
        "ceiling_batches": ([256, 512], [4, 8]),
        "ceiling_s": (2.0, 0.5),
    }
    for k, (full, small) in pick.items():
        if getattr(a, k) is None:
            setattr(a, k, small if smoke else full)
    a.images = {**({} if smoke else DEFAULT_IMAGES), **(a.images or {})}
    a.default_images = 12 if smoke else 4_000  # N of a size --images does not name
    if a.out is None:
        name = "embed-gpu-smoke.json" if smoke else "embed-gpu.json"
        a.out = Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None
        a.out = a.out or Path("benchmarks/results") / name
    return a


def main(argv: Sequence[str] | None = None) -> int:
    t_start = time.perf_counter()
    a = parse_args(argv)
    # Ray's progress bars and per-dataset INFO lines only garble the log; warnings still show.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    end = t_start + a.budget_s - RESERVE_S

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # the finally below saves what was measured

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    machine = machine_info()
    machine.update(cuda_info())
    report = Report(
        command=" ".join([Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
        config={
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "sizes"
        }
        | {"sizes": [f"{w}x{h}" for w, h in a.sizes], "goals": GOALS, "reserve_s": RESERVE_S},
        machine=machine,
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ceiling=Ceiling(spec=a.model, device=a.device, dtype=""),
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.cache.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="embed-gpu-runs-", dir=a.cache))
    bench = Bench(a, report, a.out, workdir)
    bench.save()
    try:
        print(f"== ceiling: {a.model} on {a.device}", flush=True)
        report.ceiling = bench_ceiling(a.model, a.device, a.ceiling_batches, a.ceiling_s, end)
        bench.save()
        for i, size in enumerate(a.sizes):
            now = time.perf_counter()
            bench.size(size, now + max(0.0, end - now) / (len(a.sizes) - i))
        report.status = "done"
    except BaseException as e:  # SIGTERM, ^C, or a bug: what was measured is saved first
        report.status = f"interrupted: {type(e).__name__}: {e}"
        raise
    finally:
        report.runtime_s = round(time.perf_counter() - t_start, 1)
        bench.save()
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    print("\n" + table(report))
    print(f"\nbenchmark runtime {report.runtime_s:.0f}s of {a.budget_s:.0f}s; wrote {a.out}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
