"""How keeper embed's driver grows with the corpus: ``plan`` and ``summarise`` at 100k and 1M inputs.

    .venv/bin/python benchmarks/plan_scale.py [--sizes 100000,1000000] [--embedded 0.9] \
        [--errors 0.01] [--out benchmarks/results/plan-scale.json]

For each size N, written once under ``--cache`` (default a temporary folder, removed after): a
CSV manifest of N relative image paths (``photos/0123/0123456.jpg``; no such file exists, since
planning must not read the images), and an output folder that already holds the embeddings of
the first ``--embedded`` N inputs (parts of 1,024 rows written by the job's own ``write_batch``,
keeper-tiny's 64-d schema with dHashes) and an errors table of ``--errors`` N rows after them
(parts of 16 rows, as decode tasks write them; one row in ten retryable). Then, in a fresh
process (no Ray is started): ``plan(cfg)``; this run's output is simulated, untimed (what the plan
left to do embedded in parts of 1,024, one image in a hundred failed in parts of 16); then
``summarise`` (which rewrites an errors table of more than ``keeper_train.table.COMPACT_OVER``
parts as one), then the next run's ``plan`` over what it left. Each step's wall time and peak resident memory (VmHWM, reset before the step via
``/proc/self/clear_refs``; the process's RSS before the step is given beside it) are printed and
written to ``--out`` with the counts the summary reported, which must add up (no image lost).

The driver never opens an image: the process's ``open`` audit events under the photo folder are
counted (``image_opens``, expected 0). Python does not audit ``stat``; ``strace -f -e
trace=%file`` on the worker command shows the rest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procmem import memory_mb, reset_peak  # beside this script

SPEC = "keeper-tiny:random"
ROWS_PER_PART = 1024  # EmbedConfig.rows_per_file's default
ERROR_ROWS_PER_PART = 16  # EmbedConfig.decode_batch_size's default: one errors part per task
RETRYABLE_EVERY = 10
FAIL_EVERY = 100  # in the simulated run


def photo(i: int) -> str:
    return f"photos/{i // 1000:04d}/{i:07d}.jpg"


# --------------------------------------------------------------------------------------------
# The corpus and table (a separate process: its memory is not the driver's)


def write_rows(dst: str, uris: list[str], seed: int) -> None:
    """Parts of ``ROWS_PER_PART`` embedded rows under ``dst/embeddings``, as the job writes them."""
    import numpy as np

    from keeper_core import storage
    from keeper_core.models import embed_dim
    from keeper_core.quality import FEATURE_NAMES
    from keeper_train.jobs.embed import write_batch

    rng = np.random.default_rng(seed)
    dim = embed_dim(SPEC)
    for lo in range(0, len(uris), ROWS_PER_PART):
        chunk = uris[lo : lo + ROWS_PER_PART]
        n = len(chunk)
        emb = rng.normal(size=(n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        batch: dict[str, Any] = {
            "image_uri": np.array(chunk, dtype=object),
            "image_id": np.array([f"{seed:02x}{lo + i:062x}" for i in range(n)], dtype=object),
            "embedding": emb,
            "dhash": rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64),
            "t_decode": np.zeros(n),
            "t_embed": np.zeros(n),
        }
        for name in FEATURE_NAMES:
            batch[name] = (
                rng.integers(64, 4000, n) if name in ("width", "height") else rng.random(n)
            )
        write_batch(batch, spec=SPEC, embeddings_dir=storage.join(dst, "embeddings"))


def write_failures(dst: str, uris: list[str], run_id: str, *, retryable_every: int) -> None:
    """Parts of ``ERROR_ROWS_PER_PART`` rows of the errors table, as decode tasks write them."""
    from keeper_core import storage
    from keeper_core.errors import ImageDecodeError
    from keeper_train.jobs.embed import ERRORS, _failure, write_errors

    for lo in range(0, len(uris), ERROR_ROWS_PER_PART):
        rows = []
        for i, u in enumerate(uris[lo : lo + ERROR_ROWS_PER_PART], start=lo):
            retryable = retryable_every > 0 and i % retryable_every == 0
            e = ImageDecodeError("truncated", "image file is truncated", source=u)
            reason = "unreadable" if retryable else "truncated"
            rows.append(_failure(u, run_id, "decode", reason, e, retryable=retryable))
        write_errors(storage.join(dst, ERRORS), rows)


def build(root: Path, n: int, embedded: float, errors: float) -> None:
    from keeper_core.models import embed_dim
    from keeper_train.jobs.embed import check_table_meta

    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.csv"
    manifest.write_text("image_uri\n" + "".join(f"{photo(i)}\n" for i in range(n)))
    uris = [f"{root}/{photo(i)}" for i in range(n)]  # as plan resolves them
    n_emb, n_err = int(n * embedded), int(n * errors)
    dst = str(root / "out")
    check_table_meta(dst, SPEC, embed_dim(SPEC))  # an earlier run recorded the spec
    write_rows(dst, uris[:n_emb], seed=1)
    write_failures(dst, uris[n_emb : n_emb + n_err], "earlier", retryable_every=RETRYABLE_EVERY)


# --------------------------------------------------------------------------------------------
# The driver's steps, measured (a fresh process per size)


def measure(root: Path) -> dict[str, Any]:
    photos = f"{root}/photos/"
    opened = [0]

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and str(args[0]).startswith(photos):
            opened[0] += 1

    sys.addaudithook(audit)
    import ray  # noqa: F401  # summarise imports it (for its version): not part of its time

    from keeper_train.jobs.embed import EmbedConfig, Execution, plan, summarise

    cfg = EmbedConfig(input=str(root / "manifest.csv"), output=str(root / "out"), model=SPEC)
    out: dict[str, Any] = {}
    t_start = time.perf_counter()

    rss, _ = memory_mb()
    reset_peak()
    t0 = time.perf_counter()
    p = plan(cfg)
    out["plan"] = {"s": time.perf_counter() - t0, "rss_before_mb": rss, "peak_mb": memory_mb()[1]}
    out["todo"] = len(p.todo)
    out["retried"] = p.retried

    # This run: the todo embedded in parts, one in FAIL_EVERY failed (untimed).
    failed = p.todo[::FAIL_EVERY]
    dropped = set(failed)
    write_rows(p.dst, [u for u in p.todo if u not in dropped], seed=2)
    write_failures(p.dst, failed, p.run_id, retryable_every=0)

    rss, _ = memory_mb()
    reset_peak()
    t0 = time.perf_counter()
    s = summarise(cfg, p, Execution(tallies=[]), t_start)
    out["summarise"] = {
        "s": time.perf_counter() - t0,
        "rss_before_mb": rss,
        "peak_mb": memory_mb()[1],
    }
    out["counts"] = s.counts.model_dump(by_alias=True)
    out["table"] = s.table

    # The next run's plan: after summarise rewrote a many-part errors table as one part.
    rss, _ = memory_mb()
    reset_peak()
    t0 = time.perf_counter()
    plan(cfg)
    out["replan"] = {"s": time.perf_counter() - t0, "rss_before_mb": rss, "peak_mb": memory_mb()[1]}
    out["image_opens"] = opened[0]
    return out


def run_size(n: int, cache: Path, embedded: float, errors: float) -> dict[str, Any]:
    root = cache / f"n{n}"
    if root.exists():
        shutil.rmtree(root)  # a previous measurement changed the table: start again
    t0 = time.perf_counter()
    worker = [sys.executable, __file__, "--worker"]
    fractions = ["--embedded", str(embedded), "--errors", str(errors)]
    subprocess.run([*worker, "build", "--root", str(root), "--n", str(n), *fractions], check=True)
    built = time.perf_counter() - t0
    proc = subprocess.run(
        [*worker, "measure", "--root", str(root)], check=True, capture_output=True, text=True
    )
    got: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    got["n"] = n
    got["build_s"] = built
    c = got["counts"]
    got["adds_up"] = (
        c["in"] == c["already_embedded"] + c["failed_before"] + c["attempted"]
        and c["attempted"] == c["embedded"] + c["failed"]
        and c["lost"] == 0
    )
    return got


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nkeeper embed's driver (no Ray): wall seconds and peak RSS (MB; RSS before the step)")
    head = f"{'inputs':>9} {'todo':>7}  {'plan s':>7} {'peak MB':>13}"
    print(f"{head}  {'summarise s':>11} {'peak MB':>13}  {'next plan s':>11} {'error parts':>15}")
    for r in rows:
        pl, su, re = r["plan"], r["summarise"], r["replan"]
        parts = f"{r['table']['error_parts_compacted']} -> {r['table']['error_parts']}"
        print(
            f"{r['n']:>9} {r['todo']:>7}  {pl['s']:>7.2f} "
            f"{pl['peak_mb']:>6.0f} ({pl['rss_before_mb']:>4.0f})  {su['s']:>11.2f} "
            f"{su['peak_mb']:>6.0f} ({su['rss_before_mb']:>4.0f})  {re['s']:>11.2f} {parts:>15}"
        )
    for a, b in itertools.pairwise(rows):
        x = b["n"] / a["n"]
        print(
            f"{a['n']} -> {b['n']} ({x:.0f}x inputs): plan {b['plan']['s'] / a['plan']['s']:.1f}x, "
            f"summarise {b['summarise']['s'] / a['summarise']['s']:.1f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="inputs, comma-separated")
    parser.add_argument("--embedded", type=float, default=0.9, help="fraction already embedded")
    parser.add_argument("--errors", type=float, default=0.01, help="fraction in the errors table")
    parser.add_argument("--cache", type=Path, default=None, help="keep the tables here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plan-scale.json"))
    parser.add_argument("--worker", choices=["build", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "build":
        build(args.root, args.n, args.embedded, args.errors)
        return 0
    if args.worker == "measure":
        print(json.dumps(measure(args.root)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="keeper-plan-scale-")
        cache = Path(tmp.name)
    else:
        cache = args.cache
    try:
        rows = []
        for n in sizes:
            rows.append(run_size(n, cache, args.embedded, args.errors))
            print(f"  {n}: built in {rows[-1]['build_s']:.0f}s", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_table(rows)
    # embed.py's description of the machine; imported here, in the parent only: the measured
    # worker processes must not pay for the torch it imports.
    from embed import machine_info, write_record

    result = {
        "command": " ".join(
            ["benchmarks/plan_scale.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "config": {
            "spec": SPEC,
            "embedded_fraction": args.embedded,
            "errors_fraction": args.errors,
            "rows_per_part": ROWS_PER_PART,
            "error_rows_per_part": ERROR_ROWS_PER_PART,
            "retryable_every": RETRYABLE_EVERY,
            "fail_every": FAIL_EVERY,
        },
        "machine": machine_info(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "rows": rows,
    }
    write_record(args.out, result)
    return 0 if all(r["adds_up"] and r["image_opens"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
