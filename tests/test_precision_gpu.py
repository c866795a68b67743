"""GPU checks of the precision tiers: tinygemm int4 layout, fp8 _scaled_mm, CUDA-graph decode, verified mode.

Run on a CUDA machine: ``python -m pytest tests/test_precision_gpu.py -q`` (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.decode import decode
from hf_adaptive.precision.fp8 import fp8_linear, fp8_supported, pack_fp8
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
from hf_adaptive.precision.int4 import dequantize_int4_reference, int4_linear, pack_int4
from hf_adaptive.precision.options import DecodeOptions, DraftOptions
from hf_adaptive.precision.tiers import prepare_tiers
from hf_adaptive.precision.verified import generate_verified, greedy_with_logits, mismatch_report

pytestmark = pytest.mark.gpu


def _llama(hidden: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # confident logits, so every band is used
    return model


@pytest.mark.parametrize("n,k,g", [(256, 576, 64), (512, 2048, 128)])
def test_int4_cuda_kernel_matches_dequantized_reference(n, k, g):
    """Guards against a wrong nibble order / scale layout for CUDA tinygemm."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
    y = int4_linear(x, pack_int4(w, g, torch.bfloat16)).float()
    ref = x.float() @ dequantize_int4_reference(w, g).T
    assert (y - ref).abs().max() / ref.abs().max() < 0.02


@pytest.mark.parametrize("n,k,g", [(6144, 4096, 128), (1536, 8960, 128), (256, 576, 64)])
def test_int4_triton_tuned_kernel_matches_reference_and_graph_replay(n, k, g):
    """Guards the tuned Triton int4 launch on a real card: the fastest launch the tuner picked (split K with
    atomics included) and the several-rows kernel must match x @ dequant(W).T, and a CUDA-graph replay must
    give the same bits as the eager call (no allocation or tuning inside the captured step)."""
    from hf_adaptive.precision.int4_triton import dequantize_triton_int4, int4_triton_linear, pack_int4_triton

    torch.manual_seed(0)
    w = pack_int4_triton(torch.randn(n, k, device="cuda"), g, torch.bfloat16)
    ref_w = dequantize_triton_int4(w)
    for rows in (1, 8):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ ref_w.T
        y = int4_triton_linear(x, w)
        assert (y.float() - ref).abs().max() / ref.abs().max() < 0.01, (rows, w.gemv)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream):
            int4_triton_linear(x, w)
            with torch.cuda.graph(graph, stream=stream):
                out = int4_triton_linear(x, w)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y) or (out.float() - y.float()).abs().max() <= 1e-2 * y.float().abs().max(), w.gemv


@pytest.mark.parametrize("n,k,g", [(6144, 4096, 128), (1536, 8960, 128), (256, 576, 64)])
def test_int4_code_dot_kernel_matches_reference_on_every_launch_family(n, k, g):
    """Guards the code-dot kernel's PTX decode (bytes to bfloat16 codes, which the interpreter cannot run): the
    fastest code-dot launch and a split one must match x @ dequant(W).T at 1, 8 and 16 rows."""
    from hf_adaptive.precision.int4_triton import (GemvConfig, dequantize_triton_int4, int4_triton_linear,
                                                   pack_int4_triton, tuned_launch)

    torch.manual_seed(0)
    w = pack_int4_triton(torch.randn(n, k, device="cuda"), g, torch.bfloat16, tune=False)
    ref_w = dequantize_triton_int4(w)
    for launch in (tuned_launch(n, k, g, torch.bfloat16, 0, dot=True), GemvConfig(64, 32, 2, 4, dot=True)):
        w.gemv = launch
        for rows in (1, 8, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ ref_w.T
            y = int4_triton_linear(x, w)
            assert (y.float() - ref).abs().max() / ref.abs().max() < 0.01, (rows, launch)


def test_fp8_rowwise_matches_reference():
    """Guards against transposed scales / a row-major weight operand in torch._scaled_mm."""
    if not fp8_supported(torch.device("cuda")):
        pytest.skip("fp8 needs sm89+")
    torch.manual_seed(0)
    w = torch.randn(512, 1024, device="cuda")
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    y = fp8_linear(x, pack_fp8(w)).float()
    ref = x.float() @ w.T
    assert (y - ref).abs().max() / ref.abs().max() < 0.08


def _prompt_kv(engine: GraphDecodeEngine, t: int) -> list[torch.Tensor]:
    return [layer.keys[:, :, :t].clone() for layer in engine.cache.layers]


def test_graph_decode_equals_eager_per_tier():
    """Guards against a captured graph that reads stale buffers or a capture warm-up that overwrites the
    prompt's KV (it ran at position 0): graph tokens must equal eager tokens bit for bit (same kernels)."""
    model = _llama()
    tiers = prepare_tiers(model, ("int4", "native"))
    ids = torch.randint(1, 512, (2, 12), device="cuda")
    for tier in ("native", "int4"):
        outs = []
        for graphs in (False, True):
            cfg = GraphDecodeConfig(batch_size=2, max_len=96, verify_len=5, use_cuda_graphs=graphs)
            engine = GraphDecodeEngine(tiers, cfg)
            outs.append(decode(engine, ids, DecodeOptions(max_new_tokens=32, tier=tier)))
        kv_after_capture = _prompt_kv(engine, ids.shape[1])
        engine.prefill(ids)  # graphs exist now: no warm-up, so this is the prompt KV as prefill writes it
        assert all(torch.equal(a, b) for a, b in zip(kv_after_capture, _prompt_kv(engine, ids.shape[1]))), tier
        assert torch.equal(outs[0], outs[1]), tier


def _verified_vs_greedy(dtype: torch.dtype, top: str, seed: int, n: int = 48):
    model = _llama().to(dtype)
    tiers = prepare_tiers(model, ("int4", top))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(1, 512, (1, 12), device="cuda", generator=gen)
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=1, max_len=128, verify_len=5))
    ref, ref_logits = greedy_with_logits(engine, ids, n)
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier=top, top_tier=top)
    draft = DraftOptions(max_draft=4, policy=policy, adaptive=False)
    opts = DecodeOptions(max_new_tokens=n, draft=draft)
    out = generate_verified(engine, ids, opts)
    assert any(a > 0 for _, a in draft.history), "no draft was ever accepted: verify path not exercised"
    return out, ref, ref_logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verified_graph_mode_token_identical_fp32(seed):
    """Guards against verified mode diverging from top-tier greedy under CUDA graphs (rollback, padding,
    verify-graph mask/positions): in fp32 (TF32 off) the 5-token verify forward and the 1-token decode agree
    far below the logit margins, so any mismatch is a logic bug, not rounding."""
    assert not torch.backends.cuda.matmul.allow_tf32
    out, ref, ref_logits = _verified_vs_greedy(torch.float32, "fp32", seed)
    assert torch.equal(out, ref), (mismatch_report(out, ref, ref_logits, torch.float32), out, ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verified_graph_mode_bf16_diverges_only_at_near_ties(seed):
    """Guards against verified mode diverging from bf16 greedy for a reason other than rounding: tokens must
    be identical up to the first position where greedy's own top-2 logits are a near-tie (a gap of at most
    two bf16 steps of the top logit, which the 5-token and 1-token GEMMs may round differently)."""
    out, ref, ref_logits = _verified_vs_greedy(torch.bfloat16, "native", seed)
    report = mismatch_report(out, ref, ref_logits, torch.bfloat16)
    assert report["token_identical"] or report["near_tie"], (report, out, ref)


def test_top_tier_greedy_reproducible_with_long_cache():
    """Guards against nondeterministic attention in the engine: on an H100 cuDNN SDPA (max_len 333, GQA 32/8,
    head_dim 64) gave different bf16 logits for identical inputs run to run, so top-tier greedy (the reference
    verified mode promises) was not reproducible. Logits must be bitwise equal across runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    engine = GraphDecodeEngine(prepare_tiers(model, ("int4", "native")), GraphDecodeConfig(1, 333, 5))
    ids = torch.randint(1, 128256, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    runs = [greedy_with_logits(engine, ids, 96)[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:]), [float((runs[0] - r).abs().max()) for r in runs[1:]]


@pytest.mark.parametrize("lag", [0, 1])
def test_fused_graph_decode_equals_eager_controller_path(lag):
    """Guards against the captured in-graph decision (confidence, combine, band, pinned-memory status ring)
    or the in-graph argmax differing from the eager controller on the graph engine under CUDA graphs: same
    tokens, same tier schedule, same recorded confidences, at decision lag 0 and 1."""
    from helpers import decode_both_paths

    from hf_adaptive.precision.controller import PrecisionController

    tiers = prepare_tiers(_llama(), ("int4", "native"))
    ids = torch.randint(1, 512, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    policy = PrecisionPolicyConfig(fast_tier="int4", mid_tier="native", top_tier="native")
    # random weights are rarely confident: put the threshold at the median score so both tiers get steps
    probe = PrecisionController(tiers, policy)
    decode(GraphDecodeEngine(tiers, GraphDecodeConfig(batch_size=2, max_len=96)), ids,
           DecodeOptions(max_new_tokens=48, controller=probe))
    probe.close()
    mid = sorted(probe.telemetry.scores)[len(probe.telemetry.scores) // 2]
    policy = PrecisionPolicyConfig(high=mid, low=min(mid, 0.6), fast_tier="int4", mid_tier="native",
                                   top_tier="native")
    runs = decode_both_paths(tiers, ids, policy, max_len=96, new_tokens=48, lag=lag)
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]
    assert len(set(runs[1][1])) == 2, runs[1][1]


def test_graph_capture_collects_first_and_never_inside():
    """Guards the decoders' captures against Python's garbage collector: dead CUDA objects of earlier work (pinned
    buffers, events held by reference cycles) are collected before the capture, no collection runs inside it however
    often the captured code allocates, the collector is back on afterwards, and the captured work replays exactly."""
    import gc
    import weakref

    from hf_adaptive.precision.capture import graph_capture

    class Holder:
        pass

    x = torch.ones(1024, device="cuda")
    threshold = gc.get_threshold()
    collections: list[str] = []
    inside = False

    def watch(phase: str, info: dict) -> None:
        if phase == "start" and inside:
            collections.append(f"generation {info['generation']}")

    try:
        gc.disable()
        holder = Holder()
        holder.host, holder.event, holder.self = torch.empty(1024, pin_memory=True), torch.cuda.Event(), holder
        holder.host.copy_(x, non_blocking=True)
        holder.event.record()
        dead = weakref.ref(holder)
        del holder
        gc.enable()
        gc.set_threshold(1)
        gc.callbacks.append(watch)
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph):
            inside = True
            assert dead() is None, "the dead cycle must be collected before the capture starts"
            y = x
            for _ in range(50):
                y = y * 2 - x
                _ = [Holder() for _ in range(20)]  # container allocations: what triggers a collection
            inside = False
        assert gc.isenabled()
        graph.replay()
        assert torch.equal(y, x)
        assert collections == []
    finally:
        if watch in gc.callbacks:
            gc.callbacks.remove(watch)
        gc.set_threshold(*threshold)
        gc.enable()
