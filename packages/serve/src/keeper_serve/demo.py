"""The demo's last step: serve what it trained, and call the API over HTTP.

    python -m keeper_serve.demo --out keeper-demo      # after python -m keeper_train.jobs.demo

Starts keeper's Serve app on a local Ray (packaged dev-box config, the demo's MLflow store, its
champion), calls ``/v1/models``, ``/v1/rank`` on a few held-out series and
``/v1/score/aesthetic`` on one, prints the answers beside the true keepers, writes them to
``<out>/serve-demo.json`` and shuts everything down. Auth stays on: the demo generates a token.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from keeper_core import ray_token, storage
from keeper_core.bestof import RANDOM_WEIGHTS_WARNING
from keeper_core.errors import KeeperError
from keeper_core.registry import tracking_uri
from keeper_serve.commands import write_secret


def _post(url: str, path: str, token: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}{path}", data=data, method="POST" if data else "GET")
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise KeeperError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e


def _series(out: Path, n: int) -> list[tuple[str, list[str], int | None]]:
    """``n`` series (held-out test series when the demo wrote them): id, images, true keeper."""
    path = out / "test-manifest.csv"
    if not path.exists():
        path = out / "corpus" / "manifest.csv"
    m = pd.read_csv(path)
    picked = []
    for sid, g in m.groupby("series_id", sort=True):
        best = g["is_best"].astype(bool).to_numpy() if "is_best" in g else None
        keeper = int(best.argmax()) if best is not None and best.any() else None
        picked.append((str(sid), [str(u) for u in g["image_uri"]], keeper))
        if len(picked) == n:
            break
    return picked


@contextlib.contextmanager
def demo_app(
    out: Path, name: str, overrides: dict[str, Any], port: int
) -> Iterator[tuple[str, str, float]]:
    """keeper's Serve app for a demo step, yielded as (url, token, seconds to start), and gone
    on leaving: on a local Ray started here (stopped after), or on the Ray and Serve this process
    already joined (only the app is removed, as ``keeper serve`` leaves a running Serve).

    Auth stays on: the token is ``KEEPER_API_TOKEN`` or a generated one, handed to the replicas
    in ``OUT/NAME`` (mode 600), which reaches them on a joined Ray too (an environment variable
    set here reaches only the replicas of a Ray this process starts).
    """
    import ray

    from keeper_serve import local

    token = os.environ.get("KEEPER_API_TOKEN") or secrets.token_urlsafe(32)
    token_file = out / name
    write_secret(token_file, token)
    started_ray = not ray.is_initialized()
    t0 = time.perf_counter()
    if started_ray:
        ray_token.quiet_enabled_notice()
        # WARNING: Ray's "Started a local Ray instance." and the like stay off the terminal.
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        ray_token.restrict()  # the token the new local Ray generated: this user's only
    try:
        overrides = {**overrides, "auth.token_file": str(token_file.resolve())}
        url = local.start(overrides=overrides, port=port, log_to_driver=False)
        yield url, token, time.perf_counter() - t0
    finally:
        local.shutdown()
        if started_ray:
            ray.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    series = _series(out, args.series)
    if not series:
        raise KeeperError(f"no series under {out}: run python -m keeper_train.jobs.demo first")
    overrides = {
        "clip_model": args.model,
        "tracking_uri": tracking_uri(None, out),
        "data_dir": str(out),
        "ranker.model_uri": f"models:/{args.model_name}@champion",
    }
    with demo_app(out, "serve-demo-token", overrides, args.port) as (url, token, started):
        print(f"keeper API up at {url} in {started:.0f} s (bearer token generated for the demo)")
        models = _post(url, "/v1/models", token)
        body = {
            "series": [
                {
                    "id": sid,
                    "images": [
                        {"b64": base64.b64encode(storage.read_bytes(p)).decode()} for p in paths
                    ],
                }
                for sid, paths, _ in series
            ]
        }
        t = time.perf_counter()
        ranked = _post(url, "/v1/rank", token, body)
        rank_s = time.perf_counter() - t
        aesthetic = _post(
            url, "/v1/score/aesthetic", token, {"images": body["series"][0]["images"]}
        )

    m = ranked["model"]
    print(
        f"POST /v1/rank ({sum(len(s[1]) for s in series)} images, {len(series)} series, "
        f"{rank_s * 1000:.0f} ms): {m['name']} v{m['version']} @{m['alias']} on {m['clip_model']}"
    )
    print(f"{'series':<14} {'true keeper':>11} {'pick':>5}  probabilities")
    hits = 0
    for (sid, _, keeper), s in zip(series, ranked["series"], strict=True):
        hits += keeper == s["keeper_index"]
        probs = " ".join(f"{p:.2f}" for p in s["probabilities"])
        mark = "" if keeper is None else (" ok" if keeper == s["keeper_index"] else " miss")
        print(f"{sid:<14} {keeper if keeper is not None else '-':>11} {s['keeper_index']:>5}  "
              f"{probs}{mark}")  # fmt: skip
    print(f"picked the true keeper in {hits} of {len(series)} series")
    print(f"POST /v1/score/aesthetic (series {series[0][0]}): " + ", ".join(
        f"#{s['index']} {s['total']:.3f}" for s in aesthetic["scores"]
    ))  # fmt: skip
    if models["clip"]["random_weights"]:
        print("WARNING: " + RANDOM_WEIGHTS_WARNING.format(spec=models["clip"]["spec"]))
    result = {"url": url, "models": models, "rank": ranked, "aesthetic": aesthetic,
              "true_keepers": {sid: k for sid, _, k in series}}  # fmt: skip
    (out / "serve-demo.json").write_text(json.dumps(result, indent=2))
    print(f"answers: {(out / 'serve-demo.json').resolve()}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m keeper_serve.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="keeper-demo", help="the demo's output folder")
    p.add_argument("--model", default="keeper-tiny:random", help="ModelSpec the demo embedded with")
    p.add_argument("--model-name", default="keeper-demo-ranker", help="registered ranker name")
    p.add_argument("--series", type=int, default=4, help="series to rank over HTTP")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    try:
        run(args)
    except (KeeperError, TimeoutError) as e:
        print(f"keeper serve demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
