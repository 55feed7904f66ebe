"""The path users take: `ray job submit` against a `ray start --head` cluster with token auth.

The cluster (tests/integration/conftest.py::ray_head) is started with RAY_AUTH_MODE=token and a
token of its own; a client without it is refused, a client with it runs the embed job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import HeadNode

from keeper_core.synthetic import generate_corpus

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def submit(head: HeadNode, *entrypoint: str, with_token: bool) -> subprocess.CompletedProcess[str]:
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        head.dashboard,
        "--working-dir",
        ".",
        "--",
        *entrypoint,
    ]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=head.client_env(with_token=with_token),
        capture_output=True,
        text=True,
        timeout=420,
    )


def test_submit_without_token_is_refused(ray_head: HeadNode) -> None:
    proc = submit(ray_head, "python", "-c", "print('should never run')", with_token=False)
    assert proc.returncode != 0
    assert "AuthenticationError" in proc.stdout + proc.stderr
    assert "should never run" not in proc.stdout


def test_embed_job_via_submit_embed_script(ray_head: HeadNode, tmp_path: Path) -> None:
    """clusters/local/submit-embed.sh, as docs/operations.md section 2 runs it: the repo as the
    working dir, this checkout's packages as py_modules, the token from the environment."""
    manifest = generate_corpus(tmp_path / "corpus", n_series=4, seed=5)
    total = len(pd.read_csv(manifest))
    out = tmp_path / "out"
    env = {
        **ray_head.client_env(with_token=True),
        "RAY": RAY,
        "RAY_API_SERVER_ADDRESS": ray_head.dashboard,
    }
    proc = subprocess.run(
        ["bash", str(REPO / "clusters" / "local" / "submit-embed.sh"), str(manifest), str(out),
         "rows_per_file=64"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs
    assert "keeper embed  OK" in logs  # the job's own summary, streamed back by ray job submit
    summary = json.loads((out / "_SUMMARY.json").read_text())
    assert summary["counts"]["embedded"] == total
    assert summary["counts"]["failed"] == 0
