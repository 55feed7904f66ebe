"""``keeper serve`` as a user runs it: its own local Ray, embedded defaults, a generated token."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import free_port, session_processes

pytestmark = pytest.mark.integration


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def _serving(
    args: list[str],
    log: Path,
    on_exit: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``keeper serve ARGS`` on a local Ray of its own, yielded once it printed how to call it.

    On leaving: SIGTERM (what a service manager sends: Serve, then Ray, stop), the exit awaited
    (``proc.returncode``), ``on_exit(proc)`` (checks of what must be gone by then), then SIGKILL to
    anything it left behind.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("KEEPER_API_TOKEN", "RAY_ADDRESS")}
    env = {k: v for k, v in env.items() if "HAPROXY" not in k and "HA_PROXY" not in k}
    cmd = [sys.executable, "-m", "keeper_core.cli", "serve", "--ray-address", "local", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops it." not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
            if on_exit is not None:
                on_exit(proc)
        finally:
            with contextlib.suppress(ProcessLookupError):  # anything it left behind
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=30)


def _serve(
    args: list[str], tmp_path: Path, timeout: float = 240, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KEEPER_API_TOKEN", "RAY_ADDRESS")}
    env.update(extra_env)
    cmd = [sys.executable, "-m", "keeper_core.cli", "serve", "--ray-address", "local", *args]
    return subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )


def _keeper_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("keeper serve:")]


def test_keeper_serve_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _serve(["--port", str(port), f"data_dir={tmp_path / 'data'}"], tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = _keeper_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "--port" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert "Ctrl-C" not in r.stdout


def test_keeper_serve_failed_deployment_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A deployment whose replicas cannot start (here: an unreadable aesthetic prompt file) ends
    keeper serve with the reason, instead of waiting out the health timeout."""
    args = [f"data_dir={tmp_path / 'data'}", f"aesthetic_config={tmp_path / 'absent.yaml'}"]
    t0 = time.monotonic()
    # Serve gives a replica 3 attempts before the deployment fails (each a replica process that
    # imports torch); one is enough to see keeper's handling, and saves half a minute.
    r = _serve(
        ["--port", str(free_port()), *args], tmp_path, RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT="1"
    )
    assert r.returncode == 1, r.stderr[-3000:]
    lines = _keeper_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert "KeeperIngress failed to start" in lines[0]
    assert "absent.yaml" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert time.monotonic() - t0 < 200


def test_keeper_serve_refuses_replicas_the_box_cannot_hold_at_once(tmp_path: Path) -> None:
    """A minimum replica whose memory reservation exceeds what the local Ray offers would wait
    forever for memory; keeper serve says so and exits instead of waiting out its timeout."""
    t0 = time.monotonic()
    r = _serve(
        [
            "--port",
            str(free_port()),
            f"data_dir={tmp_path / 'data'}",
            f"deployments.ClipEncoder.ray_actor_options.memory={2**50}",  # 1 PiB
        ],
        tmp_path,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    lines = _keeper_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert "minimum replicas reserve" in lines[0]
    assert "ClipEncoder 1048576.00" in lines[0]
    assert "ray_actor_options.memory" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert time.monotonic() - t0 < 120  # Ray's start, not a health timeout


def test_keeper_serve_starts_prints_how_to_call_answers_through_haproxy_and_stops(
    tmp_path: Path,
) -> None:
    """``keeper serve --haproxy`` on embedded defaults: it prints how to call it (a token file of
    its own, mode 600), says once that no ranker is loaded, keeps replica logs off the terminal;
    HAProxy, not Serve's Python proxy, answers the port, with its config in a directory of this
    instance's own (not Ray's shared /tmp/haproxy-serve); auth holds on that path; on SIGTERM it
    exits 0, HAProxy stops and the directory is removed.

    One ``keeper serve`` (a local Ray, Serve and the app: ~40 s here) for both the start-up and
    the HAProxy checks; the default Python proxy answers every other integration test."""
    import base64
    import io

    from PIL import Image

    port = free_port()
    log = tmp_path / "serve.log"
    workdirs: list[Path] = []
    left: list[str] = []

    def haproxy_gone(exited: subprocess.Popen[bytes]) -> None:  # Ray stops with keeper serve
        deadline = time.monotonic() + 30
        while _haproxy(exited.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left.extend(_haproxy(exited.pid))

    args = ["--haproxy", "--port", str(port), f"data_dir={tmp_path / 'data'}", "ranker.poll_s=2"]
    with _serving(args, log, on_exit=haproxy_gone) as proc:
        up = time.monotonic()
        url = f"http://127.0.0.1:{port}"
        text = log.read_text(errors="replace")
        token_file = tmp_path / "data" / "api-token"
        assert f"keeper API at {url}" in text
        assert f"TOKEN=$(cat {token_file})" in text
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        assert "keeper serve: HTTP through HAProxy" in text, text[-3000:]
        procs = session_processes(proc.pid)
        haproxy = _haproxy(proc.pid)
        assert len(haproxy) == 1, procs
        cfg = Path(haproxy[0].split(" -f ", 1)[1].split()[0])  # WORKDIR/NODE_ID/haproxy.cfg
        assert cfg.parent.parent.name.startswith("keeper-haproxy-"), haproxy
        workdirs.append(cfg.parent.parent)
        assert f":{port}" in cfg.read_text()
        stats_url = re.search(r"its stats page: (http://\S+/stats)", text)
        assert stats_url, text[-3000:]

        assert _get(f"{url}/healthz") == (200, {"status": "ok"})
        assert _get(f"{url}/v1/models")[0] == 401
        status, models = _get(f"{url}/v1/models", token)
        assert status == 200
        assert models["clip"] == {  # embedded defaults
            "spec": "keeper-tiny:random", "embed_dim": 64, "image_size": 64,
            "random_weights": True, "logit_scale": pytest.approx(1 / 0.07, rel=1e-4),  # init
            "logit_bias": None,  # CLIP's: no bias (SigLIP-style models report theirs)
        }  # fmt: skip
        assert models["vlm"]["status"] == "disabled"  # vlm.source is null by default
        ranker = models["ranker"]
        assert isinstance(ranker, dict)
        assert ranker["status"] == "unavailable"  # no champion in a fresh store: said, not hidden
        assert "keeper-ranker" in str(ranker["error"])
        png = io.BytesIO()
        Image.new("RGB", (80, 64), (200, 30, 30)).save(png, "PNG")
        body = json.dumps({"images": [{"b64": base64.b64encode(png.getvalue()).decode()}]})
        req = urllib.request.Request(
            f"{url}/v1/embed",
            data=body.encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert len(answer["image_embeddings"]) == 1
        assert len(answer["image_embeddings"][0]) == answer["dim"] == 64
        # HAProxy sent each request to the ingress replica's own port, none to Serve's proxy
        # (on the head node a fallback, a backup server in HAProxy's terms).
        with urllib.request.urlopen(stats_url.group(1) + ";csv", timeout=30) as r:
            rows = [ln.split(",") for ln in r.read().decode().splitlines()]
        sessions = {row[1]: int(row[7]) for row in rows if row[0] == "http-keeper"}  # stot
        replicas = [k for k in sessions if k.startswith("SERVE_REPLICA_keeper-KeeperIngress")]
        fallback = [k for k in sessions if k.startswith("SERVE_PROXY_ACTOR")]
        assert len(replicas) == 1, sessions
        assert sessions[replicas[0]] >= 3, sessions  # healthz, the 401, the embed
        assert fallback, sessions
        assert sessions[fallback[0]] == 0, sessions
        # "no ranker loaded" once, in one line on the terminal, not again at every registry
        # poll (poll_s 2: the requests above took more than two polls' time since it started).
        time.sleep(max(0.0, 5 - (time.monotonic() - up)))
        text = log.read_text(errors="replace")
        notes = [ln for ln in text.splitlines() if "no ranker loaded" in ln]
        assert len(notes) == 1, text[-3000:]
        assert notes[0].startswith("keeper serve: no ranker loaded, /v1/rank answers 503")
        assert "keeper-ranker" in notes[0]
        assert "Traceback" not in text
        assert "SeriesRanker: keeping" not in text  # replica logs stay in Ray's log files
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    assert not left, left
    assert workdirs
    assert not workdirs[0].exists()


def _haproxy(sid: int) -> list[str]:
    return [c for c in session_processes(sid).values() if c and "haproxy" in c.split()[0]]
