#!/usr/bin/env bash
# Session-3 device call 2 (one 4-GPU H100 machine, one job per GPU):
#  GPU0-2: the bench_kv_e2e grid for the issue-3 plot (1k/4k, 16k, 32k; batch 1 and 8; every cache in one run per
#  context; cuDNN SDPA on for StaticCache+compile; kernel profiles of the compiled configs);
#  GPU3: GPU tests (static cache with fixed-signature views, precision, pressure cap), the 16->8->4 switch cost,
#  then the compiled precision benchmark on Qwen2.5-Coder-1.5B's shape (random weights, Qwen's recorded schedule).
# Usage (repo root, carry .whl and .gpu/qwen_cfg): bash eval/gpu/stage_s3w2.sh
set -u
source eval/gpu/env.sh
CACHES=dynamic,static_compiled,compiled16,compiled8,compiled4,quanto4,hqq4
E2E="python3 eval/bench_kv_e2e.py --warmup 16 --repeats 3 --compile-budget-s 900 --profile-steps 8 --caches $CACHES"
( CUDA_VISIBLE_DEVICES=0 timeout 540 $E2E --time-budget-s 480 --contexts 1024,4096 --batch-sizes 1,8 \
    --out /tmp/r/e2e_1k4k > "$OUT/e2e_1k4k.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 540 $E2E --time-budget-s 480 --contexts 16384 --batch-sizes 1,8 \
    --out /tmp/r/e2e_16k > "$OUT/e2e_16k.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2 timeout 540 $E2E --time-budget-s 480 --contexts 32768 --batch-sizes 1,8 \
    --out /tmp/r/e2e_32k > "$OUT/e2e_32k.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=3 timeout 130 python3 -m pytest -q -m "gpu and not multigpu" -p no:cacheprovider \
    tests/test_kv_static.py tests/test_kv_fused_attention.py tests/test_precision_gpu.py tests/test_kv_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=3 timeout 110 python3 eval/bench_static_switch.py --steps 400 --switch-at 40 \
    --out /tmp/r/static_switch_h100 > "$OUT/static_switch.log" 2>&1
  CUDA_VISIBLE_DEVICES=3 timeout 290 python3 eval/bench_precision.py --config-dir .gpu/qwen_cfg --compile-only \
    --high 0.9 0.75 0.5 --schedule eval/data/precision_schedule_qwen2.5-coder-1.5b_translate.json \
    --out /tmp/r/precision_compiled_qwen_h100 > "$OUT/precision_qwen.log" 2>&1 ) &
wait
tar czf "$OUT/s3w2.tgz" -C /tmp/r . 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; tail -n 12 "$f" | cut -c1-300; done
