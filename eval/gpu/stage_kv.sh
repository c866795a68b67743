#!/usr/bin/env bash
# Device call (one warm multi-GPU machine): single-GPU KV/attention/precision checks side by side on separate
# GPUs, keeping the first half of SmolLM2's GGUF for the next call. Usage: bash eval/gpu/stage_kv.sh [e2e args...]
set -u
source eval/gpu/env.sh
mkdir -p /tmp/gguf /tmp/r && cp .gpu/a/* /tmp/gguf/ 2>/dev/null
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/cards.txt"
python3 -c "import torch,transformers,triton;print(torch.__version__,transformers.__version__,triton.__version__)" >> "$OUT/cards.txt"
tests=$(ls tests/test_kv_gpu.py tests/test_attention_triton.py tests/test_attention_with_cache.py \
    tests/test_attention_interface.py tests/test_kv_static*.py 2>/dev/null)
( CUDA_VISIBLE_DEVICES=0 timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider $tests \
    > "$OUT/gpu_tests_kv.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 480 python3 eval/bench_kv_e2e.py --contexts 4096,32768 --batch-sizes 1,8 \
    --warmup 16 --time-budget-s 420 --compile-budget-s 200 "$@" --out /tmp/r/bench_kv_e2e_h100 \
    > "$OUT/bench_kv_e2e.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2 timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_precision_gpu.py \
    > "$OUT/gpu_tests_precision.log" 2>&1;
  CUDA_VISIBLE_DEVICES=2 timeout 200 python3 eval/diag_precision_graph.py --out /tmp/r/precision_diag_h100 \
    > "$OUT/diag_precision.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=3 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 420 python3 eval/oom_survival.py \
    --out /tmp/r/oom_survival_h100 > "$OUT/oom_survival.log" 2>&1 ) &
wait
tar czf "$OUT/stage_kv.tgz" -C /tmp/r . 2>/dev/null
for f in "$OUT"/*.log; do echo "== $f"; tail -6 "$f"; done
