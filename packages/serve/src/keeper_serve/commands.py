"""``keeper serve``: the HTTP API on embedded defaults (local Ray, local MLflow, keeper-tiny).

Kept import-light: ray is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

SubParsers = Any  # argparse._SubParsersAction is private


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_token(env: str, data_dir: str) -> tuple[str, str]:
    """The API token: ``$env`` when set, else one generated into ``<data_dir>/api-token``.

    Returns (token, where it came from). The file is created 0600 and reused next time.
    """
    token = os.environ.get(env, "").strip()
    if token:
        return token, f"${env}"
    path = Path(data_dir).expanduser() / "api-token"
    if path.exists():
        token = path.read_text().strip()
    if len(token) < 16:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    os.environ[env] = token
    return token, str(path)


def add_serve_parser(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the HTTP API (embed, score, rank) on Ray Serve",
        description=(
            "Run keeper's Serve app from a Serve config (default: the packaged CPU dev-box "
            "config, the same as clusters/serve/keeper.yaml) on a local Ray, until Ctrl-C. "
            "Auth is on: the token comes from $KEEPER_API_TOKEN, or is generated into "
            "<data_dir>/api-token."
        ),
    )
    p.add_argument("--config", help="Serve config YAML (serve deploy format)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--insecure-local",
        action="store_true",
        help="no bearer token (development only; binds 127.0.0.1 only)",
    )
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    p.add_argument(
        "overrides",
        nargs="*",
        help="KeeperAppArgs fields as key=value (e.g. clip_model=ViT-B-32:random, "
        "ranker.model_uri=models:/keeper-ranker@champion, "
        "deployments.ClipEncoder.num_replicas=2)",
    )

    def run(args: argparse.Namespace) -> int:
        from keeper_core.errors import ConfigError
        from keeper_serve import local
        from keeper_serve.config import KeeperAppArgs

        try:
            overrides = local.parse_overrides(args.overrides)
            if args.insecure_local:
                if not _loopback(args.host):
                    raise ConfigError(
                        f"--insecure-local serves without a token and binds loopback only; "
                        f"--host {args.host} is not loopback"
                    )
                overrides["auth.insecure_local"] = True
            cfg = local.apply_overrides(local.load_config(args.config), overrides)
            app_args = KeeperAppArgs.model_validate(cfg["applications"][0].get("args") or {})
        except (ConfigError, ValueError) as e:
            print(f"keeper serve: {e}", file=sys.stderr)
            return 2
        token_note = ""
        if args.insecure_local:
            print(
                "\n  !!! keeper serve --insecure-local: the API is OPEN (no token) on "
                f"{args.host}:{args.port}. Development only. !!!\n",
                file=sys.stderr,
            )
        elif not app_args.auth.token_file:
            _, where = ensure_token(app_args.auth.token_env, app_args.data_dir)
            token_note = where
        url = local.start(cfg, host=args.host, port=args.port, ray_address=args.ray_address)
        auth = "" if args.insecure_local else ' -H "Authorization: Bearer $TOKEN"'
        print(f"keeper API at {url}  (OpenAPI: {url}/docs)")
        if token_note:
            src = token_note if token_note.startswith("$") else f"$(cat {token_note})"
            print(f"  token: TOKEN={src}")
        print(f"  curl{auth} {url}/v1/models")
        print(
            '  printf \'{"images": [{"b64": "%s"}]}\' "$(base64 -w0 photo.jpg)" | '
            f"curl{auth} -H 'Content-Type: application/json' --data-binary @- "
            f"{url}/v1/score/aesthetic"
        )
        print("Ctrl-C stops it.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            local.shutdown()
        return 0

    p.set_defaults(func=run)
