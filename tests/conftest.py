"""Shared fixtures: real services on loopback, started once per session and always stopped.

- ``moto_server``: a real ``moto_server`` process as the S3 endpoint (no in-process mocks).
- ``s3_bucket``: a fresh bucket on it, with the AWS_* environment pointing at it for the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port, stop_process, wait_for_port


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto_server on a free loopback port; yields its endpoint URL.

    It runs on this interpreter (``python -m moto.server``), never a ``moto_server`` found on
    PATH: that may be another Python's older moto (e.g. a pyenv shim to moto 5.2.1, whose
    CompleteMultipartUpload answer has the root ``CompleteMultipartUploadResponse`` instead of
    S3's ``CompleteMultipartUploadResult``; pyarrow's S3 client then takes the 200 OK for an
    embedded error and fails every multipart upload with INTERNAL_FAILURE).
    """
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc, timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new empty bucket on the session's moto_server; AWS_* env vars point at it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"keeper-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _no_stray_aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests never read the developer's ~/.aws: credentials come only from fixtures.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    os.environ.setdefault("KEEPER_TEST", "1")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch at one thread for a module (its models are tiny; Ray's workers share the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
