"""The guard filter the tiered linears give generate's compiled step (hf_adaptive/precision/guards.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.compat import generate_cache_kwargs
from hf_adaptive.precision import guards

LAYER = "L['self']._modules['model']._modules['layers']._modules['0']"
Q = f"{LAYER}._modules['self_attn']._modules['q_proj']"
DOWN = f"{LAYER}._modules['mlp']._modules['down_proj']"
TIERED = frozenset({"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"})


@pytest.mark.parametrize("name, kind, keep", [
    (f"{DOWN}.formats['int4'].packed", "TENSOR_MATCH", False),  # fixed at preparation
    (f"{DOWN}.bias", "CONSTANT_MATCH", False),
    (f"{Q}.group._x", "ID_MATCH", False),  # the fused group's bookkeeping
    (f"{Q}.group_slice", "EQUALS_MATCH", False),
    (f"{DOWN}._forward_hooks", "EMPTY_NN_MODULE_HOOKS_DICT", True),  # a hook added later still recompiles
    (DOWN, "TYPE_MATCH", True),  # the module itself
    (f"{DOWN}.training", "CONSTANT_MATCH", True),  # not an attribute the tiered linear fixes
    (f"{LAYER}._modules['input_layernorm'].variance_epsilon", "EQUALS_MATCH", True),  # not a tiered linear
    ("L['kwargs']['input_ids']", "TENSOR_MATCH", True),  # inputs
    ("G['torch']", "ID_MATCH", True),  # globals
])
def test_lean_guard_flags_drop_only_what_the_tiered_linears_fix(name, kind, keep):
    assert guards.lean_guard_flags([name], [kind], TIERED) == [keep]


def test_lean_guard_flags_keep_one_guard_per_selector_attribute_and_kind():
    """Every tiered linear shares one selector: one check of the active tier (and of the output scores' weights) stands
    for all of them, per guard kind; the same guard reached through a second linear or a fused group is dropped."""
    names = [f"{DOWN}.selector.active", f"{Q}.group.fused.selector.active", f"{DOWN}.selector.active",
             f"{Q}.group.fused.selector.output_scores.weights", f"{DOWN}.selector.output_scores.weights",
             f"{DOWN}.selector"]
    kinds = ["EQUALS_MATCH", "EQUALS_MATCH", "TYPE_MATCH", "ID_MATCH", "ID_MATCH", "TYPE_MATCH"]
    assert guards.lean_guard_flags(names, kinds, TIERED) == [True, False, True, True, False, True]


def _config(**kwargs):
    from transformers.generation.configuration_utils import CompileConfig

    return CompileConfig(**kwargs)


def test_with_guard_filter_turns_an_inductor_mode_into_its_options():
    """torch.compile takes mode or options, not both: reduce-overhead becomes triton.cudagraphs next to the filter."""
    f = guards.TierGuardFilter(TIERED)
    config = _config()  # inductor, reduce-overhead
    config._compile_all_devices = True
    lean = guards.with_guard_filter(config, f)
    assert lean.mode is None and lean.options == {"triton.cudagraphs": True, "guard_filter_fn": f}
    assert lean._compile_all_devices is True
    assert config.mode == "reduce-overhead" and config.options is None  # the caller's config is untouched
    kept = guards.with_guard_filter(_config(backend="eager"), f)
    assert kept.mode is None and kept.options == {"guard_filter_fn": f}  # the eager backend ignores a mode
    other = _config(backend="aot_eager")
    assert guards.with_guard_filter(other, f) is other  # a mode without an options form: left unfiltered


def test_with_guard_filter_ands_the_callers_own_filter():
    entries = [SimpleNamespace(name=f"{DOWN}.bias", guard_type="CONSTANT_MATCH"),
               SimpleNamespace(name="L['kwargs']['input_ids']", guard_type="TENSOR_MATCH"),
               SimpleNamespace(name="G['torch']", guard_type="ID_MATCH")]
    theirs = _config(mode=None, options={"guard_filter_fn": lambda es: [e.name != "G['torch']" for e in es]})
    lean = guards.with_guard_filter(theirs, guards.TierGuardFilter(TIERED))
    assert lean.options["guard_filter_fn"](entries) == [False, True, False]


def _guard_lines(run) -> int:
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.guards")
    logger.addHandler(handler)
    torch._logging.set_logs(guards=True)
    try:
        run()
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
    return sum(text.count("\n") + 1 for text in lines)


def test_lean_guards_keep_compiled_generate_exact_while_switching_tiers():
    """Guards the filter's safety: with the tiered linears' fixed attributes unguarded, generate's compiled step still
    tells the tiers apart (every step's tier switched, each step's logits equal to eager's under the same tier) and
    checks far fewer guards than with dynamo's full set."""
    from helpers import make_tiny_model
    from transformers import StaticCache

    from hf_adaptive.precision.tiers import prepare_tiers

    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    results = {}
    for lean in (True, False):
        torch._dynamo.reset()
        model = make_tiny_model("llama")
        with torch.no_grad():
            model.lm_head.weight.mul_(40)
        tiers = prepare_tiers(model, tiers=("int4", "native"), lean_guards=lean)
        assert tiers.lean_guards is lean
        cache = StaticCache(config=model.config, max_cache_len=32)
        config = _config(backend="eager")
        config._compile_all_devices = True  # generate compiles on accelerators only unless told

        class Alternate:  # a logits processor that flips the tier every step, as a switching controller does
            def __call__(self, input_ids, scores):
                tiers.set("int4" if tiers.active == "native" else "native")
                return scores

        def run(**kwargs):
            cache.reset()
            tiers.set("native")
            out = model.generate(ids, max_new_tokens=10, do_sample=False, logits_processor=[Alternate()],
                                 output_scores=True, return_dict_in_generate=True, **generate_cache_kwargs(cache),
                                 **kwargs)
            return out.sequences, torch.stack(out.scores)

        eager = run(disable_compile=True)
        lines = _guard_lines(lambda: run(compile_config=config))
        compiled = run(compile_config=config)
        assert torch.equal(compiled[0], eager[0]), lean
        torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)
        results[lean] = lines
    assert results[True] < 0.75 * results[False], results


def test_install_leaves_a_model_without_get_compiled_call_alone():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert guards.install(module, [module[0]]) is False
    assert "get_compiled_call" not in vars(module)


def test_installed_get_compiled_call_reuses_the_compiled_call_until_the_config_changes():
    """Guards transformers' reuse of its compiled step: an equal config (a fresh default included) gets the same
    compiled call back; a config whose options were edited in place gets a new one."""
    from helpers import make_tiny_model

    from hf_adaptive.precision.tiers import prepare_tiers

    model = make_tiny_model("llama")
    assert prepare_tiers(model, tiers=("int4", "native")).lean_guards
    config = _config(backend="eager", mode=None, options={})
    first = model.get_compiled_call(config)
    assert model.get_compiled_call(_config(backend="eager", mode=None, options={})) is first
    config.options["trace.enabled"] = False  # edited in place
    assert model.get_compiled_call(config) is not first
    assert model.get_compiled_call(None) is model.get_compiled_call(None)  # generate passes None by default
