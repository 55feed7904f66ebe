"""Every ```yaml block of README.md and docs/ parses and fits what it configures.

A block with ``args:`` is a Serve config's application args (KeeperAppArgs, with its
``deployments`` names checked); a block of one KeeperAppArgs section (``feedback:``,
``search:`` ...) is that section; a list of ``name``/``positive`` items is ``keeper select``'s
queries; a list of ``name`` items is a Serve config's ``deployments``. A block of any other shape
fails here, so a new kind of example gets a check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from keeper_serve.app import DEPLOYMENTS, OPTIONAL_DEPLOYMENTS
from keeper_serve.config import KeeperAppArgs
from keeper_train.jobs.select import Query

REPO = Path(__file__).resolve().parents[3]
FENCE = re.compile(r"```yaml\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str]]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    out = []
    for f in files:
        for i, m in enumerate(FENCE.finditer(f.read_text())):
            out.append((f"{f.name} yaml block {i + 1}", m.group(1)))
    return out


def check_deployments(items: list[Any]) -> None:
    for d in items:
        assert d["name"] in (*DEPLOYMENTS, *OPTIONAL_DEPLOYMENTS), d["name"]


@pytest.mark.parametrize(("where", "text"), blocks(), ids=[w for w, _ in blocks()])
def test_yaml_examples_fit_what_they_configure(where: str, text: str) -> None:
    doc = yaml.safe_load(text)
    if isinstance(doc, dict) and "args" in doc:
        KeeperAppArgs.model_validate(doc["args"])
        check_deployments(doc.get("deployments", []))
    elif isinstance(doc, dict) and len(doc) == 1 and next(iter(doc)) in KeeperAppArgs.model_fields:
        KeeperAppArgs.model_validate(doc)
    elif isinstance(doc, list) and doc and all("positive" in q for q in doc):
        for q in doc:
            Query.model_validate(q)
    elif isinstance(doc, list) and doc and all("name" in d for d in doc):
        check_deployments(doc)
    else:
        pytest.fail(f"{where}: no check for a block of this shape: {text[:200]!r}")


def test_the_blocks_are_found() -> None:
    assert len(blocks()) >= 7
