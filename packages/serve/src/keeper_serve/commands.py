"""``keeper serve``: the HTTP API on embedded defaults (local Ray, local MLflow, keeper-tiny).

Kept import-light: ray is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeper_core.errors import ConfigError, KeeperError
from keeper_serve.config import KeeperAppArgs

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
        write_secret(path, token + "\n")
    os.environ[env] = token
    return token, str(path)


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600 from its creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def add_serve_parser(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the HTTP API (embed, score, rank) on Ray Serve",
        description=(
            "Run keeper's Serve app from a Serve config (default: the packaged CPU dev-box "
            "config, the same as clusters/serve/keeper.yaml) on a local Ray, until Ctrl-C. "
            "Auth is on: the token comes from $KEEPER_API_TOKEN, or is generated into "
            "<data_dir>/api-token. Flags left out take the config's values."
        ),
    )
    # Defaults are None ("not given"): a value the config file sets is never replaced by one
    # the user did not type.
    p.add_argument(
        "--config",
        metavar="FILE",
        help="Serve config YAML in `serve deploy` format (default: the packaged dev-box config)",
    )
    p.add_argument(
        "--host",
        help="address the HTTP proxy binds (default: the config's http_options.host, else "
        "127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        help="HTTP port (default: the config's http_options.port, else 8000)",
    )
    p.add_argument(
        "--insecure-local",
        action="store_true",
        default=None,
        help="serve without a bearer token (sets auth.insecure_local); development only, "
        "refused unless the host is loopback",
    )
    p.add_argument(
        "--haproxy",
        action="store_true",
        default=None,
        help="answer HTTP with HAProxy instead of Serve's Python proxy (a local Ray only; "
        "faster: docs/serving.md). Its stats page, without auth, listens on every interface",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join this Ray cluster (e.g. auto, 127.0.0.1:6379) instead of starting a local "
        "one (default: $RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="KeeperAppArgs fields and Serve options as dotted keys (e.g. "
        "clip_model=ViT-B-32:random, ranker.model_uri=models:/keeper-ranker@champion, "
        "deployments.ClipEncoder.autoscaling_config.max_replicas=2, http_options.port=8001)",
    )
    p.set_defaults(func=_run)


@dataclass(frozen=True)
class _Plan:
    """What ``keeper serve`` will run: the config with overrides, and where it listens."""

    config: dict[str, Any]
    args: KeeperAppArgs
    host: str
    port: int


def _plan(args: argparse.Namespace) -> _Plan:
    """The config file, ``key=value`` overrides and flags, checked before anything starts.

    Raises:
        ConfigError: a bad override, config or flag combination (the message says which).
    """
    from keeper_serve import local

    overrides = local.parse_overrides(args.overrides)
    if args.insecure_local:
        overrides["auth.insecure_local"] = True
    if args.host is not None:
        overrides["http_options.host"] = args.host
    if args.port is not None:
        overrides["http_options.port"] = args.port
    cfg = local.apply_overrides(local.load_config(args.config), overrides)
    app_args = local.validate(cfg)  # Serve's schema and KeeperAppArgs, clip_model included
    http = local.http_address(cfg)
    host = str(http["host"])
    try:  # Serve's schema took it as an int already; never a bare int() message
        port = int(http["port"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"http_options.port: {http['port']!r} is not a port number") from e
    if app_args.auth.insecure_local and not _loopback(host):
        how = "--insecure-local" if args.insecure_local else "auth.insecure_local"
        raise ConfigError(
            f"{how} serves without a token and binds loopback only; --host {host} is not loopback"
        )
    return _Plan(cfg, app_args, host, port)


def _run(args: argparse.Namespace) -> int:
    from keeper_serve import local

    try:
        plan = _plan(args)
    except (ConfigError, ValueError) as e:
        print(f"keeper serve: {e}", file=sys.stderr)
        return 2
    token_note = ""
    insecure = plan.args.auth.insecure_local
    if insecure:
        print(
            "\n  !!! keeper serve --insecure-local: the API is OPEN (no token) on "
            f"{plan.host}:{plan.port}. Development only. !!!\n",
            file=sys.stderr,
        )
    elif not plan.args.auth.token_file:
        _, token_note = ensure_token(plan.args.auth.token_env, plan.args.data_dir)
    try:
        # Replica logs stay in Ray's log files: this terminal shows keeper's lines.
        url = local.start(
            plan.config,
            ray_address=args.ray_address,
            log_to_driver=False,
            haproxy=bool(args.haproxy),
        )
    except (KeeperError, TimeoutError) as e:
        print(f"keeper serve: {e}", file=sys.stderr)
        with contextlib.suppress(Exception):  # Ray may be half up; exiting stops a local one
            local.shutdown()
        return 1
    try:
        ranker = local.ranker_status(plan.config["applications"][0].get("name", "keeper"))
    except Exception as e:  # the app answers; only the note about the ranker is lost
        ranker = {"status": "unknown", "error": f"cannot ask the ranker: {type(e).__name__}"}
    if args.haproxy:
        stats = os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", "?")
        print(
            f"keeper serve: HTTP through HAProxy (its stats page: http://127.0.0.1:{stats}/stats)"
        )
    _print_usage(url, token_note, insecure, ranker)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        local.shutdown()
    return 0


def _print_usage(url: str, token_note: str, insecure: bool, ranker: dict[str, Any]) -> None:
    auth = "" if insecure else ' -H "Authorization: Bearer $TOKEN"'
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
    if ranker.get("status") != "ready":
        why = ranker.get("error") or ranker.get("status")
        print(
            f"keeper serve: no ranker loaded, /v1/rank answers 503 until one is: {why}",
            file=sys.stderr,
        )
    print("  replica logs: Ray's log folder (/tmp/ray/session_latest/logs/serve/ on a local Ray)")
    print("Ctrl-C stops it.", flush=True)
