#!/usr/bin/env bash
# Regenerate one area of eval/results/ on a lent GPU machine (or, for `quality`, on a CPU host).
#
#   bash eval/gpu/run.sh STAGE [JOB ...]      # from the repository root; no JOB = every job of the stage
#   bash eval/gpu/run.sh list                 # the stages and their jobs
#
# Each job writes the folder the results index (eval/results/README.md) points to, with the card in its name
# (CARD: h100, h200, ... from nvidia-smi, or `cpu`), and its log next to the result. Jobs of a stage run one per
# GPU at a time (a job that needs N GPUs takes them all). On the lent machines $OUT comes back: the written
# folders are also packed into $OUT/STAGE.tgz; unpack it at the repository root, then run
# `python eval/index_results.py` and review the diff (a new card makes a new folder: delete the one it supersedes).
#
# Stages, their time on the machine named, and what must be carried (ignored paths; 64 MiB per call in all,
# the tracked tree included):
#   kv             1 GPU per job; about 9 min on 4 GPUs (the e2e grid is 4 jobs of ~8 min; on one GPU run the jobs
#                  in several calls: `run.sh kv generate-1b-short`, `run.sh kv generate-1b-long`, `run.sh kv attention
#                  storage`, `run.sh kv e2e-32k`, ...; each generate slice stops starting configurations after 7 min).
#                  Carry .whl/ (hqq, optimum-quanto, gguf, termcolor wheels: the QuantizedCache baselines).
#   precision      1 GPU per job; about 9 min on 2 GPUs (8B jobs ~7 min each). Carry .whl/ and .gpu/qwen_cfg
#                  (scripts/export_model_config.py qwen2.5-coder-1.5b-instruct .gpu/qwen_cfg; config + tokenizer).
#                  generate-8b and generate-8b-4k (the controller inside model.generate, StaticCache and
#                  AdaptiveStaticKVCache, each with the stop flag read per step and one step late; 64- and 4096-token
#                  prompts) need neither, one call each; generate-8b-guards times lean against full guards (one call);
#                  generate-8b-profile profiles a native and a never-switching
#                  call (--profile); cascade-replay-8b times the lossless
#                  cascade through generate on recorded acceptance (one call; -translate and -long: the translation
#                  rounds, and 16k / 32k-token prompts, one call each; -selfstop: the translation rounds of a
#                  self-draft that ends at its own first doubt, one call; -captured: those rounds through the
#                  cascade's own step graphs at self_stop_sync 0 / 1 / 8, against greedy through captured decode
#                  steps too, one call).
#                  int4-kernels-8b: the 8B linears with tinygemm packings and the code-dot kernel (one call).
#                  generate-8b-captured (-deferred): the controller in generate through its compiled call and
#                  through the captured per-tier step graphs (install_decode_graphs), StaticCache with the stop flag
#                  read every step (one step late); one call each, ~150 s per configuration.
#   parallel-2gpu  2 GPUs per job; each serving job ~8 min, so one job per call. Carry .whl/, .gpu/qwen7b_cfg
#                  (the Qwen2.5-7B shape: export_model_config.py ... --set, see that script) and, for the SmolLM2
#                  jobs (equivalence, serve-mixed), its GGUF in pieces under .gpu/smol/p0 .. p2
#                  (`split -b 33000000`), one piece per call: `run.sh parallel-2gpu smol-piece 0`, then 1, then
#                  the job with the last piece (a warm machine keeps /tmp/gguf between calls).
#   parallel-4gpu  4 GPUs per job; as parallel-2gpu. serve-refit reuses the calibration serve fitted on the same
#                  warm machine, so run it in the next call.
#   quality        CPU, real checkpoints (they do not fit a GPU call): hours on 2 cores (the 48-verse runs run
#                  one verse at a time). Needs the embedded models (scripts/setup.sh fetches them once); run it
#                  with the project's interpreter: PYTHON=.venv/bin/python bash eval/gpu/run.sh quality.
# PYTHON (default python3) names the interpreter; on the lent machines it is the image's, with torch installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=eval/results
SMOL=/tmp/hfa/smollm2
SMOL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PY=${PYTHON:-python3}

setup_gpu() {  # the lent image: torch/transformers/triton installed; carried wheels go to /tmp/site
    if compgen -G ".whl/*.whl" > /dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HF_ADAPTIVE_HOME=/tmp/hfa
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
    if command -v nvidia-smi > /dev/null; then
        NGPU=$(nvidia-smi -L | wc -l)
        CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE "[abhl][0-9]{2,3}s?" \
            | head -1 | tr 'A-Z' 'a-z')
    fi
    NGPU=${NGPU:-0} CARD=${CARD:-cpu}  # the CPU-only jobs (simulate) run anywhere
}

smol_model() {  # rebuild SmolLM2 from the GGUF pieces carried over earlier calls (checked by sha256)
    [ -f "$SMOL/config.json" ] && return 0
    cat /tmp/gguf/* > /tmp/smol.gguf && echo "$SMOL_SHA256  /tmp/smol.gguf" | sha256sum -c -
    $PY -c "from pathlib import Path; from hf_adaptive.models import convert_gguf; convert_gguf(Path('/tmp/smol.gguf'), Path('$SMOL'))"
}

# --- kv: one GPU each --------------------------------------------------------------------------------------------
E2E_CACHES=dynamic,static_compiled,compiled16,compiled8,compiled4,quanto4,hqq4
e2e() {  # NAME CONTEXTS: one run of the end-to-end grid into kv_e2e_CARD/raw/NAME
    local out=$R/kv_e2e_$CARD/raw/$1; mkdir -p "$out"
    timeout 540 $PY eval/bench_kv_e2e.py --warmup 16 --repeats 3 --compile-budget-s 900 --profile-steps 8 \
        --caches $E2E_CACHES --time-budget-s 470 --contexts "$2" --batch-sizes 1,8 --out "$out" > "$out/bench_kv_e2e.log" 2>&1
}
gen() {  # NAME ARGS...: one slice of the model.generate grid into kv_generate_$CARD (each slice sized for one call;
    # GEN_BUDGET_S, default 420: stop starting configurations after this many seconds)
    local o=$R/kv_generate_$CARD n=$1; shift; mkdir -p $o
    timeout $((${GEN_BUDGET_S:-420} + 140)) $PY eval/bench_generate.py --name $n --time-budget-s ${GEN_BUDGET_S:-420} --out $o "$@" > $o/$n.log 2>&1
}
job_kv_generate-1b-short() { gen 1b_short --shape llama-3.2-1b --contexts 64,1024,4096 --batch-sizes 1,8 \
    --caches static,static_deferred,adaptive16,adaptive16_per_step,adaptive4,dynamic --profile --profile-at 64,1; }
job_kv_generate-1b-long() { gen 1b_long --shape llama-3.2-1b --contexts 65536,32768,16384 --batch-sizes 8,1 \
    --caches dynamic,static,static_deferred,adaptive16,adaptive4; }
job_kv_generate-1b-mid() { gen 1b_mid --shape llama-3.2-1b --contexts 16384,4096 --batch-sizes 1,8 \
    --caches dynamic,static,adaptive16,adaptive4; }
job_kv_generate-1b-others() { gen 1b_others --shape llama-3.2-1b --contexts 4096 --batch-sizes 1,32 \
    --caches static,adaptive_budget,eager4,quanto4,hqq4 --mixed-calls 20; }
job_kv_generate-1b-mixed() { gen 1b_mixed --shape llama-3.2-1b --contexts 4096 --batch-sizes 1 \
    --caches static,adaptive16,adaptive4,adaptive_budget --mixed-calls 20 --repeats 2; }
job_kv_generate-8b() { gen 8b --shape llama-3.1-8b --contexts 64,4096 --batch-sizes 1 \
    --caches static,static_deferred,adaptive16,adaptive16_per_step,adaptive4,dynamic --mixed-calls 20; }
job_kv_storage() { local o=$R/kv_storage_$CARD; mkdir -p $o; timeout 420 $PY eval/bench_kv.py --random-shape llama-1b \
    --contexts 1024,4096,8192 --batch-sizes 1,8 --new-tokens 64 --repeats 3 --warmup 1 --device cuda --dtype bfloat16 \
    --out $o > $o/bench_kv.log 2>&1; }
job_kv_e2e-1k4k() { e2e 1k4k 1024,4096; }
job_kv_e2e-4k1k() { e2e 4k1k 4096,1024; }
job_kv_e2e-16k() { e2e 16k 16384; }
job_kv_e2e-32k() { e2e 32k 32768; }
job_kv_e2e-merge() { local o=$R/kv_e2e_$CARD; $PY eval/merge_bench_kv_e2e.py --one-run-per-shape --out $o \
    $(for d in $o/raw/*/; do n=$(basename $d); echo "$n=$d/bench_kv_e2e.json"; done) > $o/merge.log 2>&1; }
job_kv_static-switch() { local o=$R/kv_static_switch_$CARD; mkdir -p $o; timeout 300 $PY eval/bench_static_switch.py \
    --steps 400 --switch-at 40 --out $o > $o/static_switch.log 2>&1; }
job_kv_oom() { local o=$R/kv_oom_survival_$CARD; mkdir -p $o; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout 420 $PY eval/oom_survival.py --cap-gib 7 --out $o > $o/oom_survival.log 2>&1; }
job_kv_attention() { local o=$R/kv_decode_attention_$CARD; mkdir -p $o; timeout 420 $PY eval/bench_decode_attention.py \
    --contexts 4096,16384,32768,65536 --batches 1,8 --bits 16,8,4 --out $o > $o/bench_decode_attention.log 2>&1; }
job_kv_attention-sweep() { local o=$R/kv_decode_attention_sweep_$CARD; mkdir -p $o; timeout 420 $PY \
    eval/bench_decode_attention.py --sweep-only --inner 10 --reps 20 --out $o > $o/bench_decode_attention.log 2>&1; }
job_kv_attention-variants() {  # KERNEL_BASE: an older kernel source (git show REV:hf_adaptive/attention/_triton_kernels.py)
    # the path generate takes (book + key mask), chunk 64, 5 stages; WARPS / WAVES / SHAPES narrow or widen the sweep
    local o=$R/kv_decode_kernel_variants_$CARD; mkdir -p $o; timeout 420 $PY eval/bench_kernel_variants.py \
    --variants base=${KERNEL_BASE:?set KERNEL_BASE to a kernel source file},new=hf_adaptive/attention/_triton_kernels.py \
    --chunks 64 --max-registers none --stages 5 --warps ${WARPS:-1,2} --waves ${WAVES:-2,4} --views book_mask \
    --shapes ${SHAPES:-8x32768x4,1x65536x4,8x4096x4m,8x32768x8m} --out $o > $o/bench_kernel_variants.log 2>&1; }
job_kv_registers() {  # CPU only (sm_90 builds, no GPU); KERNEL_BASE as for attention-variants
    $PY eval/kernel_registers.py --mask --stages 5 --chunks 32,64 --warps 1,2,4 \
    --kernel-source before=${KERNEL_BASE:?set KERNEL_BASE to a kernel source file} --out $R/kv_decode_instructions_cpu; }

# --- precision: one GPU each --------------------------------------------------------------------------------------
SCHED=eval/data/precision_schedule_qwen2.5-coder-1.5b_translate_stride40.json
precision() {  # FOLDER ARGS...: the compiled precision benchmark
    local o=$R/$1; shift; mkdir -p $o
    timeout 560 $PY eval/bench_precision.py --compile-only "$@" --out $o > $o/bench_precision.log 2>&1
}
job_precision_1b() { precision precision_1b_$CARD --compile-batch-sizes 1 8 --high 0.9 0.5; }
job_precision_8b() { precision precision_8b_$CARD --shape llama-3.1-8b --skip-controller --high 0.9 0.75 0.5 --schedule $SCHED; }
job_precision_8b-triton() { precision precision_8b_triton_$CARD --shape llama-3.1-8b --int4-kernel triton \
    --skip-controller --high 0.9 0.75 0.5 --schedule $SCHED; }
job_precision_qwen() { precision precision_qwen1.5b_$CARD --config-dir .gpu/qwen_cfg --skip-controller \
    --high 0.9 0.75 0.5 --schedule $SCHED; }
job_precision_qwen-triton() { precision precision_qwen1.5b_triton_$CARD --config-dir .gpu/qwen_cfg --int4-kernel triton \
    --skip-controller --high 0.9 0.75 0.5 --schedule $SCHED; }
job_precision_generate-8b() {  # per-step and deferred stop checks, both caches (~100 s per cache)
    local o=$R/precision_generate_$CARD; mkdir -p $o; timeout 560 $PY eval/bench_precision_generate.py \
    --shape llama-3.1-8b --contexts 64 --time-budget-s 420 --caches static,static_deferred,adaptive16,adaptive16_per_step \
    --repeats 3 --name 8b --out $o > $o/8b.log 2>&1; }
job_precision_generate-8b-captured() {  # generate's compiled call against the captured per-tier step graphs
    local o=$R/precision_generate_$CARD; mkdir -p $o; timeout ${CAPTURED_TIMEOUT_S:-560} $PY \
    eval/bench_precision_generate.py --shape llama-3.1-8b --contexts 64 --time-budget-s ${CAPTURED_BUDGET_S:-420} \
    --caches static --paths trees,captured --repeats 3 --name 8b_captured --out $o > $o/8b_captured.log 2>&1; }
job_precision_generate-8b-captured-deferred() {  # the same with the stop flag read one step late
    local o=$R/precision_generate_$CARD; mkdir -p $o; timeout 560 $PY eval/bench_precision_generate.py \
    --shape llama-3.1-8b --contexts 64 --time-budget-s 420 --caches static_deferred --paths trees,captured \
    --repeats 3 --name 8b_captured_deferred --out $o > $o/8b_captured_deferred.log 2>&1; }
job_precision_generate-8b-guards() {  # the same, prepare_tiers(lean_guards=True) against dynamo's full guard set
    local o=$R/precision_generate_$CARD; mkdir -p $o; timeout 560 $PY eval/bench_precision_generate.py \
    --shape llama-3.1-8b --contexts 64 --time-budget-s 420 --caches adaptive16,static_deferred --guard-sets lean,full \
    --repeats 3 --name 8b_guards --out $o > $o/8b_guards.log 2>&1; }
job_precision_generate-8b-profile() { local o=$R/precision_generate_$CARD; mkdir -p $o; timeout 440 $PY \
    eval/bench_precision_generate.py --shape llama-3.1-8b --contexts 64 --time-budget-s 300 --profile \
    --caches adaptive16,static --name 8b_profile --out $o > $o/8b_profile.log 2>&1; }
job_precision_generate-8b-4k() { local o=$R/precision_generate_$CARD; mkdir -p $o; timeout 560 $PY \
    eval/bench_precision_generate.py --shape llama-3.1-8b --contexts 4096 --time-budget-s 420 --name 8b_4k --out $o \
    > $o/8b_4k.log 2>&1; }
job_precision_cascade-replay-8b() {  # the lossless cascade in generate, replaying the modernize task's recorded rounds
    local o=$R/precision_cascade_replay_$CARD; mkdir -p $o; timeout 560 $PY eval/bench_cascade_replay.py \
    --shape llama-3.1-8b --contexts 64,4096 --new-tokens 192 --out $o --name 8b_modernize \
    --schedule eval/results/quality_draft_acceptance_modernize_qwen1.5b_cpu/draft_acceptance.json > $o/8b_modernize.log 2>&1; }
job_precision_cascade-replay-8b-translate() {  # the same on the translation task's rounds (free-form: few accepted)
    local o=$R/precision_cascade_replay_$CARD; mkdir -p $o; timeout 560 $PY eval/bench_cascade_replay.py \
    --shape llama-3.1-8b --contexts 64,4096 --new-tokens 192 --out $o --name 8b_translate \
    --schedule eval/results/quality_draft_acceptance_qwen1.5b_cpu/draft_acceptance.json > $o/8b_translate.log 2>&1; }
job_precision_cascade-replay-8b-selfstop() {  # the translation rounds of a self-draft that stops at its own doubt
    local o=$R/precision_cascade_replay_$CARD; mkdir -p $o; timeout 560 $PY eval/bench_cascade_replay.py \
    --shape llama-3.1-8b --contexts 64,4096 --new-tokens 192 --run self --out $o --name 8b_translate_selfstop \
    --schedule eval/results/quality_draft_acceptance_selfstop_qwen1.5b_cpu/draft_acceptance.json \
    > $o/8b_translate_selfstop.log 2>&1; }
job_precision_cascade-replay-8b-long() {  # the modernize rounds after 16k and 32k-token prompts (one timed call each)
    local o=$R/precision_cascade_replay_$CARD; mkdir -p $o; timeout 580 $PY eval/bench_cascade_replay.py \
    --shape llama-3.1-8b --contexts 16384,32768 --new-tokens 128 --repeats 1 --out $o --name 8b_modernize_long \
    --schedule eval/results/quality_draft_acceptance_modernize_qwen1.5b_cpu/draft_acceptance.json \
    > $o/8b_modernize_long.log 2>&1; }
job_precision_cascade-replay-8b-captured() {  # the self-stop translation rounds through the cascade's own step graphs,
    # with the p_max read late (sync 0), once (1) or always (8), against greedy through generate's compiled call and
    # through captured decode steps (read every step and one step late); ~7 min
    local o=$R/precision_cascade_replay_selfstop_$CARD; mkdir -p $o; timeout 580 $PY eval/bench_cascade_replay.py \
    --shape llama-3.1-8b --contexts 64 --new-tokens 128 --run self --no-eager --no-extra-baselines --self-stop-sync 0,1,8 \
    --paths captured --out $o --name 8b_translate_selfstop_captured \
    --schedule eval/results/quality_draft_acceptance_selfstop_qwen1.5b_cpu/draft_acceptance.json \
    > $o/8b_translate_selfstop_captured.log 2>&1; }
job_precision_int4-kernels() { local o=$R/precision_int4_kernels_$CARD; mkdir -p $o; timeout 300 $PY \
    eval/bench_int4_kernels.py --out $o > $o/bench_int4_kernels.log 2>&1; }
job_precision_int4-kernels-8b() {  # the 8B linears: tinygemm packings, the tuned Triton launch, the code-dot kernel
    local o=$R/precision_int4_kernels_8b_$CARD; mkdir -p $o; timeout 300 $PY eval/bench_int4_kernels.py \
    --models llama-3.1-8b --rows 1 8 --code-dot --tinygemm 32:8 64:8 256:8 128:4 128:2 --out $o \
    > $o/bench_int4_kernels.log 2>&1; }

# --- parallel: every GPU of the machine per job ------------------------------------------------------------------
SERVE_ARGS="--random-weights --device-memory-gb 18 --max-prompt-tokens 13000 --queue-head 16 --cooldown-s 2 \
--min-dwell-s 3 --confirm-s 0 --warmup --rule cost --max-batch-per device"
serve_equal() {  # FOLDER CALIBRATION MODES...: memory-phase serving at 8 rows per GPU for every plan
    local o=$R/parallel_serve_equal_concurrency_qwen7b/$1 cal=$2; shift 2; mkdir -p $o
    timeout 560 $PY eval/parallel_serve_bench.py --model .gpu/qwen7b_cfg --gpus $NGPU \
        --trace eval/traces/memory_phases_short.jsonl --time-scale 1.0 --modes adaptive "$@" --mode-timeout-s 175 \
        --out $o -- $SERVE_ARGS --calibration $cal > $o/serve.log 2>&1
}
equivalence() { local o=$R/parallel_equivalence_smollm2_${CARD}x$NGPU; mkdir -p $o; smol_model
    $PY -m hf_adaptive.parallel.run_script --processes $NGPU --timeout-s 240 eval/parallel_equivalence.py --model $SMOL --out $o > $o/parallel_equivalence.log 2>&1; }
reshard() { local o=$R/parallel_reshard_qwen7b_$CARD/${CARD}x$NGPU; mkdir -p $o
    $PY -m hf_adaptive.parallel.run_script --processes $NGPU --timeout-s 300 eval/bench_reshard.py --model .gpu/qwen7b_cfg --random-weights --rounds 2 \
        --out $o > $o/bench_reshard.log 2>&1; }
smol_piece() { mkdir -p /tmp/gguf && cp .gpu/smol/p$1/* /tmp/gguf/ && ls -la /tmp/gguf; }
job_parallel-2gpu_smol-piece() { smol_piece "$1"; }
job_parallel-2gpu_equivalence() { equivalence; }
job_parallel-2gpu_reshard() { reshard; }
job_parallel-2gpu_serve() { serve_equal ${CARD}x2_cost_rule eval/calibration/parallel_h200x2_qwen7b_served_warm.json tp2 pp2; }
job_parallel-2gpu_serve-mixed() { local o=$R/parallel_serve_mixed_smollm2_${CARD}x2; mkdir -p $o; smol_model
    timeout 560 $PY eval/parallel_serve_bench.py --model $SMOL --gpus 2 --trace eval/traces/mixed_small.jsonl \
        --time-scale 0.5 --calibration eval/calibration/parallel_h100x2.json --out $o \
        -- --cooldown-s 1 --min-dwell-s 3 --confirm-s 0.5 > $o/serve.log 2>&1; }
job_parallel-2gpu_simulate() {  # CPU only: the simulator on committed calibrations (seconds)
    $PY -m hf_adaptive.cli simulate --trace eval/traces/mixed.jsonl eval/traces/mixed_small.jsonl \
        eval/traces/chat_bursts.jsonl eval/traces/long_documents.jsonl eval/traces/offline_batch.jsonl \
        --calibration eval/calibration/parallel_h100x2.json --rule cost --out $R/parallel_sim_mixed_h100x2
    $PY -m hf_adaptive.cli simulate --trace eval/traces/memory_phases_short.jsonl \
        --calibration eval/calibration/parallel_h200x2_qwen7b_served_warm.json \
        --out $R/parallel_sim_heldout_qwen7b_h200x2/dpshort320 --cooldown-s 2 --min-dwell-s 3 --confirm-s 0 \
        --queue-head 16 --dp-short-tokens 320; }
job_parallel-4gpu_smol-piece() { smol_piece "$1"; }
job_parallel-4gpu_equivalence() { equivalence; }
job_parallel-4gpu_reshard() { reshard; }
job_parallel-4gpu_serve() {  # also fits a per-device calibration from its own runs, for serve-refit
    serve_equal ${CARD}x4_cost_rule eval/calibration/parallel_h200x4_qwen7b_served.json tp4
    $PY eval/calibrate_from_serve.py $R/parallel_serve_equal_concurrency_qwen7b/${CARD}x4_cost_rule \
        --model .gpu/qwen7b_cfg --device-memory-gb 18 --out /tmp/calib_per_device.json; }
job_parallel-4gpu_serve-refit() { serve_equal ${CARD}x4_cost_rule_refit /tmp/calib_per_device.json tp4; }

# --- quality: CPU, real checkpoints -------------------------------------------------------------------------------
bleu() { local o=$R/$1; shift; mkdir -p $o; HF_HUB_OFFLINE=1 $PY eval/bleu.py --device cpu "$@" --out $o > $o/bleu.log 2>&1; }
QWEN="--model qwen2.5-coder-1.5b-instruct"
W16="residual_length=16,block_size=16"
job_quality_draft-acceptance() { local o=$R/quality_draft_acceptance_smollm2_cpu; mkdir -p $o; HF_HUB_OFFLINE=1 \
    $PY eval/record_draft_acceptance.py --limit 8 --stride 40 --out $o > $o/record_draft_acceptance.log 2>&1; }
job_quality_draft-acceptance-qwen() { local o=$R/quality_draft_acceptance_qwen1.5b_cpu; mkdir -p $o; HF_HUB_OFFLINE=1 \
    $PY eval/record_draft_acceptance.py $QWEN --limit 24 --stride 40 --threads 1 --out $o \
    > $o/record_draft_acceptance.log 2>&1; }
job_quality_draft-acceptance-selfstop-qwen() { local o=$R/quality_draft_acceptance_selfstop_qwen1.5b_cpu; mkdir -p $o
    HF_HUB_OFFLINE=1 $PY eval/record_draft_acceptance.py $QWEN --limit 24 --stride 40 --runs self --self-stop 0.7 \
    --max-self-draft 8 --threads 1 --out $o > $o/record_draft_acceptance.log 2>&1; }
job_quality_draft-acceptance-modernize() { local o=$R/quality_draft_acceptance_modernize_smollm2_cpu; mkdir -p $o; \
    HF_HUB_OFFLINE=1 $PY eval/record_draft_acceptance.py --task modernize --limit 16 --stride 40 --out $o \
    > $o/record_draft_acceptance.log 2>&1; }
job_quality_draft-acceptance-modernize-qwen() { local o=$R/quality_draft_acceptance_modernize_qwen1.5b_cpu; mkdir -p $o
    HF_HUB_OFFLINE=1 $PY eval/record_draft_acceptance.py $QWEN --task modernize --limit 16 --stride 40 --threads 2 \
    --out $o > $o/record_draft_acceptance.log 2>&1; }
job_quality_kv() { mkdir -p $R/quality_kv_smollm2_cpu; HF_HUB_OFFLINE=1 $PY eval/kv_quality.py \
    --out $R/quality_kv_smollm2_cpu > $R/quality_kv_smollm2_cpu/kv_quality.log 2>&1; }
job_quality_bleu-kv() { bleu quality_bleu_kv_qwen1.5b_cpu $QWEN --threads 1 --limit 24 --batch-size 12 \
    --settings "baseline;kv8;kv4;kv:bits=8,$W16;kv:bits=4,$W16;precision"; }
job_quality_bleu-precision() { bleu quality_bleu_precision_qwen1.5b_cpu $QWEN --threads 2 --limit 48 --batch-size 1 \
    --settings baseline --precision-thresholds 0.5,0.75; }
job_quality_bleu-precision-96verses() { bleu quality_bleu_precision_96verses_qwen1.5b_cpu $QWEN --threads 2 --limit 96 \
    --batch-size 1 --settings baseline --precision-thresholds 0.75; }
job_quality_bleu-precision-t065() { bleu quality_bleu_precision_t065_96verses_qwen1.5b_cpu $QWEN --threads 2 --limit 96 \
    --batch-size 1 --settings baseline --precision-thresholds 0.65; }
job_quality_bleu-48verses() { bleu quality_bleu_48verses_qwen1.5b_cpu $QWEN --threads 2 --limit 48 --batch-size 1 \
    --settings "baseline;kv:bits=4,$W16" --precision-thresholds 0.9; }
job_quality_bleu-kv-budgets() { bleu quality_bleu_kv_budgets_qwen1.5b_cpu $QWEN --threads 1 --limit 16 --batch-size 16 \
    --settings "baseline;kv:memory_budget=96MiB,$W16;kv:memory_budget=48MiB,$W16;kv:memory_budget=32MiB,$W16"; }
job_quality_bleu-smollm2() { bleu quality_bleu_smollm2_cpu --threads 1 --limit 128 --batch-size 16 \
    --settings "baseline;kv8;kv4;precision"; }
job_quality_bleu-precision-smollm2() { bleu quality_bleu_precision_smollm2_cpu --threads 1 --limit 24 --batch-size 1 \
    --settings baseline --precision-thresholds 0.9,0.75,0.5; }

run_one() {  # STAGE JOB [ARG]: a failed job is reported and the stage goes on with the next
    "job_$1_$2" "${@:3}" || echo "run.sh: $1 $2 failed (exit $?); its log is next to its result" >&2
}
jobs_of() { declare -F | awk '{print $3}' | grep "^job_$1_" | sed "s/^job_$1_//"; }
default_jobs() {  # every job of a stage but the carrying helpers and the ones that need an earlier call
    jobs_of "$1" | grep -vx "smol-piece\|serve-refit\|e2e-merge"
}

run_jobs() {  # STAGE GPUS_PER_JOB JOB...: run jobs side by side, GPUS_PER_JOB each, then wait for the round
    local stage=$1 per=$2 slot=0; shift 2
    local slots=$(( ${NGPU:-1} / per )); [ "$slots" -ge 1 ] || slots=1
    for job in "$@"; do
        local first=$(( slot * per )) devices
        devices=$(seq -s, $first $(( first + per - 1 )))
        ( export CUDA_VISIBLE_DEVICES=$devices; run_one "$stage" "$job" ) &
        slot=$(( slot + 1 )); if [ $slot -ge $slots ]; then wait; slot=0; fi
    done
    wait
}

stage=${1:-}; shift || true
touch /tmp/run_sh_start
case "$stage" in
    list) for s in kv precision parallel-2gpu parallel-4gpu quality; do echo "$s: $(jobs_of $s | tr '\n' ' ')"; done ;;
    kv|precision) setup_gpu; run_jobs $stage 1 ${@:-$(default_jobs $stage)}
        [ "$stage" = kv ] && [ -d $R/kv_e2e_$CARD/raw ] && job_kv_e2e-merge ;;
    parallel-2gpu|parallel-4gpu)
        setup_gpu
        if [ "${1:-}" = smol-piece ]; then "job_${stage}_smol-piece" "$2"; exit 0; fi
        for job in ${@:-$(default_jobs $stage)}; do run_one $stage $job; done ;;
    quality) for job in ${@:-$(default_jobs quality)}; do run_one quality $job; done ;;
    *) echo "usage: bash eval/gpu/run.sh kv|precision|parallel-2gpu|parallel-4gpu|quality [JOB ...]" \
            "(bash eval/gpu/run.sh list names the jobs)" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ] && [ "$stage" != list ]; then  # what this call wrote comes back in $OUT
    find $R -newer /tmp/run_sh_start -type f | tar czf "$OUT/$stage.tgz" -T -
fi
