"""A CPU decode worker without torch: what it costs to start one, and keeper embed end to end.

    .venv/bin/python benchmarks/decode_worker.py --baseline-ref 012a923 \
        --out benchmarks/results/decode-worker-cpu.json

keeper embed's decode tasks (and its write tasks) run in Ray worker processes of their own. Until
keeper_core.models imported torch lazily and resized with Pillow alone, every such process
imported torch, torchvision and open_clip before its first image (the job's module imported
torch; the resize was open_clip's torchvision transform). Two measurements, side by side:

1. start-up of one worker, in fresh interpreters, alternated ``--repeats`` times: import the job's
   module and prepare a first batch of 16 JPEGs, "heavy" as before (the worker reads open_clip's
   configs itself: torch, torchvision and open_clip are imported) and "light" (the driver's
   preprocess config travels with the task: none of them is). Seconds to the first batch and the
   process's peak RSS (VmHWM: ``ru_maxrss`` would report this script's, inherited across exec).
2. ``keeper embed`` end to end as a user runs it (a new process, its own local Ray, the job's
   defaults: decode tasks), on the same files: ``--baseline-ref``'s code (a git worktree put first
   on PYTHONPATH; Ray's workers inherit it) against this tree, alternated. Pipeline seconds,
   time to the first part, images/s, and the peak of the summed RSS of every ``ray::`` process.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from embed import machine_info, make_corpus, read_manifest

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"max_pixels": 50_000_000, "max_bytes": 50_000_000, "max_raw_bytes": 50_000_000}

WORKER = """
import json, pickle, sys, time
t0 = time.perf_counter()
import numpy as np
from keeper_train.jobs.embed import prepare_batch
args = json.loads(sys.argv[1])
pre = pickle.loads(bytes.fromhex(args["preprocess"])) if args["preprocess"] else None
out = prepare_batch(
    {"image_uri": np.array(args["uris"], dtype=object)}, spec=args["spec"],
    limits={**args["limits"], "min_side": 8}, draft=True, errors_dir=args["errors"],
    run_id="bench", preprocess=pre,
)
assert len(out["image_uri"]) == len(args["uris"])
print(json.dumps({
    "first_batch_s": time.perf_counter() - t0,
    # VmHWM, not ru_maxrss: Linux carries the parent's maxrss across fork and exec
    "peak_rss_mib": next(
        int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")
    ) / 1024,
    "imported": [m for m in ("torch", "torchvision", "open_clip") if m in sys.modules],
}))
"""

JOB = """
import json, sys
from keeper_train.jobs.embed import EmbedConfig, run
a = json.loads(sys.argv[1])
s = run(EmbedConfig(input=a["manifest"], output=a["out"], model=a["spec"], limit=a["n"]))
print("SUMMARY " + s.model_dump_json())
"""


def worker_startup(spec: str, uris: list[str], repeats: int, tmp: Path) -> dict[str, Any]:
    from keeper_core.models import preprocess_config

    pre = pickle.dumps(preprocess_config(spec)).hex()
    runs: dict[str, list[dict[str, Any]]] = {"heavy": [], "light": []}
    for _ in range(repeats):
        for name in ("heavy", "light"):
            arg = {
                "spec": spec,
                "uris": uris,
                "limits": LIMITS,
                "errors": str(tmp / "errors"),
                "preprocess": pre if name == "light" else None,
            }
            done = subprocess.run(
                [sys.executable, "-c", WORKER, json.dumps(arg)],
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {"runs": runs}
    for name, rs in runs.items():
        out[name] = {
            "first_batch_s": min(r["first_batch_s"] for r in rs),
            "peak_rss_mib": min(r["peak_rss_mib"] for r in rs),
            "imported": rs[0]["imported"],
        }
    out["light_vs_heavy"] = {
        k: out["light"][k] / out["heavy"][k] for k in ("first_batch_s", "peak_rss_mib")
    }
    return out


def ray_rss_mib() -> float:
    """Summed RSS of every ``ray::`` worker process on this machine (MiB)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if not cmd.startswith(b"ray::"):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def job(code: Path, spec: str, manifest: Path, n: int, tmp: Path) -> dict[str, Any]:
    """One ``keeper embed`` in a new process (its own local Ray) with ``code``'s packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        str(code / "packages" / p / "src") for p in ("core", "train", "serve")
    )
    out = tempfile.mkdtemp(dir=tmp)
    arg = {"manifest": str(manifest), "out": out, "spec": spec, "n": n}
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            peak[0] = max(peak[0], ray_rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", JOB, json.dumps(arg)],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            check=False,
        )
    finally:
        stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"keeper embed failed ({code}):\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("SUMMARY "))
    s = json.loads(line.removeprefix("SUMMARY "))
    if s["counts"]["embedded"] != n:
        raise RuntimeError(f"keeper embed embedded {s['counts']['embedded']} of {n} ({code})")
    return {
        "wall_s": wall,
        "pipeline_s": s["seconds"]["pipeline"],
        "ray_init_s": s["seconds"].get("ray_init"),
        "seconds_to_first_part": s["seconds_to_first_part"],
        "images_per_s": s["images_per_s"],
        "peak_ray_rss_mib": peak[0],
    }


def end_to_end(
    baseline: Path, spec: str, manifest: Path, n: int, repeats: int, tmp: Path
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "this": []}
    for _ in range(repeats):
        for name, code in (("baseline", baseline), ("this", ROOT)):
            r = job(code, spec, manifest, n, tmp)
            runs[name].append(r)
            print(
                f"  {spec:20s} {name:8s} wall {r['wall_s']:6.1f}s pipeline {r['pipeline_s']:6.1f}s "
                f"first part {r['seconds_to_first_part']:5.1f}s {r['images_per_s']:6.1f} img/s "
                f"ray RSS peak {r['peak_ray_rss_mib']:6.0f} MiB",
                flush=True,
            )
    keys = ("wall_s", "pipeline_s", "seconds_to_first_part", "images_per_s", "peak_ray_rss_mib")
    best = {
        name: {k: (max if k == "images_per_s" else min)(r[k] for r in rs) for k in keys}
        for name, rs in runs.items()
    }
    return {
        "runs": runs,
        "best": best,
        "this_vs_baseline": {k: best["this"][k] / best["baseline"][k] for k in keys},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-ref", required=True, help="the commit to compare against")
    parser.add_argument("--models", default="keeper-tiny:random,ViT-B-32:random")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", default="/tmp/keeper-bench")
    parser.add_argument("--out", default="benchmarks/results/decode-worker-cpu.json")
    args = parser.parse_args(argv)
    w, h = (int(x) for x in args.size.split("x"))
    manifest = make_corpus(Path(args.cache), args.images, (w, h))
    uris = read_manifest(manifest)
    result: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="keeper-decode-worker-") as d:
        tmp = Path(d)
        base = tmp / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline_ref],
            check=True,
            capture_output=True,
        )
        try:
            specs = args.models.split(",")
            result["worker_startup"] = worker_startup(specs[-1], uris[:16], 3, tmp)
            print("worker start-up:", json.dumps(result["worker_startup"]["light_vs_heavy"]))
            result["end_to_end"] = {
                spec: end_to_end(base, spec, manifest, args.images, args.repeats, tmp)
                for spec in specs
            }
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False
            )
    result["baseline_ref"] = args.baseline_ref
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def table(r: dict[str, Any]) -> str:
    ws = r["worker_startup"]
    lines = [
        "worker start-up (fresh interpreter, first batch of 16)  heavy  light  light/heavy",
        f"  seconds to the first batch                            {ws['heavy']['first_batch_s']:5.2f}"
        f"  {ws['light']['first_batch_s']:5.2f}  {ws['light_vs_heavy']['first_batch_s']:.2f}",
        f"  peak RSS (MiB)                                        {ws['heavy']['peak_rss_mib']:5.0f}"
        f"  {ws['light']['peak_rss_mib']:5.0f}  {ws['light_vs_heavy']['peak_rss_mib']:.2f}",
        "",
        f"keeper embed end to end (best of repeats): baseline {r['baseline_ref']} vs this tree",
    ]
    for spec, e in r["end_to_end"].items():
        b, t, q = e["best"]["baseline"], e["best"]["this"], e["this_vs_baseline"]
        for k in ("wall_s", "seconds_to_first_part", "images_per_s", "peak_ray_rss_mib"):
            lines.append(f"  {spec:20s} {k:24s} {b[k]:8.1f} {t[k]:8.1f}  {q[k]:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
