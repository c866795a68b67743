#!/usr/bin/env bash
# Session-4 device call 3 (one 2-GPU machine, both GPUs): adaptive vs every static plan on the memory_phases trace,
# Qwen2.5-7B's shape (random weights from .gpu/qwen7b_cfg, see scripts/export_model_config.py --set), bf16, under
# a 20 GiB memory budget per device enforced on the allocator (a 24 GB-class card), memory-aware batch admission.
# Usage (repo root, carry .whl and .gpu/qwen7b_cfg): bash eval/gpu/stage_s4w3.sh
set -u
source eval/gpu/env.sh
timeout 570 python3 eval/parallel_serve_bench.py --model .gpu/qwen7b_cfg --gpus 2 --trace eval/traces/memory_phases.jsonl \
    --time-scale 1.0 --modes adaptive dp2 tp2 pp2 --mode-timeout-s 132 --out /tmp/r/parallel_serve_memory_phases \
    -- --random-weights --device-memory-gb 20 --max-prompt-tokens 12000 --queue-head 16 \
    --cooldown-s 2 --min-dwell-s 3 --confirm-s 0.5 > "$OUT/serve.log" 2>&1
tar czf "$OUT/s4w3.tgz" -C /tmp/r . 2>/dev/null
grep -v "Loading weights\|^INFO" "$OUT/serve.log" | tail -n 30 | cut -c1-400
cat /tmp/r/parallel_serve_memory_phases/serve_bench.md 2>/dev/null
