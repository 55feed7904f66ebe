"""The ingress's feedback set-up without Serve: a root it cannot write fails the replica at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_fakes import ingress_class

from keeper_core.errors import ConfigError
from keeper_serve.config import KeeperAppArgs


def ingress(tmp_path: Path, root: str) -> object:
    """The ingress class itself (under Serve's ASGI wrapper), built without handles."""
    cls = ingress_class()
    args = KeeperAppArgs(
        auth={"insecure_local": True},
        ranker={"model_uri": None},
        feedback={"root": root, "max_age_s": 60},
    )
    return cls(None, None, None, args)


def test_an_unwritable_feedback_root_fails_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot be written"):
        ingress(tmp_path, str(blocker / "feedback"))


def test_a_writable_root_leaves_no_probe_behind(tmp_path: Path) -> None:
    root = tmp_path / "feedback"
    front = ingress(tmp_path, str(root))
    try:
        assert [p.name for p in root.iterdir()] == []  # the probe was written, then deleted
    finally:
        front.__del__()  # type: ignore[attr-defined]  # stops the flush thread
