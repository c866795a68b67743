"""generate's decode step through ``DecodeGraphs``: one captured step per (tier, input shapes) on a StaticCache,
the controller's tiers and tokens as in eager generate, every other forward sent to generate's compiled call, the
model's hooks run once, install and remove composing with the lean guard filter, bad arguments refused."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model
from transformers import StaticCache
from transformers.generation.configuration_utils import CompileConfig

import hf_adaptive

from hf_adaptive.compat import forward_cache_kwargs, generate_cache_kwargs
from hf_adaptive.kv.static import AdaptiveStaticKVCache
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.decode_graphs import DecodeGraphs, install_decode_graphs
from hf_adaptive.precision.tiers import prepare_tiers

NEW_TOKENS = 16


def _cpu_compile() -> CompileConfig:
    """generate's compiled decode path on the CPU, with dynamo's eager backend (tracing and guards, no codegen)."""
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    return config


def _tiers(model):
    with torch.no_grad():
        model.lm_head.weight.mul_(60)  # confidences spread over all three bands
    return prepare_tiers(model, tiers=("int4", "native", "fp32"))


@pytest.fixture(scope="module")
def tiers():
    return _tiers(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(0))


def _generate(tiers, ids, cache, **kwargs):
    with PrecisionController(tiers) as ctl:
        out = tiers.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, logits_processor=[ctl],
                                   **generate_cache_kwargs(cache), **kwargs)
    return out, list(ctl.telemetry.tiers), ctl.telemetry.eager_score_steps


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_graphs_keep_the_controllers_tiers_and_tokens(arch, ids):
    """Guards the step graphs in generate: with the controller switching among three tiers, every decode forward is
    served by one entry per tier (none by generate's compiled call; qwen2's mask comes as a dict per attention type),
    the tiers and tokens equal eager generate's, the controller's score still comes from inside the step, and a
    second call on the reset cache adds no entry."""
    tiers = _tiers(make_tiny_model(arch))
    model = tiers.model
    cache = StaticCache(config=model.config, max_cache_len=64)
    want, want_tiers, _ = _generate(tiers, ids, cache, disable_compile=True)
    assert len(set(want_tiers)) == 3
    with install_decode_graphs(model, tiers, compile_backend="eager") as graphs:
        entries = []
        for _ in range(2):
            cache.reset()
            out, got_tiers, eager_steps = _generate(tiers, ids, cache, compile_config=_cpu_compile())
            assert torch.equal(out, want) and got_tiers == want_tiers and eager_steps == 0
            entries.append(dict(graphs.steps.steps))
        assert not graphs.fallbacks and graphs.replays == 2 * (NEW_TOKENS - 1)
        assert {key[0] for key in entries[0]} == set(want_tiers[:-1])  # the last step's tier has no forward
        assert entries[1] == entries[0] and not graphs.steps.use_graphs
    assert "get_compiled_call" in vars(model)  # prepare_tiers' lean guard filter is back in place


def test_decode_graphs_send_other_caches_to_generates_compiled_call(ids):
    """Guards the fallback: a cache with host-side decisions per step (AdaptiveStaticKVCache) is never captured; its
    forwards go to the compiled call generate would have used, the reason counted, the tokens unchanged."""
    tiers = _tiers(hf_adaptive.enable_fused_attention(make_tiny_model("llama")))  # its compiled step reads the cache
    model = tiers.model
    cache = AdaptiveStaticKVCache(model.config, max_cache_len=64)
    want, want_tiers, _ = _generate(tiers, ids, cache, disable_compile=True)
    with install_decode_graphs(model, tiers, compile_backend="eager") as graphs:
        cache = AdaptiveStaticKVCache(model.config, max_cache_len=64)
        out, got_tiers, _ = _generate(tiers, ids, cache, compile_config=_cpu_compile())
    assert torch.equal(out, want) and got_tiers == want_tiers
    assert graphs.fallbacks == {"cache without a device-side length": NEW_TOKENS - 1} and not graphs.steps.steps


def test_decode_graphs_cap_the_step_shapes_and_run_hooks_once(tiers, ids):
    """Guards the cap and the hooks: a step shape beyond ``max_graphs`` goes to the fallback call (the model itself,
    outside generate) with the reason counted, and the model's own pre- and post-hooks run exactly once per forward
    on either path."""
    model = tiers.model
    calls = []
    hooks = [model.register_forward_pre_hook(lambda m, a: calls.append("pre")),
             model.register_forward_hook(lambda m, a, o: calls.append("post"))]
    try:
        graphs = DecodeGraphs(model, tiers, max_graphs=1, compile_backend=None)
        cache = StaticCache(config=model.config, max_cache_len=64)
        model(ids, use_cache=True, **forward_cache_kwargs(model, cache))
        calls.clear()
        step = {"input_ids": ids[:, -1:], "position_ids": torch.tensor([[10]]), "use_cache": True,
                **forward_cache_kwargs(model, cache)}
        graphs(**step, logits_to_keep=1)
        assert calls == ["pre", "post"] and graphs.replays == 1 and len(graphs.steps.steps) == 1
        graphs(**step | {"position_ids": torch.tensor([[11]])}, logits_to_keep=0)  # another shape key: over the cap
        assert calls == ["pre", "post"] * 2 and graphs.fallbacks == {"more than max_graphs=1 step shapes": 1}
    finally:
        for hook in hooks:
            hook.remove()


def test_decode_graphs_refuse_bad_arguments(tiers):
    with pytest.raises(TypeError, match="get_compiled_call"):
        DecodeGraphs(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="prepare_tiers"):
        DecodeGraphs(tiers.model, tiers="int4")
    with pytest.raises(ValueError, match="another model"):
        DecodeGraphs(make_tiny_model("llama"), tiers)
    with pytest.raises(ValueError, match="max_graphs"):
        DecodeGraphs(tiers.model, tiers, max_graphs=0)


@pytest.mark.gpu
def test_decode_graphs_capture_each_tier_once_on_cuda():
    """Guards the captured path on a GPU: with the controller alternating tiers in generate's compiled call, each
    tier's step is captured once, a second generation replays them without a capture, and tiers and tokens equal
    eager generate's."""
    model = make_tiny_model("qwen2").cuda()
    with torch.no_grad():
        model.lm_head.weight.mul_(60)
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(0)).cuda()
    cache = StaticCache(config=model.config, max_cache_len=64)
    want, want_tiers, _ = _generate(tiers, ids, cache, disable_compile=True)
    assert len(set(want_tiers)) == 2
    with install_decode_graphs(model, tiers) as graphs:
        captures = []
        for _ in range(2):
            cache.reset()
            out, got_tiers, eager_steps = _generate(tiers, ids, cache)
            assert torch.equal(out, want) and got_tiers == want_tiers and eager_steps == 0
            captures.append(graphs.captures)
    assert captures == [2, 2] and not graphs.fallbacks


def test_captured_steps_of_one_model_share_its_compiled_forward(tiers):
    """Guards the compile cache: every CapturedSteps of a model (the decode graphs, each cascade generator's) runs
    one compiled forward per backend, so a new generator compiles nothing again and dynamo's recompile limit per code
    object is not spent on copies; another model or backend gets its own, and the cache keeps no model alive."""
    import gc
    import weakref

    from hf_adaptive.precision.step_graphs import CapturedSteps

    a, b = CapturedSteps(tiers.model, tiers, "eager"), DecodeGraphs(tiers.model, tiers, compile_backend="eager").steps
    assert a.forward.func is b.forward.func and a.forward.args == (tiers.model,)
    assert CapturedSteps(tiers.model, tiers, "aot_eager").forward.func is not a.forward.func
    other = make_tiny_model("llama")
    assert CapturedSteps(other, None, "eager").forward.func is not a.forward.func
    gone = weakref.ref(other)
    del other
    gc.collect()
    assert gone() is None


def test_decode_graphs_serve_mixed_prompt_lengths_from_the_same_entries(tiers):
    """Guards the way people call generate: calls of different prompt lengths and max_new_tokens on one StaticCache
    (reset between them) reuse the entries the first call made (generate's decode inputs keep their shapes under one
    max_cache_len), and each call's tokens equal eager generate's."""
    model = tiers.model
    cache = StaticCache(config=model.config, max_cache_len=64)
    calls = [(7, 9), (13, 4), (3, 12), (21, 6)]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (1, n), generator=g) for n, _ in calls]
    want = []
    for ids, (_, new) in zip(prompts, calls):
        cache.reset()
        want.append(model.generate(ids, max_new_tokens=new, do_sample=False, disable_compile=True,
                                   **generate_cache_kwargs(cache)))
    with install_decode_graphs(model, tiers, compile_backend="eager") as graphs:
        for i, (ids, (_, new)) in enumerate(zip(prompts, calls)):
            cache.reset()
            out = model.generate(ids, max_new_tokens=new, do_sample=False, compile_config=_cpu_compile(),
                                 **generate_cache_kwargs(cache))
            assert torch.equal(out, want[i]), i
            if i == 0:
                first = dict(graphs.steps.steps)
        assert graphs.steps.steps == first and len(first) == 1 and not graphs.fallbacks
        assert graphs.replays == sum(new - 1 for _, new in calls)
