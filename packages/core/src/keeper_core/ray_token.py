"""Ray's token file, kept readable by its owner only (this module does not import Ray).

Ray 2.60 writes a generated cluster token to ``~/.ray/auth_token`` with the process's umask,
usually readable by every user of the machine, and that token lets whoever holds it run code on
the cluster. ``ray.init()`` of a new local cluster generates it; keeper's local Ray starts
(``keeper_train.cluster.init_ray``, ``keeper_serve.local.start``) call :func:`restrict` after
``ray.init``, as ``clusters/local/ray-env.sh`` does for ``ray start``, and
:func:`quiet_enabled_notice` before it.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

#: Where Ray keeps a generated token (``ray get-auth-token`` reads it back).
TOKEN_FILE = Path("~/.ray/auth_token")
#: The logger of Ray's notice, and how the notice starts.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_ENABLED_NOTICE = "Token authentication is enabled for this Ray cluster"


def _not_the_enabled_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_ENABLED_NOTICE)


def quiet_enabled_notice() -> None:
    """Drop Ray's "Token authentication is enabled for this Ray cluster. Set
    RAY_AUTH_MODE=disabled to opt out" line, which ``ray.init`` of a local cluster logs on every
    start: keeper turns token authentication on on purpose, and the line, on the user's screen,
    tells them how to turn it off. Ray's warning that authentication is *disabled* still shows.
    Idempotent (the same filter is added once).
    """
    logging.getLogger(_AUTH_LOGGER).addFilter(_not_the_enabled_notice)


def restrict(path: Path | None = None) -> bool:
    """Make the token file readable and writable by its owner only; True if it was changed.

    A missing file (a token given through ``RAY_AUTH_TOKEN``, or no token auth) is left alone,
    as is one already private. A file this user may not chmod is left as it is.
    """
    target = (path or TOKEN_FILE).expanduser()
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
        if not mode & 0o077:
            return False
        target.chmod(0o600)
    except OSError:
        return False
    return True
