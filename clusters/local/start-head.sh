#!/usr/bin/env bash
# Start a Ray head on this machine with token authentication on.
#
#   clusters/local/start-head.sh                      # from the repo root
#   RAY=.venv/bin/ray clusters/local/start-head.sh    # use the venv's ray
#   RAY_NUM_CPUS=8 RAY_NUM_GPUS=1 clusters/local/start-head.sh --temp-dir /tmp/ray-keeper
#
# Then paste the printed `export` lines and submit with clusters/local/submit-embed.sh.
# Stop it with clusters/local/stop.sh.
#
# Settings (environment):
#   RAY                 ray executable (default: ray on PATH)
#   RAY_AUTH_TOKEN      token to use; if unset, `ray get-auth-token --generate` reads
#                       ~/.ray/auth_token, creating it if missing
#   RAY_NODE_IP         address the head listens on (default 127.0.0.1: this machine only).
#                       Set a LAN address to let other machines join as workers.
#   RAY_GCS_PORT        GCS port (default 6379)
#   RAY_DASHBOARD_PORT  dashboard + job API port (default 8265); always bound to 127.0.0.1
#   RAY_NUM_CPUS        CPUs to offer (default: all, from nproc)
#   RAY_NUM_GPUS        GPUs to offer (default: Ray autodetects)
# Any arguments are passed on to `ray start`.
set -euo pipefail

RAY="${RAY:-ray}"
NODE_IP="${RAY_NODE_IP:-127.0.0.1}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
NUM_CPUS="${RAY_NUM_CPUS:-$(nproc)}"

# `ray start` leaves auth off unless RAY_AUTH_MODE=token (or a token already exists): set it,
# with the token, so the head never comes up open; and put this ray's python first on PATH (a
# job's `python -m ...` resolves there). Shared with start-cluster.sh.
# shellcheck source=clusters/local/ray-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ray-env.sh"

gpu_args=()
if [[ -n "${RAY_NUM_GPUS:-}" ]]; then gpu_args=(--num-gpus "$RAY_NUM_GPUS"); fi

# The dashboard also serves the job-submission API (it runs code): keep it on loopback and
# reach it from elsewhere through an SSH tunnel or port-forward, never a public port.
"$RAY" start --head \
    --node-ip-address "$NODE_IP" \
    --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 \
    --dashboard-port "$DASHBOARD_PORT" \
    --num-cpus "$NUM_CPUS" \
    "${gpu_args[@]}" \
    --disable-usage-stats \
    "$@"

# `ray start` returns once the GCS is up; the job API can lag a few seconds behind it.
url="http://127.0.0.1:${DASHBOARD_PORT}"
wait_job_api "$url"

cat <<EOF

Ray head is up (token auth on). In the shell you submit from:

  export RAY_AUTH_MODE=token
  ${RAY_TOKEN_HINT}
  export RAY_API_SERVER_ADDRESS=${url}

(RAY_AUTH_MODE too: the job client sends the token only when it is "token". And
RAY_API_SERVER_ADDRESS, not RAY_ADDRESS: an http:// RAY_ADDRESS breaks ray.init() and
\`ray status\` in that shell.)  Check: ray status --address ${NODE_IP}:${GCS_PORT}

Workers on other machines (only if RAY_NODE_IP is reachable from them), with the same
RAY_AUTH_MODE and RAY_AUTH_TOKEN exported:

  ray start --address ${NODE_IP}:${GCS_PORT}

Stop: clusters/local/stop.sh
EOF
