#!/usr/bin/env bash
# Device call A (one warm multi-GPU machine): keep the first half of SmolLM2's GGUF for call B, run the
# single-GPU tests and benchmarks side by side on separate GPUs. Usage: bash eval/gpu/stage_a.sh
set -u
source eval/gpu/env.sh
mkdir -p /tmp/gguf && cp .gpu/a/* /tmp/gguf/ 2>/dev/null
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/cards.txt"
python3 -c "import torch,transformers,triton;print(torch.__version__,transformers.__version__,triton.__version__)" >> "$OUT/cards.txt"
last=$(( $(nvidia-smi -L | wc -l) - 1 ))
( CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kv_gpu.py \
    tests/test_attention_triton.py tests/test_attention_with_cache.py tests/test_attention_interface.py \
    tests/test_eval_gpu.py > "$OUT/gpu_tests.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=$(( last > 0 ? 1 : 0 )) timeout 420 python3 eval/bench_kv.py --random-shape llama-1b \
    --contexts 1024,4096,8192 --batch-sizes 1,8 --new-tokens 64 --repeats 3 --warmup 1 \
    --device cuda --dtype bfloat16 --out /tmp/r/bench_kv_h100 \
    > /tmp/bench_kv.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=$last timeout 420 python3 eval/bench_decode_attention.py --out /tmp/r/decode_attention_h100 \
    > /tmp/bench_attn.log 2>&1 ) &
wait
cat /tmp/bench_kv.log /tmp/bench_attn.log > "$OUT/bench.log"
tar czf "$OUT/stage_a.tgz" -C /tmp/r . 2>/dev/null
tail -3 "$OUT/gpu_tests.log"; tail -25 "$OUT/bench.log"
