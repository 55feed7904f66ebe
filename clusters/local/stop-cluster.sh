#!/usr/bin/env bash
# Stop the nodes clusters/local/start-cluster.sh started: all of them, or the ones named.
#
#   clusters/local/stop-cluster.sh              # every node, workers first, then the head
#   clusters/local/stop-cluster.sh gpu          # one worker node: its raylet, workers and actors
#   KEEPER_STOP_SIGNAL=KILL clusters/local/stop-cluster.sh cpu   # as a machine that dies: no
#                                                                # goodbye to the GCS
#
# Only this cluster's processes are touched (each node's `ray start --block` process group and
# its descendants: raylet, agents, workers, actors), unlike `ray stop`, which ends every Ray
# process of this user on the machine.
#
# Settings (environment): KEEPER_CLUSTER_DIR (default /tmp/kc-$UID), KEEPER_STOP_SIGNAL (TERM,
# the default, or KILL).
set -euo pipefail

DIR="${KEEPER_CLUSTER_DIR:-/tmp/kc-$(id -u)}"
SIG="${KEEPER_STOP_SIGNAL:-TERM}"

if [[ $# -gt 0 ]]; then
    nodes=("$@")
else
    nodes=()
    for pidfile in "$DIR"/*.pid; do
        [[ -e "$pidfile" ]] || continue
        name="$(basename "$pidfile" .pid)"
        [[ "$name" == head ]] || nodes+=("$name")
    done
    if [[ -e "$DIR/head.pid" ]]; then nodes+=(head); fi
fi
if [[ ${#nodes[@]} -eq 0 ]]; then
    echo "stop-cluster.sh: no nodes recorded in $DIR" >&2
    exit 0
fi

# Processes of one node: its `ray start` process group and every descendant (Ray's workers and
# actors run in process groups of their own, as children of the node's raylet).
descendants() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null || true); do
        echo "$child"
        descendants "$child"
    done
}
node_pids() {
    { pgrep -g "$1" 2>/dev/null || true; descendants "$1"; } | sort -u
}
alive() {
    local pid out=""
    for pid in "$@"; do if kill -0 "$pid" 2>/dev/null; then out="$out $pid"; fi; done
    echo "$out"
}

status=0
for name in "${nodes[@]}"; do
    pidfile="$DIR/$name.pid"
    if [[ ! -e "$pidfile" ]]; then
        echo "stop-cluster.sh: no node $name in $DIR" >&2
        status=1
        continue
    fi
    pgid="$(cat "$pidfile")"
    # Collected once, before any signal: a killed raylet's workers lose their parent.
    # shellcheck disable=SC2207
    pids=($(node_pids "$pgid"))
    if [[ ${#pids[@]} -gt 0 ]]; then
        kill -s "$SIG" "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 40); do
            # shellcheck disable=SC2046
            [[ -z "$(alive "${pids[@]}")" ]] && break
            sleep 0.5
        done
        # shellcheck disable=SC2046
        left="$(alive "${pids[@]}")"
        # shellcheck disable=SC2086
        if [[ -n "$left" ]]; then kill -s KILL $left 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
    echo "stopped node $name"
done
exit $status
