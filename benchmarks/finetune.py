"""Fine-tuning cost: frozen tower + head, LoRA, last blocks + LoRA and full fine-tune side by side.

    .venv/bin/python benchmarks/finetune.py [--quick] [--gpu] [--threads 2] \
        [--out benchmarks/results/finetune.json]

The question (from the issue): on an H200 at ViT-B-32 size with a plain loop, LoRA r=16 was no
faster than a full fine-tune (6,100 vs 7,000 img/s at batch 256) at about the same memory; so
LoRA earns its place by quality on small data, artifact size and memory on large towers. This
script gives the figures for which, on this machine:

1. Plain loop (in process, no Ray), per model (``keeper-tiny:random``, ``ViT-B-32:random``) and
   per method, each in a fresh subprocess: a series-softmax step
   (``keeper_core.heads.series_softmax_loss``, AdamW over the trainable parameters only) on
   synthetic uint8 pixels (N, 3, S, S) laid out as series of 4, the model from
   ``keeper_core.finetune.TunedRanker.build`` (MLP head on the tower's embedding):

   - ``frozen+head``: the base tower under ``no_grad``, only the head trains;
   - ``lora``: LoRA r=16 (alpha 32) on attn + mlp.c_fc + mlp.c_proj of every block;
   - ``last-blocks+lora``: the last 2 blocks (1 of keeper-tiny's 2) in full, LoRA r=16 below;
   - ``full``: every tower parameter trains. Built as ``last-blocks`` (1 block), then
     ``requires_grad_(True)`` on the whole ``visual`` (conv1, ln_pre, class and positional
     embeddings, every block, ln_post, proj).

   Images/s is the steady state (warm-up steps excluded). Peak memory: on CPU the process's peak
   RSS (``resource.getrusage`` maxrss) less its RSS before the model was built; the high-water
   mark is reset (``/proc/self/clear_refs``) once the model is built, because building loads the
   whole CLIP (text tower too) and maxrss would otherwise keep that transient peak. On a GPU,
   ``torch.cuda.max_memory_allocated`` after a reset (weights, gradients, optimizer state and
   activations). The artifact is what ``TunedRanker.save`` writes (ranker.json, head, adapter,
   blocks); for ``frozen+head`` what a head ranker saves (``SeriesRanker.save``); for ``full``
   the whole tower's state dict in place of the blocks file. Ratios are against
   ``frozen+head`` of the same model. CPU: ``--threads`` torch threads (default: all cores),
   keeper-tiny batch 64, ViT-B-32 batch 16.
2. Ray Train against the plain loop: the real job (``keeper_train.jobs.finetune.run``) on a
   generated corpus (``keeper_core.synthetic.generate_corpus``, 120 series at 86x64, all base
   photos), keeper-tiny, LoRA r=16, batch 8 series, with 1 worker (torch threads = all cores)
   and 2 workers (1 thread each), and 1 worker with ``cache_pixels=false`` (every epoch runs the
   job's whole uncached pipeline again: decode, group into series, sort). Per run: the job's
   steady images/s (``FinetuneSummary.images_per_s``: train-loop seconds of the epochs after the
   first), the share of step time waiting on data, decode seconds, fit seconds, and the worker's
   peak memory (its maxrss, Ray's runtime included: not comparable with part 1). The baseline:
   the same train series, decoded in this process with keeper_core's ``ImagePreparation``, the
   same ranker, parameter groups, schedule, batch size and series-wide augmentation
   (``finetune.unpack``), in a plain loop with all cores; ratios are job / plain. A local Ray of
   its own; MLflow in a sqlite store in a temp folder under ``--cache`` (removed at the end).
3. ``--gpu``: ViT-B-32 (batch 256) and ViT-L-14 (batch 128) with the four methods in bf16
   autocast (images/s, peak memory), and the job with ``use_gpu=true`` on ViT-B-32 over a corpus
   of 640x480 JPEGs, pixel cache on and off (data wait share). THE --gpu PATH HAS NOT BEEN RUN:
   it was written on a CPU-only machine; it refuses to start without CUDA.

``--quick`` is a smoke run (keeper-tiny only, a few steps, 40 series, one job run of 2 epochs):
its figures mean nothing. Random weights throughout: speed and memory only. With torch threads =
cores, another busy process slows a step 5-15x here (seen on this 2-core machine), so, as in
embed.py, each measurement waits for a quiet machine and is repeated once (``--attempts``) if
other processes took more than ``--quiet`` (10 %) of the CPUs meanwhile; what they took is a
column ("others' CPU") and in the JSON. About 10-15 minutes on a quiet 2-core machine (corpora
generated once under ``--cache``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import CpuMonitor, machine_info, write_record

CORES = os.cpu_count() or 1
SERIES_LEN = 4  # synthetic series in the plain loop: batch sizes are multiples of it
METHODS = ("frozen+head", "lora", "last-blocks+lora", "full")
BASELINE = "frozen+head"
RESULT = "RESULT "  # the line a per-configuration subprocess answers with
#: Runs one measurement (name, thunk) and adds its CPU accounting under "cpu".
Measure = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# 1. The plain loop, one configuration per fresh subprocess


@dataclass(frozen=True)
class Case:
    """One plain-loop configuration (travels to the subprocess as JSON)."""

    spec: str
    method: str
    batch: int
    warmup: int
    steps: int
    device: str = "cpu"
    bf16: bool = False
    threads: int = CORES
    rank: int = 16
    alpha: int = 32


def _rss_mb() -> float:
    """This process's resident set now (MB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Set the peak RSS (maxrss, VmHWM) to the current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS, so the RSS after the build is the model's."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tower_blocks(spec: str) -> int:
    """Residual blocks of a spec's vision tower, from its config (no weights)."""
    from keeper_core.models import ModelSpec, _model_config

    return int(_model_config(ModelSpec.parse(spec))["vision_cfg"]["layers"])


def ranker_config(spec: str, tower: Any, *, hidden: int = 128, layers: int = 2) -> Any:
    """What ``finetune.ranker_config`` builds for ``features=embedding``: an MLP head on the
    tower's embedding."""
    from keeper_core.heads import HeadConfig
    from keeper_core.models import embed_dim
    from keeper_core.ranker import RankerConfig

    dim = embed_dim(spec)
    return RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=dim, hidden=hidden, layers=layers, dropout=0.1),
        features="embedding",
        embedding_spec=spec,
        embed_dim=dim,
        tower=tower,
    )


def tower_config(c: Case) -> Any:
    from keeper_core.tower import TowerConfig

    n = tower_blocks(c.spec)
    if c.method == "lora":
        return TowerConfig(base_spec=c.spec, method="lora", rank=c.rank, alpha=c.alpha)
    if c.method == "last-blocks+lora":
        return TowerConfig(
            base_spec=c.spec,
            method="last-blocks+lora",
            unfreeze_blocks=min(2, n - 1),
            rank=c.rank,
            alpha=c.alpha,
        )
    if c.method == "full":
        # TowerConfig has no "full" method: last-blocks, then every tower parameter unfrozen.
        return TowerConfig(base_spec=c.spec, method="last-blocks", unfreeze_blocks=1)
    raise ValueError(f"no tower config for {c.method!r}")


def build(c: Case, dev: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model for one method, and a function writing its artifact into a folder."""
    from safetensors.torch import save_file

    from keeper_core.finetune import TunedRanker, TunedRankerModel
    from keeper_core.heads import make_head
    from keeper_core.models import load_clip
    from keeper_core.ranker import SeriesRanker
    from keeper_core.tower import TunedTower

    if c.method == BASELINE:
        rc = ranker_config(c.spec, None)
        clip = load_clip(c.spec, "cpu")
        visual = clip.model.visual
        assert isinstance(visual, torch.nn.Module)
        visual.requires_grad_(False)
        torch.manual_seed(0)
        head = make_head(rc.head)
        model = TunedRankerModel(TunedTower(visual, clip.mean, clip.std), head, rc).to(dev)
        del clip
        return model, lambda d: SeriesRanker(rc, head).save(d)

    ranker = TunedRanker.build(ranker_config(c.spec, tower_config(c)), device=dev, seed=0)
    if c.method != "full":
        return ranker.model, ranker.save
    visual = ranker.model.tower.visual
    visual.requires_grad_(True)

    def save_full(d: Path) -> None:
        ranker.save(d)
        # What a full fine-tune ships: the whole tower, not just the blocks TowerConfig names.
        state = {k: v.detach().cpu().contiguous() for k, v in visual.state_dict().items()}
        save_file(state, str(Path(d) / "blocks.safetensors"))

    return ranker.model, save_full


def scores(model: Any, pixels: torch.Tensor, mask: torch.Tensor, frozen: bool) -> torch.Tensor:
    if not frozen:
        out: torch.Tensor = model(pixels, mask)
        return out
    with torch.no_grad():  # frozen: no graph through the tower at all
        emb = model.tower(pixels)
    x = emb.new_zeros((*mask.shape, emb.shape[1]))
    x[mask] = emb
    head_out: torch.Tensor = model.head(x, mask)
    return head_out


def plain_case(c: Case) -> dict[str, Any]:
    """Build, time ``warmup + steps`` steps, measure memory and the artifact (in this process)."""
    import open_clip  # noqa: F401  imported before the baseline RSS: no method pays for imports
    import peft.tuners.lora  # noqa: F401
    import safetensors.torch  # noqa: F401

    from keeper_core.heads import series_softmax_loss
    from keeper_core.models import preprocess_config

    dev = torch.device(c.device)
    if dev.type == "cpu":
        torch.set_num_threads(c.threads)
    cuda = dev.type == "cuda"
    _release_freed_memory()
    rss0 = _rss_mb()
    t = time.perf_counter()
    model, save = build(c, dev)
    build_s = time.perf_counter() - t
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)
    s = preprocess_config(c.spec).image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (c.batch, 3, s, s), dtype=torch.uint8, generator=g).to(dev)
    mask = torch.ones((c.batch // SERIES_LEN, SERIES_LEN), dtype=torch.bool, device=dev)
    best = torch.randint(0, SERIES_LEN, (c.batch // SERIES_LEN,), generator=g).to(dev)
    autocast = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        if c.bf16 and cuda
        else contextlib.nullcontext
    )
    frozen = c.method == BASELINE

    _release_freed_memory()
    if cuda:
        torch.cuda.synchronize(dev)
        model_mb = torch.cuda.memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)
        hwm_reset = True
    else:
        model_mb = _rss_mb() - rss0
        hwm_reset = _reset_peak_rss()

    def step() -> float:
        with autocast():
            loss = series_softmax_loss(scores(model, pixels, mask, frozen).float(), mask, best)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step() for _ in range(c.warmup)]
    if cuda:
        torch.cuda.synchronize(dev)
    times = []
    t0 = time.perf_counter()
    for _ in range(c.steps):
        t = time.perf_counter()
        losses.append(step())  # float(): waits for the step, also on CUDA
        times.append(time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
        reserved_mb = torch.cuda.max_memory_reserved(dev) / 2**20
    else:
        peak_mb, reserved_mb = _maxrss_mb() - rss0, float("nan")
    with tempfile.TemporaryDirectory() as d:
        save(Path(d))
        files = {f.name: f.stat().st_size for f in sorted(Path(d).iterdir())}
    return {
        **asdict(c),
        "images_per_s": round(c.batch * c.steps / seconds, 2),
        "step_s_median": round(float(np.median(times)), 4),
        "step_s_p90": round(float(np.percentile(times, 90)), 4),
        "build_s": round(build_s, 2),
        "peak_mb": round(peak_mb, 1),
        "model_mb": round(model_mb, 1),
        "training_growth_mb": round(peak_mb - model_mb, 1),
        "cuda_reserved_peak_mb": None if math.isnan(reserved_mb) else round(reserved_mb, 1),
        "peak_reset_after_build": hwm_reset,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "artifact_bytes": sum(files.values()),
        "artifact_files": files,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }


def run_case(c: Case, timeout: float = 1200) -> dict[str, Any]:
    """``plain_case`` in a fresh Python, so peak memory is this configuration's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(asdict(c))]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{c.spec} {c.method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    row: dict[str, Any] = json.loads(lines[-1][len(RESULT) :])
    row["subprocess_s"] = round(time.perf_counter() - t, 1)
    return row


def bench_plain(
    measure: Measure, spec: str, batch: int, warmup: int, steps: int, **kw: Any
) -> dict[str, Any]:
    """The four methods on one model, each in its own subprocess."""
    rows = []
    for method in METHODS:
        case = Case(spec=spec, method=method, batch=batch, warmup=warmup, steps=steps, **kw)
        row = measure(f"{spec} {method}", lambda c=case: run_case(c))
        print(
            f"  {spec} {method:17s} {row['images_per_s']:9.1f} img/s  peak {row['peak_mb']:8.1f} MB"
            f"  trainable {row['trainable_params']:>11,}  artifact {row['artifact_bytes']:>11,} B",
            flush=True,
        )
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["images_per_s_vs_frozen"] = round(r["images_per_s"] / base["images_per_s"], 3)
        r["peak_mb_vs_frozen"] = round(r["peak_mb"] / base["peak_mb"], 3)
    return {"spec": spec, "batch": batch, "warmup": warmup, "steps": steps, "rows": rows}


# --------------------------------------------------------------------------------------------
# 2. The Ray Train job against a plain loop on the same pixels


def make_corpus(cache: Path, n_series: int, size: tuple[int, int]) -> Path:
    """A generated corpus (all base photos), made once under ``cache``."""
    from keeper_core.synthetic import PHOTOS, generate_corpus

    folder = cache / f"finetune-corpus-{size[0]}x{size[1]}-n{n_series}-seed0"
    manifest = folder / "manifest.csv"  # written last: present means whole
    if not manifest.exists():
        print(f"generating {n_series} series at {size[0]}x{size[1]} into {folder} ...", flush=True)
        generate_corpus(folder, n_series=n_series, seed=0, image_size=size, photos=PHOTOS)
    return manifest


def job_config(manifest: Path, work: Path, tracking_uri: str, **over: Any) -> Any:
    from keeper_train.jobs.finetune import FinetuneConfig

    base = {
        "series": str(manifest),
        "model": "keeper-tiny:random",
        "method": "lora",
        "rank": 16,
        "alpha": 32,
        "batch_size": 8,
        "storage": str(work / "checkpoints"),
        "tracking_uri": tracking_uri,
        "data_dir": str(work / "keeper-data"),
        "experiment": "finetune-benchmark",
    }
    cfg = FinetuneConfig.model_validate({**base, **over})
    return cfg.model_copy(update={"patience": cfg.epochs})  # every run makes all its epochs


def train_series_batches(cfg: Any) -> tuple[list[dict[str, Any]], int]:
    """The job's train split, decoded here as its Ray Data tasks decode it: one row per series
    (flat uint8 pixels, quality placeholder, length, best), and the image size."""
    from keeper_core import storage
    from keeper_core.preparation import ImagePreparation
    from keeper_core.ranker import QUALITY_INPUTS
    from keeper_train.jobs import finetune

    p = finetune.plan(cfg)
    prep = ImagePreparation(cfg.model)
    rows = []
    train = p.rows[p.rows["split"] == "train"]
    for _, g in train.groupby("series_id", sort=False):
        g = g.sort_values("position")
        px = [
            prep.resize(prep.decode(storage.read_bytes(u), source=u)).reshape(-1)
            for u in g["image_uri"].astype(str)
        ]
        rows.append(
            {
                "pixels": np.concatenate(px),
                # features=embedding: the job carries quality along unused; so does this.
                "quality": np.zeros(len(g) * len(QUALITY_INPUTS), np.float32),
                "length": len(g),
                "best": int(np.argmax(g["is_best"].to_numpy())),
            }
        )
    return rows, p.image_size


def plain_job_baseline(cfg: Any, *, threads: int, device: str = "cpu") -> dict[str, Any]:
    """The job's training step without Ray: same ranker, parameter groups, schedule, batches of
    ``batch_size`` series and series-wide augmentation; pixels in memory."""
    from keeper_core.finetune import TunedRanker
    from keeper_core.heads import series_softmax_loss
    from keeper_core.models import autocast_dtype
    from keeper_train.jobs import finetune

    series, s = train_series_batches(cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        ranker = TunedRanker.build(
            ranker_config(cfg.model, cfg.tower_config(), hidden=cfg.hidden, layers=cfg.layers),
            device=dev,
            seed=cfg.seed,
        )
        model = ranker.model
        loop = cfg.model_dump()
        opt = torch.optim.AdamW(finetune.param_groups(ranker, loop))
        steps = math.ceil(len(series) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, finetune.warmup_cosine(round(cfg.warmup_epochs * steps), steps * cfg.epochs)
        )
        amp = autocast_dtype(dev) if cfg.bf16 else None
        autocast = (
            (lambda: torch.autocast(device_type=dev.type, dtype=amp))
            if amp is not None
            else contextlib.nullcontext
        )
        shift = round(cfg.max_shift * s)
        epochs = []
        for epoch in range(cfg.epochs):
            model.train()
            rng = np.random.default_rng([cfg.seed, epoch, 0])
            order = rng.permutation(len(series))
            wait, n_images = 0.0, 0
            t_epoch = t_wait = time.perf_counter()
            for i in range(0, len(order), cfg.batch_size):
                chosen = [series[j] for j in order[i : i + cfg.batch_size]]
                batch = {k: [r[k] for r in chosen] for k in ("pixels", "quality", "length", "best")}
                pixels, mask, best, _ = finetune.unpack(
                    batch, s, rng=rng, max_shift=shift, flip=cfg.flip
                )
                wait += time.perf_counter() - t_wait
                with autocast():
                    scores_ = model(pixels.to(dev), mask.to(dev))
                    loss = series_softmax_loss(scores_.float(), mask.to(dev), best.to(dev))
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                float(loss.detach())
                n_images += len(pixels)
                t_wait = time.perf_counter()
            seconds = time.perf_counter() - t_epoch
            epochs.append({"images_per_s": n_images / seconds, "data_wait_share": wait / seconds})
    finally:
        torch.set_num_threads(before)
    steady = epochs[1:] or epochs
    return {
        "method": f"plain loop, {threads} torch thread(s), {device}",
        "images_per_s": round(float(np.mean([e["images_per_s"] for e in steady])), 2),
        "data_wait_share": round(float(np.mean([e["data_wait_share"] for e in steady])), 4),
        "train_series": len(series),
        "train_images": int(sum(r["length"] for r in series)),
        "epochs": [{k: round(v, 4) for k, v in e.items()} for e in epochs],
    }


def run_job(name: str, cfg: Any) -> dict[str, Any]:
    from keeper_train.jobs import finetune

    t = time.perf_counter()
    s = finetune.run(cfg)
    wall = time.perf_counter() - t
    row = {
        "method": name,
        "workers": cfg.num_workers,
        "torch_threads": cfg.torch_threads,
        "cache_pixels": cfg.cache_pixels,
        "use_gpu": cfg.use_gpu,
        "images_per_s": round(s.images_per_s, 2),
        "data_wait_share": round(s.data_wait_share, 4),
        "decode_s": s.decode_seconds,
        "fit_s": s.fit_seconds,
        "total_s": s.total_seconds,
        "run_wall_s": round(wall, 2),
        "peak_memory_mb": round(s.peak_memory_mb, 1),
        "trainable_params": s.trainable_params,
        "images": s.images,
        "series": s.series,
        "epochs": [e.model_dump() for e in s.epochs],
    }
    print(
        f"  job {name:42s} {row['images_per_s']:9.1f} img/s  data wait "
        f"{100 * row['data_wait_share']:5.1f} %  decode {row['decode_s']:.1f} s  fit "
        f"{row['fit_s']:.1f} s",
        flush=True,
    )
    return row


def bench_job(
    measure: Measure, manifest: Path, work: Path, tracking_uri: str,
    runs: list[tuple[str, dict[str, Any]]], baseline: dict[str, Any], common: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The plain baseline, then each job run; ratios job / plain."""
    cfg = job_config(manifest, work, tracking_uri, **common)
    plain = measure("plain baseline", lambda: plain_job_baseline(cfg, **baseline))
    print(f"  {plain['method']:46s} {plain['images_per_s']:9.1f} img/s", flush=True)
    rows = []
    for name, over in runs:
        run_cfg = job_config(manifest, work, tracking_uri, **{**common, **over})
        rows.append(measure(name, lambda c=run_cfg, n=name: run_job(n, c)))
    for r in rows:
        r["images_per_s_vs_plain"] = round(r["images_per_s"] / plain["images_per_s"], 3)
    return {
        "config": cfg.model_dump(
            include={"model", "method", "rank", "alpha", "batch_size", "epochs", "head", "features"}
        ),
        "manifest": str(manifest),
        "plain": plain,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------
# Tables and driver


def plain_table(title: str, bench: dict[str, Any]) -> str:
    lines = [
        f"{title}: {bench['spec']}, batch {bench['batch']} images ({bench['batch'] // SERIES_LEN} "
        f"series of {SERIES_LEN}), {bench['steps']} timed steps after {bench['warmup']}",
        "",
        "| method | images/s | vs frozen+head | peak MB | model MB | trainable params | artifact "
        "| others' CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in bench["rows"]:
        lines.append(
            f"| {r['method']} | {r['images_per_s']:.1f} | {r['images_per_s_vs_frozen']:.2f} | "
            f"{r['peak_mb']:.0f} | {r['model_mb']:.0f} | {r['trainable_params']:,} | "
            f"{r['artifact_bytes'] / 1e6:.2f} MB | {r['cpu']['foreign_share']:.0%} |"
        )
    return "\n".join(lines)


def job_table(title: str, bench: dict[str, Any]) -> str:
    p = bench["plain"]
    lines = [
        f"{title}: {bench['config']}",
        "",
        "| run | images/s | vs plain | data wait | decode s | fit s | total s | peak MB "
        "| others' CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {p['method']} | {p['images_per_s']:.1f} | 1.00 | {100 * p['data_wait_share']:.1f} % "
        f"| - | - | - | - | {p['cpu']['foreign_share']:.0%} |",
    ]
    for r in bench["rows"]:
        lines.append(
            f"| {r['method']} | {r['images_per_s']:.1f} | {r['images_per_s_vs_plain']:.2f} | "
            f"{100 * r['data_wait_share']:.1f} % | {r['decode_s']:.1f} | {r['fit_s']:.1f} | "
            f"{r['total_s']:.1f} | {r['peak_memory_mb']:.0f} | {r['cpu']['foreign_share']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every path (< 2 min)")
    parser.add_argument("--gpu", action="store_true", help="also the GPU rows (needs CUDA)")
    parser.add_argument(
        "--gpu-only",
        action="store_true",
        help="the GPU rows alone, the Ray Train job's first (a GPU session's short time: the "
        "CPU rows are measured on CPU machines)",
    )
    parser.add_argument("--threads", type=int, default=CORES, help="torch threads, plain loops")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/keeper-bench"), help="corpora")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.1,
        help="each measurement waits until, and is repeated unless, other processes take at most "
        "this share of the CPUs (not with --quick, which only records it)",
    )
    parser.add_argument("--attempts", type=int, default=2, help="most tries per measurement")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one plain-loop subprocess
    args = parser.parse_args(argv)
    if args.one:
        print(RESULT + json.dumps(plain_case(Case(**json.loads(args.one)))), flush=True)
        return 0
    args.gpu = args.gpu or args.gpu_only
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; none is visible")

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    q = args.quick
    # (spec, batch images, warm-up steps, timed steps) on CPU; --quick: keeper-tiny only.
    cpu_models = [("keeper-tiny:random", 64, 3, 20), ("ViT-B-32:random", 16, 2, 8)]
    cpu_models = [("keeper-tiny:random", 64, 2, 3)] if q else cpu_models
    job_series, job_epochs = (40, 2) if q else (120, 6)
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "quick": q,
        "threads": args.threads,
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": round(load_start, 2),
        "plain_cpu": [],
        "job_cpu": None,
        "plain_gpu": [],
        "job_gpu": None,
        "notes": "random weights: speed and memory only. CPU peak MB = peak RSS over the RSS "
        "before the build (high-water mark reset after the build); GPU peak MB = "
        "max_memory_allocated. full = every tower parameter trainable; its artifact holds "
        "the whole tower.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a run cut short keeps what it measured
        args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")

    mon = CpuMonitor()

    def measure(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if not q:
            return mon.measure(name, fn, args.quiet, args.attempts)
        res: dict[str, Any] = {}
        with mon.section(res):  # --quick: no waiting for quiet, but what others took is noted
            res.update(fn())
        return res

    def plain_gpu() -> None:
        print("3a. plain loop, GPU, bf16 autocast", flush=True)
        gpu_models = [("ViT-B-32:random", 256), ("ViT-L-14:random", 128)]
        for spec, batch in gpu_models:
            w, n = (2, 3) if q else (5, 20)
            report["plain_gpu"].append(
                bench_plain(
                    measure, spec, batch, w, n, device="cuda", bf16=True, threads=args.threads
                )
            )
            save()

    if not args.gpu_only:
        print(f"1. plain loop, CPU, {args.threads} torch thread(s)", flush=True)
        for spec, batch, warmup, steps in cpu_models:
            report["plain_cpu"].append(
                bench_plain(measure, spec, batch, warmup, steps, threads=args.threads)
            )
            save()
        if args.gpu:
            plain_gpu()

    import ray

    args.cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="finetune-bench-", dir=args.cache))
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    one = max(1, args.threads // 2)
    cpu_runs = [
        (f"Ray Train, 1 worker x {args.threads} threads", {"torch_threads": args.threads}),
        (f"Ray Train, 2 workers x {one} thread(s)", {"num_workers": 2, "torch_threads": one}),
        (
            f"Ray Train, 1 worker x {args.threads} threads, no pixel cache",
            {"torch_threads": args.threads, "cache_pixels": False},
        ),
    ]
    # --quick: one job run (each costs ~45 s of fixed start-up, decode and MLflow logging here).
    cpu_runs = cpu_runs[:1] if q else cpu_runs
    gpu_runs: list[tuple[str, dict[str, Any]]] = [
        ("Ray Train, 1 GPU worker, pixel cache", {}),
        ("Ray Train, 1 GPU worker, no pixel cache", {"cache_pixels": False}),
    ]
    gpu_job = {
        "model": "ViT-B-32:random",
        "use_gpu": True,
        "batch_size": 32,
        "epochs": 2 if q else 4,
    }
    # address="local": a Ray of our own, never one another process started on this machine.
    ray.init(address="local", log_to_driver=False, logging_level=logging.WARNING)
    import ray.data  # configures its logger on import: quieten it after

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # each dataset's plan, every epoch
    try:
        if not args.gpu_only:
            print("2. Ray Train job against the plain loop (keeper-tiny, LoRA r=16)", flush=True)
            manifest = make_corpus(args.cache, job_series, (86, 64))
            report["job_cpu"] = bench_job(
                measure, manifest, work, tracking_uri, cpu_runs, {"threads": args.threads},
                {"epochs": job_epochs},
            )  # fmt: skip
            save()
        if args.gpu:
            print("3b. Ray Train job, GPU (ViT-B-32, bf16), pixel cache on and off", flush=True)
            manifest = make_corpus(args.cache, 40 if q else 400, (640, 480))
            report["job_gpu"] = bench_job(
                measure, manifest, work, tracking_uri, gpu_runs,
                {"threads": args.threads, "device": "cuda"}, gpu_job,
            )  # fmt: skip
            save()
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    if args.gpu_only:  # after the job's rows, which no earlier session got to
        plain_gpu()
    mon.stop()  # a daemon thread: an exception above ends it with the process

    tables = [plain_table("plain loop, CPU", b) for b in report["plain_cpu"]]
    tables += [plain_table("plain loop, GPU bf16", b) for b in report["plain_gpu"]]
    if report["job_cpu"]:
        tables.append(job_table("Ray Train job vs plain loop, CPU", report["job_cpu"]))
    if report["job_gpu"]:
        tables.append(job_table("Ray Train job vs plain loop, GPU", report["job_gpu"]))
    report["table"] = "\n\n".join(tables)
    report["loadavg_end"] = round(os.getloadavg()[0], 2)
    report["runtime_s"] = round(time.perf_counter() - t_start, 1)
    print("\n" + report["table"])
    if q:
        print("\n--quick: a smoke run; these figures mean nothing")
    print(f"\nbenchmark runtime {report['runtime_s']:.0f} s")
    write_record(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
