#!/usr/bin/env bash
# Start a real multi-node Ray cluster on this machine: a head and worker nodes, each its own
# raylet (`ray start --block`) with its own resources, token authentication on.
#
#   clusters/local/start-cluster.sh                        # head + workers `cpu` and `gpu`
#   RAY=.venv/bin/ray clusters/local/start-cluster.sh      # use the venv's ray
#   KEEPER_WORKERS="cpu:keeper_cpu_node gpu:keeper_gpu_node gpu2:keeper_gpu_node" \
#       clusters/local/start-cluster.sh                    # a third worker of the gpu type
#
# Then paste the printed `export` lines. Stop it with clusters/local/stop-cluster.sh (all nodes,
# or the ones named: `stop-cluster.sh gpu` takes one worker node away, as a lost machine would).
#
# What it is for: checking placement and failure handling before a real cluster. The worker named
# `gpu` offers the custom resource keeper_gpu_node, which stands in for a GPU node type: `keeper
# embed ... actor_resources='{keeper_gpu_node: 1}'` puts the model actors there only (on a real
# cluster ask for num_gpus_per_worker=1 instead), while decode tasks spread over every node.
# Every node shares this machine's cores, so more nodes add no throughput here.
#
# Settings (environment):
#   RAY                  ray executable (default: ray on PATH)
#   RAY_AUTH_TOKEN       token to use; if unset, `ray get-auth-token --generate` (~/.ray/auth_token)
#   KEEPER_CLUSTER_DIR   state: pid and log of each node, its Ray temp dir ray-NAME (default /tmp/kc-$UID;
#                        keep it short: Ray's unix socket paths must stay under 107 characters)
#   RAY_GCS_PORT         head's GCS port (default 6390)
#   RAY_DASHBOARD_PORT   dashboard + job API port (default 8275), on 127.0.0.1 only
#   KEEPER_PORT_BASE     node i (head = 0) takes ports BASE+20i .. BASE+20i+9 (default 47000) and
#                        worker ports WORKER_BASE+200i .. +199: several raylets on one host must
#                        not race for Ray's default ports
#   KEEPER_WORKER_PORT_BASE  WORKER_BASE (default 30000, below the kernel's ephemeral ports)
#   HEAD_CPUS            CPUs the head offers (default 1)
#   WORKER_CPUS          CPUs each worker offers (default 1)
#   OBJECT_STORE_MB      object store per node (default 300)
#   KEEPER_WORKERS       worker nodes as NAME:RESOURCE pairs (default "cpu:keeper_cpu_node
#                        gpu:keeper_gpu_node"); each offers 1 of its RESOURCE and 1 of
#                        keeper_node_NAME (the head: keeper_node_head), to place work on one node
set -euo pipefail

RAY="${RAY:-ray}"
DIR="${KEEPER_CLUSTER_DIR:-/tmp/kc-$(id -u)}"
GCS_PORT="${RAY_GCS_PORT:-6390}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8275}"
PORT_BASE="${KEEPER_PORT_BASE:-47000}"
WORKER_BASE="${KEEPER_WORKER_PORT_BASE:-30000}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
STORE_BYTES=$(( ${OBJECT_STORE_MB:-300} * 1024 * 1024 ))
WORKERS="${KEEPER_WORKERS:-cpu:keeper_cpu_node gpu:keeper_gpu_node}"

if ls "$DIR"/*.pid >/dev/null 2>&1; then
    echo "start-cluster.sh: $DIR already holds a cluster's pid files; stop it first:" >&2
    echo "  KEEPER_CLUSTER_DIR=$DIR clusters/local/stop-cluster.sh" >&2
    exit 1
fi
mkdir -p "$DIR"
chmod 700 "$DIR"

# Token auth on, the token, and this ray's python first on PATH (shared with start-head.sh).
# shellcheck source=clusters/local/ray-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ray-env.sh"

# node_ports INDEX: the per-node ports, so raylets on one host never race for Ray's defaults.
node_ports() {
    local b=$(( PORT_BASE + 20 * $1 )) w=$(( WORKER_BASE + 200 * $1 ))
    echo --node-manager-port $b --object-manager-port $(( b + 1 )) \
        --dashboard-agent-listen-port $(( b + 2 )) --dashboard-agent-grpc-port $(( b + 3 )) \
        --metrics-export-port $(( b + 4 )) --runtime-env-agent-port $(( b + 5 )) \
        --min-worker-port $w --max-worker-port $(( w + 199 ))
}

# start_node NAME ARGS...: one `ray start --block` in its own session (process group), so
# stop-cluster.sh can end exactly this node. Each node has a temp dir of its own, as on separate
# machines: in a shared one, every node's runtime-env agent unpacks a job's working_dir into the
# same folder, and one that unpacks it after another (it first deletes the folder) pulls it from
# under the processes already running there (a job driver's cwd gone mid-run).
start_node() {
    local name="$1"
    shift
    setsid "$RAY" start --block --node-ip-address 127.0.0.1 --temp-dir "$DIR/ray-$name" \
        --object-store-memory "$STORE_BYTES" --disable-usage-stats "$@" \
        >"$DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
}

# wait_node NAME: until the node's `ray start` says "Ray runtime started." (it says so only once
# the GCS lists the node: Ray's Node() waits for its registration), or its `ray start` died (its
# log says why). Polled in its log, 5 times a second: a `ray status` per poll would start a
# Python process (~2 s here) each time and compete with the node starting.
wait_node() {
    local name="$1" pid
    pid=$(cat "$DIR/$name.pid")
    for _ in $(seq 600); do
        if grep -q "Ray runtime started" "$DIR/$name.log" 2>/dev/null; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "start-cluster.sh: node $name exited; its log:" >&2
            tail -20 "$DIR/$name.log" >&2
            return 1
        fi
        sleep 0.2
    done
    echo "start-cluster.sh: node $name not up after 120 s (log: $DIR/$name.log)" >&2
    return 1
}

# shellcheck disable=SC2046  # node_ports is a list of flags
start_node head --head --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port $(( PORT_BASE + 6 )) \
    --num-cpus "$HEAD_CPUS" --resources '{"keeper_node_head": 1}' $(node_ports 0)
wait_node head

i=0
for spec in $WORKERS; do
    i=$(( i + 1 ))
    name="${spec%%:*}"
    resource="${spec#*:}"
    # shellcheck disable=SC2046
    start_node "$name" --address "127.0.0.1:$GCS_PORT" --num-cpus "$WORKER_CPUS" \
        --resources "{\"$resource\": 1, \"keeper_node_$name\": 1}" $(node_ports "$i")
    wait_node "$name"   # one at a time: a node registers before the next starts
done

url="http://127.0.0.1:${DASHBOARD_PORT}"
wait_job_api "$url"   # the job API can lag the GCS by a few seconds

cat <<EOF
Ray cluster up: head + $i worker node(s) [$WORKERS], token auth on, state in $DIR.

  export RAY_AUTH_MODE=token
  ${RAY_TOKEN_HINT}
  export RAY_API_SERVER_ADDRESS=${url}

Check: ray status --address 127.0.0.1:${GCS_PORT}
Stop one node: KEEPER_CLUSTER_DIR=$DIR clusters/local/stop-cluster.sh gpu
Stop all:      KEEPER_CLUSTER_DIR=$DIR clusters/local/stop-cluster.sh
EOF
