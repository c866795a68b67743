#!/usr/bin/env bash
# Session-4 device call 4 (2 GPUs, last ~5 minutes of the budget): does TP=2 hold the long-document phase of
# memory_phases (26 documents of 9-11k tokens, Qwen2.5-7B shape, 20 GiB budget per device) now that the allocator
# uses expandable segments (call 3 ran out of memory there on 3.6 GiB of fragmentation), and how fast is it?
set -u
source eval/gpu/env.sh
timeout 175 python3 eval/parallel_serve_bench.py --model .gpu/qwen7b_cfg --gpus 2 \
    --trace eval/traces/memory_phases_docs.jsonl --time-scale 1.0 --modes tp2 --mode-timeout-s 150 \
    --out /tmp/r/parallel_serve_docs_tp2 -- --random-weights --device-memory-gb 20 --max-prompt-tokens 12000 \
    > "$OUT/serve.log" 2>&1
tar czf "$OUT/s4w4.tgz" -C /tmp/r . 2>/dev/null
grep -v "Loading weights\|^INFO\|frame #\|TCPStore\|should dump" "$OUT/serve.log" | tail -n 20 | cut -c1-400
grep -v policy_switches /tmp/r/parallel_serve_docs_tp2/tp2.md 2>/dev/null | tail -8
