"""Embedding throughput: keeper's Ray Data job against the model's ceiling and hand-written loops.

    .venv/bin/python benchmarks/embed.py [--images 1000] [--size 1024x768] \
        [--models keeper-tiny:random,ViT-B-32:random] [--out benchmarks/results/embed-cpu.json]

On the same JPEGs (real photos from keeper_core.synthetic, generated once into --cache) and the
same model, side by side in one process, for each model spec:

1. ceiling: the image encoder's forward on pre-decoded, pre-processed tensors, at the best of a
   few batch sizes;
2. naive loop: per image read, decode (no draft), full transform, forward at batch 1;
3. tuned DataLoader: workers read + decode (JPEG draft, to keeper's size) + transform, batched
   forward in the main process; the best of a small grid of num_workers x torch threads;
3b. the same DataLoader (3's best workers and threads) doing the job's work: the job's own decode
   stage (``prepare_batch``: quality features, hashes, capture metadata) in the workers, its
   forward and Parquet writer in the main process; 4 / 3b is what Ray costs keeper;
4. keeper: ``keeper_train.jobs.embed.run`` on local Ray, files to Parquet (it also computes the
   quality features and writes them: strictly more work than 1-3), at the ceiling's best batch
   size. A short cold run first (start-up: ray init + seconds to the first written part), then
   N and 2N images in the same Ray session: end to end is 2N / pipeline seconds, steady state
   is N / (t_2N - t_N).

``--keeper-set KEY=VALUE,...`` tunes 4 through ``EmbedConfig`` (on a small CPU-only box:
``model_threads=<cores>``, ``num_cpus_per_worker=0.75``); 4b (``--defaults-variant``, on by
default) runs the job again with nothing but the batch size set, for comparison.

Each measurement waits for a quiet machine and is repeated (``--attempts``) when other
processes took more than ``--quiet`` of the CPUs meanwhile; what they took is in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from keeper_core.embedding import ClipEmbedder, l2_normalize
from keeper_core.images import decode_image
from keeper_core.models import resize_transform
from keeper_core.quality import quality_features
from keeper_core.synthetic import generate_corpus

CORES = os.cpu_count() or 1
MEAN_SHOTS = 3.5  # generate_corpus draws 2-5 shots per series


# --------------------------------------------------------------------------------------------
# Corpus and machine


def make_corpus(cache: Path, n_images: int, size: tuple[int, int], seed: int = 0) -> Path:
    """A manifest of ``n_images`` JPEGs of ``size``, generated once under ``cache``.

    Series ``i`` is the same whatever the series count, so any cached corpus of this size and
    seed holding enough shots is reused (its first ``n_images`` shots).
    """
    prefix = f"corpus-{size[0]}x{size[1]}-seed{seed}-n"
    cached = sorted(cache.glob(f"{prefix}*/manifest.csv"))  # written last: the corpus is whole
    n_series = math.ceil(n_images / MEAN_SHOTS * 1.15) + 1
    fresh = [cache / f"{prefix}{n}" / "manifest.csv" for n in (n_series, math.ceil(n_images / 2))]
    for src in [*cached, *fresh]:  # the last always has enough: every series has >= 2 shots
        if not src.exists():
            n = int(src.parent.name.rsplit("-n", 1)[1])
            print(f"generating {n} series at {size[0]}x{size[1]} into {src.parent} ...")
            generate_corpus(src.parent, n_series=n, seed=seed, image_size=size)
        uris = [line.split(",")[1] for line in src.read_text().splitlines()[1:]]
        if len(uris) >= n_images:
            manifest = src.parent / f"bench-{n_images}.csv"
            manifest.write_text("image_uri\n" + "\n".join(uris[:n_images]) + "\n")
            return manifest
    raise AssertionError("unreachable: n_images / 2 series hold at least n_images shots")


def read_manifest(manifest: Path) -> list[str]:
    return manifest.read_text().split()[1:]


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import ray

    return {
        "cpu_model": cpu,
        "cores": CORES,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "ray": ray.__version__,
            "open_clip": version("open_clip_torch"),
            "pillow": version("pillow"),
            "numpy": np.__version__,
            "keeper_core": version("keeper-core"),
            "keeper_train": version("keeper-train"),
        },
    }


def write_record(out: str | Path, record: dict[str, Any]) -> Path:
    """Write a benchmark's result record as indented JSON to ``out`` (its folder made) and say so.

    ``default=float``: numpy scalars (and anything else ``float`` takes) are written as numbers.
    """
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"\nwrote {path}")
    return path


def disturbance(cpu: dict[str, Any]) -> float:
    """The share of the CPUs a measurement lost to others: other processes plus the hypervisor's
    steal (a busy host slows a VM's every process alike; 2-25 % of steal was seen here)."""
    return float(cpu["foreign_share"] + cpu.get("steal_share", 0.0))


def process_role(pid: int) -> str:
    """What one of this benchmark's processes is, for the CPU breakdown: "benchmark" (this
    process, which is the job's driver for keeper), "dataloader worker", a Ray system process
    (raylet, gcs_server, dashboard, ...) or a Ray worker by the title of what it runs now
    (``ray::MapBatches(prepare_batch)``, ``ray::MapWorker(MapBatches(EmbedStage))``, ``ray::IDLE``;
    an actor's methods and constructor count as the actor). CpuMonitor charges an idle worker's
    CPU to the last task it ran, so ``ray::IDLE`` is workers that have run nothing yet.
    """
    if pid == os.getpid():
        return "benchmark"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "exited"
    head = argv[0].decode(errors="replace")
    if not head:  # a zombie: exited, not yet reaped
        return "exited"
    if head.startswith("ray::"):  # the worker's class or task, without the method it runs
        title = head.split(" ", 1)[0]
        return title[: title.rfind(")") + 1] if ")" in title else title.split(".", 1)[0]
    words = " ".join(a.decode(errors="replace") for a in argv)
    if "default_worker.py" in words:  # a Ray worker before it has taken a task's title
        return "ray worker (starting)"
    for marker in ("log_monitor", "autoscaler", "runtime_env", "dashboard"):
        if marker in words:  # the dashboard's own subprocesses name it in their titles
            return f"ray {marker}"
    name = Path(head.split(" ", 1)[0]).name
    if name in ("raylet", "gcs_server"):
        return name
    if "python" in name and "embed.py" in words:
        return "dataloader worker"
    return name[:30] or "?"


class CpuMonitor:
    """Tells this benchmark's CPU use from everyone else's, by sampling /proc.

    On a shared 2-core machine another process's work skews every number here, so each section
    reports the CPU seconds that processes outside this one's tree took, a lower bound (a process
    that lives less than one sampling interval is missed), and the hypervisor's steal.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.tick = interval, os.sysconf("SC_CLK_TCK")
        self.mine = self.foreign = 0.0
        self.by_role: dict[str, float] = defaultdict(float)  # own CPU seconds by process_role
        self._worker_role: dict[int, str] = {}  # a Ray worker's last task or actor
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.sample()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        procs: dict[int, tuple[int, float]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:  # exited while we looked
                continue
            f = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ... utime, stime
            procs[int(name)] = (int(f[1]), (int(f[11]) + int(f[12])) / self.tick)
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _) in procs.items():
            children[ppid].append(pid)
        tree, todo = {os.getpid()}, [os.getpid()]
        while todo:
            for c in children[todo.pop()]:
                tree.add(c)
                todo.append(c)
        with self._lock:
            first = not self._last
            for pid, (_, cpu) in procs.items():
                delta = 0.0 if first else cpu - self._last.get(pid, 0.0)
                if pid in tree:
                    self.mine += delta
                    role = process_role(pid)
                    if role == "ray::IDLE" and pid in self._worker_role:
                        # A sample's delta is mostly what the worker ran before it went idle
                        # (a decode task takes less than an interval): keep its last task.
                        role = self._worker_role[pid]
                    elif role.startswith("ray::") and role != "ray::IDLE":
                        self._worker_role[pid] = role
                    if delta:
                        self.by_role[role] += delta
                else:
                    self.foreign += delta
            self._last = {pid: cpu for pid, (_, cpu) in procs.items()}

    def wait_quiet(self, threshold: float, max_wait: float) -> float:
        """Wait until other processes and the hypervisor's steal take <= threshold of the CPUs
        over 5 s; returns the wait."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < max_wait:
            self.sample()
            before, steal = self.foreign, self._steal()
            time.sleep(5)
            self.sample()
            taken = self.foreign - before + (self._steal() - steal) / self.tick
            if taken / (5 * CORES) <= threshold:
                break
        return time.perf_counter() - t0

    def measure(
        self,
        name: str,
        fn: Callable[[], dict[str, Any]],
        threshold: float,
        attempts: int,
        max_wait: float = 300.0,
    ) -> dict[str, Any]:
        """``fn()`` with its CPU accounting, in a quiet moment (waiting up to ``max_wait`` s for
        one; 0: not at all); again while others took more than ``threshold`` of the CPUs during
        it, ``attempts`` times at most. The least disturbed attempt is kept: contention only ever
        slows a measurement down."""
        best: dict[str, Any] | None = None
        for attempt in range(1, attempts + 1):
            waited = self.wait_quiet(threshold, max_wait) if max_wait > 0 else 0.0
            res: dict[str, Any] = {}
            with self.section(res):
                res.update(fn())
            res["cpu"].update(attempt=attempt, waited_for_quiet_s=round(waited, 1))
            share = disturbance(res["cpu"])
            if best is None or share < disturbance(best["cpu"]):
                best = res
            if share <= threshold:
                break
            print(
                f"  ({name}: other processes and steal took {share:.0%} of the CPUs meanwhile)",
                flush=True,
            )
        assert best is not None
        return best

    @staticmethod
    def _steal() -> float:
        # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal (in ticks)
        return float(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])

    @contextmanager
    def section(self, into: dict[str, Any]) -> Iterator[None]:
        """Adds wall, own, foreign and stolen CPU seconds of the block to ``into["cpu"]``."""
        self.sample()
        mine, foreign, steal, t0 = self.mine, self.foreign, self._steal(), time.perf_counter()
        roles = dict(self.by_role)
        yield
        self.sample()
        wall = time.perf_counter() - t0
        by_role = {r: round(v - roles.get(r, 0.0), 1) for r, v in self.by_role.items()}
        into["cpu"] = {
            "wall_s": round(wall, 2),
            "own_cpu_s": round(self.mine - mine, 1),
            "own_cpu_s_by_process": {r: v for r, v in sorted(by_role.items()) if v > 0},
            "foreign_cpu_s": round(self.foreign - foreign, 1),
            "foreign_share": round((self.foreign - foreign) / (wall * CORES), 3),
            "steal_share": round((self._steal() - steal) / self.tick / (wall * CORES), 3),
        }


# --------------------------------------------------------------------------------------------
# 1-3: in-process methods (one model, one forward function)


def make_forward(embedder: ClipEmbedder) -> Callable[[torch.Tensor], np.ndarray]:
    model: Any = embedder.clip.model

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> np.ndarray:
        return l2_normalize(model.encode_image(x).float().numpy())

    return forward


def bench_ceiling(
    forward: Callable[[torch.Tensor], np.ndarray],
    pixels: torch.Tensor,
    batch_sizes: Sequence[int],
    min_seconds: float,
) -> dict[str, Any]:
    """Forward over pre-processed tensors; each batch size runs >= min_seconds and >= 2 batches."""
    forward(pixels[: min(batch_sizes)])  # warm-up: first-call allocations and kernel choice
    by_batch = {}
    for bs in batch_sizes:
        done, batches, t0 = 0, 0, time.perf_counter()
        while batches < 2 or time.perf_counter() - t0 < min_seconds:
            start = (batches * bs) % max(len(pixels) - bs + 1, 1)
            x = pixels[start : start + bs]
            forward(x)
            done, batches = done + len(x), batches + 1
        by_batch[bs] = done / (time.perf_counter() - t0)
        print(f"  ceiling  batch {bs:4d}: {by_batch[bs]:8.1f} img/s", flush=True)
    best = max(by_batch, key=lambda b: by_batch[b])
    return {
        "images_per_s": by_batch[best],
        "batch_size": best,
        "by_batch_size": {str(k): round(v, 2) for k, v in by_batch.items()},
        "images_in_tensor_set": len(pixels),
    }


def bench_naive(
    embedder: ClipEmbedder, forward: Callable[[torch.Tensor], np.ndarray], uris: Sequence[str]
) -> dict[str, Any]:
    """Read, full decode, full transform and forward one image at a time."""
    t0 = time.perf_counter()
    for uri in uris:
        img = decode_image(Path(uri).read_bytes(), source=uri)
        forward(embedder.clip.transform(img).unsqueeze(0))
    seconds = time.perf_counter() - t0
    return {"images_per_s": len(uris) / seconds, "seconds": seconds, "images": len(uris)}


def draft_size(model_size: int) -> tuple[int, int]:
    """What keeper's job drafts JPEGs to: the model input, but >= 256 px for quality features.

    The DataLoader drafts the same, so both decode the same pixels; for a model input far below
    256 px (keeper-tiny: 64) a loop that only embeds could draft further and decode faster.
    """
    from keeper_core.preparation import QUALITY_SIZE

    return (max(model_size, QUALITY_SIZE),) * 2


def bench_stages(embedder: ClipEmbedder, uris: Sequence[str]) -> dict[str, float]:
    """Milliseconds per image of each CPU step, one process: where decode-side time goes."""
    draft = draft_size(embedder.clip.image_size)
    resize = resize_transform(embedder.spec)
    ms: dict[str, float] = defaultdict(float)
    drafted = []

    def timed(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        ms[name] += 1000 * (time.perf_counter() - t0) / len(uris)
        return out

    # One torch thread, as in a DataLoader worker or a Ray decode task: with the process's two,
    # torch's thread pool makes ToTensor on one 224 px image 10-100x slower on this VM.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for uri in uris:
        data = timed("read", Path(uri).read_bytes)
        full = timed("decode_full", decode_image, data)
        img = timed("decode_draft", decode_image, data, draft_size=draft)
        timed("transform_full_image", embedder.clip.transform, full)
        timed("transform_draft_image", embedder.clip.transform, img)
        timed("resize_uint8_draft_image", resize, img)
        drafted.append(img)
    for i in range(0, len(drafted), 16):  # the job's decode batch: features are vectorised
        timed("quality_features", quality_features, drafted[i : i + 16])
    torch.set_num_threads(threads)
    return {k: round(v, 2) for k, v in ms.items()}


class JpegDataset(Dataset[torch.Tensor]):
    """Read + decode (JPEG draft, as keeper drafts) + full transform, in a worker."""

    def __init__(self, uris: Sequence[str], transform: Callable[[Any], torch.Tensor], size: int):
        self.uris, self.transform, self.draft = list(uris), transform, draft_size(size)

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int) -> torch.Tensor:
        data = Path(self.uris[i]).read_bytes()
        return self.transform(decode_image(data, source=self.uris[i], draft_size=self.draft))


def timed_loader(
    ds: Dataset[Any], step: Callable[[Any], int], threads: int, **loader_args: Any
) -> tuple[int, float]:
    """Run ``step`` on every batch of a DataLoader over ``ds`` (persistent workers, prefetch 4)
    with ``threads`` torch threads here: (images ``step`` counted, seconds, worker start-up
    included)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        loader = DataLoader(ds, persistent_workers=True, prefetch_factor=4, **loader_args)
        n = sum(step(batch) for batch in loader)
        seconds = time.perf_counter() - t0
        del loader  # stops the persistent workers before anything else is timed
        gc.collect()
    finally:
        torch.set_num_threads(before)
    return n, seconds


def run_dataloader(
    embedder: ClipEmbedder,
    forward: Callable[[torch.Tensor], np.ndarray],
    uris: Sequence[str],
    batch_size: int,
    num_workers: int,
    threads: int,
) -> float:
    """Images/s of one DataLoader configuration, worker start-up included."""

    def step(x: torch.Tensor) -> int:
        forward(x)
        return len(x)

    ds = JpegDataset(uris, embedder.clip.transform, embedder.clip.image_size)
    n, seconds = timed_loader(
        ds,
        step,
        threads,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=False,  # CPU: nothing to pin for
    )
    assert n == len(uris), (n, len(uris))
    return n / seconds


def bench_dataloader(
    embedder: ClipEmbedder,
    forward: Callable[[torch.Tensor], np.ndarray],
    uris: Sequence[str],
    batch_size: int,
    tune_images: int,
) -> dict[str, Any]:
    """Tune num_workers x main-process torch threads on a prefix, then run the best on all."""
    grid = [(w, t) for w in sorted({1, CORES}) for t in sorted({1, CORES}, reverse=True)]
    tuning = {}
    for w, t in grid:
        ips = run_dataloader(embedder, forward, uris[:tune_images], batch_size, w, t)
        tuning[f"workers={w},threads={t}"] = round(ips, 2)
        print(f"  dataloader tune workers {w} threads {t}: {ips:8.1f} img/s", flush=True)
    w, t = max(grid, key=lambda c: tuning[f"workers={c[0]},threads={c[1]}"])
    t0 = time.perf_counter()
    ips = run_dataloader(embedder, forward, uris, batch_size, w, t)
    return {
        "images_per_s": ips,
        "seconds": time.perf_counter() - t0,
        "images": len(uris),
        "best": {
            "num_workers": w,
            "torch_threads": t,
            "batch_size": batch_size,
            "prefetch_factor": 4,
            "persistent_workers": True,
            "pin_memory": False,
            "draft_size": draft_size(embedder.clip.image_size),
        },
        "tuning_images": tune_images,
        "tuning": tuning,
    }


class KeeperWorkDataset(Dataset[dict[str, np.ndarray]]):
    """Batches of images through the job's own decode stage (``prepare_batch``) in a worker:
    read, draft decode, resize, quality features, both hashes, capture metadata."""

    def __init__(self, uris: Sequence[str], batch_size: int, prepare: dict[str, Any]):
        self.chunks = [list(uris[i : i + batch_size]) for i in range(0, len(uris), batch_size)]
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        from keeper_train.jobs.embed import prepare_batch

        return prepare_batch({"image_uri": np.array(self.chunks[i], dtype=object)}, **self.prepare)


def _as_is(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch  # DataLoader's default would turn the numpy columns into tensors


def run_same_work(
    embedder: ClipEmbedder,
    spec: str,
    uris: Sequence[str],
    batch_size: int,
    num_workers: int,
    threads: int,
    workdir: Path,
) -> float:
    """Images/s of a DataLoader doing the job's work: its decode stage in the workers, the
    model stage's forward (``ClipEmbedder`` on uint8 pixels) and its Parquet writer in the
    main process. Ray's share of keeper's time is what keeper loses to this loop."""
    from keeper_train.jobs.embed import EmbedConfig, prepare_arguments, write_batch

    out = Path(tempfile.mkdtemp(prefix="same-work-", dir=workdir))
    cfg = EmbedConfig(input="-", output=str(out), model=spec, batch_size=batch_size)
    ds = KeeperWorkDataset(uris, batch_size, prepare_arguments(cfg, str(out), "bench"))

    def step(batch: dict[str, np.ndarray]) -> int:
        rows = embedder(batch)
        rows["t_embed"] = np.zeros(len(rows["image_uri"]))  # write_batch's tally column
        tally = write_batch(rows, spec=spec, embeddings_dir=str(out / "embeddings"))
        return int(tally["rows"][0])

    try:
        n, seconds = timed_loader(
            ds, step, threads, batch_size=None, collate_fn=_as_is, num_workers=num_workers
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert n == len(uris), (n, len(uris))
    return n / seconds


# --------------------------------------------------------------------------------------------
# 4: keeper's Ray Data job


def run_job(
    spec: str, manifest: Path, n: int, batch_size: int, workdir: Path, **overrides: Any
) -> tuple[Any, float, Any]:
    """keeper embed on the first ``n`` images into a fresh output (removed after).

    Returns ``(EmbedSummary, wall seconds, EmbedConfig)``; a run that did not embed all ``n``
    cleanly is an error (a benchmark of a failing job measures nothing).
    """
    from keeper_train.jobs.embed import EmbedConfig, run

    out = Path(tempfile.mkdtemp(prefix=f"keeper-embed-{n}-", dir=workdir))
    cfg = EmbedConfig(
        input=str(manifest),
        output=str(out),
        model=spec,
        batch_size=batch_size,
        rows_per_file=batch_size,  # the first part appears after one batch: start-up shows
        limit=n,
        **overrides,
    )
    t0 = time.perf_counter()
    try:
        summary = run(cfg)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - t0
    if summary.status != "ok" or summary.counts.embedded != n:
        raise RuntimeError(
            f"keeper embed of {n} images did not finish cleanly: {summary.status}, "
            f"{summary.counts.embedded} embedded, {summary.counts.failed} failed "
            f"{summary.errors_by_reason}"
        )
    return summary, wall, cfg


def bench_keeper(
    spec: str, manifest: Path, n_images: int, batch_size: int, workdir: Path, **overrides: Any
) -> dict[str, Any]:
    """Run the job on a few, then the first N, then all 2N images (fresh outputs, one Ray session).

    The first, short run is the cold start (Ray itself, if not up yet, and its worker processes);
    N and 2N then both start warm, so their difference is the steady state and nothing else.
    """
    half = n_images // 2
    runs = []
    for n in (min(2 * batch_size, half), half, 2 * half):
        result, wall, cfg = run_job(spec, manifest, n, batch_size, workdir, **overrides)
        summary = result.model_dump(by_alias=True)
        c, sec = summary["counts"], summary["seconds"]
        r = {
            "images": n,
            "embedded": c["embedded"],
            "pipeline_s": sec["pipeline"],
            "ray_init_s": sec.get("ray_init", 0.0),
            "run_wall_s": round(wall, 3),
            "seconds": sec,
            "seconds_to_first_part": summary["seconds_to_first_part"],
            "images_per_s": summary["images_per_s"],
            "worker_seconds": summary["worker_seconds"],
            "cluster": summary["cluster"],
        }
        runs.append(r)
        print(
            f"  keeper   {n:5d} images: pipeline {r['pipeline_s']:7.1f}s "
            f"({r['images_per_s']:.1f} img/s), ray init {r['ray_init_s']:.1f}s, "
            f"first part {r['seconds_to_first_part']:.1f}s, workers {r['worker_seconds']}",
            flush=True,
        )
    cold, small, big = runs
    dt = big["pipeline_s"] - small["pipeline_s"]
    # Noise can swamp the difference on tiny runs; a non-positive one estimates nothing.
    steady = (big["images"] - small["images"]) / dt if dt > 0 else float("nan")
    w = big["worker_seconds"]
    return {
        "images_per_s": big["embedded"] / big["pipeline_s"],  # end to end over the 2N run
        "steady_images_per_s": steady,
        # Start-up as a cold run sees it: Ray started (unless up already), then its first part.
        "startup_s": cold["ray_init_s"] + cold["seconds_to_first_part"],
        "config": cfg.model_dump(include={"batch_size", "rows_per_file", *overrides}),
        # Summed over workers, per image: where the time goes inside the job.
        "per_image_ms": {
            "read_decode_features": 1000 * w["read_decode_features"] / big["embedded"],
            "embed": 1000 * w["embed"] / big["embedded"],
            "write": 1000 * w["write"] / big["embedded"],
        },
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# Driver


def bench_in_process(
    spec: str, uris: Sequence[str], args: argparse.Namespace, workdir: Path, mon: CpuMonitor
) -> dict[str, Any]:
    """Methods 1-3b with one model in this process (freed when this returns)."""
    torch.set_num_threads(CORES)
    embedder = ClipEmbedder(spec, device="cpu")
    forward = make_forward(embedder)
    res: dict[str, Any] = {}

    pixels = torch.stack(
        [
            embedder.clip.transform(decode_image(Path(u).read_bytes(), source=u))
            for u in uris[: args.ceiling_images]
        ]
    )
    q, n = args.quiet, args.attempts
    res["ceiling"] = ceiling = mon.measure(
        "ceiling", lambda: bench_ceiling(forward, pixels, args.batch_sizes, args.min_seconds), q, n
    )
    bs = ceiling["batch_size"]
    res["naive"] = mon.measure("naive", lambda: bench_naive(embedder, forward, uris), q, n)
    print(f"  naive    {res['naive']['images_per_s']:8.1f} img/s", flush=True)
    # ~8 s of ceiling-speed work per tuning run, >= 2 batches: worker start-up must not decide it.
    tune = min(len(uris), max(2 * bs, int(8 * ceiling["images_per_s"])))
    res["dataloader"] = mon.measure(
        "dataloader", lambda: bench_dataloader(embedder, forward, uris, bs, tune), q, n
    )
    print(f"  dataloader best {res['dataloader']['images_per_s']:8.1f} img/s", flush=True)
    best = res["dataloader"]["best"]
    w, t = best["num_workers"], best["torch_threads"]
    res["same_work"] = mon.measure(
        "same_work",
        lambda: {
            "images_per_s": run_same_work(embedder, spec, uris, bs, w, t, workdir),
            "num_workers": w,
            "torch_threads": t,
            "batch_size": bs,
        },
        q,
        n,
    )
    print(f"  same-work dataloader {res['same_work']['images_per_s']:8.1f} img/s", flush=True)
    # The ceiling again, at its best batch size: a second look at how noisy this machine is.
    # The better of the two counts (contention only ever slows a run down).
    again = bench_ceiling(forward, pixels, [bs], args.min_seconds)["images_per_s"]
    ceiling["first_images_per_s"], ceiling["recheck_images_per_s"] = ceiling["images_per_s"], again
    ceiling["images_per_s"] = max(ceiling["images_per_s"], again)
    res["cpu_stage_ms"] = bench_stages(embedder, uris[: args.stage_images])
    print(f"  per-image CPU steps (ms): {res['cpu_stage_ms']}", flush=True)
    return res


def bench_model(
    spec: str, manifest: Path, args: argparse.Namespace, workdir: Path, mon: CpuMonitor
) -> dict[str, Any]:
    uris = read_manifest(manifest)
    print(f"\n== {spec}: {len(uris)} images", flush=True)
    res = bench_in_process(spec, uris, args, workdir, mon)
    gc.collect()  # the in-process model and tensors, before Ray's workers want the memory
    q, n, bs = args.quiet, args.attempts, res["ceiling"]["batch_size"]
    res["keeper"] = mon.measure(
        "keeper",
        lambda: bench_keeper(spec, manifest, len(uris), bs, workdir, **args.keeper_set),
        q,
        n,
    )
    if args.defaults_variant:
        print("  keeper with the job's defaults:", flush=True)
        res["keeper_defaults"] = mon.measure(
            "keeper_defaults", lambda: bench_keeper(spec, manifest, len(uris), bs, workdir), q, n
        )
    return res


def ratios(r: dict[str, Any]) -> dict[str, float]:
    ceil, dl, k = r["ceiling"]["images_per_s"], r["dataloader"]["images_per_s"], r["keeper"]
    out = {
        "keeper_steady/dataloader": k["steady_images_per_s"] / dl,
        "keeper_steady/ceiling": k["steady_images_per_s"] / ceil,
        "keeper_e2e/dataloader": k["images_per_s"] / dl,
        "keeper_e2e/ceiling": k["images_per_s"] / ceil,
        "dataloader/ceiling": dl / ceil,
        "naive/ceiling": r["naive"]["images_per_s"] / ceil,
    }
    if "same_work" in r:  # results written before the same-work loop existed have none
        same = r["same_work"]["images_per_s"]
        out["keeper_steady/same_work"] = k["steady_images_per_s"] / same
        out["keeper_e2e/same_work"] = k["images_per_s"] / same
        out["same_work/dataloader"] = same / dl
    if "keeper_defaults" in r:
        out["keeper_defaults_steady/dataloader"] = r["keeper_defaults"]["steady_images_per_s"] / dl
        out["keeper_defaults_steady/ceiling"] = r["keeper_defaults"]["steady_images_per_s"] / ceil
    return {k: round(v, 3) for k, v in out.items()}


def table(spec: str, r: dict[str, Any]) -> str:
    """The result of one model as a Markdown table (pasted into docs/benchmarks.md as is)."""
    c, dl, k = r["ceiling"], r["dataloader"]["best"], r["keeper"]
    ceil = c["images_per_s"]
    rows = [
        ("1 ceiling (forward only)", ceil, "ceiling", f"batch {c['batch_size']}"),
        ("2 naive loop", r["naive"]["images_per_s"], "naive", "batch 1, full decode"),
        (
            "3 tuned DataLoader",
            r["dataloader"]["images_per_s"],
            "dataloader",
            f"{dl['num_workers']} worker(s), {dl['torch_threads']} torch thread(s)",
        ),
        (
            "3b DataLoader doing the job's work",
            r["same_work"]["images_per_s"],
            "same_work",
            "prepare_batch in the workers, Parquet parts written",
        ),
        ("4 keeper, end to end", k["images_per_s"], "keeper", f"{k['runs'][-1]['images']} images"),
        ("4 keeper, steady state", k["steady_images_per_s"], "keeper", "(2N - N) / (t2N - tN)"),
    ]
    if "keeper_defaults" in r:
        kd = r["keeper_defaults"]
        rows += [
            ("4b keeper, job defaults, end to end", kd["images_per_s"], "keeper_defaults", ""),
            ("4b keeper, job defaults, steady", kd["steady_images_per_s"], "keeper_defaults", ""),
        ]
    lines = [
        f"{spec}",
        "",
        "| method | images/s | vs ceiling | foreign CPU | notes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, v, key, note in rows:
        foreign = r[key]["cpu"]["foreign_share"] if "cpu" in r[key] else float("nan")
        lines.append(f"| {name} | {v:.2f} | {v / ceil:.2f} | {foreign:.0%} | {note} |")
    lines.append("")
    lines += [f"- {name}: {v:.2f}" for name, v in r["ratios"].items()]
    d = r["dataloader"]
    for key, images in (  # every image the measurement handled (tuning runs and cold run too)
        ("dataloader", d["images"] + d["tuning_images"] * len(d["tuning"])),
        ("same_work", d["images"]),
        ("keeper", sum(run["images"] for run in k["runs"])),
    ):
        by = r[key]["cpu"].get("own_cpu_s_by_process", {})
        if by:
            top = sorted(by.items(), key=lambda kv: -kv[1])
            cells = ", ".join(f"{name} {1000 * v / images:.1f}" for name, v in top if v >= 0.1)
            lines.append(f"- {key}: CPU ms an image by process: {cells}")
    lines.append(
        f"- keeper cold start-up (ray init {k['runs'][0]['ray_init_s']:.1f} s + first part): "
        f"{k['startup_s']:.1f} s; "
        f"per image in the job: {', '.join(f'{n} {v:.1f} ms' for n, v in k['per_image_ms'].items())}"
    )
    return "\n".join(lines)


def parse_overrides(text: str) -> dict[str, str]:
    """``k=v,k=v`` -> {k: v}; EmbedConfig validates and converts the values."""
    pairs = [kv.split("=", 1) for kv in text.split(",") if kv.strip()]
    if any(len(kv) != 2 for kv in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000, help="JPEGs per method (even: N and 2N)")
    p.add_argument("--size", type=parse_size, default=(1024, 768), help="WIDTHxHEIGHT")
    p.add_argument("--models", default="keeper-tiny:random,ViT-B-32:random")
    p.add_argument("--out", default="benchmarks/results/embed-cpu.json")
    p.add_argument("--cache", type=Path, default=Path("/tmp/keeper-bench"), help="corpus cache")
    p.add_argument(
        "--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128]
    )
    p.add_argument("--ceiling-images", type=int, default=256, help="pre-decoded tensor set")
    p.add_argument("--min-seconds", type=float, default=6.0, help="per ceiling batch size")
    p.add_argument("--stage-images", type=int, default=128, help="for the per-step CPU timings")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.1,
        help="a measurement waits until, and is repeated unless, other processes take at most "
        "this share of the CPUs (a shared machine skews every number here)",
    )
    p.add_argument("--attempts", type=int, default=2, help="most tries per measurement")
    p.add_argument(
        "--defaults-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run keeper with the job's defaults (only batch_size, rows_per_file set)",
    )
    p.add_argument(
        "--keeper-set",
        type=parse_overrides,
        default={},
        help="EmbedConfig overrides for keeper, e.g. num_cpus_per_worker=0.75,decode_batch_size=32 "
        "(batch_size and rows_per_file are the ceiling's best batch size)",
    )
    args = p.parse_args(argv)
    if args.images < 2 or args.images % 2:
        p.error("--images must be an even number >= 2 (keeper runs N and 2N)")

    # Progress bars only garble the log of a background run; they change no measured work.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    t_start = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    manifest = make_corpus(args.cache, args.images, args.size)
    workdir = Path(tempfile.mkdtemp(prefix="runs-", dir=args.cache))
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {
            "images": args.images,
            "size": list(args.size),
            "models": specs,
            "batch_sizes": args.batch_sizes,
            "ceiling_images": args.ceiling_images,
            "keeper_set": args.keeper_set,
            "manifest": str(manifest),
            "notes": "keeper also computes 10 quality features per image and writes Parquet; "
            "1-3 only embed, 3b does keeper's work without Ray. Random weights: speed only, "
            "the embeddings mean nothing.",
        },
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": os.getloadavg(),
        "models": {},
    }
    import ray

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every model too: a run cut short keeps what it measured
        out.write_text(json.dumps(report, indent=2, default=float) + "\n")

    mon = CpuMonitor()
    try:
        for spec in specs:
            report["models"][spec] = bench_model(spec, manifest, args, workdir, mon)
            save()
    finally:
        ray.shutdown()
        mon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    print()
    for spec, r in report["models"].items():
        r["ratios"] = ratios(r)
        print(table(spec, r) + "\n")
    report["runtime_s"] = round(time.perf_counter() - t_start, 1)
    print(f"benchmark runtime {report['runtime_s']:.0f}s")
    write_record(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
