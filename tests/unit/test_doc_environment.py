"""Every environment variable keeper's code reads (its own ``KEEPER_*`` and the ``AWS_*`` its
S3 client reads) is in the table of docs/operations.md section 12, and that table names none
the code does not read: a platform engineer sets them from there."""

from __future__ import annotations

import re
from pathlib import Path

from keeper_core.run_lock import LOCK_ENV

ROOT = Path(__file__).resolve().parents[2]
READS = re.compile(
    r"""(?:environ\.get|environ\[|getenv|env\.get)\(?\s*["']((?:KEEPER|AWS)_[A-Z0-9_]+)"""
)


def _read_by_code() -> set[str]:
    names = {LOCK_ENV}  # read through its constant
    for path in (ROOT / "packages").rglob("*.py"):
        names.update(READS.findall(path.read_text()))
    return names


def _documented() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## 12. Environment variables", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {
        name
        for row in rows
        for name in re.findall(r"`((?:KEEPER|AWS)_[A-Z0-9_]+)`", row.split("|")[1])
    }


def test_every_variable_keeper_reads_is_documented() -> None:
    read = _read_by_code()
    assert {"KEEPER_OUTPUT_LOCK", "KEEPER_S3_READ_TIMEOUT", "AWS_ENDPOINT_URL"} <= read
    assert read - _documented() == set()


def test_the_table_names_only_variables_keeper_or_boto3_reads() -> None:
    boto3_reads = {"AWS_SECRET_ACCESS_KEY"}  # read by botocore itself, beside the key id
    assert _documented() - _read_by_code() - boto3_reads == set()
