"""Bad input gives errors that name the parameter, the allowed values, the value and the fix; over-budget
behaviour at the lowest rung is explicit (warn once or raise), never silent."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig

from helpers import make_tiny_model
from hf_adaptive.kv.cache import AdaptiveKVCache
from hf_adaptive.kv.config import KVCacheConfig
from hf_adaptive.kv.pressure import KVBudgetExceededError


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                       num_hidden_layers=2, intermediate_size=64, vocab_size=32)


@pytest.mark.parametrize("kwargs,words", [
    (dict(backend="bnb"), ["backend", "'torch'", "'hqq'", "'bnb'"]),
    (dict(fixed_bits=3), ["fixed_bits", "(16, 8, 4, 2)", "3"]),
    (dict(block_size=12), ["block_size", "multiple of 8", "12"]),
    (dict(residual_length=0), ["residual_length", "positive", "0"]),
    (dict(memory_budget="lots"), ["memory_budget", "'lots'", "GiB"]),
    (dict(on_budget_exceeded="ignore"), ["on_budget_exceeded", "'warn'", "'ignore'"]),
    (dict(memory_budget="1GiB", gpu_memory_fraction=0.9), ["mutually exclusive"]),
])
def test_bad_settings_name_parameter_allowed_and_received(kwargs, words):
    """Guards against errors that do not say which parameter is wrong, what is allowed and what came in."""
    with pytest.raises(ValueError) as info:
        AdaptiveKVCache(_config(), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert "Fix" in str(info.value) or "mutually" in str(info.value)


def test_wrong_config_type():
    """Guards against AdaptiveKVCache(model) or a dict being accepted and failing later mid-generate."""
    with pytest.raises(ValueError, match="PretrainedConfig.*got dict.*Fix"):
        AdaptiveKVCache({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="kv_config"):
        AdaptiveKVCache(_config(), kv_config={"block_size": 64})
    with pytest.raises(ValueError, match="unknown argument"):
        AdaptiveKVCache(_config(), bits=4)


def test_budget_below_exact_window_is_refused():
    """Guards against a budget that can never be met (even the exact window exceeds it) being accepted."""
    # exact window: 2 layers * (64 + 64) tokens * 2 heads * 64 dims * 2 (K,V) * 2 bytes = 131072
    with pytest.raises(ValueError, match=r"memory_budget=100000 .* need 131072 .*Fix: memory_budget >= 131072"):
        AdaptiveKVCache(_config(), memory_budget=100_000)
    AdaptiveKVCache(_config(), memory_budget=131_072)


def test_budget_rechecked_with_real_batch_and_dtype():
    """Guards against the construction-time check (batch 1, bf16) passing for a fp32 batch of 4."""
    cache = AdaptiveKVCache(_config(), memory_budget=131_072)
    k = torch.zeros(4, 2, 5, 64)
    with pytest.raises(ValueError, match="batch 4 at 4 bytes"):
        cache.update(k, k, 0)


def _overflow(cache: AdaptiveKVCache, steps: int) -> None:
    for i in range(steps):
        k = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
        for layer_idx in range(2):
            cache.update(k, k, layer_idx)


def test_over_budget_at_lowest_rung_raises_when_asked():
    """Guards against silently running past the budget when the user asked for a hard limit."""
    cache = AdaptiveKVCache(_config(), memory_budget=140_000, fixed_bits=4, on_budget_exceeded="raise")
    with pytest.raises(KVBudgetExceededError, match=r"over memory_budget=140000.*\(4 bits\)"):
        _overflow(cache, 10)


def test_over_budget_at_lowest_rung_warns_once_and_continues():
    """Guards against warning spam per token, or stopping generation when the user chose to continue."""
    cache = AdaptiveKVCache(_config(), memory_budget=140_000, on_budget_exceeded="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _overflow(cache, 12)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    stats = cache.stats()
    assert stats["over_budget_steps"] >= 1 and cache.get_seq_length() == 12 * 64
    assert all(set(layer.block_bits) == {4} for layer in cache.layers)  # it did reach the lowest rung first


def test_value_group_must_divide_head_dim():
    """Guards against a value group that silently straddles heads' channels."""
    cache = AdaptiveKVCache(_config(), value_group=48)
    k = torch.zeros(1, 2, 3, 64)
    with pytest.raises(ValueError, match="value_group=48 must divide the head dim 64"):
        cache.update(k, k, 0)


def test_kv_config_object_and_overrides():
    """Guards against keyword overrides being ignored when a KVCacheConfig is also given."""
    cache = AdaptiveKVCache(_config(), KVCacheConfig(block_size=32, memory_budget="1MiB"), residual_length=16)
    assert (cache.settings.block_size, cache.settings.residual_length, cache.settings.memory_budget) == (32, 16, 2**20)


def test_packed_view_on_sliding_layer_is_refused():
    """Guards against handing the kernel a sliding layer as if it had the packed layout."""
    model = make_tiny_model("gemma3")
    cache = AdaptiveKVCache(model.config)
    with pytest.raises(ValueError, match="full-attention layers only"):
        cache.packed_view(0)
