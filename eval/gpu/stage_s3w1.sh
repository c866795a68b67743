#!/usr/bin/env bash
# Session-3 device call 1 (one 4-GPU H100 machine, jobs side by side, one GPU each):
#  GPU0: precision benchmark with compiled steps (Llama-3.2-1B shape), the single-GPU GPU tests, switch cost;
#  GPU1-3: the full bench_kv_e2e grid for the issue-3 plot (contexts 1k/4k, 16k, 32k; batch 1 and 8), every cache
#  in one run per context, cuDNN SDPA on for StaticCache+compile, kernel profiles of the compiled configs.
# Usage (repo root, carry .whl): bash eval/gpu/stage_s3w1.sh
set -u
source eval/gpu/env.sh
CACHES=dynamic,static_compiled,compiled16,compiled8,compiled4,quanto4,hqq4
E2E="python3 eval/bench_kv_e2e.py --warmup 16 --repeats 3 --compile-budget-s 900 --profile-steps 8 --caches $CACHES"
( CUDA_VISIBLE_DEVICES=0 timeout 280 python3 eval/bench_precision.py --compile-only --compile-batch-sizes 1 8 \
    --high 0.9 0.5 --out /tmp/r/precision_compiled_h100 > "$OUT/precision_compiled.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m "gpu and not multigpu" -p no:cacheprovider \
    tests/test_kv_static.py tests/test_attention_triton.py tests/test_kv_gpu.py tests/test_precision_gpu.py \
    tests/test_attention_interface.py tests/test_attention_with_cache.py tests/test_kv_fused_attention.py \
    > "$OUT/gpu_tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 eval/bench_static_switch.py --steps 300 --switch-at 40 \
    --out /tmp/r/static_switch_h100 > "$OUT/static_switch.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 540 $E2E --time-budget-s 500 --contexts 1024,4096 --batch-sizes 1,8 \
    --out /tmp/r/e2e_1k4k > "$OUT/e2e_1k4k.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2 timeout 540 $E2E --time-budget-s 500 --contexts 16384 --batch-sizes 1,8 \
    --out /tmp/r/e2e_16k > "$OUT/e2e_16k.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=3 timeout 540 $E2E --time-budget-s 500 --contexts 32768 --batch-sizes 1,8 \
    --out /tmp/r/e2e_32k > "$OUT/e2e_32k.log" 2>&1 ) &
wait
tar czf "$OUT/s3w1.tgz" -C /tmp/r . 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; tail -n 14 "$f" | cut -c1-300; done
