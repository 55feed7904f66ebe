"""Integration fixtures: one local Ray for the session, and a `ray start --head` cluster for the
tests that go through `ray job submit`. Every process started here is stopped here."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import free_port, session_processes

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def ray_cluster(moto_server: str) -> Iterator[str]:
    """A local Ray (2 CPUs) shared by the integration tests; yields its GCS address.

    Ray workers inherit the environment of the process that starts Ray, so the S3 endpoint of
    the session's moto_server is exported first: jobs on this Ray read and write the test bucket.
    """
    import ray

    os.environ.update({"AWS_ENDPOINT_URL": moto_server, **AWS_TEST_ENV})
    ray.init(
        num_cpus=2,
        object_store_memory=500 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"AWS_ENDPOINT_URL": moto_server, **AWS_TEST_ENV}},
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster: str) -> Iterator[int]:
    """The HTTP port of the one Serve that the modules deploying keeper's app share on the
    session's Ray (see ``shared_serve``); Serve is stopped at the end of the session."""
    yield free_port()
    import ray
    from ray import serve

    from keeper_serve import local

    if ray.is_initialized():
        local.quiet_controller_exit()
        serve.shutdown()


@pytest.fixture(scope="module")
def shared_serve(serve_port: int) -> int:
    """Serve running on the session's Ray at ``serve_port`` (started if a module stopped it), its
    port returned: a module deploys its app there and removes only that app at the end, as
    ``keeper serve`` does on a cluster whose Serve already runs (``local.start`` joins it,
    ``local.shutdown`` deletes what it deployed). Serve's controller and HTTP proxy start once
    for the session instead of once per module (each start and stop ~6 s here)."""
    from ray import serve

    from keeper_serve import local

    http = {**local.http_address(local.load_config(None)), "port": serve_port}
    serve.start(http_options=http)
    return serve_port


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (Ray's daemons name their temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_daemons(marker: str, sid: int) -> None:
    """Stop every Ray daemon of one ``ray start`` (without --block it detaches them): those
    whose command line names its temp dir, and every process of its session, which also holds
    the ones that rename themselves (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and the
    Ray client server: left running, they outlived the tests by up to 20 minutes, the agent
    taking CPU from whatever ran next.

    The GCS server and a Python daemon outlive SIGTERM by 20 s and more on this machine, so the
    grace period is short: the cluster is going away with the session either way."""

    def pids() -> list[int]:
        return sorted({*_pids_with(marker), *session_processes(sid)} - {os.getpid()})

    _signal_all(pids(), signal.SIGTERM)
    deadline = time.monotonic() + 3
    while pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    _signal_all(pids(), signal.SIGKILL)


@dataclass
class HeadNode:
    dashboard: str  # http://127.0.0.1:PORT, the address `ray job submit` takes
    token: str
    home: Path  # HOME of the cluster's processes (holds ~/.ray/auth_token)
    api_token: str  # KEEPER_API_TOKEN in the cluster's environment (keeper's HTTP API)

    def client_env(self, *, with_token: bool) -> dict[str, str]:
        """Environment of a client on another machine: no token file; the token only if given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["HOME"] = str(self.home / "client")
        if with_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env


@pytest.fixture(scope="session")
def ray_head() -> Iterator[HeadNode]:
    """A Ray head started by clusters/local/start-head.sh (the documented way: token auth on),
    on free loopback ports."""
    home = Path(tempfile.mkdtemp(prefix="keeper-rayhome-"))
    (home / "client").mkdir()
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="krt", dir="/tmp")
    token = secrets.token_hex(32)
    api_token = secrets.token_urlsafe(32)
    ports = {name: free_port() for name in ("gcs", "dash", "client", "agent")}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "RAY": str(Path(sys.executable).parent / "ray"),  # start-head.sh puts its dir on PATH
        "HOME": str(home),
        "RAY_AUTH_TOKEN": token,
        "RAY_GCS_PORT": str(ports["gcs"]),
        "RAY_DASHBOARD_PORT": str(ports["dash"]),
        "RAY_NUM_CPUS": "2",
        # As on a cluster node: Serve replicas inherit the API token from the node's environment.
        "KEEPER_API_TOKEN": api_token,
    }
    cmd = [
        "bash", str(REPO / "clusters" / "local" / "start-head.sh"),
        "--ray-client-server-port", str(ports["client"]),
        "--dashboard-agent-listen-port", str(ports["agent"]),
        "--object-store-memory", str(300 * 1024**2),
        "--temp-dir", temp_dir, "--include-dashboard", "true",
    ]  # fmt: skip
    head = HeadNode(
        dashboard=f"http://127.0.0.1:{ports['dash']}", token=token, home=home, api_token=api_token
    )
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=180)
        started = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        (home / "ray-start.log").write_text(started.stdout + started.stderr)
        if started.returncode != 0:
            raise RuntimeError(f"start-head.sh exited {started.returncode}:\n{started.stderr}")
        # What the script prints for a client: the mode, how to get the token, this dashboard;
        # never the token itself (it would sit in scrollback and in logs like this one's).
        for line in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN=",
                     f"RAY_API_SERVER_ADDRESS={head.dashboard}"):  # fmt: skip
            assert f"export {line}" in started.stdout, started.stdout
        assert token not in started.stdout + started.stderr
        _wait_for_dashboard(head, None, timeout_s=120)
        yield head
    finally:
        if proc.poll() is None:  # start-head.sh itself, past its timeout
            proc.kill()
            proc.wait(timeout=30)
        _stop_daemons(temp_dir, proc.pid)


def _wait_for_dashboard(
    head: HeadNode, proc: subprocess.Popen[bytes] | None, timeout_s: float
) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = (head.home / "ray-start.log").read_text()[-3000:]
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log}")
        try:
            req = urllib.request.Request(
                f"{head.dashboard}/api/version", headers={"Authorization": f"Bearer {head.token}"}
            )
            with urllib.request.urlopen(req, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {head.dashboard} not up after {timeout_s}s")


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT, the tracking URI clients use
    artifacts: str  # s3://bucket/prefix the server proxies artifacts to


@pytest.fixture(scope="session")
def mlflow_server(
    moto_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A real `mlflow server`: sqlite backend, artifacts proxied to a moto_server bucket.

    It takes ~30 s to answer /health on this machine, so it is started once per session.
    """
    import boto3

    d = tmp_path_factory.mktemp("mlflow")
    bucket = "keeper-mlflow"
    boto3.client(
        "s3", endpoint_url=moto_server, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)  # fmt: skip
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": moto_server,
        "AWS_ENDPOINT_URL": moto_server,
        **AWS_TEST_ENV,
    }
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{bucket}/artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(d / "mlflow.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = MlflowServer(uri=f"http://127.0.0.1:{port}", artifacts=f"s3://{bucket}/artifacts")
    try:
        _wait_for_health(server.uri, proc, d / "mlflow.log", timeout_s=180)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def _wait_for_health(uri: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"mlflow server at {uri} not healthy after {timeout_s}s")


def register_ranker(
    uri: str, name: str, ranker: Any, rows: Any, folder: Path, experiment: str
) -> str:
    """Log ``ranker`` in a new run as train-head does and register it (a new version, @challenger).

    ``rows``: the embedding table joined to the manifest (its first rows are the input example).
    """
    import mlflow

    from keeper_train import tracking

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = tracking.experiment_id(client, experiment, folder)
    cols = ["series_id", "image_uri", "embedding", *ranker.config.quality_names]
    with mlflow.start_run(experiment_id=exp) as run:
        info = tracking.log_ranker(ranker.save(folder / "ranker"), rows[cols].head(8))
        return str(tracking.register(client, info.model_uri, name, run.info.run_id))


def negated(ranker: Any) -> Any:
    """A copy of ``ranker`` with its output layer negated: every series' order exactly reversed."""
    import torch

    from keeper_core.ranker import SeriesRanker

    out = SeriesRanker(ranker.config)
    out.head.load_state_dict(ranker.head.state_dict())
    last = [m for m in out.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.neg_()
        last.bias.neg_()
    return out
