"""The demo's last step: one ``POST /v1/select`` over HTTP, with its stage accounting printed.

    python -m keeper_serve.select_demo --out keeper-demo   # after python -m keeper_train.jobs.demo

Builds a tiny random vision-language model (``keeper_core.tiny_vlm``: offline, its judgements mean
nothing, and the output says so), starts keeper's Serve app on a local Ray with it as the VlmJudge,
sends the demo corpus's first images as candidates for one query, prints what every stage of the
cascade kept, dropped and cost and the picks, writes ``<out>/select-demo.json`` and shuts
everything down. Auth stays on: the demo generates a token.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from keeper_core import storage
from keeper_core.bestof import RANDOM_WEIGHTS_WARNING
from keeper_core.errors import KeeperError
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_core.vlm import VlmConfig, actor_memory
from keeper_serve.demo import _post, demo_app

QUERY = "a cat sitting on a sofa"


def format_stages(answer: dict[str, Any]) -> str:
    """The cascade's accounting as a table: one line per stage, then the cost."""
    lines = [f"{'stage':<11} {'in':>4} {'kept':>5} {'dropped':>8} {'ms':>8}"]
    for s in answer["stages"]:
        note = "  (skipped)" if s["skipped"] else ""
        lines.append(
            f"{s['name']:<11} {s['n_in']:>4} {s['n_kept']:>5} {s['n_dropped']:>8} "
            f"{s['ms']:>8.1f}{note}"
        )
    cost = answer["cost"]
    lines.append(
        f"{cost['candidates']} candidates, {cost['vlm_calls']} VLM calls, "
        f"{cost['ms']:.0f} ms in the server"
    )
    return "\n".join(lines)


def _shown(path: str, root: Path) -> str:
    """A candidate's path relative to the corpus folder (shots of bursts share file names)."""
    p = Path(path)
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    manifest = out / "corpus" / "manifest.csv"
    if not manifest.exists():
        raise KeeperError(f"no corpus under {out}: run python -m keeper_train.jobs.demo first")
    paths = [str(u) for u in pd.read_csv(manifest)["image_uri"].head(args.candidates)]
    vlm_dir = out / "tiny-vlm"
    if not (vlm_dir / "keeper.json").exists():  # a re-run takes the one it built (seeded: same)
        build_tiny_vlm(vlm_dir)
    overrides = {
        "clip_model": args.model,
        "data_dir": str(out),
        "ranker.model_uri": None,  # /v1/select needs no ranker
        "vlm.source": str(vlm_dir.resolve()),
        # The judge's replica reserves what it needs, as a real config's block does (Serve
        # replaces the code's ray_actor_options as a whole: its 0.2 CPU is said again).
        "deployments.VlmJudge.ray_actor_options.num_cpus": 0.2,
        "deployments.VlmJudge.ray_actor_options.memory": actor_memory(
            VlmConfig(source=str(vlm_dir.resolve()), device="cpu")
        ),
    }
    with demo_app(out, "select-demo-token", overrides, args.port) as (url, token, started):
        print(f"keeper API up at {url} in {started:.0f} s, with a tiny VLM")
        body = {
            "positive": [QUERY],
            "negative": ["a blurry photo"],
            "images": [{"b64": base64.b64encode(storage.read_bytes(p)).decode()} for p in paths],
            "top_n": args.top_n,
            "top_k": args.top_k,
        }
        answer = _post(url, "/v1/select", token, body)

    print(
        f'POST /v1/select "{QUERY}": {len(paths)} candidates, top_n {args.top_n}, top_k {args.top_k}'
    )
    print(format_stages(answer))
    root = manifest.parent
    picks = ", ".join(_shown(paths[i], root) for i in answer["picks"])
    print(f"picks, best first: {picks}")
    models = answer["models"]
    if models["clip_random_weights"] and answer["stages"][2]["n_dropped"]:
        print("(random CLIP weights make most images look alike: dedup merges many of them)")
    if models["clip_random_weights"]:
        print("WARNING: " + RANDOM_WEIGHTS_WARNING.format(spec=models["clip_model"]))
    if models["vlm"].get("random_weights"):
        print(
            "WARNING: the VLM is keeper_core.tiny_vlm's, with random weights: its judgements "
            "mean nothing (the cascade's plumbing and accounting are what this shows)"
        )
    (out / "select-demo.json").write_text(
        json.dumps({"url": url, "answer": answer}, indent=2), "utf-8"
    )
    print(f"answer: {(out / 'select-demo.json').resolve()}")
    return answer


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m keeper_serve.select_demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="keeper-demo", help="the demo's output folder")
    p.add_argument("--model", default="keeper-tiny:random", help="ModelSpec the demo embedded with")
    p.add_argument("--candidates", type=int, default=24, help="corpus images sent as candidates")
    p.add_argument("--top-n", type=int, default=6, help="candidates the VLM judges")
    p.add_argument("--top-k", type=int, default=3, help="picks")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    try:
        run(args)
    except (KeeperError, TimeoutError) as e:
        print(f"keeper select demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
