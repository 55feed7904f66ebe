#!/usr/bin/env bash
# The whole test suite, as `make test` runs it: the integration tests in the foreground (one pytest
# process around the session's Ray, moto_server and mlflow server) and, beside them, the unit tests
# on two pytest-xdist workers (each its own process: no shared Ray or servers).
#
# Why beside and not after: the integration half keeps ~1.5 of this machine's 2 cores busy on
# average (it waits on processes, sockets and Ray), and the unit half needs ~530 CPU-seconds. The
# unit tests run at nice 19, the lowest priority: Ray starts its workers at nice 15, so at nice 10
# the unit tests took CPU from the integration tests' Ray workers instead of only the idle share.
# (docs/benchmarks.md, "The test suite's wall time", has the figures.)
#
# Both halves always run to the end; the unit half's output follows the integration half's. Each
# half's pytest exit 5 (no tests collected) is a failure; the first non-zero status is the result.
#
#   tests/run.sh [PYTHON]      (default: .venv/bin/python)
#   KEEPER_TEST_SERIAL=1 tests/run.sh     the two halves one after the other, as before
set -uo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
unit=(tests/unit -n 2)
integration=(tests/integration)

check() {  # check NAME RC: print a failure line for 5 (nothing collected), return the status
  if [ "$2" -eq 5 ]; then
    echo "pytest collected no tests in $1: a failure" >&2
    return 1
  fi
  return "$2"
}

if [ "${KEEPER_TEST_SERIAL:-0}" = 1 ]; then
  "$py" -m pytest "${unit[@]}"
  check tests/unit $?
  urc=$?
  "$py" -m pytest "${integration[@]}"
  check tests/integration $?
  irc=$?
else
  log="$(mktemp -t keeper-unit.XXXXXX)"
  # Its own session, so that an interrupt stops the xdist workers too.
  setsid nice -n 19 "$py" -m pytest "${unit[@]}" > "$log" 2>&1 &
  unit_pid=$!
  trap 'kill -TERM -- -"$unit_pid" 2>/dev/null; exit 130' INT TERM
  echo "== unit tests running beside the integration tests (nice 19); their report follows"
  "$py" -m pytest "${integration[@]}"
  check tests/integration $?
  irc=$?
  wait "$unit_pid"
  urc=$?
  trap - INT TERM
  echo "== unit tests (tests/unit -n 2)"
  cat "$log"
  rm -f "$log"
  check tests/unit "$urc"
  urc=$?
fi
[ "$urc" -ne 0 ] && exit "$urc"
exit "$irc"
