#!/usr/bin/env bash
# Stop the Ray head (and any local Ray worker) that clusters/local/start-head.sh started.
#
#   clusters/local/stop.sh
#   RAY=.venv/bin/ray clusters/local/stop.sh
#
# `ray stop` ends every Ray process of this user on this machine, not only this head:
# a `ray.init()` cluster another shell or a test run started goes down too.
# Arguments are passed on to `ray stop` (e.g. --force, --grace-period 30).
set -euo pipefail

"${RAY:-ray}" stop "$@"
