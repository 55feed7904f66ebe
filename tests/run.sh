#!/usr/bin/env bash
# The whole test suite, as `make test` runs it: the integration tests in the foreground (one pytest
# process around the session's Ray, moto_server and mlflow server) and, beside them, the unit tests
# on two pytest-xdist workers (each its own process: no shared Ray or servers), and mypy with --mypy.
#
# Why beside and not after: the integration half keeps ~1.5 of this machine's 2 cores busy on
# average (it waits on processes, sockets and Ray), and the unit half needs ~530 CPU-seconds. The
# unit tests run at the lowest priority (below): Ray starts its workers at nice 15, so at nice 10
# the unit tests took CPU from the integration tests' Ray workers instead of only the idle share,
# and at nice 19 still a third of a core where both wanted it.
# (docs/benchmarks.md, "The test suite's wall time", has the figures.)
#
# Both halves always run to the end; the unit half's output follows the integration half's. Each
# half's pytest exit 5 (no tests collected) is a failure; the first non-zero status is the result.
#
#   tests/run.sh [PYTHON [--mypy]]     (default: .venv/bin/python)
#   --mypy   also run the venv's mypy (PYTHON's bin dir) beside the integration tests, at the same
#            low priority; its failure fails the run. `make test` passes it after ruff; `make lint` runs it alone.
#   KEEPER_TEST_SERIAL=1 tests/run.sh     everything one after the other, as before
set -uo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
with_mypy=0
if [ "${2:-}" = --mypy ]; then with_mypy=1; fi
mypy="$(dirname "$py")/mypy"
mrc=0
# The lowest priority there is: Linux's SCHED_IDLE (chrt, util-linux) where it is allowed, and nice 19
# in any case. Against a nice-15 CPU burner on one core, a nice-19 one took 30% of the core and left
# it 69% of its speed alone; under SCHED_IDLE it left it 88% (this machine, 5 s each).
low=(nice -n 19)
if chrt --idle 0 true 2>/dev/null; then low=(chrt --idle 0 nice -n 19); fi
unit=(tests/unit -n 2)
integration=(tests/integration)

check() {  # check NAME RC: print a failure line for 5 (nothing collected), return the status
  if [ "$2" -eq 5 ]; then
    echo "pytest collected no tests in $1: a failure" >&2
    return 1
  fi
  return "$2"
}

beside() {  # beside LOG CMD...: CMD at the low priority in its own session (so that an interrupt
  # stops its children too), its output to LOG; its pid is $!
  local log="$1"
  shift
  setsid "${low[@]}" "$@" > "$log" 2>&1 &
}

report() {  # report TITLE PID LOG: wait for PID, print TITLE and LOG, return PID's status
  wait "$2"
  local rc=$?
  echo "== $1"
  cat "$3"
  rm -f "$3"
  return "$rc"
}

if [ "${KEEPER_TEST_SERIAL:-0}" = 1 ]; then
  if [ "$with_mypy" = 1 ]; then
    "$mypy"
    mrc=$?
  fi
  "$py" -m pytest "${unit[@]}"
  check tests/unit $?
  urc=$?
  "$py" -m pytest "${integration[@]}"
  check tests/integration $?
  irc=$?
else
  ulog="$(mktemp -t keeper-unit.XXXXXX)"
  beside "$ulog" "$py" -m pytest "${unit[@]}"
  unit_pid=$!
  groups=(-"$unit_pid")
  if [ "$with_mypy" = 1 ]; then
    mlog="$(mktemp -t keeper-mypy.XXXXXX)"
    beside "$mlog" "$mypy"
    mypy_pid=$!
    groups+=(-"$mypy_pid")
  fi
  trap 'kill -TERM -- "${groups[@]}" 2>/dev/null; exit 130' INT TERM
  echo "== unit tests running beside the integration tests (${low[*]}); their report follows"
  "$py" -m pytest "${integration[@]}"
  check tests/integration $?
  irc=$?
  if [ "$with_mypy" = 1 ]; then
    report mypy "$mypy_pid" "$mlog"
    mrc=$?
  fi
  report "unit tests (tests/unit -n 2)" "$unit_pid" "$ulog"
  check tests/unit $?
  urc=$?
  trap - INT TERM
fi
if [ "$mrc" -ne 0 ]; then
  echo "mypy failed (exit $mrc)" >&2
  exit "$mrc"
fi
[ "$urc" -ne 0 ] && exit "$urc"
exit "$irc"
