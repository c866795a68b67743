#!/usr/bin/env bash
# Device call B (same warm multi-GPU machine, right after stage A): rebuild SmolLM2 from the two GGUF halves,
# convert it once, then run the parallel-plan equivalence (2 and 4 GPUs), the mixed-trace serving benchmark
# and the H100 speed eval side by side. Usage: bash eval/gpu/stage_b.sh
set -u
source eval/gpu/env.sh
cat /tmp/gguf/* .gpu/b/* > /tmp/smol.gguf && sha256sum /tmp/smol.gguf
python3 -c "from pathlib import Path; from hf_adaptive.models import convert_gguf; convert_gguf(Path('/tmp/smol.gguf'), Path('$SMOL'))" \
    > /tmp/convert.log 2>&1 || { tail -20 /tmp/convert.log; exit 1; }
n=$(nvidia-smi -L | wc -l); mkdir -p /tmp/r
( CUDA_VISIBLE_DEVICES=0,1 timeout 240 torchrun --nproc_per_node 2 eval/parallel_equivalence.py --model $SMOL \
    --out /tmp/r/parallel_equivalence_h100x2 > /tmp/eq2.log 2>&1
  CUDA_VISIBLE_DEVICES=0,1 timeout 200 torchrun --nproc_per_node 2 eval/calibrate_parallel.py --model $SMOL --tag h100x2 \
    --batches 1 8 --prompt-lens 128 2048 --new-tokens 32 --repeats 1 --out /tmp/r/calibration > /tmp/cal2.log 2>&1
  CUDA_VISIBLE_DEVICES=0,1 timeout 300 python3 eval/parallel_serve_bench.py --model $SMOL --gpus 2 \
    --trace eval/traces/mixed_small.jsonl --time-scale 0.5 --calibration /tmp/r/calibration/parallel_h100x2.json \
    --out /tmp/r/parallel_serve_h100x2 -- --cooldown-s 1 --min-dwell-s 3 --confirm-s 0.5 > /tmp/serve2.log 2>&1 ) &
( if [ "$n" -ge 4 ]; then CUDA_VISIBLE_DEVICES=2,3 timeout 200 python3 eval/speed.py --device cuda --model $SMOL \
    --settings "baseline;kv8;kv4" --batch-sizes 1,8 --prompt-tokens 1024 --new-tokens 128 --repeats 3 \
    --out /tmp/r/h100_smollm2_speed > /tmp/speed.log 2>&1; fi ) &
wait
if [ "$n" -ge 4 ]; then timeout 200 torchrun --nproc_per_node 4 eval/parallel_equivalence.py --model $SMOL \
    --out /tmp/r/parallel_equivalence_h100x4 > /tmp/eq4.log 2>&1; fi
for f in eq2 cal2 serve2 speed eq4; do echo "== $f"; tail -8 /tmp/$f.log 2>/dev/null; done > "$OUT/stage_b.log"
tar czf "$OUT/stage_b.tgz" -C /tmp/r . ; cat "$OUT/stage_b.log"
