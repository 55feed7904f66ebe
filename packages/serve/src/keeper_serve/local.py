"""Run keeper's Serve app from a Serve config file on this process's Ray (local or joined).

``serve deploy FILE`` is how a cluster runs the app; this is the same file applied from
Python, for ``keeper serve``, the demo, the tests and the benchmark: the application's
``args`` go through :class:`KeeperAppArgs`, its ``deployments`` become ``Deployment.options``,
and ``http_options`` / ``runtime_env.env_vars`` are honoured. Overrides are dotted keys::

    {"clip_model": "ViT-B-32:random", "ranker.model_uri": None,
     "deployments.ClipEncoder.autoscaling_config.max_replicas": 2, "http_options.port": 8001}
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from keeper_core import ray_token
from keeper_core.errors import ConfigError, KeeperError
from keeper_serve.config import (
    ENCODER,
    RANKER,
    KeeperAppArgs,
    describe,
    encoder_memory_shortfall,
)

log = logging.getLogger("keeper.serve")

#: The CPU dev-box config, shipped inside the package (clusters/serve/keeper.yaml links to it).
DEFAULT_CONFIG = Path(__file__).with_name("serve_config.yaml")


class StartError(KeeperError):
    """Serve or the app could not start (port taken, a deployment failed); the message says why."""


@dataclass
class _Started:
    """What :func:`start` set up in this process, so that :func:`shutdown` undoes that and no
    more: Serve itself where none ran before, else only the applications deployed onto it."""

    serve: bool = False
    apps: set[str] = field(default_factory=set)


_started = _Started()


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """A Serve config file as a dict (``None``: the packaged dev-box config), its shape checked
    (``check_shape``).

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 YAML, or has the wrong shape (one
            line naming the file).
    """
    p = Path(path) if path else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the Serve config {p}: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"cannot read the Serve config {p}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read the Serve config {p}: {_yaml_problem(e)}") from e
    return check_shape(data, str(p))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans lines)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"invalid YAML: {e.problem}{where}"
    return "invalid YAML: " + " ".join(str(e).split())


def check_shape(data: Any, where: str) -> dict[str, Any]:
    """``data`` when it has the shape keeper reads before Serve's own schema does: a mapping
    with a non-empty ``applications`` list of mappings, each one's ``args`` a mapping and its
    ``deployments`` a list of mappings with a ``name``, and ``http_options`` a mapping.

    Raises:
        ConfigError: the first part that is not so, named (``where``: the file).
    """

    def kind(v: Any) -> str:
        return type(v).__name__

    apps = data.get("applications") if isinstance(data, dict) else None
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{where}: a Serve config needs an 'applications' list")
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            raise ConfigError(
                f"{where}: applications[{i}] must be a mapping (name, import_path, args, "
                f"deployments), not {kind(app)} {app!r}"
            )
        args = app.get("args")
        if args is not None and not isinstance(args, dict):
            raise ConfigError(
                f"{where}: applications[{i}].args must be a mapping of KeeperAppArgs fields, "
                f"not {kind(args)}"
            )
        deps = app.get("deployments")
        if deps is not None and not isinstance(deps, list):
            raise ConfigError(f"{where}: applications[{i}].deployments must be a list")
        for j, dep in enumerate(deps or []):
            if not isinstance(dep, dict) or not isinstance(dep.get("name"), str):
                raise ConfigError(
                    f"{where}: applications[{i}].deployments[{j}] must be a mapping with a name"
                )
    http = data.get("http_options")
    if http is not None and not isinstance(http, dict):
        raise ConfigError(f"{where}: http_options must be a mapping, not {kind(http)}")
    return data


def apply_overrides(config: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with dotted-key overrides applied to its (first) application.

    ``deployments.NAME.KEY...`` edits that deployment's entry (created if missing),
    ``http_options.KEY`` the HTTP options, anything else the application's ``args``.
    """
    out = copy.deepcopy(config)
    app = out["applications"][0]
    for key, value in overrides.items():
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {key!r}: a name is missing between the dots")
        if parts[0] == "deployments":
            if len(parts) < 3:
                raise ConfigError(f"override {key!r}: use deployments.NAME.OPTION")
            deps = app.setdefault("deployments", [])
            dep = next((d for d in deps if d.get("name") == parts[1]), None)
            if dep is None:
                dep = {"name": parts[1]}
                deps.append(dep)
            target, path = dep, parts[2:]
        elif parts[0] == "http_options":
            if len(parts) < 2:
                raise ConfigError(
                    f"override {key!r}: http_options takes keys: http_options.KEY=VALUE"
                )
            target, path = out.setdefault("http_options", {}), parts[1:]
        else:
            target, path = app.setdefault("args", {}), parts
        for p in path[:-1]:
            if target.get(p) is None:  # absent, or null (a section that is off): a new one
                target[p] = {}
            nxt = target[p]
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p} is not a mapping")
            target = nxt
        target[path[-1]] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings; values are YAML scalars (``null``, ``2``, ``true``, text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"expected key=value, got {item!r}")
        key = key.strip()
        try:
            out[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            # Worded as keeper_train's overrides say it: the key, the value, how to quote it.
            problem = getattr(e, "problem", None) or "not a YAML value"
            quoted = "'" + value.replace("'", "''") + "'"
            raise ConfigError(
                f"override {key!r}: value {value!r} is not valid YAML ({problem}); to pass it "
                f'as a string, quote it: "{key}={quoted}"'
            ) from e
    return out


def validate(cfg: Mapping[str, Any]) -> KeeperAppArgs:
    """The config (with its overrides) against Serve's schema, then its first application's
    ``args`` against ``KeeperAppArgs`` (``checked``: clip_model's architecture and tag too).

    Raises:
        ConfigError: one line naming each invalid field.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        raise ConfigError(f"invalid Serve config: {describe(e)}") from e
    try:
        return KeeperAppArgs.checked(cfg["applications"][0].get("args") or {})
    except ValidationError as e:
        raise ConfigError(f"invalid application args: {describe(e)}") from e


def _options(app: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The application's ``deployments`` as ``Deployment.options`` keywords per name."""
    env = dict((app.get("runtime_env") or {}).get("env_vars") or {})
    opts: dict[str, dict[str, Any]] = {}
    for dep in app.get("deployments") or []:
        d = copy.deepcopy({k: v for k, v in dep.items() if k != "name"})
        opts[dep["name"]] = d
    if env:
        for d in opts.values():
            actor = d.setdefault("ray_actor_options", {})
            renv = actor.setdefault("runtime_env", {})
            renv["env_vars"] = {**env, **(renv.get("env_vars") or {})}
    return opts


#: The variable that makes Ray Serve 2.60 answer HTTP with HAProxy instead of its Python proxy.
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"


def haproxy_env(workdir: Path) -> dict[str, str]:
    """The environment a Ray must start with to serve HTTP through HAProxy, with files and
    ports of its own.

    Ray Serve reads these when its processes import it: set them before ``ray start`` (or
    ``ray.init``), on every node. Ray's defaults put every instance's files under
    ``/tmp/haproxy-serve`` and its metrics and stats pages on ports 9101 and 8404, so a second
    Serve on the machine collides; here the files go under ``workdir`` and both ports are free
    ones. HAProxy binds those two pages on every interface, and each ingress replica its own
    HTTP port (30000-31000) on the node's address: the replicas check the bearer token as on the
    proxy path; the stats page (backends and counters) has no auth.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    return {
        HAPROXY_FLAG: "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(workdir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(workdir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(workdir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(workdir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }


def free_port() -> int:
    """A TCP port free on every interface now (the OS's pick; free until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def start(
    config: str | Path | dict[str, Any] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    host: str | None = None,
    port: int | None = None,
    ray_address: str | None = None,
    wait_s: float = 300.0,
    log_to_driver: bool = True,
    haproxy: bool = False,
) -> str:
    """Deploy the app and wait until ``/healthz`` answers; returns the base URL.

    Starts a local Ray for this process unless Ray is initialised or ``ray_address`` is given.
    An open API (``auth.insecure_local``) is served only by a Ray started here: joining one is a
    ``ConfigError`` (its Serve may already listen beyond loopback, keeping its own host).
    ``host`` and ``port`` replace the config's ``http_options`` when given. Replicas read the
    API token where the config says (``auth.token_file``, or the variable ``auth.token_env`` in
    their own environment: a local Ray started here inherits this process's). Tokens are never
    put into a runtime_env, which the dashboard shows.

    Args:
        log_to_driver: stream the replicas' logs to this process's stderr (when it starts or
            joins Ray here); without, they stay in Ray's log files.
        haproxy: serve HTTP through HAProxy instead of Serve's Python proxy (``haproxy_env``;
            docs/serving.md). It takes effect where Ray starts, so only for a Ray started
            here; joining a cluster, it is refused unless this process's environment has
            ``RAY_SERVE_ENABLE_HA_PROXY=1``, as the cluster's ``ray start`` must have had.

    Raises:
        ConfigError: an invalid config (the message names the field).
        StartError: Serve's HTTP proxy could not listen, or a deployment failed to start.
        TimeoutError: the app was not healthy within ``wait_s``.
    """
    import ray
    from ray import serve

    if isinstance(config, dict):
        cfg = check_shape(config, "the Serve config")
    else:
        cfg = load_config(config)
    cfg = apply_overrides(cfg, overrides or {})
    if host is not None:
        cfg.setdefault("http_options", {})["host"] = host
    if port is not None:
        cfg.setdefault("http_options", {})["port"] = port
    args = validate(cfg)
    app_cfg = cfg["applications"][0]
    http = http_address(cfg)
    opts = _options(app_cfg)
    name = app_cfg.get("name", "keeper")
    short = encoder_memory_shortfall(
        args.clip_model, opts.get(ENCODER, {}).get("ray_actor_options") or {}
    )
    if short:  # the operator's figure stands (as with `serve deploy`); say what it risks
        log.warning("%s: raise deployments.%s.ray_actor_options.memory", short, ENCODER)

    if ray_address == "local" and not ray.is_initialized() and not _can_listen(http):
        # A new local Ray's proxy would fail on this port anyway, ~10 s later: say it now.
        raise StartError(
            f"Serve's HTTP proxy cannot listen on {http['host']}:{http['port']}: the port is in "
            "use (choose another with --port)"
        )
    started_here = False
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if args.auth.insecure_local:
        # Open only on loopback: a Serve already running (a cluster's, or a `ray start` head a
        # plain ray.init() would join) keeps its own http_options, maybe 0.0.0.0.
        if ray.is_initialized() or address not in (None, "local"):
            raise ConfigError(
                "an open API (--insecure-local / auth.insecure_local) is served only by a Ray "
                "that keeper serve starts itself: a running cluster's Serve keeps its own host "
                "and may listen beyond loopback. Drop --ray-address / RAY_ADDRESS, or serve "
                "with a token"
            )
        address = "local"
    if haproxy and (ray.is_initialized() or address not in (None, "local")):
        if os.environ.get(HAPROXY_FLAG) != "1":  # joining: HAProxy is the cluster's already
            raise ConfigError(
                f"HAProxy is chosen where Ray starts: start the cluster with {HAPROXY_FLAG}=1 "
                "in its environment (docs/serving.md), or let keeper start a local Ray"
            )
    elif haproxy:  # a Ray started here: its own files and ports, even if the flag is set
        workdir = Path(tempfile.mkdtemp(prefix="keeper-haproxy-"))
        os.environ.update(haproxy_env(workdir))  # the local Ray's processes inherit it
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        address = "local"  # a new Ray, never one found running (it would lack the variable)
    if not ray.is_initialized():
        if address in (None, "local"):
            ray_token.quiet_enabled_notice()
        ray.init(
            address=address,
            log_to_driver=log_to_driver,
            logging_level=logging.INFO if log_to_driver else logging.WARNING,
        )
        started_here = address in (None, "local")
        if started_here:
            ray_token.restrict()  # the token a new local Ray generated: this user's only
    if started_here:  # a Ray of this process alone: nothing will add memory to it
        refusal = memory_refusal(opts, float(ray.available_resources().get("memory", 0)))
        if refusal:
            raise StartError(refusal)
    if not log_to_driver:  # Serve's own start-up lines, as the replicas' logs: in Ray's files
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    running = running_http()
    if running is not None:  # joining a Serve: it keeps its http_options, whatever we ask
        refusal = _elsewhere(running, http)
        if refusal:
            raise StartError(refusal)
    else:  # ours to stop from here on, even if it comes up only half
        _started.serve = True
    try:
        serve.start(http_options=http, proxy_location=cfg.get("proxy_location"))
    except Exception as e:  # RayTaskError from the proxy actor: one line, not its traceback
        raise StartError(
            f"Serve's HTTP proxy cannot listen on {http['host']}:{http['port']}: "
            f"{_first_line(e)} (is the port in use? choose another with --port)"
        ) from e
    from keeper_serve.app import bind  # the deployments' modules: torch, open_clip (seconds)

    if running is not None and name in serve.status().applications:
        log.warning("application %r already runs on this Serve: this deploy replaces it", name)
    _started.apps.add(name)
    try:  # returns once every deployment runs; raises when one failed to deploy
        serve.run(
            bind(args, opts),
            name=name,
            route_prefix=app_cfg.get("route_prefix", "/"),
            blocking=False,
        )
    except Exception as e:  # RuntimeError naming the deployments, not why: ask Serve why
        raise StartError(deploy_failure(name) or _first_line(e)) from e
    unreserved = unreserved_deployments(serve.status().applications[name].deployments, opts)
    if unreserved:
        log.warning(
            "deployments %s reserve no memory: Ray places their replicas by CPU alone and may "
            "put more on a node than its memory holds; set deployments.NAME.ray_actor_options."
            "memory (bytes; docs/serving.md lists measured peaks)",
            ", ".join(unreserved),
        )
    shown = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
    url = f"http://{shown}:{int(http['port'])}{app_cfg.get('route_prefix', '/').rstrip('/')}"
    wait_healthy(url, wait_s, failed=lambda: deploy_failure(name))
    return url


def running_http() -> dict[str, Any] | None:
    """The HTTP host and port of the Serve already running on this process's Ray (initialised),
    or None when none runs. Serve fixes them when it starts: ``serve.start`` joining it ignores
    other ``http_options`` with a log line, and the app answers where that Serve listens."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    http = client.http_config
    return {"host": str(http.host), "port": int(http.port)}


def _elsewhere(running: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """Why an app cannot be served at ``wanted`` (host, port) by a Serve listening at ``running``,
    or None when they agree."""
    have = (str(running["host"]), int(running["port"]))
    want = (str(wanted["host"]), int(wanted["port"]))
    if have == want:
        return None
    return (
        f"Serve already runs on this Ray with its HTTP proxy on {have[0]}:{have[1]}, and keeps "
        f"that (http_options are fixed when Serve starts): the app would not answer on "
        f"{want[0]}:{want[1]}. Deploy onto it with --host {have[0]} --port {have[1]} "
        "(http_options.host, http_options.port), or stop that Serve first (serve shutdown)"
    )


def unreserved_deployments(
    running: Iterable[str], opts: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """The app's deployments (``running``: their names, as Serve lists them) whose config sets
    no ``ray_actor_options.memory``. keeper's code reserves none (Serve replaces a deployment's
    ``ray_actor_options`` with the config's whole), so these are scheduled by CPU alone: e.g. a
    ``ChallengerRanker`` block added for an A/B test without its own ``memory``."""
    return sorted(d for d in running if not _reserved(opts.get(d) or {}))


def _reserved(options: Mapping[str, Any]) -> Any:
    """A deployment's ``ray_actor_options.memory`` (bytes), or None."""
    return (options.get("ray_actor_options") or {}).get("memory")


def memory_floor(opts: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Bytes of memory each deployment's minimum replicas reserve (``ray_actor_options.memory``
    x ``min_replicas``, or ``num_replicas``, else 1), for the deployments that reserve any."""
    out: dict[str, float] = {}
    for name, d in opts.items():
        memory = _reserved(d)
        if not memory:
            continue
        scaling = d.get("autoscaling_config") or {}
        replicas = scaling.get("min_replicas", d.get("num_replicas", 1))
        if isinstance(replicas, int | float) and replicas > 0:
            out[name] = float(memory) * replicas
    return out


def memory_refusal(opts: Mapping[str, Mapping[str, Any]], available: float) -> str | None:
    """Why the app's minimum replicas cannot all be placed on a Ray node offering ``available``
    bytes of memory, or None. Without this, a replica that does not fit waits for memory that
    will never come, and ``keeper serve`` for its health timeout."""
    floor = memory_floor(opts)
    total = sum(floor.values())
    if total <= available:
        return None
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in floor.items())
    return (
        f"the app's minimum replicas reserve {total / 2**30:.2f} GiB of memory ({parts}) and "
        f"this Ray offers {available / 2**30:.2f} GiB: free memory, or lower a reservation, "
        "e.g. deployments.ClipEncoder.ray_actor_options.memory=BYTES (docs/serving.md)"
    )


def _can_listen(http: Mapping[str, Any]) -> bool:
    """Whether a listening socket can bind ``http``'s host and port now (as uvicorn would)."""
    host = str(http["host"])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(http["port"])))
        except OSError:
            return False
    return True


def http_address(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config's ``http_options`` with Serve's defaults for host (127.0.0.1) and port (8000)."""
    return {"host": "127.0.0.1", "port": 8000, **(cfg.get("http_options") or {})}


def _first_line(e: BaseException) -> str:
    """An exception's own message, first line: a RayTaskError's cause, not its traceback."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0]


def deploy_failure(app_name: str) -> str | None:
    """Why the application failed to deploy (DEPLOY_FAILED), or None while it has not."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or app.status != "DEPLOY_FAILED":
        return None
    for dep_name, dep in app.deployments.items():
        if dep.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            # Serve's message ends with the constructor's traceback: its last line is the error.
            lines = [ln for ln in (dep.message or "").splitlines() if ln.strip()]
            return f"deployment {dep_name} failed to start: {lines[-1] if lines else 'no message'}"
    lines = [ln for ln in (app.message or "").splitlines() if ln.strip()]
    return f"application {app_name} failed to deploy: {lines[-1] if lines else 'no message'}"


def ranker_status(app_name: str = "keeper") -> dict[str, Any]:
    """The running app's ``SeriesRanker.info()``: ``status`` (ready/unavailable/disabled), ``error``."""
    from ray import serve

    info: dict[str, Any] = (
        serve.get_deployment_handle(RANKER, app_name).info.remote().result(timeout_s=60)
    )
    return info


def wait_healthy(
    url: str, wait_s: float, *, failed: Callable[[], str | None] | None = None
) -> None:
    """Poll ``GET url/healthz`` until it answers 200 (bounded).

    Raises:
        StartError: ``failed()`` returned a reason (a deployment failed: waiting cannot help).
        TimeoutError: no healthy answer within ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(e)
        reason = failed() if failed is not None else None
        if reason:
            raise StartError(reason)
        time.sleep(0.5)
    raise TimeoutError(f"keeper Serve app not healthy at {url} after {wait_s:.0f} s: {last}")


#: What the driver prints when ``serve.shutdown()`` works as designed: the Serve controller ends
#: itself inside its own ``graceful_shutdown`` call, and Ray reports that call, and the
#: controller's long-poll ``listen_for_change`` calls in flight, as failed tasks of a killed actor.
_CONTROLLER_TASK = "Task ServeController."
_KILLED = "killed by `ray.kill`"


def _controller_exit(line: str) -> bool:
    return _CONTROLLER_TASK in line and _KILLED in line


def shutdown() -> None:
    """Undo what :func:`start` did in this process. Where it started Serve, stop Serve (every
    application on it goes too, as with ``serve run``); where it joined a Serve already running
    (a cluster's, maybe serving other applications), delete only the applications it deployed
    and leave that Serve as it was. Ray itself stays up. Without Ray there is nothing to stop
    (``serve.shutdown()`` would start a Ray to find that out).

    Ray's driver prints ``(raylet) Task ServeController.graceful_shutdown failed ... killed by
    ray.kill`` each time (the controller's own exit, as designed), a line that reads as an
    error on the user's screen: :func:`quiet_controller_exit` drops exactly those lines."""
    import ray
    from ray import serve

    ours, apps = _started.serve, sorted(_started.apps)
    _started.serve, _started.apps = False, set()
    if not ray.is_initialized():
        return
    if ours:
        quiet_controller_exit()
        serve.shutdown()
        return
    for name in apps:
        serve.delete(name)


def quiet_controller_exit() -> None:
    """Filter the driver's printer of cluster errors (``ray._private.worker.print_to_stdstream``,
    which Ray's error-listener thread calls) so that the benign lines above are not printed;
    every other line, and every other error, still is. Idempotent; a Ray without that function
    (another version) is left as it is."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_keeper_filtered", False):
        return

    def filtered(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        lines = [line for line in data.get("lines", []) if not _controller_exit(str(line))]
        if not lines and data.get("lines"):
            return None
        return printer({**data, "lines": lines}, *args, **kwargs)

    filtered._keeper_filtered = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = filtered
