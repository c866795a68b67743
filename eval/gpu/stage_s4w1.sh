#!/usr/bin/env bash
# Session-4 device call 1 (one 2-GPU H100 machine, one job per GPU):
#  GPU0: compiled precision benchmark on the Llama-3.1-8B shape (random weights; weights dominate the step there),
#        replaying the Qwen2.5-Coder-1.5B translation schedule recorded over 12 verses spread through Matthew;
#  GPU1: the same replay on Qwen2.5-Coder-1.5B's own shape, then the GPU tests of precision and the static KV cache.
# Usage (repo root, carry .whl and .gpu/qwen_cfg): bash eval/gpu/stage_s4w1.sh
set -u
source eval/gpu/env.sh
SCHED=eval/data/precision_schedule_qwen2.5-coder-1.5b_translate_stride40.json
( CUDA_VISIBLE_DEVICES=0 timeout 540 python3 eval/bench_precision.py --shape llama-3.1-8b --compile-only \
    --skip-controller --high 0.9 0.75 0.5 --schedule $SCHED --out /tmp/r/precision_compiled_8b_h100 \
    > "$OUT/precision_8b.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 330 python3 eval/bench_precision.py --config-dir .gpu/qwen_cfg --compile-only \
    --skip-controller --high 0.9 0.75 0.5 --schedule $SCHED --out /tmp/r/precision_compiled_qwen_stride40_h100 \
    > "$OUT/precision_qwen.log" 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 180 python3 -m pytest -q -m "gpu and not multigpu" -p no:cacheprovider \
    tests/test_precision_gpu.py tests/test_kv_static.py > "$OUT/gpu_tests.log" 2>&1 ) &
wait
tar czf "$OUT/s4w1.tgz" -C /tmp/r . 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; tail -n 14 "$f" | cut -c1-300; done
