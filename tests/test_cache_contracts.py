"""The DynamicLayer / StaticLayer surface that ``generate`` and users touch, kept by both adaptive caches.

Every contract runs over AdaptiveKVCache and AdaptiveStaticKVCache (eager, CPU) in five storage regimes: tokens
only in the exact tail, history in 16-, 8- and 4-bit blocks, and a memory budget that walks the ladder
16 -> 8 -> 4 bits and demotes stored blocks. Where storage is lossless, results equal transformers' DynamicCache.
Layer-level contracts feed random (B, H, T, D) states through ``cache.update``; generate-level ones run a tiny
random-init Llama (hidden 64, 2 layers, 2 KV heads of 16 dims).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import hf_adaptive
from helpers import make_tiny_model
from hf_adaptive.kv.cache import AdaptiveKVCache, generate_cache_kwargs
from hf_adaptive.kv.static import AdaptiveStaticKVCache, CacheFullError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, H, D = 2, 2, 16  # the tiny Llama's batch used here, KV heads and head dim
PROMPT, STEPS = 21, 23  # a prefill, then decode-sized updates
N = PROMPT + STEPS
SMALL = dict(residual_length=8, block_size=8, value_group=16)
REGIMES = {
    "tail": {},  # residual_length 64, block_size 64: these sequences never leave the exact tail
    "16bit": SMALL,
    "8bit": {**SMALL, "fixed_bits": 8},
    "4bit": {**SMALL, "fixed_bits": 4},
    "demotion": {**SMALL, "memory_budget": 36_000},  # fp32, batch 2: 16 -> 8 -> 4 bits, then 16-bit blocks -> 4
}
LOSSLESS = ("tail", "16bit")
ATOL = {"tail": 0.0, "16bit": 0.0, "8bit": 0.05, "4bit": 0.5, "demotion": 0.5}  # for randn states
MAX_CACHE_LEN = 96
CASES = [(kind, regime) for kind in ("dynamic", "static") for regime in REGIMES]


def make_cache(config, kind: str, regime: str, **extra):
    kwargs = {**REGIMES[regime], **extra}
    if kind == "static":
        return AdaptiveStaticKVCache(config, max_cache_len=kwargs.pop("max_cache_len", MAX_CACHE_LEN), **kwargs)
    return AdaptiveKVCache(config, **kwargs)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(params=CASES, ids=[f"{k}-{r}" for k, r in CASES])
def case(request, model):
    """(cache kind, regime, a fresh cache of that kind and regime)."""
    kind, regime = request.param
    return kind, regime, make_cache(model.config, kind, regime)


def feed(cache, seed: int = 0, chunks=(PROMPT,) + (1,) * STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Update every layer with random states, chunk by chunk; returns all keys and values fed (B, H, sum, D)."""
    g = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for n in chunks:
        k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
        for layer_idx in range(len(cache.layers)):
            cache.update(k, v, layer_idx)
        ks.append(k), vs.append(v)
    return torch.cat(ks, -2), torch.cat(vs, -2)


def snapshot(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def assert_sequence(cache, expected: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each layer's keys/values equal ``expected`` exactly (shape included)."""
    for layer, (k, v) in zip(cache.layers, expected):
        assert layer.keys.shape == k.shape and torch.equal(layer.keys, k)
        assert layer.values.shape == v.shape and torch.equal(layer.values, v)


def generate(model, ids, cache, **kwargs):
    kwargs.setdefault("max_new_tokens", 24)
    return model.generate(ids, do_sample=False, disable_compile=True, **generate_cache_kwargs(cache), **kwargs)


def returned_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def prompt(length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (B, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- storage regimes
def test_regimes_store_what_they_claim(case):
    """Guards the suite itself: a regime that silently stored everything exact would make every test below pass
    without reaching the quantized pools or the demotion path."""
    kind, regime, cache = case
    feed(cache)
    bits = set(cache.layers[0].block_bits)
    expected = {"tail": set(), "16bit": {16}, "8bit": {8}, "4bit": {4}, "demotion": {4}}[regime]
    assert bits == expected, bits
    if regime == "demotion":
        assert {h["bits"] for h in cache.history} == {16, 8, 4}
        assert cache.stats()["demotions"].get("16->4", 0) > 0


# ---------------------------------------------------------------------------------------------- keys / values
def test_keys_and_values_are_the_whole_sequence(case):
    """Guards DynamicLayer's contract: once tokens left the exact tail, ``layer.keys`` held only the tail
    (transformers' generation checks read (B, H, seq_len, D)). Lossless regimes give back exactly what was fed."""
    kind, regime, cache = case
    k, v = feed(cache)
    assert cache.get_seq_length() == N
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (B, H, N, D)
        tail = layer.tail_keys.shape[-2]
        assert torch.equal(layer.keys[..., N - tail:, :], k[..., N - tail:, :])  # the exact tail stays exact
        torch.testing.assert_close(layer.keys, k, atol=ATOL[regime], rtol=0)
        torch.testing.assert_close(layer.values, v, atol=ATOL[regime], rtol=0)
        if regime in LOSSLESS:
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_whole_sequence_is_cached_until_the_layer_changes(case):
    """Guards the lazy cache of keys/values: a second read must not rebuild it, and every change (update,
    crop, reorder, demotion) must show in the next read instead of a stale copy."""
    kind, regime, cache = case
    feed(cache)
    layer = cache.layers[0]
    assert layer.keys.data_ptr() == layer.keys.data_ptr()
    k1, v1 = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    for layer_idx in range(len(cache.layers)):
        cache.update(k1, v1, layer_idx)
    assert layer.keys.shape[-2] == N + 1 and torch.equal(layer.keys[..., -1:, :], k1)
    grown = layer.keys.clone()
    cache.crop(-1)
    assert torch.equal(layer.keys, grown[..., :-1, :])
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, grown[[1, 0], :, :-1])
    if regime in ("16bit", "8bit"):  # blocks above 4 bits: demoting them must change what keys reads
        before = layer.keys.clone()
        assert layer.demote(4, 2) == 2
        assert not torch.equal(layer.keys, before)
        torch.testing.assert_close(layer.keys, before, atol=ATOL["4bit"], rtol=0)


def test_keys_are_read_only(case):
    """Guards against an assignment to keys being taken as the sequence (it is assembled from the pools)."""
    kind, regime, cache = case
    feed(cache, chunks=(PROMPT,))
    with pytest.raises(AttributeError, match="read-only.*Fix"):
        cache.layers[0].keys = torch.zeros(B, H, PROMPT, D)


# ---------------------------------------------------------------------------------------------- lengths, masks
def test_seq_length_and_mask_sizes(case):
    """Guards the lengths generate builds masks and positions from: 0 before any update, then stored + query."""
    kind, regime, cache = case
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(5, 0) == (5, 0)
    assert cache.layers[0].keys is None
    feed(cache)
    for layer_idx in range(len(cache.layers)):
        assert cache.get_seq_length(layer_idx) == N
        assert cache.get_mask_sizes(1, layer_idx) == (N + 1, 0)
        assert cache.get_mask_sizes(4, layer_idx) == (N + 4, 0)
    assert cache.get_max_length() == (MAX_CACHE_LEN if kind == "static" else -1)


def test_early_initialization_then_update(case, model):
    """Guards Cache.early_initialization (export recipes, chunked prefill): an empty, initialized layer must
    report 0 tokens and then store exactly what a lazily initialized one stores."""
    kind, regime, cache = case
    cache.early_initialization(B, H, D, torch.float32, torch.device("cpu"))
    assert cache.is_initialized and cache.get_seq_length() == 0
    assert cache.layers[0].keys.shape == (B, H, 0, D)
    feed(cache)
    lazy = make_cache(model.config, kind, regime)
    feed(lazy)
    assert_sequence(cache, snapshot(lazy))


# ---------------------------------------------------------------------------------------------- crop
@pytest.mark.parametrize("remove", [1, 5, 17, N, N + 10])
def test_crop_removes_the_last_tokens(case, remove, caplog):
    """Guards crop(-n) (assisted decoding's rollback): the first tokens stay as they read before, also when the
    crop reaches history blocks; removing everything (or more) leaves an empty, reusable layer."""
    kind, regime, cache = case
    feed(cache)
    before = snapshot(cache)
    cache.crop(-remove)
    kept = max(N - remove, 0)
    assert cache.get_seq_length() == kept and cache.get_mask_sizes(1, 0) == (kept + 1, 0)
    assert_sequence(cache, [(k[..., :kept, :], v[..., :kept, :]) for k, v in before])
    feed(cache, seed=1, chunks=(3,))
    assert cache.layers[1].keys.shape == (B, H, kept + 3, D)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("regime", LOSSLESS)  # a crop into quantized blocks returns them dequantized (counted)
def test_crop_then_refeed_leaves_no_trace(model, kind, regime):
    """Guards the rollback of rejected candidates: cropping tokens and feeding the same ones again must restore
    the sequence exactly where storage is lossless (is_croppable)."""
    cache = make_cache(model.config, kind, regime)
    k, v = feed(cache)
    cache.crop(-4)
    for layer_idx in range(len(cache.layers)):
        cache.update(k[..., -4:, :], v[..., -4:, :], layer_idx)
    assert_sequence(cache, [(k, v)] * len(cache.layers))
    assert cache.is_croppable and cache.stats()["lossy_crop_tokens"] == 0


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_crop_with_a_positive_count_is_refused_like_transformers(model, kind):
    """Guards crop's semantics: transformers' DynamicLayer.crop raises on a positive value; ours kept that many
    tokens instead, so code written for the installed transformers cropped silently wrong."""
    cache, reference = make_cache(model.config, kind, "16bit"), DynamicCache(config=model.config)
    feed(cache)
    feed(reference)
    with pytest.raises(ValueError, match="positive"):
        reference.crop(5)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"crop\(tokens_to_remove=5\).*negative.*Fix"):
        cache.crop(5)
    with pytest.raises(TypeError, match="int"):
        cache.crop(-1.0)
    cache.crop(0)
    assert_sequence(cache, before)


# ---------------------------------------------------------------------------------------------- batch operations
def test_reorder_select_and_repeat_move_whole_rows(case):
    """Guards beam search and batch expansion: every row op must reach the pools as well as the tail, and
    move quantized data without re-quantizing it (so it is exact in every regime)."""
    kind, regime, cache = case
    feed(cache)
    before = snapshot(cache)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert_sequence(cache, [(k[[1, 0]], v[[1, 0]]) for k, v in before])
    cache.batch_repeat_interleave(2)
    assert_sequence(cache, [(k[[1, 1, 0, 0]], v[[1, 1, 0, 0]]) for k, v in before])
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert_sequence(cache, [(k[[1, 0]], v[[1, 0]]) for k, v in before])
    assert cache.get_seq_length() == N
    feed(cache, seed=2, chunks=(1,))
    assert cache.layers[0].keys.shape == (B, H, N + 1, D)


# ---------------------------------------------------------------------------------------------- reset and reuse
def test_reset_gives_a_cache_as_new(case, model):
    """Guards reset: no tokens, no history, no stale whole-sequence copy, and the same results as a new cache."""
    kind, regime, cache = case
    feed(cache)
    assert cache.layers[0].keys is not None
    cache.reset()
    stats = cache.stats()
    assert cache.get_seq_length() == 0 and cache.history == [] and stats["kv_bytes"] == 0 and stats["step"] == 0
    assert stats.get("view_changes", 0) == 0 and not getattr(cache, "hooked_step", False)
    for layer in cache.layers:  # the static cache may keep its buffers for the next sequence: then empty
        assert layer._full is None
        assert layer.keys is None if not layer.is_initialized else layer.keys.shape == (B, H, 0, D)
    feed(cache, seed=3)
    fresh = make_cache(model.config, kind, regime)
    feed(fresh, seed=3)
    assert_sequence(cache, snapshot(fresh))


def test_reused_for_a_second_generate(case, model):
    """Guards reuse: after reset a second generate equals a new cache's; continuing a conversation (no reset)
    equals DynamicCache where lossless, and the cache holds both turns."""
    kind, regime, cache = case
    first = prompt()
    turn1 = generate(model, first, cache, max_new_tokens=12)
    cache.reset()
    again = generate(model, first, cache, max_new_tokens=12)
    assert torch.equal(again, generate(model, first, make_cache(model.config, kind, regime), max_new_tokens=12))
    turn2_ids = torch.cat([again, prompt(length=5, seed=7)], dim=1)
    turn2 = generate(model, turn2_ids, cache, max_new_tokens=12)
    assert cache.get_seq_length() == turn2.shape[1] - 1
    assert cache.layers[0].keys.shape == (B, H, turn2.shape[1] - 1, D)
    if regime in LOSSLESS:
        reference = DynamicCache(config=model.config)
        generate(model, first, reference, max_new_tokens=12)
        assert torch.equal(turn1, again)
        assert torch.equal(turn2, generate(model, turn2_ids, reference, max_new_tokens=12))


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.filterwarnings("ignore:KV cache holds")  # beams double the rows: the demotion budget is exceeded
@pytest.mark.parametrize("mode", ["greedy", "beam", "prompt_lookup"])
def test_generate_dict_output_holds_the_whole_sequence(case, model, mode):
    """Guards what transformers' own generation tests check on the returned cache (greedy and beam dict outputs,
    assisted decoding): each layer's keys/values are (batch, heads, seq_len, head_dim) like DynamicCache's,
    with DynamicCache's tokens and keys where storage is lossless."""
    kind, regime, cache = case
    # prompt lookup: one repetitive sequence (assisted decoding takes batch 1), so candidates are proposed
    ids = prompt(length=12)[:1].repeat(1, 3) if mode == "prompt_lookup" else prompt()
    kwargs = {"greedy": {}, "beam": {"num_beams": 2}, "prompt_lookup": {"prompt_lookup_num_tokens": 3}}[mode]
    outs = [generate(model, ids, c, return_dict_in_generate=True, **kwargs)
            for c in (DynamicCache(config=model.config), cache)]
    ref, ours = (returned_cache(out) for out in outs)
    assert ours is cache
    for layer, ref_layer in zip(ours.layers, ref.layers):
        assert layer.keys.shape == layer.values.shape == ref_layer.keys.shape
        assert layer.keys.shape[-2] == outs[1].sequences.shape[1] - 1
        if regime in LOSSLESS:
            torch.testing.assert_close(layer.keys, ref_layer.keys)
            torch.testing.assert_close(layer.values, ref_layer.values)
    if regime in LOSSLESS:
        assert torch.equal(outs[0].sequences, outs[1].sequences)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("regime", [r for r in REGIMES if r != "tail"])  # with no history nothing is built
def test_decode_steps_never_build_the_whole_sequence(model, kind, regime):
    """Guards the hot path: keys/values are built only when read, never by generate's own steps (which would
    dequantize the history a second time per step), and a read after generate builds them once."""
    cache = make_cache(model.config, kind, regime)
    generate(model, prompt(), cache)
    assert all(layer._full is None for layer in cache.layers)
    assert cache.layers[0].keys.shape == (B, H, N, D) and cache.layers[0]._full is not None


@pytest.fixture(scope="module")
def fused_model():
    return hf_adaptive.enable_fused_attention(make_tiny_model("llama"))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("regime", ["16bit", "4bit"])
def test_packed_decode_keeps_the_contract_without_building_it(fused_model, kind, regime):
    """Guards the fused decode path: its steps read the packed layout and must never build the whole sequence
    (no dequantization per step), yet keys/values afterwards are the whole sequence as on the eager path."""
    cache = make_cache(fused_model.config, kind, regime)
    out = generate(fused_model, prompt(), cache)
    assert all(layer._full is None for layer in cache.layers)
    eager = make_cache(fused_model.config, kind, regime, packed_attention=False) if kind == "dynamic" else None
    for layer in cache.layers:
        assert layer.keys.shape == (B, H, out.shape[1] - 1, D)
    if kind == "static":
        assert cache.get_mask_sizes(1, 0) == (MAX_CACHE_LEN, 0)  # a static decode step's keys are the view
    else:
        generate(fused_model, prompt(), eager)
        torch.testing.assert_close(cache.layers[0].keys, eager.layers[0].keys, atol=ATOL[regime], rtol=0)


# ---------------------------------------------------------------------------------------------- max_cache_len
PAST_MAX_PATHS = {  # (block settings, fused attention)
    "eager-default-blocks": ({}, False),
    "eager-small-blocks": (SMALL, False),
    "fused-small-blocks": (SMALL, True),
    "fused-default-blocks": ({}, True),
}


@pytest.mark.parametrize("path", sorted(PAST_MAX_PATHS))
def test_past_max_cache_len_is_one_clear_error(model, fused_model, path):
    """Guards the static cache's capacity: past max_cache_len it accepted tokens silently (default blocks),
    raised a raw RuntimeError (small blocks) or a nonsense key_mask error (fused). Now every path raises one
    CacheFullError (an IndexError, as StaticCache's, and a ValueError) before storing anything."""
    blocks, fused = PAST_MAX_PATHS[path]
    m = fused_model if fused else model
    cache = AdaptiveStaticKVCache(m.config, max_cache_len=32, **blocks)
    with pytest.raises(CacheFullError, match=r"max_cache_len=32 .* to 33 \(32 stored \+ 1 new\).*Fix") as info:
        generate(m, prompt(length=20), cache, max_new_tokens=30)
    assert isinstance(info.value, IndexError) and isinstance(info.value, ValueError)
    assert cache.get_seq_length() == 32 and cache.layers[1].keys.shape == (B, H, 32, D)
    assert not cache.hooked_step
    cache.crop(-4)  # the cache is still usable
    feed(cache, chunks=(4,))
    assert cache.layers[0].keys.shape == (B, H, 32, D)


def test_prompt_longer_than_max_cache_len_is_refused_before_storing(model):
    """Guards the prefill and direct layer updates: a prompt over max_cache_len must not be half stored."""
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=16, **SMALL)
    with pytest.raises(CacheFullError, match=r"max_cache_len=16 .* to 20 \(0 stored \+ 20 new\)"):
        generate(model, prompt(length=20), cache, max_new_tokens=2)
    assert cache.get_seq_length() == 0 and cache.history == []
    feed(cache, chunks=(10,))
    with pytest.raises(CacheFullError, match=r"to 17 \(10 stored \+ 7 new\)"):
        cache.layers[0].update(torch.zeros(B, H, 7, D), torch.zeros(B, H, 7, D))
    assert cache.layers[0].get_seq_length() == 10
