"""Without pressure, AdaptiveKVCache must be token-identical to DynamicCache for every generate mode.

Small residual_length/block_size make 16-bit history blocks (pools + block-table gather) appear within a
few dozen tokens, so these tests exercise the block path, not only the exact tail.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import make_tiny_model
from hf_adaptive.kv.cache import AdaptiveKVCache, generate_cache_kwargs

SMALL = dict(residual_length=8, block_size=8)


def _prompt(batch: int = 1, length: int = 21, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=g)


def _pair(model, cache_kwargs=SMALL, **gen):
    """(DynamicCache output, AdaptiveKVCache output, the adaptive cache) for the same generate call."""
    seed = gen.pop("seed", None)
    inputs = gen.pop("inputs")
    outs = []
    caches = [DynamicCache(config=model.config), AdaptiveKVCache(model.config, **cache_kwargs)]
    for cache in caches:
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model.generate(**inputs, **generate_cache_kwargs(cache), **gen))
    return outs[0], outs[1], caches[1]


def test_greedy_identical(tiny_model):
    """Guards against any change of K/V values or order in the block path (pools, gather, tail split)."""
    ref, out, cache = _pair(tiny_model, inputs={"input_ids": _prompt()}, max_new_tokens=40, do_sample=False)
    assert torch.equal(ref, out)
    assert any(layer.get("blocks", 0) >= 5 for layer in cache.stats()["layers"]), "history blocks never formed"


def test_sampling_identical_same_seed(tiny_model):
    """Guards against the cache consuming RNG or perturbing logits so sampled tokens diverge."""
    ref, out, _ = _pair(tiny_model, inputs={"input_ids": _prompt()}, max_new_tokens=30, do_sample=True,
                        top_k=20, temperature=1.3, seed=123)
    assert torch.equal(ref, out)


def test_beam_search_identical(tiny_model):
    """Guards against reorder_cache / batch expansion not reaching the pools and the block table."""
    ref, out, _ = _pair(tiny_model, inputs={"input_ids": _prompt(length=19)}, max_new_tokens=30,
                        do_sample=False, num_beams=3, num_return_sequences=2)
    assert torch.equal(ref, out)


def test_left_padded_batch_identical(tiny_model):
    """Guards against batch rows getting mixed up in the pools or the padding mask being misaligned."""
    ids = _prompt(batch=3, length=20)
    mask = torch.ones_like(ids)
    mask[0, :7], mask[2, :3] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    ref, out, _ = _pair(tiny_model, inputs={"input_ids": ids, "attention_mask": mask}, max_new_tokens=30,
                        do_sample=False)
    assert torch.equal(ref, out)


def test_prompt_lookup_decoding_identical(tiny_model):
    """Guards against crop() (rejected candidates) corrupting the tail or the block table."""
    ids = _prompt(length=12).repeat(1, 3)  # repetitive prompt: the n-gram lookup proposes candidates
    ref, out, _ = _pair(tiny_model, inputs={"input_ids": ids}, max_new_tokens=40, do_sample=False,
                        prompt_lookup_num_tokens=4)
    assert torch.equal(ref, out)


def test_assisted_decoding_with_assistant_model_identical():
    """Guards against wrong rollback when an assistant model's candidates are partly rejected."""
    model, assistant = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    ref, out, _ = _pair(model, inputs={"input_ids": _prompt(length=20)}, max_new_tokens=24, do_sample=False,
                        assistant_model=assistant)
    assert torch.equal(ref, out)


def test_multi_turn_reuse_and_reset_identical(tiny_model):
    """Guards against state leaking across turns (reuse) or surviving reset()."""
    first = _prompt(length=20)
    ref_cache, cache = DynamicCache(config=tiny_model.config), AdaptiveKVCache(tiny_model.config, **SMALL)
    outs = {}
    for name, c in (("ref", ref_cache), ("ours", cache)):
        turn1 = tiny_model.generate(first, **generate_cache_kwargs(c), max_new_tokens=20, do_sample=False)
        turn2_ids = torch.cat([turn1, _prompt(length=9, seed=5)], dim=1)
        outs[name] = tiny_model.generate(turn2_ids, **generate_cache_kwargs(c), max_new_tokens=20, do_sample=False)
    assert torch.equal(outs["ref"], outs["ours"])
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.history == []
    fresh = tiny_model.generate(first, **generate_cache_kwargs(DynamicCache(config=tiny_model.config)),
                                max_new_tokens=20, do_sample=False)
    again = tiny_model.generate(first, **generate_cache_kwargs(cache), max_new_tokens=20, do_sample=False)
    assert torch.equal(fresh, again)


@pytest.mark.parametrize("kwarg", ["past_key_values", "cache"])
def test_both_generate_kwargs(kwarg):
    """Guards against the cache being silently ignored (generate building its own) under either kwarg name."""
    import transformers
    from packaging.version import Version

    if kwarg == "cache" and Version(transformers.__version__).release < (5, 23):
        pytest.skip("generate(cache=...) exists from transformers 5.23")
    model = make_tiny_model("qwen2")
    cache = AdaptiveKVCache(model.config, **SMALL)
    ids = _prompt()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=10, do_sample=False, **{kwarg: cache})
    assert cache.get_seq_length() == ids.shape[1] + 9
    assert len(cache.history) == 10
