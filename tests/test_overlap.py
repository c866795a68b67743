"""Overlapped decoding: when ``generate`` may read its stop flag one step late (``hf_adaptive.overlap``), and the
precision controller's decision lag that keeps it from waiting for the device. The deferred loop itself needs CUDA
events; its token identity and the absence of host syncs are checked by the GPU tests at the end."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from hf_adaptive import overlap

pytestmark = pytest.mark.skipif(not overlap.overlap_available(), reason="transformers without DeferredStopCheck")

CUDA = torch.device("cuda")  # a device object only: the predicate reads its type, nothing runs there


class _OptedIn:
    defers_stop_check = True
    is_croppable = True


class _NotCroppable:
    defers_stop_check = True
    is_croppable = False


@pytest.fixture
def predicate():
    from transformers.generation.utils import DeferredStopCheck

    assert overlap.install() and overlap.install()  # idempotent
    yield DeferredStopCheck.is_supported
    overlap.enable_overlapped_decoding(False)


def test_predicate_defers_for_opted_in_caches_on_cuda_only(predicate):
    """Guards the scope of the wrapper: CUDA and a cache that opts in and can undo a step; never an assistant, never
    the CPU (no events there), and every other case answered as transformers does."""
    assert predicate(CUDA, _OptedIn(), True, False) and overlap.stop_check_deferred()
    assert not predicate(CUDA, _OptedIn(), True, True) and not overlap.stop_check_deferred()
    assert not predicate(torch.device("cpu"), _OptedIn(), True, False)
    assert not predicate(CUDA, _NotCroppable(), True, False)  # the extra step could not be undone
    assert predicate(CUDA, _NotCroppable(), False, False)  # ... unless nobody sees the cache
    assert not predicate(CUDA, DynamicCache(), True, False)  # not opted in


def test_enable_overlapped_decoding_covers_every_cache_that_can_undo_a_step(predicate):
    assert overlap.enable_overlapped_decoding(True)
    assert predicate(CUDA, DynamicCache(), True, False)
    assert predicate(CUDA, None, False, False)
    static = StaticCache(config=_tiny_config(), max_cache_len=8)
    assert predicate(CUDA, static, True, False) == bool(static.is_croppable)
    overlap.enable_overlapped_decoding(False)
    assert not predicate(CUDA, DynamicCache(), True, False)


def test_enable_overlapped_decoding_refuses_a_non_bool():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        overlap.enable_overlapped_decoding("yes")


def test_adaptive_static_cache_opts_in():
    from hf_adaptive.kv.static import AdaptiveStaticKVCache

    cache = AdaptiveStaticKVCache(_tiny_config(), max_cache_len=32)
    assert cache.defers_stop_check and cache.is_croppable


def _tiny_config():
    from helpers import make_tiny_model

    return make_tiny_model("llama").config


class _Alternate:
    """A policy whose answer ignores the scores: the fast tier on every other decision, so the tier each step ran
    shows which decision it came from."""

    def __init__(self, fast: str, top: str) -> None:
        self.fast, self.top, self.n, self.current = fast, top, 0, top

    def reset(self) -> None:
        self.n, self.current = 0, self.top

    def decide(self, scores: list[float]) -> str:
        self.n += 1
        self.current = self.fast if self.n % 2 else self.top
        return self.current


def _tiers_run(decision_lag):
    from helpers import make_tiny_model

    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    model = make_tiny_model("llama")
    tiers = prepare_tiers(model, tiers=("int4", "native"))
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with PrecisionController(tiers, decision_lag=decision_lag) as ctl:
        ctl.policy = _Alternate(tiers.fast, tiers.top)
        model.generate(ids, max_new_tokens=8, do_sample=False, logits_processor=[ctl])
        return list(ctl.telemetry.tiers)


def test_decision_lag_one_applies_each_decision_one_forward_later():
    """Guards the lag: with 0 the forward after step i runs step i's decision; with 1 it runs step i - 1's, and the
    first decode forward keeps the prefill's top tier. Every step is still recorded once."""
    now, lagged = _tiers_run(0), _tiers_run(1)
    assert now == ["native", "int4", "native", "int4", "native", "int4", "native", "int4"]
    assert lagged == ["native", "native", "int4", "native", "int4", "native", "int4", "native"]
    assert _tiers_run(None) == now  # on CPU generate reads its stop flag every step: no lag


@pytest.mark.parametrize("lag", [2, -1, True, 0.5])
def test_decision_lag_refuses_other_values(lag):
    from helpers import make_tiny_model

    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    tiers = prepare_tiers(make_tiny_model("llama"), tiers=("int4", "native"))
    with pytest.raises(ValueError, match="decision_lag must be None, 0 or 1"):
        PrecisionController(tiers, decision_lag=lag)


def _cuda_model():
    from helpers import make_tiny_model

    import hf_adaptive

    model = make_tiny_model("llama", dtype=torch.bfloat16).cuda()
    hf_adaptive.enable_fused_attention(model)
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["adaptive_static", "static"])
def test_deferred_generate_matches_the_per_step_read_and_leaves_the_cache_as_long(kind):
    """Guards the identity of overlapped decoding: the same tokens as the per-step read, and after an EOS stop the
    extra forward is cropped off, so the returned cache holds exactly as many tokens (a StaticCache of a release
    without crop included)."""
    from hf_adaptive.compat import generate_cache_kwargs
    from hf_adaptive.kv.static import AdaptiveStaticKVCache

    model = _cuda_model()
    if kind == "static":
        model.set_attn_implementation("sdpa")

    def cache_for(defer: bool):
        cache = (AdaptiveStaticKVCache(model.config, max_cache_len=64) if kind == "adaptive_static"
                 else StaticCache(config=model.config, max_cache_len=64))
        assert overlap.defer_stop_checks(cache, defer) == defer
        return cache

    ids = torch.randint(1, 128, (1, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    out, lengths = {}, {}
    for defer in (False, True):
        first = model.generate(ids, max_new_tokens=24, do_sample=False, **generate_cache_kwargs(cache_for(defer)))
        assert overlap.stop_check_deferred() == defer
        eos = int(first[0, ids.shape[1] + 9])  # stop at the tenth new token
        cache = cache_for(defer)
        out[defer] = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                                    **generate_cache_kwargs(cache))
        lengths[defer] = int(cache.get_seq_length())
    assert torch.equal(out[True], out[False])
    assert lengths[True] == lengths[False] == out[False].shape[1] - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_controller_in_deferred_generate_lags_its_decisions():
    """Guards the controller's automatic lag: in a generate call that defers its stop check it decides from the step
    before the last, so its read never waits; tokens stay those of the same tiers run per step."""
    from hf_adaptive.compat import generate_cache_kwargs
    from hf_adaptive.kv.static import AdaptiveStaticKVCache
    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    model = _cuda_model()
    tiers = prepare_tiers(model, tiers=("int4", "native"))
    ids = torch.randint(1, 128, (1, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    runs = {}
    for defer, lag in ((True, None), (False, 1)):
        cache = AdaptiveStaticKVCache(model.config, max_cache_len=64)
        cache.defers_stop_check = defer
        with PrecisionController(tiers, decision_lag=lag) as ctl:
            ctl.policy = _Alternate(tiers.fast, tiers.top)
            out = model.generate(ids, max_new_tokens=12, do_sample=False, logits_processor=[ctl],
                                 **generate_cache_kwargs(cache))
            runs[defer] = (out, list(ctl.telemetry.tiers), max(ctl.telemetry.wait_ns))
    (out, tiers_run, wait), (ref, ref_tiers, _) = runs[True], runs[False]
    assert tiers_run == ref_tiers and tiers_run[:3] == ["native", "native", "int4"]
    assert torch.equal(out, ref)
    assert wait < 1_000_000  # its reads found the copies complete


def test_defer_stop_checks_opts_one_cache_in_and_out(predicate):
    cache = DynamicCache()
    assert overlap.defer_stop_checks(cache) and predicate(CUDA, cache, True, False)
    assert not overlap.defer_stop_checks(cache, False) and not predicate(CUDA, cache, True, False)
    static = StaticCache(config=_tiny_config(), max_cache_len=8)
    assert overlap.defer_stop_checks(static) and predicate(CUDA, static, True, False)  # a crop of its own before 5.18
    for bad in (None, object(), (1, 2)):
        with pytest.raises(TypeError, match="cache must be a transformers Cache"):
            overlap.defer_stop_checks(bad)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        overlap.defer_stop_checks(cache, 1)


def test_overlapped_decoding_block_restores_the_previous_setting(predicate):
    with overlap.overlapped_decoding() as available:
        assert available and predicate(CUDA, DynamicCache(), True, False)
        with overlap.overlapped_decoding(False):
            assert not predicate(CUDA, DynamicCache(), True, False)
        assert predicate(CUDA, DynamicCache(), True, False)
    assert not predicate(CUDA, DynamicCache(), True, False)


def test_a_new_calls_prefill_forgets_the_last_calls_deferral(predicate):
    """Guards the automatic lag against a stale flag: a deferred call leaves ``stop_check_deferred`` set, and the
    next call's prefill clears it before generate decides again (here on CPU, where it never defers)."""
    assert predicate(CUDA, _OptedIn(), True, False) and overlap.stop_check_deferred()
    assert _tiers_run(None) == _tiers_run(0)
    assert not overlap.stop_check_deferred()


def test_crop_zero_touches_no_layer_of_the_adaptive_caches():
    """Guards the per-step cost of a deferred stop check: it calls ``cache.crop(0)`` after every step, which must not
    walk the layers of a cache whose layers keep no past states; ``crop(-1)`` still reaches them all."""
    from helpers import make_tiny_model

    from hf_adaptive.compat import forward_cache_kwargs
    from hf_adaptive.kv.static import AdaptiveStaticKVCache

    model = make_tiny_model("llama")
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=32)
    model(torch.arange(3, 10)[None], use_cache=True, **forward_cache_kwargs(model, cache))
    calls = []
    for layer in cache.layers:
        own = layer.crop
        layer.crop = lambda n, own=own: (calls.append(n), own(n))
    cache.crop(0)
    assert calls == [] and int(cache.get_seq_length()) == 7
    cache.crop(-1)
    assert calls == [-1] * len(cache.layers) and int(cache.get_seq_length()) == 6
