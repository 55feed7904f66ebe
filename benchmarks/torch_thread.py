"""Which thread runs a model's forward matters on CPU: keeper_core.torch_thread's measurement.

Each arrangement runs in a fresh process (OpenMP's thread teams are per process), alternated
``--rounds`` times, all with the same model, batch and torch threads:

- ``one-thread``: model built and run on one worker thread (``TorchThread``: what keeper's
  Serve replicas and embed actors now do);
- ``main-only``: built and run on the main thread (a plain script; the reference);
- ``load-main-run-thread``: built on the main thread, run on a worker thread (what a Serve
  replica did before: constructor, then ``asyncio.to_thread``).

Prints a table of median forward ms and the ratio to ``one-thread``; writes JSON.

    .venv/bin/python benchmarks/torch_thread.py --model ViT-B-32:random --batches 1,16 \
        --out benchmarks/results/torch-thread-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("one-thread", "main-only", "load-main-run-thread")


def child(model: str, batch: int, threads: int, mode: str, reps: int) -> dict[str, float]:
    """One arrangement in this process: median and min ms of ``reps`` forwards after 3."""
    import torch

    from keeper_core.models import load_clip
    from keeper_core.torch_thread import TorchThread

    worker = TorchThread("bench")
    state: dict[str, object] = {}

    def load() -> None:
        torch.set_num_threads(threads)
        clip = load_clip(model, "cpu")
        state["model"] = clip.model.eval()
        state["x"] = torch.randn(batch, 3, clip.image_size, clip.image_size)

    def forward() -> float:
        m, x = state["model"], state["x"]
        with torch.inference_mode():
            t0 = time.perf_counter()
            m.encode_image(x)  # type: ignore[attr-defined]
            return (time.perf_counter() - t0) * 1000

    (worker.call if mode == "one-thread" else (lambda f: f()))(load)
    run = forward if mode == "main-only" else (lambda: worker.call(forward))
    for _ in range(3):
        run()
    times = [run() for _ in range(reps)]
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32:random")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the three modes")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        batch, mode = a.child.split(":")
        print(json.dumps(child(a.model, int(batch), a.threads, mode, a.reps)))
        return 0

    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        runs: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(a.rounds):
            for mode in MODES:
                cmd = [
                    sys.executable,
                    __file__,
                    "--model",
                    a.model,
                    "--threads",
                    str(a.threads),
                    "--reps",
                    str(a.reps),
                    "--child",
                    f"{batch}:{mode}",
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])
        base = statistics.median(runs["one-thread"])
        for mode in MODES:
            ms = statistics.median(runs[mode])
            rows.append(
                {
                    "batch": batch,
                    "mode": mode,
                    "median_ms": ms,
                    "runs_ms": runs[mode],
                    "vs_one_thread": ms / base,
                }
            )

    print(
        f"{a.model}, {a.threads} torch threads, {os.cpu_count()} cores, "
        f"median of {a.rounds} processes x {a.reps} forwards"
    )
    print(f"{'batch':>5}  {'arrangement':<22} {'ms/forward':>10}  {'vs one-thread':>13}")
    for r in rows:
        print(
            f"{r['batch']:>5}  {r['mode']:<22} {r['median_ms']:>10.1f}  {r['vs_one_thread']:>12.2f}x"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {
                "cores": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "model": a.model,
            "threads": a.threads,
            "random_weights": a.model.endswith(":random"),
            "rows": rows,
        }
        a.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
