#!/usr/bin/env bash
# Prepared in session 4, not yet run (no device time was left): the four-mode comparison on memory_phases_strict,
# 2 GPUs (~6 min). Qwen2.5-7B shape (random weights; .gpu/qwen7b_cfg, see scripts/export_model_config.py --set),
# bf16, 18 GiB budget per device enforced on the allocator: a 12k-token document does not fit a DP replica (DP
# refuses it, with the reason), TP=2 holds five. Compare adaptive with the static plans that serve every request,
# and report DP's refusals next to its throughput.
# Usage (repo root, carry .whl and .gpu/qwen7b_cfg): bash eval/gpu/stage_next_memory_strict.sh
set -u
source eval/gpu/env.sh
timeout 570 python3 eval/parallel_serve_bench.py --model .gpu/qwen7b_cfg --gpus 2 \
    --trace eval/traces/memory_phases_strict.jsonl --time-scale 1.0 --modes adaptive tp2 dp2 pp2 \
    --mode-timeout-s 135 --out /tmp/r/parallel_serve_memory_strict \
    -- --random-weights --device-memory-gb 18 --max-prompt-tokens 13000 --queue-head 16 \
    --cooldown-s 2 --min-dwell-s 3 --confirm-s 0.5 > "$OUT/serve.log" 2>&1
tar czf "$OUT/memory_strict.tgz" -C /tmp/r . 2>/dev/null
grep -v "Loading weights\|^INFO\|frame #\|TCPStore\|should dump" "$OUT/serve.log" | tail -n 20 | cut -c1-400
cat /tmp/r/parallel_serve_memory_strict/serve_bench.md 2>/dev/null
