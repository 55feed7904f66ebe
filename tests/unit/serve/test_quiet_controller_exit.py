"""keeper_serve.local.quiet_controller_exit: Serve's own controller exit is not printed as an error.

``serve.shutdown()`` ends the controller inside its ``graceful_shutdown`` call, and Ray's driver
prints "(raylet) Task ServeController.graceful_shutdown failed ..." for it (and the same for the
controller's long-poll calls in flight), lines that read as errors in ``make demo`` and when
``keeper serve`` stops. The filter drops exactly those lines; every other line still prints.
"""

from __future__ import annotations

from typing import Any

import pytest
from ray._private import worker

from keeper_serve import local

BENIGN = (
    "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so "
    "the task will be retried. Error: The actor is dead because it was killed by `ray.kill`."
)

#: What `keeper serve` printed on SIGTERM after its "Ctrl-C stops it." line.
LONG_POLL = (
    "Task ServeController.listen_for_change failed. There are infinite retries remaining, so the "
    "task will be retried. Error: The actor is dead because it was killed by `ray.kill`."
)


def test_only_the_controllers_own_exit_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    printed: list[tuple[dict[str, Any], bool]] = []

    def printer(data: dict[str, Any], ignore_prefix: bool) -> None:
        printed.append((data, ignore_prefix))

    monkeypatch.setattr(worker, "print_to_stdstream", printer)
    local.quiet_controller_exit()
    local.quiet_controller_exit()  # idempotent: one filter, not two
    assert worker.print_to_stdstream is not printer
    assert getattr(worker.print_to_stdstream, "_keeper_filtered", False)

    worker.print_to_stdstream({"lines": [BENIGN], "pid": "raylet", "is_err": False}, False)
    worker.print_to_stdstream({"lines": [LONG_POLL], "pid": "raylet", "is_err": False}, False)
    assert printed == []
    # The controller failing for any other reason is still shown.
    crashed = "Task ServeController.listen_for_change failed. Error: The actor died unexpectedly"
    worker.print_to_stdstream({"lines": [crashed], "pid": "raylet", "is_err": True}, True)
    assert printed == [({"lines": [crashed], "pid": "raylet", "is_err": True}, True)]
    printed.clear()
    other = "Task MyActor.f failed. There are infinite retries remaining"
    worker.print_to_stdstream(
        {"lines": [BENIGN, other], "pid": "raylet", "is_err": False}, ignore_prefix=False
    )
    oom = {"lines": ["A worker died or was killed while executing a task"], "pid": "raylet"}
    worker.print_to_stdstream({**oom, "is_err": True}, True)
    assert printed == [
        ({"lines": [other], "pid": "raylet", "is_err": False}, False),
        ({**oom, "is_err": True}, True),
    ]
