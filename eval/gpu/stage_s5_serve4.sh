#!/usr/bin/env bash
# Session 5: adaptive vs static plans, $TRACE (default eval/traces/memory_phases_short.jsonl: 128 chats at 20/s, then
# 4 documents of 11.5-12.5k tokens at 2/s; call 1 used memory_phases_strict on 4 GPUs, and its adaptive and TP=4 modes
# ran past 180 s). Qwen2.5-7B shape (random weights, .gpu/qwen7b_cfg), bf16, 18 GiB budget per device enforced on the
# allocator: a 12k-token document does not fit a DP replica (DP refuses it); TP holds several. Every mode warms each
# layout it may use before its clock starts (--warmup).
# Usage (repo root, carry .whl and .gpu/qwen7b_cfg), one call per group of modes (10 minutes a call; a mode takes
# 1-3 minutes with start-up):
#   [GPUS=2] [CONFIRM_S=0] [MODE_TIMEOUT_S=175] [WORKER_EXTRA="--dp-short-tokens 320"] \
#       bash eval/gpu/stage_s5_serve4.sh adaptive tp2 pp2
# FIT_OUT=/tmp/r/calib.json also fits a calibration from the call's runs (eval/calibrate_from_serve.py); a next call on
# the same warm machine can serve with it: WORKER_EXTRA="--rule cost --calibration /tmp/r/calib.json".
set -u
source eval/gpu/env.sh
name=${GPUS:-4}gpu_$(IFS=_; echo "$*")
timeout 560 python3 eval/parallel_serve_bench.py --model .gpu/qwen7b_cfg --gpus "${GPUS:-4}" \
    --trace "${TRACE:-eval/traces/memory_phases_short.jsonl}" --time-scale 1.0 --modes "$@" \
    --mode-timeout-s "${MODE_TIMEOUT_S:-200}" --out "/tmp/r/serve_$name" \
    -- --random-weights --device-memory-gb 18 --max-prompt-tokens 13000 --queue-head 16 \
    --cooldown-s 2 --min-dwell-s 3 --confirm-s "${CONFIRM_S:-0.5}" --warmup ${WORKER_EXTRA:-} > "$OUT/serve_$name.log" 2>&1
if [ -n "${FIT_OUT:-}" ]; then  # fit a calibration from this call's runs (on a warm machine /tmp/r persists)
    # A plan the adaptive run used for only a few batches (DP4 on 4 GPUs: 3) has none left after the default 3 warm
    # batches; the fitter then refuses, and this retries with --warm-batches 1 (the .md records the command used).
    for warm in 3 1; do
        python3 eval/calibrate_from_serve.py "/tmp/r/serve_$name" --model .gpu/qwen7b_cfg --device-memory-gb 18 \
            --warm-batches $warm --out "$FIT_OUT" >> "$OUT/serve_$name.log" 2>&1 && cp "$FIT_OUT" "$OUT/" && break
    done
fi
tar czf "$OUT/serve_$name.tgz" -C /tmp/r . 2>/dev/null
grep -v "Loading weights\|frame #\|TCPStore\|should dump" "$OUT/serve_$name.log" | grep -v "^INFO.*random weights" \
    | tail -n 25 | cut -c1-300
cat /tmp/r/serve_$name/serve_bench.md 2>/dev/null | grep -v "^Command"
