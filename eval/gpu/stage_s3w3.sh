#!/usr/bin/env bash
# Session-3 device call 3 (one 4-GPU H100 machine, one job per GPU; the host-sensitive KV grid pinned to its own
# CPU cores, every other job to the rest, so concurrent inductor compiles do not slow its host step):
#  GPU0: bench_kv_e2e at 4k then 1k (batch 1 and 8), every cache, leaner host step;
#  GPU1: compiled precision benchmark on Qwen2.5-Coder-1.5B's shape (random weights, Qwen's recorded schedule);
#  GPU2: compiled precision benchmark, Llama-3.2-1B shape, batch 1 (near-tie guard) and 8;
#  GPU3: Qwen2.5-Coder-1.5B decode speed (issue 4; random weights of its config), then the precision GPU tests.
# Usage (repo root, carry .whl and .gpu/qwen_cfg): bash eval/gpu/stage_s3w3.sh
set -u
source eval/gpu/env.sh
REST="taskset -c 16-$(( $(nproc) - 1 ))"
CACHES=dynamic,static_compiled,compiled16,compiled8,compiled4,quanto4,hqq4
( CUDA_VISIBLE_DEVICES=0 timeout 520 taskset -c 0-15 python3 eval/bench_kv_e2e.py --warmup 16 --repeats 3 \
    --compile-budget-s 900 --profile-steps 8 --caches $CACHES --time-budget-s 470 --contexts 4096,1024 \
    --batch-sizes 1,8 --out /tmp/r/e2e_4k1k > "$OUT/e2e_4k1k.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 520 $REST python3 eval/bench_precision.py --config-dir .gpu/qwen_cfg --compile-only \
    --skip-controller --high 0.9 0.75 0.5 --schedule eval/data/precision_schedule_qwen2.5-coder-1.5b_translate.json \
    --out /tmp/r/precision_compiled_qwen_h100 > "$OUT/precision_qwen.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2 timeout 520 $REST python3 eval/bench_precision.py --compile-only --compile-batch-sizes 1 8 \
    --high 0.9 0.5 --out /tmp/r/precision_compiled_h100 > "$OUT/precision_llama.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=3 timeout 260 $REST python3 eval/speed.py --device cuda --model .gpu/qwen_cfg --random-weights \
    --settings "baseline;kv8;kv4" --batch-sizes 1,8 --prompt-tokens 1024 --new-tokens 128 --repeats 3 \
    --out /tmp/r/h100_qwen2.5-coder-1.5b_random_speed > "$OUT/qwen_speed.log" 2>&1
  CUDA_VISIBLE_DEVICES=3 timeout 120 $REST python3 -m pytest -q -m "gpu and not multigpu" -p no:cacheprovider \
    tests/test_precision_gpu.py tests/test_kv_static.py > "$OUT/gpu_tests.log" 2>&1 ) &
wait
tar czf "$OUT/s3w3.tgz" -C /tmp/r . 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; tail -n 12 "$f" | cut -c1-300; done
