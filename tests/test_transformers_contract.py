"""The parts of the transformers API that AdaptiveKVCache relies on (5.17 and 5.24 must both pass).

If one of these fails after a transformers upgrade, the cache needs porting: the failure names what moved.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import (Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer,
                                      get_layer_types_and_kwargs)

from helpers import make_tiny_model

TF_RELEASE = Version(transformers.__version__).release


@pytest.mark.parametrize("name", ["lazy_initialization", "update", "get_mask_sizes", "get_seq_length",
                                  "get_max_length", "reset", "reorder_cache"])
def test_cache_layer_mixin_methods(name):
    """Guards against CacheLayerMixin losing a method our layers override or inherit."""
    assert callable(getattr(CacheLayerMixin, name))


@pytest.mark.parametrize("name", ["crop", "batch_repeat_interleave", "batch_select_indices"])
def test_dynamic_layer_methods(name):
    """Guards against DynamicLayer losing the batch/crop hooks generate calls on our layers."""
    assert callable(getattr(DynamicLayer, name))
    assert DynamicLayer.is_croppable is True


def test_cache_container_api():
    """Guards against Cache's constructor or dispatch methods changing shape."""
    assert "layers" in inspect.signature(Cache.__init__).parameters
    for name in ("update", "reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices", "reset",
                 "get_seq_length", "get_mask_sizes"):
        assert callable(getattr(Cache, name)), name
    assert list(inspect.signature(Cache.update).parameters)[:4] == ["self", "key_states", "value_states", "layer_idx"]
    assert isinstance(Cache.is_croppable, property)


def test_sliding_window_layer_api():
    """Guards against the sliding layer we subclass changing its constructor or window bookkeeping."""
    layer = DynamicSlidingWindowLayer(sliding_window=4)
    k = torch.randn(1, 1, 6, 2)
    keys, _ = layer.update(k, k)
    assert keys.shape[-2] == 6 and layer.keys.shape[-2] == 3 and layer.get_seq_length() == 6
    assert hasattr(layer, "activate_past_recording")


def test_layer_types_from_config():
    """Guards against get_layer_types_and_kwargs changing its return forms (dict in 5.17, list in 5.24)."""
    types, kwargs = get_layer_types_and_kwargs(make_tiny_model("gemma3").config.get_text_config(decoder=True))
    assert types == ["sliding_attention", "full_attention"]
    per_layer = [kwargs] * len(types) if isinstance(kwargs, dict) else kwargs
    assert per_layer[0]["sliding_window"] == 16
    types, _ = get_layer_types_and_kwargs(make_tiny_model("llama").config)
    assert types == ["full_attention", "full_attention"]


def test_generate_takes_a_user_cache_and_calls_update_per_layer():
    """Guards against generate ignoring a user cache or models no longer calling cache.update(k, v, idx)."""
    model = make_tiny_model("llama")
    calls = []

    class Recording(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            calls.append((layer_idx, key_states.shape[-2]))
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    kwarg = "cache" if TF_RELEASE >= (5, 23) else "past_key_values"
    model.generate(torch.ones(1, 5, dtype=torch.long), max_new_tokens=3, do_sample=False,
                   **{kwarg: Recording(config=model.config)})
    assert calls == [(0, 5), (1, 5), (0, 1), (1, 1), (0, 1), (1, 1)]


def test_generate_kwarg_names():
    """Guards against the past_key_values -> cache rename: 5.23+ must accept cache=, older past_key_values=."""
    from hf_adaptive.kv.cache import generate_cache_kwargs

    expected = "cache" if TF_RELEASE >= (5, 23) else "past_key_values"
    assert list(generate_cache_kwargs(object())) == [expected]
    if TF_RELEASE >= (5, 23):
        assert "cache" in inspect.signature(make_tiny_model("llama").forward).parameters
