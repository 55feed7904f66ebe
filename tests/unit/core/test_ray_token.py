"""keeper_core.ray_token: Ray's generated token file made private to its owner."""

from __future__ import annotations

import stat
from pathlib import Path

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
