"""Ray's token file, kept readable by its owner only (this module does not import Ray).

Ray 2.60 writes a generated cluster token to ``~/.ray/auth_token`` with the process's umask,
usually readable by every user of the machine, and that token lets whoever holds it run code on
the cluster. ``ray.init()`` of a new local cluster generates it; keeper's local Ray starts
(``keeper_train.cluster.init_ray``, ``keeper_serve.local.start``) call :func:`restrict` after
``ray.init``, as ``clusters/local/ray-env.sh`` does for ``ray start``.
"""

from __future__ import annotations

import stat
from pathlib import Path

#: Where Ray keeps a generated token (``ray get-auth-token`` reads it back).
TOKEN_FILE = Path("~/.ray/auth_token")


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
