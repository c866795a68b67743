#!/usr/bin/env bash
# Session 8: switch cost from a pageable vs a page-locked host copy (eval/bench_reshard.py), and the GPU tests of the
# sharding path on SmolLM2's real weights. Three calls on one warm 4-GPU machine (64 MiB travel per call, the tracked
# tree included), SmolLM2's GGUF (sha256 b179c952...) split in three pieces under .gpu/s8/p0..p2 (`split -b 33000000`):
#   part a (carry .whl, .gpu/qwen7b_cfg, .gpu/s8/p0): keeps piece 0, then the re-shard bench on the Qwen2.5-7B shape
#          (random weights, bf16) over 4 GPUs, then over 2 (CUDA_VISIBLE_DEVICES=0,1).
#   part p (carry .gpu/s8/p1): keeps piece 1.
#   part b (carry .whl, .gpu/s8/p2, .gpu/qwen7b_cfg): rebuilds SmolLM2 and runs the multi-GPU tests (plans vs one
#          GPU, pinned shards vs pageable ones); SERVE=1 then also serves memory_phases_short at equal concurrency
#          with the cost rule (adaptive and TP4, stage_s5_serve4.sh).
# Usage (repo root): bash eval/gpu/stage_s8_reshard.sh a, then p, then [SERVE=1] ... b
set -u
source eval/gpu/env.sh
case "${1:-}" in
a)
    mkdir -p /tmp/gguf && cp .gpu/s8/p0/* /tmp/gguf/
    timeout 240 torchrun --nproc_per_node 4 --master_port 29741 eval/bench_reshard.py --model .gpu/qwen7b_cfg \
        --random-weights --rounds 2 --out /tmp/r/reshard_4gpu > "$OUT/reshard_4gpu.log" 2>&1
    CUDA_VISIBLE_DEVICES=0,1 timeout 150 torchrun --nproc_per_node 2 --master_port 29742 eval/bench_reshard.py \
        --model .gpu/qwen7b_cfg --random-weights --rounds 2 --out /tmp/r/reshard_2gpu > "$OUT/reshard_2gpu.log" 2>&1
    for f in 4gpu 2gpu; do echo "== $f"; grep -v "Warning\|warn(" "$OUT/reshard_$f.log" | tail -n 16; done ;;
p)
    cp .gpu/s8/p1/* /tmp/gguf/ && ls -la /tmp/gguf; exit 0 ;;
b)
    cat /tmp/gguf/* .gpu/s8/p2/* > /tmp/smol.gguf && sha256sum /tmp/smol.gguf
    python3 -c "from pathlib import Path; from hf_adaptive.models import convert_gguf; convert_gguf(Path('/tmp/smol.gguf'), Path('$SMOL'))" \
        > /tmp/convert.log 2>&1 || { tail -20 /tmp/convert.log; exit 1; }
    HF_ADAPTIVE_TEST_MODEL=$SMOL timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_parallel_gpu.py tests/test_parallel_shard.py > "$OUT/gpu_tests.log" 2>&1
    tail -n 5 "$OUT/gpu_tests.log"
    if [ -n "${SERVE:-}" ]; then
        GPUS=4 CONFIRM_S=0 MODE_TIMEOUT_S=170 WORKER_EXTRA="--rule cost --calibration eval/calibration/parallel_h200x4_qwen7b_served.json --max-batch-per device" \
            bash eval/gpu/stage_s5_serve4.sh adaptive tp4
    fi ;;
*) echo "usage: bash eval/gpu/stage_s8_reshard.sh a|p|b" >&2; exit 2 ;;
esac
tar czf "$OUT/stage_s8_${1}.tgz" -C /tmp/r . 2>/dev/null
