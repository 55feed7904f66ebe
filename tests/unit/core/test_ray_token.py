"""keeper_core.ray_token: Ray's generated token file made private to its owner."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from keeper_core import ray_token


def test_a_world_readable_token_file_is_made_private(tmp_path: Path) -> None:
    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)  # what Ray 2.60's generate_and_save_token leaves under umask 022
    assert ray_token.restrict(token) is True
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert ray_token.restrict(token) is False  # already private: left alone


def test_a_missing_token_file_is_left_alone(tmp_path: Path) -> None:
    assert ray_token.restrict(tmp_path / "none") is False


def test_the_default_is_rays_own_path() -> None:
    assert ray_token.TOKEN_FILE.expanduser() == Path.home() / ".ray" / "auth_token"


def test_rays_enabled_notice_is_dropped_and_its_disabled_warning_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """keeper turns token auth on on purpose: Ray's line telling the user how to turn it off is
    not printed; its warning that auth is disabled still is."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    ray_token.quiet_enabled_notice()
    ray_token.quiet_enabled_notice()  # idempotent
    assert logger.filters.count(ray_token._not_the_enabled_notice) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled "
            "to opt out."
        )
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone ...")
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "Token authentication is disabled for thi"
    ]
