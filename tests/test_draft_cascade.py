"""The lossless draft cascade through ``model.generate``: policy table, token identity with greedy decoding for each
drafter and both, on DynamicCache and AdaptiveKVCache, the self-draft's tier and cache hygiene, stops, errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_model
from transformers import DynamicCache

from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.static import AdaptiveStaticKVCache
from hf_adaptive.policy.draft_policy import DraftChoice, DraftPolicyConfig, choose_draft
from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.cascade import cascade_decoding
from hf_adaptive.precision.drafting import CascadeCandidateGenerator
from hf_adaptive.precision.tiers import prepare_tiers

ALWAYS = PrecisionPolicyConfig(high=0.0, low=0.0)  # every confidence > 0 drafts the full length
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tiers():
    return prepare_tiers(make_tiny_model("llama"), tiers=("int4", "fp32"))


@pytest.fixture(scope="module")
def repeated_prompt():
    """A prompt that repeats its own text, so prompt lookup finds continuations the model then follows."""
    base = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    return torch.cat([base, base, base[:, :4]], dim=1)


def _cache(kind: str, model):
    # residual 8 / block 8: history blocks are flushed during the test, so crops also pop blocks
    return {"dynamic": lambda: DynamicCache(config=model.config),
            "adaptive": lambda: AdaptiveKVCache(model.config, residual_length=8, block_size=8)}[kind]()


def _run(tiers, ids, drafters, cache=None, **kw):
    gen = CascadeCandidateGenerator(tiers, DraftPolicyConfig(drafters=drafters, bands=ALWAYS))
    extra = {} if cache is None else {"cache": cache}
    out = tiers.model.generate(ids, custom_generate=cascade_decoding, candidate_generator=gen, **extra, **kw)
    return out, gen.telemetry.report()


@pytest.mark.parametrize("score, lookup, drafters, expected", [
    (0.95, 5, ("lookup", "self"), DraftChoice("lookup", 5)),   # a match is free: it runs first
    (0.10, 5, ("lookup", "self"), DraftChoice("lookup", 5)),   # ... whatever the confidence
    (0.95, 20, ("lookup", "self"), DraftChoice("lookup", 8)),  # capped at max_lookup_tokens
    (0.95, 0, ("lookup", "self"), DraftChoice("self", 4)),     # no match, confident: full self-draft
    (0.70, 0, ("lookup", "self"), DraftChoice("self", 2)),     # mid band: half
    (0.50, 0, ("lookup", "self"), DraftChoice("none", 0)),     # unsure: the verifier decodes alone
    (None, 0, ("lookup", "self"), DraftChoice("self", 4)),     # before the first verify
    (0.95, 5, ("self",), DraftChoice("self", 4)),              # lookup disabled
    (0.95, 0, ("lookup",), DraftChoice("none", 0)),            # self disabled, no match
])
def test_choose_draft_table(score, lookup, drafters, expected):
    """Guards the cascade's decision rules (lookup first, confidence bands for the self-draft)."""
    assert choose_draft(score, lookup, DraftPolicyConfig(drafters=drafters)) == expected


@pytest.mark.parametrize("kwargs", [{"drafters": ("lookup", "eagle")}, {"drafters": ()}, {"max_self_draft": 0},
                                    {"bands": 0.9}])
def test_draft_policy_config_refuses_bad_values(kwargs):
    with pytest.raises((ValueError, TypeError)):
        DraftPolicyConfig(**kwargs)


@pytest.mark.parametrize("cache_kind", ["dynamic", "adaptive"])
@pytest.mark.parametrize("drafters, used", [(("lookup",), "lookup"), (("self",), "self"),
                                            (("lookup", "self"), "lookup")])
def test_cascade_is_greedy(tiers, repeated_prompt, cache_kind, drafters, used):
    """Guards losslessness: every drafter alone and the cascade return plain greedy's tokens with the same cache,
    and the drafter really proposed and got tokens accepted (the identity is not vacuous)."""
    model = tiers.model
    ref = model.generate(repeated_prompt, do_sample=False, max_new_tokens=NEW_TOKENS,
                         cache=_cache(cache_kind, model))
    out, report = _run(tiers, repeated_prompt, drafters, _cache(cache_kind, model), max_new_tokens=NEW_TOKENS)
    assert torch.equal(out, ref)
    stats = report["drafters"][used]
    assert stats["proposed"] > 0 and stats["accepted"] > 0
    assert report["verify_forwards"] < NEW_TOKENS - 1  # drafts saved verifier forwards
    json.dumps(report)


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


def test_cascade_refuses_what_it_cannot_keep_lossless(tiers, repeated_prompt):
    """Guards the clear errors: batch > 1, sampling, a static cache, a generator of another model."""
    model = tiers.model
    cases = [
        (dict(inputs=repeated_prompt.repeat(2, 1)), "batch size must be 1"),
        (dict(inputs=repeated_prompt, do_sample=True), "greedy only"),
        (dict(inputs=repeated_prompt, cache=AdaptiveStaticKVCache(model.config, max_cache_len=128)),
         "AdaptiveStaticKVCache is not supported"),
    ]
    for kwargs, message in cases:
        gen = CascadeCandidateGenerator(tiers)
        with pytest.raises(ValueError, match=message):
            model.generate(custom_generate=cascade_decoding, candidate_generator=gen, max_new_tokens=4, **kwargs)
    other = prepare_tiers(make_tiny_model("llama", seed=1), tiers=("int4", "fp32"))
    with pytest.raises(ValueError, match="another model"):
        model.generate(repeated_prompt, custom_generate=cascade_decoding,
                       candidate_generator=CascadeCandidateGenerator(other), max_new_tokens=4)
