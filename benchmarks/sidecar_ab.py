"""keeper's sidecar writes at this checkout against another checkout's: an A/B of keeper_core.

    git archive fd31afb packages/core/src | tar -x -C /tmp/keeper-old
    .venv/bin/python benchmarks/sidecar_ab.py --old-src /tmp/keeper-old/packages/core/src \
        [--n 2000] [--rounds 2] [--out benchmarks/results/sidecar-ab.json]

``keeper pick`` writes one sidecar per photo with ``handback.write_sidecar``. Each round runs, for
the other checkout's ``keeper_core`` (first on ``PYTHONPATH``) and then this one's, a fresh
process that writes ``--n`` new sidecars (what a first run does; no fsync, as a mirror is
written) and then writes the same choice into them again (a re-run). The processes alternate,
so a slower or busier stretch of the machine falls on both. CPU milliseconds a sidecar
(``time.process_time``), the mean over rounds, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from embed import machine_info, write_record

ROOT = Path(__file__).resolve().parents[1]

_WRITER = r"""
import json, os, sys, tempfile, time
import keeper_core.handback as hb
n = int(sys.argv[1])
folder = tempfile.mkdtemp()
fields = {"group": "g000123", "rank": "1", "decision": "keep", "reasons": "sharpest of 4"}
def write_all():
    t = time.process_time()
    for i in range(n):
        hb.write_sidecar(os.path.join(folder, f"IMG_{i:06d}.xmp"), rating=5, label="Green",
                         keeper_fields=fields, durable=False)
    return (time.process_time() - t) / n * 1e3
new, rerun = write_all(), write_all()
print(json.dumps({"module": hb.__file__, "new_ms": new, "rerun_ms": rerun}))
"""


def run(src: Path, n: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["module"].startswith(str(src)):
        raise SystemExit(f"{src}: keeper_core came from {result['module']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-src", type=Path, required=True, help="the other keeper_core's src")
    parser.add_argument("--n", type=int, default=2000, help="sidecars a process writes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/sidecar-ab.json")
    args = parser.parse_args(argv)
    sides = {"old": args.old_src.resolve(), "new": ROOT / "packages" / "core" / "src"}
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for side, src in sides.items():
            runs[side].append(run(src, args.n))
    mean = {
        side: {k: sum(r[k] for r in rs) / len(rs) for k in ("new_ms", "rerun_ms")}
        for side, rs in runs.items()
    }
    print(f"{'ms a sidecar':<24} {'old':>8} {'new':>8} {'new/old':>8}")
    for key, label in (("new_ms", "new sidecar"), ("rerun_ms", "re-run, same choice")):
        old, new = mean["old"][key], mean["new"][key]
        print(f"{label:<24} {old:>8.3f} {new:>8.3f} {new / old:>8.2f}")
    out = {
        "command": " ".join(sys.argv),
        "sides": {k: str(v) for k, v in sides.items()},
        "runs": runs,
        "mean": mean,
        "machine": machine_info(),
    }
    write_record(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
