#!/usr/bin/env bash
# Device call (one 4-GPU H100 machine, jobs side by side on separate GPUs): the compile-friendly adaptive KV cache
# (GPU tests, end-to-end decode vs DynamicCache / StaticCache+compile / QuantizedCache at 4k b1 and 32k b8, more
# contexts for the plot), OOM survival at a 7 GiB cap, the precision benchmark and Qwen2.5-1.5B speed (random
# weights of its real config). Usage: bash eval/gpu/stage_wave2.sh
set -u
source eval/gpu/env.sh
mkdir -p /tmp/r
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/cards.txt"
E2E="python3 eval/bench_kv_e2e.py --warmup 16 --repeats 3 --compile-budget-s 330"
( CUDA_VISIBLE_DEVICES=0 timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kv_static.py \
    tests/test_attention_triton.py > "$OUT/gpu_tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 80 python3 eval/bench_decode_attention.py --contexts 4096 --batches 8 --bits 4 \
    --sweep --out /tmp/r/decode_attention_sweep_h100 > "$OUT/sweep.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 140 python3 eval/bench_static_switch.py --steps 300 --switch-at 40 \
    --out /tmp/r/static_switch_h100 > "$OUT/static_switch.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 350 $E2E --time-budget-s 320 --contexts 4096 --batch-sizes 1 \
    --caches dynamic,static_compiled,compiled4,quanto4,hqq4,fused4,compiled8,compiled16 \
    --out /tmp/r/bench_kv_e2e_h100_4k_b1 > "$OUT/e2e_4k_b1.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2 timeout 260 $E2E --time-budget-s 230 --contexts 32768 --batch-sizes 8 \
    --caches dynamic,static_compiled,compiled4,quanto4,fused4 --out /tmp/r/bench_kv_e2e_h100_32k_b8 \
    > "$OUT/e2e_32k_b8.log" 2>&1
  CUDA_VISIBLE_DEVICES=2 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 80 python3 eval/oom_survival.py \
    --cap-gib 7 --out /tmp/r/oom_survival_h100_7gib > "$OUT/oom_7gib.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=3 timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_precision_gpu.py \
    > "$OUT/gpu_tests_precision.log" 2>&1
  CUDA_VISIBLE_DEVICES=3 timeout 180 python3 eval/bench_precision.py --out /tmp/r/precision_h100 \
    > "$OUT/precision.log" 2>&1
  CUDA_VISIBLE_DEVICES=3 timeout 110 python3 eval/speed.py --device cuda --model .gpu/qwen_cfg --random-weights \
    --settings "baseline;kv8;kv4" --batch-sizes 1,8 --prompt-tokens 1024 --new-tokens 128 --repeats 3 \
    --out /tmp/r/h100_qwen2.5-coder-1.5b_speed > "$OUT/qwen_speed.log" 2>&1 ) &
wait
tar czf "$OUT/wave2.tgz" -C /tmp/r . 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; tail -12 "$f"; done
