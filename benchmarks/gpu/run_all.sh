#!/usr/bin/env bash
# On the GPU device machine, after setup_device.sh: keeper's GPU checks, most valuable first, each
# under a `timeout` cut from what is left of the budget, going on after one fails.
#
#   bash benchmarks/gpu/setup_device.sh && bash benchmarks/gpu/run_all.sh [budget_s=540]
#   CHECKS=finetune,cascade bash benchmarks/gpu/run_all.sh 200   # only these (a second call)
#
# Writes under $OUT (what the run tool brings back: at most 8 files, so each check's log is folded
# into logs/all.log once it ends):
#   summary.txt        one line per check: name, status, rc, seconds, limit, command
#   <check>.json       each benchmark's own JSON (embed_gpu, serve, decode, finetune, cascade)
#   logs/all.log       setup's and every check's output, in order
#   logs/<check>.log   the check running when the run was cut short, if it was
#
# Sizes: each check's arguments below, or the environment's EMBED_GPU_ARGS, SERVE_ARGS,
# DECODE_ARGS, FINETUNE_ARGS, CASCADE_ARGS in their place. CHECKS (comma-separated names) runs
# only those, in the order below (a second call, with its own $OUT, for what the first skipped). A check starts only if at least its minimum is
# left; it gets min(its cap, what is left less RESERVE_S).
set -uo pipefail  # no -e: one failing check must not stop the others

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
BUDGET=${1:-540}
RESERVE_S=10  # folding logs and writing the summary after the last check
ENV_DIR=${KEEPER_GPU_ENV:-$HOME/keeper-gpu-env}
CACHE=${KEEPER_GPU_CACHE:-/tmp/keeper-bench}  # generated corpora, shared by the benchmarks
START=$SECONDS

[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "usage: run_all.sh [budget_seconds]" >&2; exit 2; }
[[ -n ${OUT:-} ]] || { echo "run_all.sh: OUT is not set (the run tool sets it)" >&2; exit 2; }
[[ -f $ENV_DIR/env.sh ]] || { echo "run_all.sh: run setup_device.sh first" >&2; exit 2; }
# shellcheck source=/dev/null
source "$ENV_DIR/env.sh"
mkdir -p "$OUT/logs" "$CACHE"
SUMMARY=$OUT/summary.txt
ALL_LOG=$OUT/logs/all.log
PY=${PYTHON:-python3}
CORES=$(getconf _NPROCESSORS_ONLN)  # not nproc: it reports OMP_NUM_THREADS when set

echo "# run_all.sh $BUDGET s budget, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), $CORES cores" \
    >"$SUMMARY"
if [[ -f $OUT/logs/setup.log ]]; then
    { echo "===== setup"; cat "$OUT/logs/setup.log"; } >>"$ALL_LOG"
    rm -f "$OUT/logs/setup.log"
fi

elapsed() { echo $((SECONDS - START)); }
want() { [[ -z ${CHECKS:-} || ",$CHECKS," == *",$1,"* ]]; }

# check NAME CAP_S MIN_S COMMAND...: runs COMMAND under a timeout, logs it (to logs/NAME.log,
# folded into logs/all.log after, or to $LOG_TO), records one line in the summary.
check() {
    local name=$1 cap=$2 min=$3
    shift 3
    local left=$((BUDGET - $(elapsed) - RESERVE_S))
    local limit=$((cap < left ? cap : left))
    if ((limit < min)); then
        printf '%-10s skipped   %4s s left, needs %s s: %s\n' "$name" "$left" "$min" "$*" \
            | tee -a "$SUMMARY"
        return
    fi
    local log=${LOG_TO:-$OUT/logs/$name.log} t0=$SECONDS rc status
    echo "[run_all $(elapsed)s] $name (limit ${limit}s): $*"
    # -k: a benchmark that ignores SIGTERM (a Ray driver mid-shutdown) is killed 10 s later.
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAILED ;;
    esac
    printf '%-10s %-8s rc=%-3s %4s s (limit %s s): %s\n' "$name" "$status" "$rc" \
        "$((SECONDS - t0))" "$limit" "$*" | tee -a "$SUMMARY"
    # No `ray stop` after a failure: it would end every Ray on the machine, not only this one's.
    # A killed driver's local Ray goes with it (Ray's raylet and GCS die with their parent).
    [[ $status == ok ]] || tail -n 25 "$log" | sed "s/^/  $name| /"
    [[ -n ${LOG_TO:-} ]] && return  # a log of its own, kept as it is
    { echo "===== $name: $status rc=$rc: $*"; cat "$log"; } >>"$ALL_LOG"
    rm -f "$log"
}

# shellcheck disable=SC2206  # the *_ARGS overrides are word lists
{
    # (e) the machine, first: it costs nothing and dates every figure after it.
    # (into logs/all.log: a run brings back at most 8 files, and the checks write 7 beside it)
    want nvidia-smi && check nvidia-smi 30 5 \
        bash -c "nvidia-smi && nvidia-smi -q -d CLOCK,MEMORY,POWER"

    # Colour conversion on the device equals littlecms (MatrixProfile.to_srgb; CI runs it on CPU
    # tensors only). ~15 s, output in logs/all.log.
    want icc && check icc 60 20 "$PY" benchmarks/gpu/icc_check.py --device cuda

    # (d) CLIP embedding on the GPU (issue 14's goals): the ceiling, then per image size the
    # rows in order of value (GPU decode in the actor, CPU decode tasks, the variants). Its own
    # --budget-s stays 20 s under the cap (imports come before its clock starts); what does not
    # fit is recorded as "not measured: budget".
    if want embed_gpu; then
        args=(${EMBED_GPU_ARGS:---budget-s 220})
        check embed_gpu 240 60 "$PY" benchmarks/embed_gpu.py --out "$OUT/embed_gpu.json" \
            "${args[@]}"
    fi

    # (b) fine-tuning on the GPU: --gpu-only --quick (the Ray Train job with use_gpu on a
    # 40-series corpus, pixel cache on and off, then 2 warm-up + 3 timed steps per method at
    # ViT-B-32 and ViT-L-14 in bf16; the CPU rows are the CPU machines' to measure). On
    # 2026-12-04 the whole --quick ran out of its 300 s in the GPU job, after the CPU rows.
    args=(${FINETUNE_ARGS:---gpu-only --quick --threads "$CORES"})
    want finetune && check finetune 300 120 "$PY" benchmarks/finetune.py --gpu "${args[@]}" \
        --cache "$CACHE" --out "$OUT/finetune.json"

    # (c) the selection cascade on the GPU, small: random ViT-B-32 CLIP, the tiny judge and the
    # ~146 M-parameter random Llava (cpu-small shape) in bf16, 200 candidates. For the
    # Llava-1.5-7B shape: CASCADE_ARGS="--clip ViT-B-32:random --shape llava-1.5-7b
    # --candidates 1000 --vlm-all-limit 100 --repeats 3" (several minutes more).
    args=(${CASCADE_ARGS:---clip ViT-B-32:random --shape cpu-small --candidates 200 --repeats 3})
    want cascade && check cascade 240 60 "$PY" benchmarks/cascade.py --gpu "${args[@]}" \
        --threads "$CORES" --cache "$CACHE" --out "$OUT/cascade.json"

    # Serve and decode were measured on 2026-12-04 (docs/benchmarks.md): after the checks that
    # have no GPU figure yet.
    # Serve with HAProxy in front (`--haproxy`, as `keeper serve --haproxy`: replicas take HTTP
    # directly from HAProxy, no Python proxy): on 2026-12-04 the proxy was the likely bound at
    # concurrency 64 (1.3 cores for 210 req/s); on 2 CPU cores HAProxy gave 1.06x at concurrency
    # 32 over four alternated pairs. Before the plain run, which has a figure.
    if want serve_haproxy; then
        ingress=deployments.KeeperIngress.autoscaling_config
        args=(${SERVE_ARGS:---concurrency 1,64 --duration 10 --warmup 3 --max-batch-size 64
            --keeper-set $ingress.min_replicas=5,$ingress.max_replicas=5})
        check serve_haproxy 200 100 "$PY" benchmarks/serve.py --haproxy \
            --device cuda --quiet-wait 0 --attempts 1 --keeper-config clusters/serve/keeper-gpu.yaml \
            --cache "$CACHE" "${args[@]}" --out "$OUT/serve_haproxy.json"
    fi

    # (f) Serve on the GPU (issue 14: keeper >= 10x a naive FastAPI server at concurrency 64):
    # the GPU config (one encoder replica on the GPU, batches of 64) with five 2-CPU ingress
    # replicas fixed (10 + the encoder's 4 + the ranker's 1 of 16 cores; autoscaling would not
    # settle in a 10 s window), beside the naive server and the offline ceiling on the same GPU.
    # ~150 s: offline 20 s, naive and keeper start-ups, 13 s a concurrency each.
    if want serve; then
        ingress=deployments.KeeperIngress.autoscaling_config
        args=(${SERVE_ARGS:---concurrency 1,64 --duration 10 --warmup 3 --max-batch-size 64
            --keeper-set $ingress.min_replicas=5,$ingress.max_replicas=5})
        check serve 200 100 "$PY" benchmarks/serve.py --device cuda --quiet-wait 0 --attempts 1 \
            --keeper-config clusters/serve/keeper-gpu.yaml --cache "$CACHE" "${args[@]}" \
            --out "$OUT/serve.json"
    fi

    # (a) nvJPEG through GpuDecoder beside PIL and libjpeg-turbo: 48 JPEGs per size, GPU batches
    # of 16 (3 timed batches after a warm-up one); ~60 s, most of it the CPU rows.
    args=(${DECODE_ARGS:---files 48 --repeats 3 --gpu-batch 16})
    want decode && check decode 120 45 "$PY" benchmarks/decode.py "${args[@]}" \
        --out "$OUT/decode.json"
}

echo "# total $(elapsed) s of $BUDGET s" >>"$SUMMARY"
echo "===== summary ($OUT/summary.txt)"
cat "$SUMMARY"
