#!/usr/bin/env bash
# Device call (same warm 4-GPU machine, right after stage_kv.sh): rebuild SmolLM2 from the two GGUF halves, then
# the parallel-plan equivalence on 2 and 4 GPUs and the mixed-trace serving benchmark (every static plan and the
# adaptive engine, default and cost-aware rule) on 2 GPUs. Usage: bash eval/gpu/stage_parallel.sh
set -u
source eval/gpu/env.sh
cat /tmp/gguf/* .gpu/b/* > /tmp/smol.gguf && sha256sum /tmp/smol.gguf
python3 -c "from pathlib import Path; from hf_adaptive.models import convert_gguf; convert_gguf(Path('/tmp/smol.gguf'), Path('$SMOL'))" \
    > /tmp/convert.log 2>&1 || { tail -20 /tmp/convert.log; exit 1; }
mkdir -p /tmp/r
( CUDA_VISIBLE_DEVICES=0,1 timeout 470 python3 eval/parallel_serve_bench.py --model $SMOL --gpus 2 \
    --trace eval/traces/mixed_small.jsonl --time-scale 0.5 --calibration eval/calibration/parallel_h100x2.json \
    --out /tmp/r/parallel_serve_h100x2 -- --cooldown-s 1 --min-dwell-s 3 --confirm-s 0.5 > /tmp/serve2.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2,3 timeout 200 torchrun --nproc_per_node 2 --master_port 29711 eval/parallel_equivalence.py \
    --model $SMOL --out /tmp/r/parallel_equivalence_h100x2 > /tmp/eq2.log 2>&1 ) &
wait
timeout 200 torchrun --nproc_per_node 4 --master_port 29712 eval/parallel_equivalence.py --model $SMOL \
    --out /tmp/r/parallel_equivalence_h100x4 > /tmp/eq4.log 2>&1
for f in serve2 eq2 eq4; do echo "== $f"; tail -12 /tmp/$f.log 2>/dev/null; done > "$OUT/stage_parallel.log"
tar czf "$OUT/stage_parallel.tgz" -C /tmp/r . ; cat "$OUT/stage_parallel.log"
