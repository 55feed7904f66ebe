"""keeper's app on a Ray whose Serve already runs, as on a shared cluster: ``local.start`` (what
``keeper serve --ray-address`` runs) deploys onto that Serve at its own address, refuses another
address before changing anything, and ``local.shutdown`` (Ctrl-C, or a failed start) removes
only keeper's app: that Serve and another team's application on it keep serving."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import free_port, small_app_overrides
from test_serve import TOKEN

pytestmark = pytest.mark.integration

SPEC = "keeper-tiny:random"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_keeper_joins_a_running_serve_and_leaves_it_as_it_was(
    shared_serve: int, tmp_path: Path
) -> None:
    from ray import serve

    from keeper_serve import local

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    class Other:
        def __call__(self, request: Any) -> dict[str, str]:
            return {"team": "other"}

    serve.run(Other.bind(), name="other-team", route_prefix="/other")
    other = f"http://127.0.0.1:{shared_serve}/other"
    try:
        assert _get(other) == {"team": "other"}
        (tmp_path / "token").write_text(TOKEN)
        overrides = small_app_overrides(tmp_path, SPEC)

        elsewhere = free_port()
        with pytest.raises(local.StartError) as refused:
            local.start(overrides=overrides, port=elsewhere, wait_s=120)
        why = str(refused.value)
        assert f"HTTP proxy on 127.0.0.1:{shared_serve}" in why, why
        assert f"would not answer on 127.0.0.1:{elsewhere}" in why, why
        assert f"--port {shared_serve}" in why, why
        local.shutdown()  # what keeper serve runs after a failed start: nothing of ours to undo
        assert set(serve.status().applications) == {"other-team"}
        assert _get(other) == {"team": "other"}

        url = local.start(overrides=overrides, port=shared_serve, wait_s=240)
        try:
            assert url == f"http://127.0.0.1:{shared_serve}"
            assert _get(f"{url}/healthz") == {"status": "ok"}
            assert _get(other) == {"team": "other"}
        finally:
            local.shutdown()
        apps = serve.status().applications
        assert "keeper" not in apps, apps
        assert apps["other-team"].status == "RUNNING"
        assert _get(other) == {"team": "other"}
    finally:
        serve.delete("other-team")
