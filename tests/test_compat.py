"""hf_adaptive.compat: cropping caches across the transformers releases the package supports."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from hf_adaptive.compat import cache_can_crop, crop_cache, ensure_croppable, forward_cache_kwargs
from helpers import make_tiny_model


class _StaticLayerWithoutCrop(StaticLayer):
    """``StaticLayer`` as transformers < 5.18 ships it: a device length counter, no ``crop``."""

    crop = None
    is_croppable = False


def _filled_static_cache(model, tokens: int, layer_type=None) -> StaticCache:
    cache = StaticCache(config=model.config, max_cache_len=32)
    if layer_type is not None:
        for layer in cache.layers:
            layer.__class__ = layer_type
    model(torch.arange(3, 3 + tokens)[None], use_cache=True, **forward_cache_kwargs(model, cache))
    return cache


@pytest.mark.parametrize("layer_type", [None, _StaticLayerWithoutCrop], ids=["current", "before-5.18"])
def test_crop_cache_rolls_a_static_cache_back(layer_type):
    """Guards the cascade's rollback of StaticCache on every supported release: the length drops by the count
    (the layers' own crop, or the rewound device counter where the release has none), and the next forward's
    logits equal those of a cache that never held the cropped tokens."""
    model = make_tiny_model("llama")
    cache = _filled_static_cache(model, 10, layer_type)
    assert ensure_croppable(cache)
    crop_cache(cache, 4)
    crop_cache(cache, 0)  # a count of 0 removes nothing
    assert int(cache.get_seq_length()) == 6
    fresh = _filled_static_cache(model, 6)
    nxt = torch.tensor([[50]])
    pos = torch.tensor([[6]])
    rolled, never = (model(nxt, position_ids=pos, use_cache=True, **forward_cache_kwargs(model, c)).logits
                     for c in (cache, fresh))
    torch.testing.assert_close(rolled, never)


def test_crop_cache_refuses_a_negative_count():
    cache = _filled_static_cache(make_tiny_model("llama"), 4)
    with pytest.raises(ValueError, match="tokens_to_remove must be >= 0"):
        crop_cache(cache, -2)


@pytest.mark.parametrize("layer_type", [None, _StaticLayerWithoutCrop], ids=["current", "before-5.18"])
def test_ensure_croppable_gives_an_old_static_cache_a_crop(layer_type):
    """Guards what generate's deferred stop check calls on an opted-in StaticCache: ``crop(0)`` every step and
    ``crop(-1)`` after an extra step, on every supported release (an instance-level crop where the release has
    none), with the next forward's logits those of a cache that never held the cropped token."""
    model = make_tiny_model("llama")
    cache = _filled_static_cache(model, 7, layer_type)
    assert ensure_croppable(cache) and cache_can_crop(cache)
    release_lacks_crop = layer_type is not None or not callable(getattr(StaticLayer, "crop", None))
    assert ("crop" in vars(cache)) == release_lacks_crop  # the class's own crop where there is one
    cache.crop(0)
    cache.crop(-1)
    assert int(cache.get_seq_length()) == 6
    if release_lacks_crop:
        with pytest.raises(ValueError, match="tokens_to_remove must be <= 0"):
            cache.crop(2)
    fresh = _filled_static_cache(model, 6)
    nxt, pos = torch.tensor([[50]]), torch.tensor([[6]])
    rolled, never = (model(nxt, position_ids=pos, use_cache=True, **forward_cache_kwargs(model, c)).logits
                     for c in (cache, fresh))
    torch.testing.assert_close(rolled, never)


def test_ensure_croppable_leaves_other_caches_alone():
    from transformers import DynamicCache

    assert ensure_croppable(DynamicCache()) and "crop" not in vars(DynamicCache())
    assert not ensure_croppable(object())
