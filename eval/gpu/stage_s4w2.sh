#!/usr/bin/env bash
# Session-4 device call 2 (one 2-GPU machine, one job per GPU): the Triton int4 kernel.
#  GPU0: compiled precision benchmark on the Llama-3.1-8B shape with the Triton int4 tier (replaying the stride-40
#        Qwen translation schedule), as call 1 did with tinygemm;
#  GPU1: per-linear kernel benchmark (bf16 / tinygemm / Triton), the Qwen-shape precision benchmark with the Triton
#        tier, then the precision and static-KV GPU tests (now on the Triton int4 tier).
# Usage (repo root, carry .whl and .gpu/qwen_cfg): bash eval/gpu/stage_s4w2.sh
set -u
source eval/gpu/env.sh
SCHED=eval/data/precision_schedule_qwen2.5-coder-1.5b_translate_stride40.json
( CUDA_VISIBLE_DEVICES=0 timeout 450 python3 eval/bench_precision.py --shape llama-3.1-8b --compile-only \
    --int4-kernel triton --skip-controller --high 0.9 0.75 0.5 --schedule $SCHED \
    --out /tmp/r/precision_compiled_8b_triton > "$OUT/precision_8b_triton.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 150 python3 eval/bench_int4_kernels.py --out /tmp/r/int4_kernels > "$OUT/int4_kernels.log" 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 300 python3 eval/bench_precision.py --config-dir .gpu/qwen_cfg --compile-only \
    --int4-kernel triton --skip-controller --high 0.9 0.75 0.5 --schedule $SCHED \
    --out /tmp/r/precision_compiled_qwen_triton > "$OUT/precision_qwen_triton.log" 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 110 python3 -m pytest -q -m "gpu and not multigpu" -p no:cacheprovider \
    tests/test_precision_gpu.py tests/test_kv_static.py > "$OUT/gpu_tests.log" 2>&1 ) &
wait
tar czf "$OUT/s4w2.tgz" -C /tmp/r . 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; tail -n 14 "$f" | cut -c1-300; done
