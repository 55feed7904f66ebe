"""`serve deploy` of the shipped Serve config onto a `ray start` head with token auth, as an
operator runs it: refused without the Ray token, running with it, answering HTTP with the API token."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import HeadNode
from support import free_port

from keeper_serve.local import DEFAULT_CONFIG

pytestmark = pytest.mark.integration


def _serve(head: HeadNode, *args: str, with_token: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "serve"), *args, "--address", head.dashboard],
        env=head.client_env(with_token=with_token),
        capture_output=True,
        text=True,
        timeout=180,
    )


def _get(url: str, token: str | None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        # A bound, not a speed check: the first call after /healthz answers may wait while the
        # replicas behind it finish starting (over 10 s on a loaded 2-core CI machine).
        with urllib.request.urlopen(req, timeout=60) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body or b"{}")
    except json.JSONDecodeError:  # the proxy's own answers (404/503 while deploying) are text
        return status, {"_text": body.decode(errors="replace")}


def test_serve_deploy_shipped_config_on_a_token_auth_cluster(
    ray_head: HeadNode, tmp_path: Path
) -> None:
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    port = free_port()
    config["http_options"]["port"] = port  # only what a second app on this machine must change
    app = config["applications"][0]
    app["args"]["data_dir"] = str(tmp_path / "data")  # replicas run in the head's cwd
    path = tmp_path / "keeper.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    refused = _serve(ray_head, "deploy", str(path), with_token=False)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()

    deployed = _serve(ray_head, "deploy", str(path), with_token=True)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                if _get(f"{url}/healthz", None)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, _serve(ray_head, "status", with_token=True).stdout
            time.sleep(2)
        assert _get(f"{url}/v1/models", None)[0] == 401
        status, models = _get(f"{url}/v1/models", ray_head.api_token)
        assert status == 200
        assert models["clip"]["spec"] == "keeper-tiny:random"  # type: ignore[index]
        status_out = _serve(ray_head, "status", with_token=True)
        assert status_out.returncode == 0
        assert "RUNNING" in status_out.stdout
    finally:
        done = _serve(ray_head, "shutdown", "-y", with_token=True)
        assert done.returncode == 0, done.stdout + done.stderr
