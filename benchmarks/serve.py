"""Online embedding: keeper's Serve app against a hand-written FastAPI server and the offline ceiling.

    .venv/bin/python benchmarks/serve.py [--model ViT-B-32:random] \
        [--servers offline,naive,keeper] [--concurrency 1,8,32] [--duration 20] [--warmup 3] \
        [--out benchmarks/results/serve-cpu.json]

The same model and the same pool of JPEGs (real photos from keeper_core.synthetic, 640x480,
quality 90, generated once into --cache), side by side in one run:

1. offline: ``ClipEmbedder.embed_pixels`` in this process on uint8 batches of --max-batch-size,
   (a) forward only, on pre-decoded pixels, at batch 1 and at the batch size; (b) decode (JPEG
   draft to the model's input, as keeper's serve decodes) + resize/crop per image + the batched
   forward, all timed: the ceiling a server that decodes can be compared with;
2. naive: what users write by hand, a FastAPI app in one uvicorn process (1 worker, torch threads
   = all cores): ``POST /v1/embed`` with ``{"images": [{"b64": ...}]}``, PIL decode (no draft),
   the model's full transform, one forward per request, the embeddings back as JSON. Its handler
   is a plain ``def`` (FastAPI runs it in its thread pool, so concurrent requests run concurrent
   forwards); ``naive-async`` is the same with ``async def`` (one forward at a time, on the event
   loop), another thing users write;
3. keeper: keeper's Serve app (``keeper_serve.local.start``) on a local Ray started here, with
   a Serve config (--keeper-config) as shipped, except: the model, no ranker (nothing polls
   MLflow), the encoder's max_batch_size = --max-batch-size, and --keeper-set overrides (dotted
   keys: KeeperAppArgs fields, ``deployments.NAME.OPTION``, ``http_options.KEY``). Same route,
   same body, with a bearer token (a random one in KEEPER_API_TOKEN).

Servers run under a closed-loop load: N client threads in this process, each with one
http.client keep-alive connection to loopback, sending one-image requests back to back; the
requests that complete within --duration after a --warmup count. The load generator shares the
machine's cores with the server; what it used is in the table (client CPU) and the JSON.

The goals, at concurrency 32: keeper >= 1.5x naive req/s, >= 0.6x the offline decode +
forward ceiling (issue 13), >= 0.8x that ceiling and, at concurrency 1, a p50 no more than 20 ms
above the naive server's (issue 14), p99 <= 3x p50 (and no errors); printed and saved under
``goals``. The ceiling decodes and resizes with keeper's own ``ImagePreparation`` (the ingress's
pixels, which equal ``keeper embed``'s); a second row drafts the JPEG to the model's input size
instead, a cheaper decode whose pixels differ, for comparison only.

``--device cuda`` (a GPU node) puts every model on the GPU: offline and naive in bf16 autocast
(keeper's encoder's precision, so the comparison is of serving, not of arithmetic), keeper's
encoder as its config says (``--keeper-config clusters/serve/keeper-gpu.yaml``: one replica per
GPU). Its VlmJudge block is dropped, as the app builds no VLM here (``vlm.source`` null: no
weights to download). The goals are then issue 14's GPU ones, at concurrency 64: keeper >= 10x
naive req/s, p99 <= 3x p50, no errors. The offline ceiling still decodes on one thread in this
process: on a GPU it is a CPU decode figure, not the GPU's. The client threads share one
interpreter: at thousands of requests a second their CPU share (``client_cpu_share``) says
whether the load generator, not the server, was the limit. Without CUDA, ``--device cuda``
stops with an error before anything starts.

--breakdown turns on the encoder's access log in keeper's app and, per concurrency, joins the
proxy's, the ingress's and the encoder's access-log lines of each request (by request id): the
median time each hop held a request, so the overhead over the naive server can be placed (proxy
-> ingress, the ingress's own parsing/decoding, the encoder call), and the encoder's own forward
time from its ``batching_stats`` (one replica's: run it with one encoder replica). The extra log line costs the
encoder a little: use it to locate time, not for the headline figures.

keeper's row also records ``replica_peak_rss_mib``: the largest resident memory any replica of
each deployment reached, from before the app starts to the end of its row (``ReplicaMemory``),
what the Serve configs' ``ray_actor_options.memory`` is sized from (docs/serving.md).

Each measurement waits for a quiet machine (up to --quiet-wait s) and is repeated (--attempts)
when other processes took more than --quiet of the CPUs meanwhile (embed.py's CpuMonitor).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import http.client
import io
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

# benchmarks/ is sys.path[0] when this runs as a script: embed.py's CpuMonitor and machine_info.
from embed import CORES, CpuMonitor, machine_info, write_record
from pydantic import BaseModel

from keeper_core.embedding import ClipEmbedder
from keeper_core.images import decode_image
from keeper_core.preparation import ImagePreparation
from keeper_core.synthetic import generate_corpus
from keeper_serve.api import ImagePreparer
from keeper_serve.config import KeeperAppArgs
from keeper_serve.local import free_port

ROUTE = "/v1/embed"
TOKEN_ENV = "KEEPER_API_TOKEN"
OFFLINE_FORWARD, OFFLINE_FORWARD_B1, OFFLINE_E2E, OFFLINE_E2E_DRAFT = (
    "offline-forward",
    "offline-forward-b1",
    "offline-decode-forward",
    "offline-draft-input-forward",
)
SERVERS = ("offline", "naive", "naive-async", "keeper")


# --------------------------------------------------------------------------------------------
# The image pool and the request bodies (identical for every server)


def image_pool(cache: Path, n: int, size: tuple[int, int], quality: int) -> list[bytes]:
    """``n`` JPEGs of real photos at ``size`` and ``quality``, generated once under ``cache``."""
    folder = cache / f"serve-pool-{size[0]}x{size[1]}-q{quality}-n{n}"
    manifest = folder / "manifest.csv"  # written last: the pool is whole
    if not manifest.exists():
        print(f"generating {n} JPEGs at {size[0]}x{size[1]} q{quality} into {folder} ...")
        # >= 2 shots per series: n / 2 series always hold n images.
        generate_corpus(folder, n_series=math.ceil(n / 2), image_size=size, jpeg_quality=quality)
    uris = [line.split(",")[1] for line in manifest.read_text().splitlines()[1:]]
    return [Path(u).read_bytes() for u in uris[:n]]


def request_body(jpeg: bytes) -> bytes:
    return json.dumps({"images": [{"b64": base64.b64encode(jpeg).decode("ascii")}]}).encode()


def find_vectors(obj: Any, dim: int) -> list[list[float]]:
    """Every list of ``dim`` numbers in a JSON response (whatever the response's layout)."""
    if isinstance(obj, list) and len(obj) == dim and all(isinstance(v, int | float) for v in obj):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    return [v for item in items for v in find_vectors(item, dim)]


# --------------------------------------------------------------------------------------------
# 1: offline


def keeper_preparation(spec: str) -> ImagePreparation:
    """The decode + resize keeper's ingress runs: its own ``ImagePreparer``'s, built from the
    app's default args (draft on, the default limits) for this model."""
    return ImagePreparer(KeeperAppArgs(clip_model=spec)).preparation


def decode_resize(prep: ImagePreparation, jpeg: bytes) -> np.ndarray:
    """What keeper's server does per image before the forward, the same pixels: its decode (a
    JPEG drafted no smaller than the quality features' 256 px, so a 640x480 JPEG is decoded
    whole) and its resize/crop to the model's uint8 input."""
    return prep.resize(prep.decode(jpeg))


def decode_resize_draft_input(embedder: ClipEmbedder, jpeg: bytes) -> np.ndarray:
    """A cheaper decode than keeper's: JPEG draft to the model's input size (a 640x480 JPEG at
    320x240), then resize. Different pixels from keeper's (the corpus's), so not its ceiling."""
    s = embedder.clip.image_size
    return embedder.preprocess_uint8(decode_image(jpeg, draft_size=(s, s)))


def timed_loop(step: Callable[[int], int], min_seconds: float) -> dict[str, Any]:
    """``step(i) -> images`` repeatedly for >= min_seconds and >= 2 steps (after one warm-up)."""
    step(0)
    done, steps, t0 = 0, 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - t0 < min_seconds:
        done += step(steps + 1)
        steps += 1
    seconds = time.perf_counter() - t0
    return {"images_per_s": done / seconds, "images": done, "seconds": round(seconds, 2)}


def bench_offline(
    spec: str, pool: Sequence[bytes], args: argparse.Namespace, mon: CpuMonitor
) -> dict[str, Any]:
    torch.set_num_threads(CORES)
    bs = args.max_batch_size
    embedder = ClipEmbedder(spec, device=args.device, batch_size=bs)
    prep = keeper_preparation(spec)
    pixels = np.stack([decode_resize(prep, b) for b in pool])
    n = len(pool)

    def forward(batch: int) -> Callable[[int], int]:
        def step(i: int) -> int:
            idx = [(i * batch + k) % n for k in range(batch)]
            embedder.embed_pixels(pixels[idx])
            return batch

        return step

    def end_to_end(i: int) -> int:
        batch = [pool[(i * bs + k) % n] for k in range(bs)]
        embedder.embed_pixels(np.stack([decode_resize(prep, b) for b in batch]))
        return bs

    def end_to_end_draft_input(i: int) -> int:
        batch = [pool[(i * bs + k) % n] for k in range(bs)]
        embedder.embed_pixels(np.stack([decode_resize_draft_input(embedder, b) for b in batch]))
        return bs

    res: dict[str, Any] = {}
    half = args.duration / 2
    for key, step, seconds in (
        (OFFLINE_FORWARD_B1, forward(1), half),
        (OFFLINE_FORWARD, forward(bs), half),
        (OFFLINE_E2E, end_to_end, args.duration),
        (OFFLINE_E2E_DRAFT, end_to_end_draft_input, half),
    ):
        res[key] = measure(mon, key, lambda s=step, t=seconds: timed_loop(s, t), args)
        print(f"  {key:20s} {res[key]['images_per_s']:8.2f} img/s", flush=True)
    res["stage_ms"] = stage_ms(embedder, prep, pool)
    print(f"  per-image CPU steps, 1 thread (ms): {res['stage_ms']}", flush=True)

    # Reference embeddings of pool[0], to check that every server computes the same thing (and
    # of another photo: random weights map all images close together, so compare with that).
    def ref(jpeg: bytes, keeper: bool) -> list[float]:
        if keeper:
            return embedder.embed_pixels(decode_resize(prep, jpeg)[None])[0].tolist()
        return embedder.embed_pixels(embedder.preprocess(decode_image(jpeg))[None])[0].tolist()

    other = next((b for b in pool[1:] if b != pool[0]), pool[0])
    res["reference"] = {
        "same_image_keeper_pixels": ref(pool[0], True),
        "same_image_full_transform": ref(pool[0], False),
        "other_image_full_transform": ref(other, False),
    }
    res["embed_dim"] = embedder.embed_dim
    return res


def stage_ms(
    embedder: ClipEmbedder, prep: ImagePreparation, pool: Sequence[bytes]
) -> dict[str, float]:
    """Milliseconds per image of each CPU step a server does before the forward (1 thread)."""
    from PIL import Image

    s = embedder.clip.image_size
    ms: Counter[str] = Counter()

    def timed(name: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        ms[name] += time.perf_counter() - t0
        return out

    def unwrap(body: bytes) -> bytes:
        return base64.b64decode(json.loads(body)["images"][0]["b64"])

    def pil_decode(jpeg: bytes) -> Image.Image:
        return Image.open(io.BytesIO(jpeg)).convert("RGB")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for jpeg in pool:
            body = request_body(jpeg)
            timed("json_b64_decode", unwrap, body)
            full = timed("pil_decode_full", pil_decode, jpeg)
            draft = timed("decode_draft", decode_image, jpeg, draft_size=(s, s))
            timed("full_transform", embedder.preprocess, full)
            timed("resize_uint8_of_draft", embedder.preprocess_uint8, draft)
            decoded = timed("keeper_decode", prep.decode, jpeg)
            timed("keeper_resize", prep.resize, decoded)
    finally:
        torch.set_num_threads(threads)
    return {k: round(1000 * v / len(pool), 2) for k, v in ms.items()}


# --------------------------------------------------------------------------------------------
# 2: the naive server (this file runs it: ``serve.py _naive-server``)


class _Image(BaseModel):
    b64: str


class _EmbedRequest(BaseModel):
    images: list[_Image]


def naive_app(spec: str, handler: str, device: str = "cpu") -> Any:
    """A FastAPI app as a user writes it: decode, transform, forward, in the request handler.

    On CUDA the forward runs in bf16 autocast, as keeper's encoder does there.
    """
    import torch.nn.functional as F
    from fastapi import FastAPI
    from PIL import Image

    from keeper_core.models import load_clip

    torch.set_num_threads(CORES)  # a user's process gets all cores (torch's default, explicit)
    clip = load_clip(spec, device)
    model: Any = clip.model.eval()
    cuda = device == "cuda"
    app = FastAPI()

    def embed(req: _EmbedRequest) -> dict[str, Any]:
        images = [
            Image.open(io.BytesIO(base64.b64decode(im.b64))).convert("RGB") for im in req.images
        ]
        x = torch.stack([clip.transform(im) for im in images]).to(device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
        with torch.inference_mode(), autocast:
            emb = F.normalize(model.encode_image(x).float(), dim=-1)
        return {"model": spec, "embeddings": emb.tolist()}

    async def embed_async(req: _EmbedRequest) -> dict[str, Any]:
        return embed(req)

    app.post(ROUTE)(embed if handler == "sync" else embed_async)
    app.get("/healthz")(lambda: {"ok": True})
    return app


def naive_server_main(argv: Sequence[str]) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="serve.py _naive-server")
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--handler", choices=("sync", "async"), default="sync")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    a = p.parse_args(argv)
    app = naive_app(a.model, a.handler, a.device)
    uvicorn.run(app, host="127.0.0.1", port=a.port, workers=1, log_level="warning")
    return 0


@contextlib.contextmanager
def naive_server(spec: str, handler: str, log_dir: Path, device: str = "cpu") -> Any:
    """Runs the naive server in its own process group; yields (base URL, start-up seconds)."""
    port = free_port()
    log = (log_dir / f"naive-{handler}.log").open("wb")
    cmd = [sys.executable, __file__, "_naive-server", "--model", spec, "--port", str(port)]
    cmd += ["--device", device]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--handler", handler], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"naive server exited ({proc.returncode}); see {log.name}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"naive server not healthy after 300 s; see {log.name}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}", time.perf_counter() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# --------------------------------------------------------------------------------------------
# 3: keeper's Serve app


def parse_sets(text: str) -> dict[str, Any]:
    """``k=v,k=v`` -> {k: v} with YAML scalars (``null``, ``2``, ``0.005``, ``true``)."""
    import yaml

    pairs = [kv.split("=", 1) for kv in text.split(",") if kv.strip()]
    if any(len(kv) != 2 for kv in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return {k.strip(): yaml.safe_load(v.strip()) for k, v in pairs}


def without_unbuilt_vlm(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The Serve config without its VlmJudge block when the overrides leave the app no VLM.

    keeper's app builds VlmJudge only for a ``vlm.source``, and Serve refuses a block for a
    deployment the app does not build (the GPU config has one, for its 7B judge).
    """
    if "vlm.source" not in overrides or overrides["vlm.source"] is not None:
        return config
    for app in config.get("applications") or []:
        deps = app.get("deployments") or []
        app["deployments"] = [d for d in deps if d.get("name") != "VlmJudge"]
    return config


@contextlib.contextmanager
def keeper_server(spec: str, args: argparse.Namespace, data_dir: Path) -> Any:
    """keeper's app on local Ray; yields (base URL, start-up seconds, the overrides it got)."""
    from keeper_serve.local import load_config, shutdown, start

    bs = args.max_batch_size
    overrides: dict[str, Any] = {
        "clip_model": spec,
        "auth.token_env": TOKEN_ENV,
        # No registry here: embeddings only. The ranker's user_config overrides its args, so
        # both: a ranker polling MLflow every few seconds would take CPU from the encoder.
        "ranker.model_uri": None,
        "deployments.SeriesRanker.user_config.model_uri": None,
        "data_dir": str(data_dir),
        # The same batch size as offline (the encoder's user_config overrides its args: both).
        "encoder.max_batch_size": bs,
        "deployments.ClipEncoder.user_config.max_batch_size": bs,
        **args.keeper_set,
    }
    if args.device == "cuda":
        overrides.setdefault("vlm.source", None)  # no VLM weights to fetch: /v1/embed only
    config = without_unbuilt_vlm(load_config(args.keeper_config), overrides)
    t0 = time.perf_counter()
    try:
        port = free_port()  # Serve's proxy takes a fixed port; 0 would not tell us which
        url = start(config, overrides=overrides, host="127.0.0.1", port=port, haproxy=args.haproxy)
        yield url.rstrip("/"), time.perf_counter() - t0, overrides
    finally:
        import ray

        try:
            shutdown()
        except Exception as e:  # still stop Ray; the error that brought us here matters more
            print(f"  keeper shutdown failed: {e!r}", flush=True)
        if ray.is_initialized():
            ray.shutdown()


# --------------------------------------------------------------------------------------------
# The closed-loop load generator


def endpoint(url: str) -> tuple[str, int, str]:
    """Base URL -> (host, port, path of the embed route)."""
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80, u.path.rstrip("/") + ROUTE


def smoke(url: str, headers: dict[str, str], body: bytes, dim: int) -> list[float] | None:
    """One request before the load: the server answers 200 with one embedding."""
    host, port, path = endpoint(url)
    conn = http.client.HTTPConnection(host, port, timeout=300)
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{url}{path} answered {resp.status}: {data[:500]!r}")
    vectors = find_vectors(json.loads(data), dim)
    if len(vectors) != 1:
        print(f"  warning: expected one {dim}-d embedding in the response, found {len(vectors)}")
        return None
    return vectors[0]


def closed_loop(
    url: str,
    headers: dict[str, str],
    bodies: Sequence[bytes],
    concurrency: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """``concurrency`` threads, each with a keep-alive connection, sending requests back to back.

    Requests completing within [warmup, warmup + duration] count (throughput and latency);
    errors (non-200 answers and failed connections) count over the whole run, warm-up included.
    """
    host, port, path = endpoint(url)
    records: list[list[tuple[float, float, int]]] = [[] for _ in range(concurrency)]
    failures: Counter[str] = Counter()
    barrier = threading.Barrier(concurrency + 1)
    t: dict[str, float] = {}

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=600)
        rec, k = records[i], i
        barrier.wait()
        stop = t["stop"]
        while (start := time.perf_counter()) < stop:
            body = bodies[k % len(bodies)]
            k += concurrency
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                failures[type(e).__name__] += 1
                status = -1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=600)
            rec.append((start, time.perf_counter(), status))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    t["measure"], t["stop"] = t0 + warmup, t0 + warmup + duration
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    barrier.wait()
    for th in threads:
        th.join()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - t0
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)

    every = [r for rec in records for r in rec]
    window = [r for r in every if t["measure"] <= r[1] <= t["stop"]]
    ok = np.array([1000 * (e - s) for s, e, status in window if status == 200])
    statuses = Counter(str(status) for _, _, status in every if status != 200)
    p50, p99 = (float(np.percentile(ok, q)) for q in (50, 99)) if len(ok) else (math.nan,) * 2
    return {
        "requests_per_s": len(ok) / duration,  # one image per request: images/s
        "p50_ms": p50,
        "p99_ms": p99,
        "p99_over_p50": p99 / p50 if len(ok) else math.nan,
        "mean_ms": float(ok.mean()) if len(ok) else math.nan,
        "max_ms": float(ok.max()) if len(ok) else math.nan,
        "ok_in_window": len(ok),
        "requests_total": len(every),
        "errors": sum(statuses.values()),
        "errors_by_status": dict(statuses),  # "-1": no HTTP answer (see connection_failures)
        "connection_failures": dict(failures),
        "concurrency": concurrency,
        "warmup_s": warmup,
        "duration_s": duration,
        "wall_s": round(wall, 2),  # warm-up + duration + the drain of requests in flight
        # This process: the client threads (plus the CPU monitor and, for keeper, Ray's driver).
        "client_cpu_s": round(client_cpu, 2),
        "client_cpu_share": round(client_cpu / (wall * CORES), 3),
    }


#: One access-log line of Serve (proxy or replica): request id, what, status, milliseconds.
_ACCESS = re.compile(r" (\S+) -- (?:POST /v1/embed 200|CALL embed_pixels OK) (\d+(?:\.\d+)?)ms$")
_HOPS = {"proxy": "proxy_*.log", "ingress": "replica_*KeeperIngress*.log",
         "encoder": "replica_*ClipEncoder*.log"}  # fmt: skip


class ReplicaMemory:
    """Peak resident memory of each Serve deployment's replicas, sampled from /proc.

    A replica is a process titled ``ray::ServeReplica:APP:DEPLOYMENT`` (Ray sets the title);
    the figure per deployment is the largest RSS any of its replicas reached, which is what its
    ``ray_actor_options.memory`` must cover (docs/serving.md).
    """

    TITLE = re.compile(rb"ray::ServeReplica:[^:\x00]+:([A-Za-z0-9_]+)")

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.page = interval, os.sysconf("SC_PAGE_SIZE")
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
                m = self.TITLE.match(title)
                if m is None:
                    continue
                rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self.page
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            name = m.group(1).decode()
            self.peak[name] = max(self.peak.get(name, 0), rss)

    def stop(self) -> dict[str, float]:
        """Stops sampling; the peak RSS per deployment, MiB."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return {k: round(v / 2**20, 1) for k, v in sorted(self.peak.items())}


def serve_log_dir() -> Path:
    """This process's Ray session's Serve log folder (Ray has no public call for it)."""
    import ray

    node = ray._private.worker._global_node
    return Path(node.get_logs_dir_path()) / "serve"


def log_offsets(log_dir: Path) -> dict[Path, int]:
    return {f: f.stat().st_size for pattern in _HOPS.values() for f in log_dir.glob(pattern)}


def encoder_stats() -> dict[str, float]:
    """One ClipEncoder replica's batching counters (run --breakdown with one encoder replica)."""
    from ray import serve

    handle = serve.get_deployment_handle("ClipEncoder", app_name="keeper")
    stats: dict[str, float] = handle.batching_stats.remote().result(timeout_s=60)
    return stats


def forward_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the encoder's forwards took between two ``encoder_stats`` snapshots."""
    d = {k: after[k] - before[k] for k in after}
    if not d["forwards"]:
        return {"forwards": 0}
    return {
        "forwards": int(d["forwards"]),
        "images_per_forward": round(d["images"] / d["forwards"], 2),
        "forward_ms": round(1000 * d["forward_s"] / d["forwards"], 1),
    }


def hop_breakdown(log_dir: Path, since: dict[Path, int]) -> dict[str, Any]:
    """Median ms per hop over the requests logged since ``since`` (joined by request id)."""
    per_hop: dict[str, dict[str, float]] = {hop: {} for hop in _HOPS}
    for hop, pattern in _HOPS.items():
        for f in log_dir.glob(pattern):
            with f.open("rb") as fh:
                fh.seek(since.get(f, 0))
                for line in fh.read().decode(errors="replace").splitlines():
                    if m := _ACCESS.search(line):
                        per_hop[hop][m.group(1)] = float(m.group(2))
    ids = set.intersection(*(set(v) for v in per_hop.values()))
    if not ids:
        return {"requests": 0}
    med = {hop: float(np.median([per_hop[hop][i] for i in ids])) for hop in _HOPS}
    return {
        "requests": len(ids),
        "median_ms": {hop: round(v, 1) for hop, v in med.items()},
        "proxy_minus_ingress_ms": round(med["proxy"] - med["ingress"], 1),
        "ingress_minus_encoder_ms": round(med["ingress"] - med["encoder"], 1),
    }


def bench_server(
    name: str,
    url: str,
    headers: dict[str, str],
    bodies: Sequence[bytes],
    reference: dict[str, list[float]] | None,
    dim: int,
    args: argparse.Namespace,
    mon: CpuMonitor,
) -> dict[str, Any]:
    res: dict[str, Any] = {"by_concurrency": {}}
    vec = smoke(url, headers, bodies[0], dim)
    if vec is not None and reference is not None:
        res["cosine_vs_offline"] = {
            k: round(float(np.dot(vec, ref)), 4) for k, ref in reference.items()
        }
    log_dir = serve_log_dir() if name == "keeper" and args.breakdown else None

    def run(c: int) -> dict[str, Any]:
        """One closed-loop attempt; with --breakdown, the hops of this attempt's requests."""
        if log_dir is None:
            return closed_loop(url, headers, bodies, c, args.warmup, args.duration)
        since, stats0 = log_offsets(log_dir), encoder_stats()
        r = closed_loop(url, headers, bodies, c, args.warmup, args.duration)
        r["hops"] = hop_breakdown(log_dir, since)
        r["hops"]["encoder_forwards"] = forward_breakdown(stats0, encoder_stats())
        return r

    for c in args.concurrency:
        r = measure(mon, f"{name} c={c}", lambda c=c: run(c), args)
        if log_dir:
            print(f"  {name:12s} c={c:3d}: hops {r['hops']}", flush=True)
        res["by_concurrency"][str(c)] = r
        print(
            f"  {name:12s} c={c:3d}: {r['requests_per_s']:7.2f} req/s, p50 {r['p50_ms']:8.1f} ms, "
            f"p99 {r['p99_ms']:8.1f} ms, errors {r['errors']}, client CPU "
            f"{r['client_cpu_share']:.0%}, others {r['cpu']['foreign_share']:.0%}",
            flush=True,
        )
    return res


# --------------------------------------------------------------------------------------------
# Driver


def measure(
    mon: CpuMonitor, name: str, fn: Callable[[], dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """``fn()`` with embed.py's quiet-machine rules, from this script's --quiet, --attempts and
    --quiet-wait."""
    return mon.measure(name, fn, args.quiet, args.attempts, args.quiet_wait)


ROW_NAMES = {
    OFFLINE_FORWARD_B1: "offline, forward only, batch 1",
    OFFLINE_FORWARD: "offline, forward only, batch {bs}",
    OFFLINE_E2E: "offline, keeper's decode + resize + forward, batch {bs} (ceiling)",
    OFFLINE_E2E_DRAFT: "offline, draft-to-input decode + resize + forward, batch {bs}",
    "naive": "naive FastAPI (1 uvicorn worker, def handler)",
    "naive-async": "naive FastAPI (1 uvicorn worker, async def handler)",
    "keeper": "keeper Serve app",
}


def rows_at(report: dict[str, Any], c: int) -> list[dict[str, Any]]:
    """The table rows at concurrency ``c`` (offline rows do not depend on it)."""
    rows = []
    off = report.get("offline")
    for key in (OFFLINE_FORWARD_B1, OFFLINE_FORWARD, OFFLINE_E2E, OFFLINE_E2E_DRAFT):
        if off and key in off:
            r = off[key]
            rows.append({"key": key, "rps": r["images_per_s"], "cpu": r["cpu"], "client": None})
    for key, s in report["servers"].items():
        r = s.get("by_concurrency", {}).get(str(c))
        if r:
            rows.append(
                {
                    "key": key,
                    "rps": r["requests_per_s"],
                    "p50": r["p50_ms"],
                    "p99": r["p99_ms"],
                    "errors": r["errors"],
                    "cpu": r["cpu"],
                    "client": r["client_cpu_share"],
                }
            )
    naive = next((r["rps"] for r in rows if r["key"] == "naive"), None)
    ceiling = next((r["rps"] for r in rows if r["key"] == OFFLINE_E2E), None)
    for r in rows:
        r["vs_naive"] = r["rps"] / naive if naive else None
        r["vs_offline"] = r["rps"] / ceiling if ceiling else None
    return rows


def table(report: dict[str, Any], c: int, bs: int, quiet: float) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        f"concurrency {c} ({c} client thread(s) in this process, keep-alive, 1 image a request)",
        "",
        "| method | req/s | p50 ms | p99 ms | p99/p50 | errors | vs naive | vs offline "
        "| client CPU | others CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows_at(report, c):
        p50, p99 = r.get("p50"), r.get("p99")
        lines.append(
            f"| {ROW_NAMES[r['key']].format(bs=bs)} | {r['rps']:.2f} | {f(p50, '.0f')} "
            f"| {f(p99, '.0f')} | {f(p99 / p50 if p50 and p99 else None, '.2f')} "
            f"| {r.get('errors', '-')} | {f(r['vs_naive'], '.2f')} | {f(r['vs_offline'], '.2f')} "
            f"| {f(r['client'], '.0%')} | {r['cpu']['foreign_share']:.0%}"
            f"{' (!)' if r['cpu']['foreign_share'] > quiet else ''} |"
        )
    return "\n".join(lines)


def goals(
    report: dict[str, Any], concurrency: Sequence[int], device: str = "cpu"
) -> dict[str, Any]:
    """The issue's goals at concurrency 32 (or the highest concurrency run, marked as such); on
    CUDA issue 14's GPU goals at concurrency 64."""
    at = 64 if device == "cuda" else 32
    c = at if at in concurrency else max(concurrency)
    rows = {r["key"]: r for r in rows_at(report, c)}
    k = rows.get("keeper")

    def goal(name: str, value: float | None, target: float, higher: bool) -> dict[str, Any]:
        met = None if value is None else (value >= target if higher else value <= target)
        return {"goal": name, "value": value, "target": target, "met": met}

    p99_p50 = k["p99"] / k["p50"] if k and k.get("p50") else None
    ks = report["servers"].get("keeper")
    state = "not run" if ks is None else "failed" if "error" in ks else "ok"
    if device == "cuda":
        throughput = [goal("keeper / naive req/s >= 10", k["vs_naive"] if k else None, 10, True)]
    else:
        at_1 = {r["key"]: r for r in rows_at(report, 1)} if 1 in concurrency else {}
        k1, n1 = at_1.get("keeper"), at_1.get("naive")
        gap_1 = k1["p50"] - n1["p50"] if k1 and n1 and k1.get("p50") and n1.get("p50") else None
        throughput = [
            goal("keeper / naive req/s >= 1.5", k["vs_naive"] if k else None, 1.5, True),
            goal("keeper / offline img/s >= 0.6", k["vs_offline"] if k else None, 0.6, True),
            goal("keeper / offline img/s >= 0.8 (#14)", k["vs_offline"] if k else None, 0.8, True),
            goal("c=1 p50 keeper - naive ms <= 20 (#14)", gap_1, 20.0, False),
        ]
    return {
        "concurrency": c,
        "wanted_concurrency": at,
        "device": device,
        "keeper": state,
        "goals": [
            *throughput,
            goal("keeper p99 / p50 <= 3", p99_p50, 3.0, False),
            goal("keeper errors == 0", float(k["errors"]) if k else None, 0.0, False),
        ],
    }


def print_goals(g: dict[str, Any]) -> None:
    wanted = g.get("wanted_concurrency", 32)
    where = f"concurrency {g['concurrency']}" + (
        "" if g["concurrency"] == wanted else f" ({wanted} was not run)"
    )
    print(f"goals at {where}:")
    for x in g["goals"]:
        v = f"n/a (keeper {g['keeper']})" if x["value"] is None else f"{x['value']:.2f}"
        met = {True: "met", False: "MISSED", None: "-"}[x["met"]]
        print(f"  {x['goal']:36s} {v:>22s}  {met}")


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_servers(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = sorted(set(names) - set(SERVERS))
    if bad:
        raise argparse.ArgumentTypeError(f"unknown server(s) {bad}; choose from {SERVERS}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_naive-server"]:
        return naive_server_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32:random")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where every model runs (cuda: a GPU node, with --keeper-config "
        "clusters/serve/keeper-gpu.yaml)",
    )
    p.add_argument(
        "--servers",
        type=parse_servers,
        default=["offline", "naive", "keeper"],
        help=f"which of {','.join(SERVERS)} to run, in this order",
    )
    p.add_argument("--concurrency", type=parse_ints, default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    p.add_argument("--max-batch-size", type=int, default=16, help="offline and keeper's encoder")
    p.add_argument("--images", type=int, default=64, help="JPEGs in the request pool")
    p.add_argument("--out", default="benchmarks/results/serve-cpu.json")
    p.add_argument("--cache", type=Path, default=Path("/tmp/keeper-bench"), help="pool cache")
    p.add_argument("--keeper-config", default="clusters/serve/keeper.yaml", help="Serve config")
    p.add_argument(
        "--keeper-set",
        type=parse_sets,
        default={},
        help="KeeperAppArgs / deployment overrides for keeper, dotted keys with YAML values, "
        "e.g. encoder.torch_threads=2,deployments.ClipEncoder.num_replicas=1",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.1,
        help="a measurement waits until, and is repeated unless, other processes take at most "
        "this share of the CPUs (a shared machine skews every number here)",
    )
    p.add_argument(
        "--quiet-wait", type=float, default=300.0, help="most seconds to wait for it; 0: do not"
    )
    p.add_argument("--attempts", type=int, default=2, help="most tries per measurement")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="keeper: log the encoder's calls too and report the median ms per hop "
        "(proxy, ingress, encoder) per concurrency",
    )
    p.add_argument(
        "--haproxy",
        action="store_true",
        help="keeper: HTTP through HAProxy, as `keeper serve --haproxy` (docs/serving.md)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this process sees no CUDA device")
    if args.breakdown:
        args.keeper_set["deployments.ClipEncoder.logging_config.enable_access_log"] = True

    t_start = time.perf_counter()
    pool = image_pool(args.cache, args.images, (640, 480), 90)
    bodies = [request_body(b) for b in pool]
    token = secrets.token_hex(16)  # 32 characters
    os.environ[TOKEN_ENV] = token
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        # e.g. RAY_SERVE_ENABLE_HA_PROXY=1: set where Ray starts, it changes what is measured
        "ray_serve_env": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")
        },
        "haproxy": args.haproxy,  # --haproxy: keeper_serve.local.start sets its variables
        "config": {
            "model": args.model,
            "device": args.device,
            "servers": args.servers,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "max_batch_size": args.max_batch_size,
            "quiet": args.quiet,
            "images": len(pool),
            "image_size": [640, 480],
            "jpeg_quality": 90,
            "mean_jpeg_bytes": round(float(np.mean([len(b) for b in pool]))),
            "mean_body_bytes": round(float(np.mean([len(b) for b in bodies]))),
            "keeper_config": args.keeper_config,
            "keeper_set": args.keeper_set,
            "load_generator": "closed loop: one thread per client in this process, one "
            "http.client keep-alive connection each, 1 image per request, back to back; it "
            "shares the cores with the server (client_cpu_share)",
            "notes": "offline decodes with JPEG draft to the model input (as keeper's serve "
            "does); naive decodes fully with PIL. Random weights: speed only.",
        },
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": os.getloadavg(),
        "servers": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every server too: a run cut short keeps what it measured
        out.write_text(json.dumps(report, indent=2, default=float) + "\n")

    print(f"== {args.model}: {len(pool)} JPEGs 640x480 q90, concurrency {args.concurrency}")
    mon = CpuMonitor()
    workdir = Path(tempfile.mkdtemp(prefix="serve-", dir=args.cache))
    reference, dim = None, None
    try:
        if "offline" in args.servers:
            off = bench_offline(args.model, pool, args, mon)
            reference, dim = off.pop("reference"), off["embed_dim"]
            report["offline"] = off
            save()
            gc.collect()  # the in-process model, before the servers load theirs
        if dim is None:
            from keeper_core.models import embed_dim

            dim = embed_dim(args.model)
        for name in args.servers:
            if name == "offline":
                continue
            print(f"-- {name}", flush=True)
            if name == "keeper":
                ctx = keeper_server(args.model, args, workdir)
            else:
                handler = "async" if name == "naive-async" else "sync"
                ctx = naive_server(args.model, handler, workdir, args.device)
            # keeper's replicas from before they start: a model load can peak above serving
            memory = ReplicaMemory() if name == "keeper" else None
            res: dict[str, Any] = {}
            try:
                with ctx as (url, startup, *extra):
                    print(f"  up at {url} after {startup:.1f} s", flush=True)
                    res = bench_server(name, url, headers, bodies, reference, dim, args, mon)
                    res["startup_s"] = round(startup, 2)
                    if extra:
                        res["overrides"] = extra[0]
            except Exception as e:  # one server failing must not lose the others' numbers
                print(f"  {name} FAILED: {e!r}", flush=True)
                res = {"error": repr(e)[-2000:]}
            finally:  # a peak is a maximum: stopping after the app is gone changes nothing
                if memory is not None:
                    res["replica_peak_rss_mib"] = memory.stop()
                    print(f"  peak RSS per replica (MiB): {res['replica_peak_rss_mib']}")
            report["servers"][name] = res
            save()
    finally:
        mon.stop()
        for log in workdir.glob("*.log"):  # the naive servers' logs, kept when they say something
            if log.stat().st_size:
                report.setdefault("server_logs", {})[log.name] = log.read_text()[-4000:]
        shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    print()
    bs = args.max_batch_size
    if "offline" in report:
        print(
            f"per-image CPU steps before the forward, 1 thread (ms): {report['offline']['stage_ms']}"
        )
    for c in args.concurrency:
        print(table(report, c, bs, args.quiet) + "\n")
    report["goals"] = goals(report, args.concurrency, args.device)
    print_goals(report["goals"])
    print(
        "notes: the load generator runs in this process on the same cores as the servers "
        "(client CPU: its share of all cores); (!): other processes took more than "
        f"{args.quiet:.0%} of the CPUs during that row, in every attempt: do not trust it."
    )
    report["runtime_s"] = round(time.perf_counter() - t_start, 1)
    print(f"benchmark runtime {report['runtime_s']:.0f}s")
    write_record(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
