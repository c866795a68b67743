"""The lossless draft cascade through ``model.generate``: policy table, token identity with greedy decoding for each
drafter and both, on DynamicCache and AdaptiveKVCache, the self-draft's tier and cache hygiene, stops, errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_model
from transformers import CompileConfig, DynamicCache, StaticCache

import hf_adaptive
from hf_adaptive.compat import generate_cache_kwargs
from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.static import AdaptiveStaticKVCache
from hf_adaptive.policy.draft_policy import (DraftChoice, DrafterRecord, DraftPolicyConfig, carry_history, choose_draft,
                                             round_value)
from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.cascade import cascade_decoding
from hf_adaptive.precision.drafting import CascadeCandidateGenerator
from hf_adaptive.precision.tiers import prepare_tiers

ALWAYS = PrecisionPolicyConfig(high=0.0, low=0.0)  # every confidence > 0 drafts the full length
NEW_TOKENS = 32


_TIERS: dict = {}


def _tiers(arch: str):
    """Tiered tiny model per architecture, built once (prepare_tiers replaces the model's linears in place)."""
    if arch not in _TIERS:
        _TIERS[arch] = prepare_tiers(make_tiny_model(arch), tiers=("int4", "fp32"))
    return _TIERS[arch]


@pytest.fixture(scope="module")
def tiers():
    return _tiers("llama")


@pytest.fixture(scope="module")
def repeated_prompt():
    """A prompt that repeats its own text, so prompt lookup finds continuations the model then follows."""
    base = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    return torch.cat([base, base, base[:, :4]], dim=1)


def _cache(kind: str, model):
    # residual 8 / block 8: history blocks are flushed during the test, so crops also pop blocks
    return {"dynamic": lambda: DynamicCache(config=model.config),
            "adaptive": lambda: AdaptiveKVCache(model.config, residual_length=8, block_size=8),
            "static": lambda: StaticCache(config=model.config, max_cache_len=128),
            "adaptive_static": lambda: AdaptiveStaticKVCache(model.config, max_cache_len=128, residual_length=8,
                                                             block_size=8)}[kind]()


def _run(tiers, ids, drafters, cache=None, **kw):
    # free drafts, full-length bands and a prior held at certainty: the tiny model's zero confidence and its
    # rejections must not stop the drafter under test (the mechanism, not the policy, is tested here)
    gen = CascadeCandidateGenerator(tiers, DraftPolicyConfig(drafters=drafters, bands=ALWAYS, self_draft_cost=0.0,
                                                             self_prior=1.0, prior_acceptance=1.0, prior_weight=1e9))
    extra = {} if cache is None else {"cache": cache}
    out = tiers.model.generate(ids, custom_generate=cascade_decoding, candidate_generator=gen, **extra, **kw)
    return out, gen.telemetry.report()


@pytest.mark.parametrize("score, lookup, drafters, expected", [
    (0.95, 5, ("lookup", "self"), DraftChoice("lookup", 5)),   # a free match beats a paid self-draft
    (0.10, 5, ("lookup", "self"), DraftChoice("lookup", 5)),   # ... whatever the confidence
    (0.95, 20, ("lookup", "self"), DraftChoice("lookup", 8)),  # capped at max_lookup_tokens
    (0.95, 0, ("lookup", "self"), DraftChoice("self", 3)),     # no match, confident: the most tokens per cost
    (0.70, 0, ("lookup", "self"), DraftChoice("self", 1)),     # mid band: at a=0.7 a second token does not pay
    (0.50, 0, ("lookup", "self"), DraftChoice("none", 0)),     # unsure: the verifier decodes alone
    (None, 0, ("lookup", "self"), DraftChoice("self", 4)),     # before the first verify: confident
    (0.95, 5, ("self",), DraftChoice("self", 3)),              # lookup disabled
    (0.95, 0, ("lookup",), DraftChoice("none", 0)),            # self disabled, no match
])
def test_choose_draft_table(score, lookup, drafters, expected):
    """Guards the cascade's decision rule with no history: a free lookup first, the self-draft only where its
    expected tokens per round beat its cost (0.65 of a native forward per draft token by default)."""
    assert choose_draft(score, lookup, DraftPolicyConfig(drafters=drafters)) == expected


def test_round_value_matches_the_closed_form():
    """Guards the arithmetic the rule rests on: (1 + a + ... + a^k) / (1 + k c)."""
    assert round_value(3, 0.5, 0.25) == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 1.75)
    assert round_value(0, 0.9, 0.65) == pytest.approx(1.0)
    assert round_value(4, 1.0, 0.0) == pytest.approx(5.0)


def test_drafter_record_learns_a_geometric_acceptance():
    """Guards the acceptance estimate: accepted / (accepted + rejections), shrunk toward the prior, and refuses a
    round that accepted more than it proposed."""
    rec = DrafterRecord().after(4, 4).after(4, 1).after(3, 0)  # 5 accepted, 2 rounds cut short
    assert (rec.accepted, rec.rejections) == (5, 2)
    assert rec.acceptance(0.5, 0.0) == pytest.approx(5 / 7)
    assert rec.acceptance(0.5, 3.0) == pytest.approx((5 + 1.5) / 10)
    assert DrafterRecord().acceptance(0.3, 0.0) == 0.3
    with pytest.raises(ValueError, match="accepted <= proposed"):
        DrafterRecord().after(2, 3)


def test_carried_evidence_keeps_the_rate_and_loses_weight():
    """Guards the carry-over: a record weighed by a share keeps its acceptance rate but counts less against the
    prior, and carry_history drops everything at share 0."""
    rec = DrafterRecord(accepted=1, rejections=40)
    half = rec.carried(0.5)
    assert half.acceptance(0.5, 0.0) == pytest.approx(rec.acceptance(0.5, 0.0))
    assert rec.acceptance(0.5, 4.0) < half.acceptance(0.5, 4.0) < 0.5
    assert carry_history({"lookup": rec}, 0.0) == {} and carry_history({"lookup": rec}, 1.0) == {"lookup": rec}


def test_a_lookup_that_keeps_failing_gives_way_to_the_self_draft():
    """Guards the point of learning: lookup drafts that the verifier rejects (free-form translation) stop running,
    and a self-draft whose cost eats its gain never runs while the lookup keeps paying."""
    config = DraftPolicyConfig()
    failing = {"lookup": DrafterRecord(accepted=1, rejections=40)}
    assert choose_draft(0.95, 6, config, failing).drafter == "self"
    assert choose_draft(0.95, 6, config).drafter == "lookup"
    dear = DraftPolicyConfig(self_draft_cost=2.0)
    assert choose_draft(0.99, 0, dear) == DraftChoice("none", 0)
    rejected = {"self": DrafterRecord(accepted=2, rejections=30)}
    assert choose_draft(0.95, 0, config, rejected) == DraftChoice("none", 0)


@pytest.mark.parametrize("kwargs", [{"drafters": ("lookup", "eagle")}, {"drafters": ()}, {"max_self_draft": 0},
                                    {"bands": 0.9}, {"self_draft_cost": -0.1}, {"prior_acceptance": 1.5},
                                    {"prior_weight": float("nan")}, {"self_prior": -1.0},
                                    {"carry": 1.5}, {"self_stop": 0.0}, {"self_stop": 1.0}, {"self_stop": "0.7"},
                                    {"self_stop_sync": -1}, {"self_stop_sync": 1.5}])
def test_draft_policy_config_refuses_bad_values(kwargs):
    with pytest.raises((ValueError, TypeError)):
        DraftPolicyConfig(**kwargs)


def test_own_confidence_stop_lets_the_drafter_set_its_length():
    """Guards the policy side of ``self_stop``: neither the confidence bands nor the geometric acceptance model cap
    the self-draft (the drafter ends it at its own first doubt), so a round asks for the full ``max_self_draft``
    whenever a one-token draft would pay."""
    banded = DraftPolicyConfig(drafters=("self",), self_draft_cost=0.1)
    stopping = DraftPolicyConfig(drafters=("self",), self_draft_cost=0.1, self_stop=0.7)
    assert choose_draft(0.8, 0, banded).length < banded.max_self_draft
    assert choose_draft(0.8, 0, stopping) == DraftChoice("self", stopping.max_self_draft)
    # the geometric model would stop at one token here (a = 0.81 at cost 0.65); the stop drafts on while sure
    record = {"self": DrafterRecord(accepted=80, rejections=20)}
    assert choose_draft(0.95, 0, DraftPolicyConfig(drafters=("self",)), record).length == 1
    assert choose_draft(0.95, 0, DraftPolicyConfig(drafters=("self",), self_stop=0.7), record).length == 4
    # ... but it is not run where its first token does not pay for itself, and a free lookup still comes first
    failing = {"self": DrafterRecord(accepted=30, rejections=70)}
    assert choose_draft(0.95, 0, DraftPolicyConfig(self_stop=0.7), failing) == DraftChoice("none", 0)
    assert choose_draft(0.95, 5, DraftPolicyConfig(self_stop=0.7), record).drafter == "lookup"


def _self_stop_run(tiers, ids, self_stop, cache=None, sync=0, **kw):
    gen = CascadeCandidateGenerator(tiers, DraftPolicyConfig(drafters=("self",), self_draft_cost=0.0, self_prior=1.0,
                                                             prior_weight=1e9, self_stop=self_stop,
                                                             self_stop_sync=sync))
    extra = {} if cache is None else {"cache": cache}
    out = tiers.model.generate(ids, custom_generate=cascade_decoding, candidate_generator=gen, max_new_tokens=NEW_TOKENS,
                               **extra, **kw)
    return out, [r for r in gen.telemetry.rounds if r.proposed]


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_self_draft_stops_at_its_own_doubt_and_stays_greedy(repeated_prompt, cache_kind):
    """Guards the own-confidence stop on CPU, where each draft step's p_max is read at once: a bar no p_max reaches
    ends every draft after its first token, a bar every p_max clears lets each run to the cap, and either way the
    tokens are greedy's and the crop leaves the cache as greedy's (qwen2's tiny model rejects some drafts)."""
    tiers = _tiers("qwen2")
    model = tiers.model
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS, cache=_cache(cache_kind, model))
    out, doubting = _self_stop_run(tiers, repeated_prompt, 1 - 1e-9, _cache(cache_kind, model))
    assert torch.equal(out, ref)
    assert doubting and all(r.proposed == 1 for r in doubting)
    out, sure = _self_stop_run(tiers, repeated_prompt, 1e-9, _cache(cache_kind, model))
    assert torch.equal(out, ref)
    cap = DraftPolicyConfig().max_self_draft
    assert max(r.proposed for r in sure) == cap and sum(r.proposed == cap for r in sure) >= len(sure) - 2  # the end


@pytest.mark.gpu
def test_self_draft_reads_its_doubt_one_step_late_on_cuda(repeated_prompt):
    """Guards the CUDA path of the own-confidence stop: the p_max of a draft step is read after the next step is
    queued (no wait), so a draft that doubts its first token ends after its second; the tokens stay greedy's."""
    tiers = prepare_tiers(make_tiny_model("qwen2").cuda(), tiers=("int4", "fp32"))
    ids = repeated_prompt.cuda()
    ref = tiers.model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
    out, doubting = _self_stop_run(tiers, ids, 1 - 1e-9)
    assert torch.equal(out, ref)
    assert doubting and all(r.proposed == 2 for r in doubting[:-1]) and doubting[-1].proposed <= 2
    # the first self_stop_sync steps are read at once: the draft then ends at its first doubtful token
    out, waited = _self_stop_run(tiers, ids, 1 - 1e-9, sync=1)
    assert torch.equal(out, ref)
    assert waited and all(r.proposed == 1 for r in waited)


def _gen(tiers, drafters, **kw):
    return CascadeCandidateGenerator(tiers, DraftPolicyConfig(drafters=drafters, bands=ALWAYS, self_draft_cost=0.0,
                                                              self_prior=1.0, prior_acceptance=1.0, prior_weight=1e9),
                                     **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_captured_steps_drive_the_compiled_cascade_on_a_static_cache(repeated_prompt, arch):
    """Guards the cascade's own step graphs on the CPU (their compiled forwards on static buffers, un-captured):
    on a StaticCache the compiled cascade runs every decode forward through the generator's ``CapturedSteps``, one
    entry per (tier, width, logits kept): the verify widths at the top tier and one-token steps at the int4 tier.
    Tokens equal greedy's and the path through generate's compiled call (``step_graphs=False``); a second call on
    the same cache object, reset, reuses the entries."""
    from hf_adaptive.precision.cascade import verify_widths

    tiers = _tiers(arch)
    model = tiers.model
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS, cache=_cache("static", model),
                         disable_compile=True)
    cache = _cache("static", model)
    gen = _gen(tiers, ("lookup", "self"), step_graphs=True)
    for _ in range(2):
        cache.reset()
        out = model.generate(repeated_prompt, custom_generate=cascade_decoding, candidate_generator=gen, cache=cache,
                             max_new_tokens=NEW_TOKENS, compile_config=_cpu_compile())
        assert torch.equal(out, ref)
        steps = gen.captured_steps(_cpu_compile())
        # (tier, width fed, logits kept) of every entry
        keys = {(tier, dict(tensors)["input_ids"][0][1], dict(fixed)["logits_to_keep"])
                for tier, _, tensors, fixed in steps.steps}
        assert steps.cache is cache and not steps.use_graphs
        assert {(tier, w) for tier, w, _ in keys} <= {("fp32", w) for w in verify_widths(8)} | {("int4", 1)}
        assert ("int4", 1, 1) in keys and any(tier == "fp32" for tier, _, _ in keys)
    trees = _gen(tiers, ("lookup", "self"), step_graphs=False)  # generate's compiled call
    out = model.generate(repeated_prompt, custom_generate=cascade_decoding, candidate_generator=trees,
                         cache=_cache("static", model), max_new_tokens=NEW_TOKENS, compile_config=_cpu_compile())
    assert torch.equal(out, ref) and trees._captured is None


def test_captured_steps_take_static_caches_only(tiers):
    """Guards what a captured graph may freeze: only caches whose length lives on the device and advances inside the
    forward; a DynamicCache (host-side lengths) or AdaptiveStaticKVCache (host-side decisions per step) is refused
    with the fix named, and the cascade then keeps generate's compiled call for them."""
    from hf_adaptive.precision.step_graphs import CapturedSteps, supports

    model = tiers.model
    assert supports(_cache("static", model))
    assert not supports(_cache("dynamic", model)) and not supports(_cache("adaptive_static", model))
    steps = CapturedSteps(model, tiers, compile_backend=None)
    ids = torch.ones(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="StaticCache"):
        steps(input_ids=ids, position_ids=ids, cache=_cache("dynamic", model))
    with pytest.raises(TypeError, match="cache keyword"):
        steps(input_ids=ids, position_ids=ids)
    with pytest.raises(TypeError, match="step_graphs"):
        CascadeCandidateGenerator(tiers, step_graphs="yes")


def test_captured_steps_take_their_warm_up_back(tiers, repeated_prompt):
    """Guards the warm-up before a capture: its runs advance the cache and write KV past its length, and both are
    taken back, so a step's first call leaves the cache exactly as one plain forward does (length and logits)."""
    from hf_adaptive.compat import forward_cache_kwargs
    from hf_adaptive.precision.step_graphs import WARMUP_RUNS, CapturedSteps

    model = tiers.model
    ids = repeated_prompt[:, :10]
    plain, warmed = _cache("static", model), _cache("static", model)
    for cache in (plain, warmed):
        model(ids[:, :-2], use_cache=True, **forward_cache_kwargs(model, cache))
    pos = torch.arange(8, 10)[None]
    want = model(ids[:, -2:], position_ids=pos, use_cache=True, **forward_cache_kwargs(model, plain)).logits
    steps = CapturedSteps(model, tiers, compile_backend=None)
    calls = []
    steps.forward = lambda **kw: calls.append(1) or model.forward(**kw)
    got = steps(input_ids=ids[:, -2:], position_ids=pos, logits_to_keep=0, **forward_cache_kwargs(model, warmed))
    assert len(calls) == WARMUP_RUNS + 1 and int(warmed.get_seq_length()) == int(plain.get_seq_length()) == 10
    torch.testing.assert_close(got.logits, want)
    nxt = ids[:, -1:]
    a = model(nxt, position_ids=torch.tensor([[10]]), use_cache=True, **forward_cache_kwargs(model, plain)).logits
    b = model(nxt, position_ids=torch.tensor([[10]]), use_cache=True, **forward_cache_kwargs(model, warmed)).logits
    torch.testing.assert_close(a, b)  # the KV of every position read is the real forward's


@pytest.mark.gpu
def test_captured_cascade_replays_its_graphs_on_cuda(repeated_prompt):
    """Guards the captured path on a GPU: each (tier, width) forward is captured once (warm-up runs taken back off
    the cache, so the KV stays greedy's), later rounds and a second generation on the reset cache replay the same
    graphs, and the tokens equal greedy's."""
    tiers = prepare_tiers(make_tiny_model("qwen2").cuda(), tiers=("int4", "fp32"))
    model = tiers.model
    ids = repeated_prompt.cuda()
    ref = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, disable_compile=True)
    cache = StaticCache(config=model.config, max_cache_len=128)
    gen = _gen(tiers, ("lookup", "self"), step_graphs=True)
    captures = []
    for _ in range(2):
        cache.reset()
        out = model.generate(ids, custom_generate=cascade_decoding, candidate_generator=gen,
                             max_new_tokens=NEW_TOKENS, **generate_cache_kwargs(cache))
        assert torch.equal(out, ref)
        steps = gen.captured_steps()
        captures.append(steps.captures)
        assert steps.use_graphs and all(step.graph is not None for step in steps.steps.values())
    assert captures[0] == len(gen.captured_steps().steps) >= 2 and captures[1] == captures[0]


@pytest.mark.parametrize("cache_kind", ["dynamic", "adaptive"])
@pytest.mark.parametrize("drafters, used", [(("lookup",), "lookup"), (("self",), "self"),
                                            (("lookup", "self"), "lookup")])
@pytest.mark.parametrize("arch, rejects", [("llama", False), ("qwen2", True)], ids=["llama", "qwen2-rejects"])
def test_cascade_is_greedy(repeated_prompt, arch, rejects, cache_kind, drafters, used):
    """Guards losslessness: every drafter alone and the cascade return plain greedy's tokens with the same cache,
    and the drafter really proposed and got tokens accepted (the identity is not vacuous). On the llama model the
    drafts are all accepted; on the qwen2 one some are rejected, so the crop of rejected tails is exercised."""
    tiers = _tiers(arch)
    model = tiers.model
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS,
                         cache=_cache(cache_kind, model))
    out, report = _run(tiers, repeated_prompt, drafters, _cache(cache_kind, model), max_new_tokens=NEW_TOKENS)
    assert torch.equal(out, ref)
    stats = report["drafters"][used]
    assert stats["proposed"] > 0 and stats["accepted"] > 0
    assert (stats["accepted"] < stats["proposed"]) == rejects
    assert report["verify_forwards"] < NEW_TOKENS - 1  # drafts saved verifier forwards
    json.dumps(report)


@pytest.mark.parametrize("cache_kind", ["static", "adaptive_static"])
@pytest.mark.parametrize("arch, rejects", [("llama", False), ("qwen2", True)], ids=["llama", "qwen2-rejects"])
def test_cascade_is_greedy_on_static_caches(repeated_prompt, arch, rejects, cache_kind):
    """Guards crops of fixed-size caches: a static layer rolls its length back, the adaptive one its tail rows."""
    tiers = _tiers(arch)
    model = tiers.model
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS, cache=_cache(cache_kind, model))
    out, report = _run(tiers, repeated_prompt, ("lookup", "self"), _cache(cache_kind, model),
                       max_new_tokens=NEW_TOKENS)
    assert torch.equal(out, ref)
    assert 0 < report["acceptance_rate"] and (report["acceptance_rate"] < 1) == rejects


def _cpu_compile():
    """generate's compile settings, compiling on the CPU too with dynamo's eager backend (its tracing and guards,
    no code generation), so the compiled cascade's shapes and graph count are checked without a GPU."""
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("cache_kind, widths", [("static", {1, 5, 9}), ("adaptive_static", {1})])
@pytest.mark.parametrize("arch, rejects", [("llama", False), ("qwen2", True)], ids=["llama", "qwen2-rejects"])
def test_compiled_cascade_is_greedy_at_fixed_shapes(repeated_prompt, arch, rejects, cache_kind, widths, monkeypatch):
    """Guards the compiled cascade: where generate compiles its step, the cascade's decode forwards go through
    compiled forwards at fixed shapes (on StaticCache the cascade's own step graphs, the default; on
    AdaptiveStaticKVCache generate's compiled call): on StaticCache every verify feeds one of verify_widths (1, 5, 9 for drafts of
    up to 8, padded), on AdaptiveStaticKVCache (a one-token compiled step) the verifies run eagerly at their own
    widths and draft-less rounds take the step. Either way the output is greedy's, a second call compiles nothing
    new, and each compiled forward starts a new cudagraph-trees step (interleaved graphs record no new tree paths)."""
    from torch._dynamo.utils import counters

    from hf_adaptive.precision import cascade

    if cache_kind == "static":
        tiers = _tiers(arch)
    else:  # its compiled step reads the cache through the fused attention: a model of its own
        tiers = prepare_tiers(hf_adaptive.enable_fused_attention(make_tiny_model(arch)), tiers=("int4", "fp32"))
    model = tiers.model
    fed, marks = [], []
    forward = cascade._forward
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(cascade, "_forward", lambda call, m, *a: fed.append((a[1].shape[1], call is not m)) or
                        forward(call, m, *a))
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS, cache=_cache(cache_kind, model),
                         disable_compile=True)
    for call in range(2):
        fed.clear()
        marks.clear()
        counters.clear()
        out, report = _run(tiers, repeated_prompt, ("lookup", "self"), _cache(cache_kind, model),
                           max_new_tokens=NEW_TOKENS, compile_config=_cpu_compile())
        assert torch.equal(out, ref)
        assert 0 < report["acceptance_rate"] and (report["acceptance_rate"] < 1) == rejects
        decode = fed[1:]  # the first forward is the eager prefill
        assert fed[0] == (repeated_prompt.shape[1], False)
        if cache_kind == "static":  # room for every width: no verify runs eagerly
            assert all(compiled for _, compiled in decode)
        # every compiled forward (verifies and int4 draft steps), and only those, starts a new cudagraph-trees step
        self_steps = report["drafters"].get("self", {}).get("proposed", 0)
        assert len(marks) == sum(compiled for _, compiled in decode) + self_steps > 0
        assert {width for width, compiled in decode if compiled} <= widths
        assert all(width > max(widths) for width, compiled in decode if not compiled)  # wider than any graph
        if call:
            assert counters["stats"]["unique_graphs"] == 0  # nothing traced again


@pytest.mark.parametrize("cache_kind", ["dynamic", "adaptive"])
def test_cascade_is_greedy_with_sliding_window_layers(repeated_prompt, cache_kind):
    """Guards crops of sliding-window layers (Gemma 3: window 16, shorter than the prompt) under the cascade."""
    tiers = _tiers("gemma3")
    model = tiers.model
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS, cache=_cache(cache_kind, model))
    out, report = _run(tiers, repeated_prompt, ("lookup", "self"), _cache(cache_kind, model),
                       max_new_tokens=NEW_TOKENS)
    assert torch.equal(out, ref)
    assert report["acceptance_rate"] > 0


def test_self_draft_runs_int4_and_leaves_only_top_tier_kv(tiers, repeated_prompt):
    """Guards the self-draft's two invariants: its forwards run the int4 tier (restored after), and its KV
    entries are cropped, so the cache ends as greedy's does (int4 KV would differ by ~1e-2, not ~1e-6)."""
    model, seen = tiers.model, []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(tiers.active))
    try:
        greedy_cache, cascade_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS, cache=greedy_cache)
        seen.clear()
        _run(tiers, repeated_prompt, ("self",), cascade_cache, max_new_tokens=NEW_TOKENS)
    finally:
        hook.remove()
    assert "int4" in seen and "fp32" in seen and tiers.active == "fp32"
    assert cascade_cache.get_seq_length() == greedy_cache.get_seq_length()
    for a, b in zip(cascade_cache.layers, greedy_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)


def test_cascade_stops_at_eos_like_greedy(tiers, repeated_prompt):
    """Guards the stop rules: drafts accepted past an EOS are cut, as greedy decoding stops there."""
    model = tiers.model
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
    eos = int(ref[0, repeated_prompt.shape[1] + 9])  # a token greedy emits mid-way (inside a lookup run)
    ref_eos = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    out, _ = _run(tiers, repeated_prompt, ("lookup", "self"), max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    assert ref_eos.shape[1] < ref.shape[1]
    assert torch.equal(out, ref_eos)


def test_cascade_takes_the_tokenizers_all_ones_mask(tiers, repeated_prompt):
    """Guards the usual call ``generate(**tokenizer(...))``: an all-ones attention mask is no padding."""
    model = tiers.model
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=8)
    out, _ = _run(tiers, repeated_prompt, ("lookup", "self"), attention_mask=torch.ones_like(repeated_prompt),
                  max_new_tokens=8)
    assert torch.equal(out, ref)


def test_cascade_refuses_what_it_cannot_keep_lossless(tiers, repeated_prompt):
    """Guards the clear errors: batch > 1, sampling, padding, a generator of another model."""
    model = tiers.model
    padded_mask = torch.ones_like(repeated_prompt)
    padded_mask[:, 0] = 0
    cases = [
        (dict(inputs=repeated_prompt.repeat(2, 1)), "batch size must be 1"),
        (dict(inputs=repeated_prompt, do_sample=True), "greedy only"),
        (dict(inputs=repeated_prompt, attention_mask=padded_mask), "masks prompt tokens"),
    ]
    for kwargs, message in cases:
        gen = CascadeCandidateGenerator(tiers)
        with pytest.raises(ValueError, match=message):
            model.generate(custom_generate=cascade_decoding, candidate_generator=gen, max_new_tokens=4, **kwargs)
    other = prepare_tiers(make_tiny_model("llama", seed=1), tiers=("int4", "fp32"))
    with pytest.raises(ValueError, match="another model"):
        model.generate(repeated_prompt, custom_generate=cascade_decoding,
                       candidate_generator=CascadeCandidateGenerator(other), max_new_tokens=4)


def test_generator_hosted_by_the_transformers_interface(tiers, repeated_prompt):
    """Guards the CandidateGenerator contract outside cascade_decoding: candidates extend the ids, and
    update_candidate_strategy computes the confidence itself when the caller has not read it."""
    gen = CascadeCandidateGenerator(tiers, DraftPolicyConfig(drafters=("lookup",)))
    gen.bind(DynamicCache(config=tiers.model.config), None, max_length=100)
    candidates, logits = gen.get_candidates(repeated_prompt)
    k = candidates.shape[1] - repeated_prompt.shape[1]
    assert logits is None and k > 0 and torch.equal(candidates[:, :repeated_prompt.shape[1]], repeated_prompt)
    verifier_logits = torch.randn(1, k + 1, tiers.model.config.vocab_size)
    gen.update_candidate_strategy(candidates, verifier_logits, 1)
    assert 0.0 <= gen.score <= 1.0
    assert gen.telemetry.report()["drafters"]["lookup"] | {"draft_ms": 0} == {
        "rounds": 1, "proposed": k, "accepted": 1, "emitted": 2, "acceptance_rate": 1 / k,
        "tokens_per_verify": 2.0, "draft_ms": 0, "verify_ms": 0.0}


def test_self_draft_needs_a_cheaper_tier():
    only_top = prepare_tiers(make_tiny_model("llama"), tiers=("fp32",))
    with pytest.raises(ValueError, match="cheaper tier"):
        CascadeCandidateGenerator(only_top)
    CascadeCandidateGenerator(only_top, DraftPolicyConfig(drafters=("lookup",)))  # lookup alone needs none


def test_record_draft_acceptance_totals():
    """Guards the eval script's table: totals per (run, drafter), the identical-verse count and the modelled
    speed-up (emitted tokens per verify forward plus the self-draft's cost)."""
    from helpers import load_eval_script

    script = load_eval_script("record_draft_acceptance")

    def run(identical, lookup, self_draft, verifies, emitted):
        drafters = {"lookup": {"rounds": 1, "proposed": lookup[0], "accepted": lookup[1]},
                    "self": {"rounds": 1, "proposed": self_draft[0], "accepted": self_draft[1]}}
        return {"token_identical": identical, "drafters": drafters, "verify_forwards": verifies,
                "emitted_tokens": emitted}

    records = [{"runs": {name: run(True, (4, 2), (2, 2), 3, 9) for name in script.RUNS}},
               {"runs": {name: run(name != "self", (6, 0), (4, 1), 5, 7) for name in script.RUNS}}]
    rows = {(r["run"], r["drafter"]): r for r in script._totals(records, 0.5)}
    assert rows[("cascade", "lookup")]["proposed"] == 10 and rows[("cascade", "lookup")]["accepted"] == 2
    assert rows[("cascade", "self")]["acceptance_rate"] == 0.5
    assert rows[("cascade", "self")]["run_tokens_per_verify"] == 2.0
    assert rows[("cascade", "self")]["modelled_speedup"] == pytest.approx(16 / (8 + 0.5 * 6))  # 6 self drafts
    assert rows[("self", "self")]["verses_token_identical"] == "1/2"


def test_generator_feeds_the_policy_what_the_verifier_kept(repeated_prompt):
    """Guards the loop the policy learns from: the generator's history holds exactly the accepted tokens and the
    cut-short rounds of its telemetry (qwen2's tiny model rejects some drafts), and a new generation keeps the share
    ``carry`` of it (none at 0)."""
    tiers = _tiers("qwen2")
    config = DraftPolicyConfig(drafters=("lookup", "self"), bands=ALWAYS, self_draft_cost=0.0, self_prior=1.0,
                               prior_acceptance=1.0, prior_weight=1e9)
    gen = CascadeCandidateGenerator(tiers, config)
    tiers.model.generate(repeated_prompt, custom_generate=cascade_decoding, candidate_generator=gen,
                         max_new_tokens=NEW_TOKENS)
    rounds = [r for r in gen.telemetry.rounds if r.proposed]
    for name in {r.drafter for r in rounds}:
        mine = [r for r in rounds if r.drafter == name]
        assert gen.history[name] == DrafterRecord(sum(r.accepted for r in mine),
                                                  sum(r.accepted < r.proposed for r in mine))
    assert any(rec.rejections for rec in gen.history.values())
    before = dict(gen.history)
    gen.bind(None, None, 64)  # the next generation starts from half the evidence (carry=0.5)
    assert gen.history == {name: DrafterRecord(r.accepted / 2, r.rejections / 2) for name, r in before.items()}
    fresh = CascadeCandidateGenerator(tiers, DraftPolicyConfig(carry=0.0))
    fresh.history = dict(before)
    fresh.bind(None, None, 64)
    assert fresh.history == {}


def test_record_draft_acceptance_tasks_read_their_own_field():
    """Guards the input-grounded task: `modernize` puts the King James verse (not the Spanish one) in its prompt,
    and every task's prompt keeps the one field the translation config fills."""
    from helpers import load_eval_script

    from hf_adaptive.evaluation.translate import TranslationConfig

    script = load_eval_script("record_draft_acceptance")
    assert script.TASKS["modernize"][0] == "en_kjv" and script.TASKS["translate"][0] == "es"
    for field, prompt in script.TASKS.values():
        assert TranslationConfig(prompt=prompt).prompt.format(es="VERSE").count("VERSE") == 1
    assert script._parser().parse_args(["--task", "modernize"]).task == "modernize"
    with pytest.raises(SystemExit):
        script._parser().parse_args(["--task", "summarise"])
