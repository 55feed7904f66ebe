"""keeper on a real multi-node Ray cluster: a head and two worker nodes on this machine, each its
own raylet, started and stopped by clusters/local/start-cluster.sh and stop-cluster.sh.

The worker `gpu` offers keeper_gpu_node (a stand-in for a GPU node type), `cpu` offers
keeper_cpu_node; every node also offers keeper_node_<name>. Jobs go in through `ray job submit`
with the cluster's token, as users send them. What is checked: a worker node killed mid-embed
leaves every image embedded exactly once, and that job's decode tasks spread over the nodes while
its model actor goes only where actor_resources sends it; train-head puts one worker on each node;
Serve replicas spread over the nodes and the app keeps answering when a worker node is stopped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from support import free_port

from keeper_core.synthetic import generate_corpus
from keeper_serve.local import DEFAULT_CONFIG

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START = REPO / "clusters" / "local" / "start-cluster.sh"
STOP = REPO / "clusters" / "local" / "stop-cluster.sh"
NODES = ("head", "cpu", "gpu")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class Cluster:
    state: Path  # KEEPER_CLUSTER_DIR
    gcs: str
    dashboard: str
    token: str
    api_token: str

    def client_env(self, *, with_token: bool = True) -> dict[str, str]:
        """A client on another machine: its own HOME (no token file), the token only if given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["HOME"] = str(self.state / "client")
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        if with_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def cli(self, tool: str, *args: str, timeout: float = 120, with_token: bool = True) -> Any:
        return subprocess.run(
            [str(BIN / tool), *args],
            cwd=REPO,
            env=self.client_env(with_token=with_token),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(
        self,
        *entrypoint: str,
        sid: str | None = None,
        wait: bool = True,
        timeout: float = 420,
        excludes: tuple[str, ...] = (),
    ) -> Any:
        """`ray job submit` of the repo as working dir (less ``excludes``); ``wait=False``
        returns once submitted."""
        env = ["--runtime-env-json", json.dumps({"excludes": list(excludes)})] if excludes else []
        return self.cli(
            "ray",
            "job", "submit", "--address", self.dashboard, "--working-dir", ".", *env,
            "--submission-id", sid or f"keeper-{secrets.token_hex(4)}",
            *([] if wait else ["--no-wait"]), "--", *entrypoint,
            timeout=timeout,
        )  # fmt: skip

    def api(self, path: str) -> Any:
        """GET the dashboard's REST API with the token: what `ray job status`/`ray list` read,
        without starting a CLI process (2-5 s each on this machine) for every poll."""
        req = urllib.request.Request(
            f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def job_status(self, sid: str) -> str:
        return str(self.api(f"/api/jobs/{sid}")["status"])

    def wait_job(self, sid: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job_status(sid)
            if state in TERMINAL:
                return state
            time.sleep(1)
        raise AssertionError(
            f"job {sid} not finished after {timeout_s} s: {self.logs(sid)[-3000:]}"
        )

    def logs(self, sid: str) -> str:
        return str(self.api(f"/api/jobs/{sid}/logs")["logs"])

    def _state(self, kind: str) -> list[dict[str, Any]]:
        """`ray list <kind> --detail`: the state API's rows."""
        body = self.api(f"/api/v0/{kind}?detail=1&limit=1000")
        assert body["result"], body.get("msg")
        return list(body["data"]["result"]["result"])

    def nodes(self) -> dict[str, str]:
        """Alive node name -> Ray node id, from the keeper_node_<name> resource each offers."""
        out = {}
        for node in self._state("nodes"):
            if node.get("state") != "ALIVE":
                continue
            for res in node.get("resources_total", {}):
                if res.startswith("keeper_node_"):
                    out[res.removeprefix("keeper_node_")] = node["node_id"]
        return out

    def actors(self, class_prefix: str) -> list[dict[str, Any]]:
        return [
            a
            for a in self._state("actors")
            if str(a.get("class_name", "")).startswith(class_prefix) and a.get("state") == "ALIVE"
        ]

    def stop(self, *names: str, kill: bool = True) -> None:
        env = {**os.environ, "KEEPER_CLUSTER_DIR": str(self.state)}
        if kill:
            env["KEEPER_STOP_SIGNAL"] = "KILL"
        proc = subprocess.run(
            ["bash", str(STOP), *names], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _free_block(n: int) -> int:
    """A base port B with B .. B+n-1 all free, between Ray's default worker ports (10002-19999)
    and the kernel's ephemeral range (32768-), where no outgoing connection takes one."""
    import random
    import socket

    for _ in range(50):
        base = random.randrange(20000, 29000 - n)
        try:
            for port in range(base, base + n):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no block of free ports for the cluster")


def _start(state: Path) -> Cluster:
    token = secrets.token_hex(32)
    api_token = secrets.token_urlsafe(32)
    gcs, dash = free_port(), free_port()
    home = state / "home"
    (state / "client").mkdir(parents=True)
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "RAY": str(BIN / "ray"),
        "RAY_AUTH_TOKEN": token,
        "KEEPER_CLUSTER_DIR": str(state),
        "RAY_GCS_PORT": str(gcs),
        "RAY_DASHBOARD_PORT": str(dash),
        # Ports of this cluster's nodes: below the ephemeral range, apart from the session's Ray.
        "KEEPER_PORT_BASE": str(_free_block(60)),
        "OBJECT_STORE_MB": "200",
        # As on a cluster node: Serve replicas take the API token from the node's environment.
        "KEEPER_API_TOKEN": api_token,
        # The GCS declares a node dead after 5 missed 1-s health checks (Ray's default: 5 x 3 s,
        # timeouts 10 s): the node-loss tests then wait seconds, not half a minute, for it.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "2000",
        "RAY_health_check_failure_threshold": "5",
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["bash", str(START)], env=env, capture_output=True, text=True, timeout=300
    )
    cluster = Cluster(state, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", token, api_token)
    if proc.returncode != 0:
        cluster.stop()
        raise AssertionError(f"start-cluster.sh failed:\n{proc.stdout}\n{proc.stderr}")
    assert "export RAY_AUTH_TOKEN=" in proc.stdout
    assert token not in proc.stdout + proc.stderr  # how to get it, never the token itself
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One three-node cluster for the module. test_token_and_nodes runs first (file order) and
    sees all three; the `embedded` fixture then takes `cpu` away, and the Serve test picks its
    node from those still alive."""
    state = Path(tempfile.mkdtemp(prefix="kc", dir="/tmp"))  # short: Ray's socket paths
    try:
        c = _start(state)
        try:
            yield c
        finally:
            c.stop()
    finally:
        shutil.rmtree(state, ignore_errors=True)


@dataclass
class Embedded:
    """`keeper embed` of 70 series submitted with the actors on `gpu`, and the `cpu` worker node
    SIGKILLed (raylet, workers) once the first part was written, while decode tasks ran there."""

    manifest: Path
    out: Path
    nodes: dict[str, str]  # the nodes before the kill: name -> Ray node id
    written_at_kill: int
    state: str
    logs: str


@pytest.fixture(scope="module")
def embedded(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Embedded:
    """One embed job serves three checks (exactly once across a node loss, decode spread and
    actor placement, train-head on its table): each job submission costs the module ~50 s."""
    tmp = tmp_path_factory.mktemp("embedded")
    manifest = generate_corpus(tmp / "corpus", n_series=70, seed=4, image_size=(512, 384))
    out = tmp / "out"
    nodes = cluster.nodes()
    sid = f"keeper-kill-{secrets.token_hex(4)}"
    job = _embed(cluster, manifest, out, "concurrency=1", sid=sid, wait=False)
    assert job.returncode == 0, job.stdout + job.stderr
    parts = out / "embeddings"
    # Mid-run: the first part is written. Polled every 0.1 s, and the kill goes before the
    # parts are read: CI once saw every part written in the gap of a slower loop.
    deadline = time.monotonic() + 240
    written: list[Path] = []
    while not written:
        written = sorted(parts.glob("*.parquet")) if parts.is_dir() else []
        if not written:
            assert cluster.job_status(sid) not in TERMINAL, cluster.logs(sid)[-3000:]
            assert time.monotonic() < deadline, cluster.logs(sid)[-3000:]
            time.sleep(0.1)
    cluster.stop("cpu")
    written_at_kill = sum(pq.read_metadata(f).num_rows for f in written)
    state = cluster.wait_job(sid, timeout_s=420)
    return Embedded(manifest, out, nodes, written_at_kill, state, cluster.logs(sid))


def _embed(
    cluster: Cluster,
    manifest: Path,
    out: Path,
    *extra: str,
    sid: str | None = None,
    wait: bool = True,
) -> Any:
    return cluster.submit(
        "python", "-m", "keeper_train.jobs.embed",
        "--config", "packages/train/configs/embed.yaml",
        f"input={manifest}", f"output={out}", "ray_address=auto",
        "actor_resources={keeper_gpu_node: 1}", "decode_batch_size=4", "rows_per_file=16",
        *extra,
        sid=sid,
        wait=wait,
    )  # fmt: skip


def _table(out: Path) -> pd.DataFrame:
    return pq.read_table(out / "embeddings").to_pandas()


def test_token_and_nodes(cluster: Cluster) -> None:
    """Three live nodes with their resources; a client without the token is refused."""
    assert set(cluster.nodes()) == set(NODES)
    refused = cluster.cli(
        "ray", "job", "submit", "--address", cluster.dashboard, "--", "echo", "never",
        with_token=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "never" not in refused.stdout
    with pytest.raises(urllib.error.HTTPError) as http:  # the REST API the tests poll, too
        urllib.request.urlopen(f"{cluster.dashboard}/api/v0/nodes", timeout=30)
    assert http.value.code == 401


def test_worker_node_killed_mid_embed(embedded: Embedded) -> None:
    """Ray retried the lost node's tasks elsewhere: the table holds every image exactly once."""
    uris = set(pd.read_csv(embedded.manifest)["image_uri"])
    assert embedded.written_at_kill < len(uris), "the job ended before the node was killed"
    assert embedded.state == "SUCCEEDED", embedded.logs[-4000:]
    summary = json.loads((embedded.out / "_SUMMARY.json").read_text())
    counts = summary["counts"]
    assert counts["embedded"] == len(uris), counts
    assert counts["failed"] == 0, counts
    assert counts["lost"] == 0, counts
    table = _table(embedded.out)
    assert len(table) == len(uris)
    assert set(table["image_uri"]) == uris
    assert table["image_uri"].is_unique


def test_embed_spreads_decode_and_places_actors(embedded: Embedded) -> None:
    """Decode tasks ran on the nodes beside the actor's; the model actor only where
    actor_resources sent it (`gpu`). The killed `cpu` node may have decoded some rows too."""
    assert embedded.state == "SUCCEEDED", embedded.logs[-4000:]
    total = len(pd.read_csv(embedded.manifest))
    summary = json.loads((embedded.out / "_SUMMARY.json").read_text())
    decode = summary["nodes"]["decode"]
    ids = embedded.nodes
    assert {ids["head"], ids["gpu"]} <= set(decode) <= set(ids.values()), (decode, ids)
    assert sum(decode.values()) == total
    assert summary["nodes"]["embed"] == {ids["gpu"]: total}
    assert f"nodes    decode on {len(decode)}" in embedded.logs  # the run's own summary says so
    assert "nodes    embed  on 1" in embedded.logs


def test_train_head_one_worker_per_node(
    cluster: Cluster, embedded: Embedded, tmp_path: Path
) -> None:
    assert embedded.state == "SUCCEEDED", embedded.logs[-4000:]
    results = tmp_path / "results.json"
    sid = f"keeper-train-{secrets.token_hex(4)}"
    proc = cluster.submit(
        "python", "-m", "keeper_train.jobs.train_head",
        "--config", "packages/train/configs/train_head.yaml", "--json", str(results),
        f"embeddings={embedded.out}", f"series={embedded.manifest}", "num_workers=2",
        "placement_strategy=STRICT_SPREAD", "epochs=1", "baselines=false",
        f"storage={tmp_path / 'ckpt'}", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "ray_address=auto",
        sid=sid,
        # A working_dir other than the embed job's, as after an edit: every node's runtime-env
        # agent unpacks it anew, the worker node's after the head's. With the nodes sharing one
        # temp dir the later unpack deleted the folder under the running driver (its cwd gone at
        # MLflow's log_model): each node has its own (start-cluster.sh).
        excludes=("docs/",),
    )  # fmt: skip
    # The job's own log, not the client's: its stderr is Ray's packaging chatter.
    assert proc.returncode == 0, cluster.logs(sid)[-4000:]
    workers = json.loads(results.read_text())["worker_nodes"]
    assert len(workers) == 2
    assert len(set(workers)) == 2, workers  # one worker per node: head and gpu, cpu is gone
    assert set(workers) <= set(cluster.nodes().values())
    assert "2 workers on 2 nodes" in proc.stdout


def _http(url: str, token: str | None, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]
    except OSError as e:
        return 0, str(e)


def _serve_config(tmp_path: Path, port: int) -> Path:
    """The shipped config, changed only where one host with three raylets needs it."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["http_options"]["port"] = port
    config["proxy_location"] = "HeadOnly"  # three proxies on one host would share one port
    app = config["applications"][0]
    app["args"]["data_dir"] = str(tmp_path / "data")
    for d in app["deployments"]:
        scaling = d["autoscaling_config"]
        if d["name"] in ("KeeperIngress", "ClipEncoder"):
            # Two of each so that losing a node leaves one; one of each fits a 1-CPU node.
            scaling["min_replicas"] = scaling["max_replicas"] = 2
            d["ray_actor_options"]["num_cpus"] = 0.25 if d["name"] == "KeeperIngress" else 0.4
        else:
            scaling["max_replicas"] = 1
            d["ray_actor_options"]["num_cpus"] = 0.1
    app["args"]["encoder"]["torch_threads"] = 1
    path = tmp_path / "keeper.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_serve_replicas_spread_and_survive_a_node(cluster: Cluster, tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    port = free_port()
    deployed = cluster.cli(
        "serve", "deploy", str(_serve_config(tmp_path, port)), "--address", cluster.dashboard
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url = f"http://127.0.0.1:{port}"
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 30)).save(buf, "JPEG")
    body = {"images": [{"b64": base64.b64encode(buf.getvalue()).decode()}]}

    def embed() -> int:
        return _http(f"{url}/v1/embed", cluster.api_token, body)[0]

    deadline = time.monotonic() + 300
    while True:
        nodes = cluster.nodes()
        ingress = cluster.actors("ServeReplica:keeper:KeeperIngress")
        encoder = cluster.actors("ServeReplica:keeper:ClipEncoder")
        if len(ingress) == 2 and len(encoder) == 2 and embed() == 200:
            break
        assert time.monotonic() < deadline, cluster.cli(
            "serve", "status", "--address", cluster.dashboard
        ).stdout
        time.sleep(1)
    for replicas in (ingress, encoder):
        assert len({a["node_id"] for a in replicas}) == 2, replicas  # spread: one per node
    # Take away a worker node that holds replicas (not the head: it has the proxy). An earlier
    # test may have taken `cpu` already.
    held = {a["node_id"] for a in ingress + encoder}
    victim = next(name for name in ("cpu", "gpu") if nodes.get(name) in held)
    cluster.stop(victim)
    t_stop = time.monotonic()
    codes = []
    while time.monotonic() - t_stop < 20:
        codes.append(embed())
        time.sleep(0.5)
    ok = codes.count(200)
    print(f"after stopping {victim}: {ok} of {len(codes)} requests answered 200: {codes}")
    # The app keeps answering: the surviving replicas take the traffic; a request in flight on
    # the lost node may fail, and none in the last 5 seconds.
    assert ok >= 0.8 * len(codes), codes
    late = codes[-10:]
    assert late.count(200) == len(late), codes
    assert victim not in cluster.nodes()
    done = cluster.cli("serve", "shutdown", "-y", "--address", cluster.dashboard)
    assert done.returncode == 0, done.stdout + done.stderr
