#!/usr/bin/env bash
# Submit keeper's embed job to the head started by clusters/local/start-head.sh.
#
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...      # printed by start-head.sh
#   (RAY_API_SERVER_ADDRESS, default http://127.0.0.1:8265, picks another head)
#   clusters/local/submit-embed.sh ~/photos /tmp/emb/vit-b-32
#   clusters/local/submit-embed.sh ~/photos /tmp/emb/vit-b-32 model=ViT-B-32:laion2b_s34b_b79k batch_size=256
#
# SRC and DST are read and written by the Ray workers, so local paths must be visible on
# every node (one machine: any path; several: a shared mount, or use s3:// prefixes).
# Extra key=value arguments override packages/train/configs/embed.yaml.
#
# What runs: from the repo root,
#   ray job submit --address http://127.0.0.1:8265 --working-dir . \
#     --runtime-env-json '{"py_modules": [...keeper_core, ...keeper_train], "excludes": [...]}' \
#     -- python -m keeper_train.jobs.embed --config packages/train/configs/embed.yaml \
#        input=SRC output=DST ray_address=auto [key=value ...]
# --working-dir ships the repo (minus .gitignore'd files and `excludes`) so the relative
# --config path resolves; py_modules puts this checkout's keeper_core/keeper_train first on
# the workers' PYTHONPATH. Third-party dependencies (torch, open_clip, ...) must already be
# installed where the head and workers run (here: the venv that runs `ray start`).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 SRC DST [key=value ...]" >&2
    exit 2
fi
src="$1"
dst="$2"
shift 2

if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    echo "submit-embed.sh: RAY_AUTH_TOKEN is not set; export the lines start-head.sh printed" >&2
    exit 2
fi
# The job client only sends the token when it believes auth is on.
export RAY_AUTH_MODE=token

# Local folders: make them absolute, since the job runs in a copy of the working dir.
if [[ "$src" != *://* && -e "$src" ]]; then src="$(cd "$(dirname "$src")" && pwd)/$(basename "$src")"; fi
if [[ "$dst" != *://* ]]; then
    mkdir -p "$dst"
    dst="$(cd "$dst" && pwd)"
fi

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

exec "${RAY:-ray}" job submit \
    --address "${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" \
    --working-dir . \
    --runtime-env-json '{"py_modules": ["packages/core/src/keeper_core", "packages/train/src/keeper_train"], "excludes": [".git", "keeper-demo", "benchmarks/results"]}' \
    -- python -m keeper_train.jobs.embed --config packages/train/configs/embed.yaml \
    input="$src" output="$dst" ray_address=auto "$@"
