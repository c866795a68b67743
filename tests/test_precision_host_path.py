"""The host path of a precision decode step: the exponential-race sampler (the distribution of softmax(logits / T),
forbidden tokens never drawn, seeded draws reproducible, no host sync on CUDA) and the controller's overhead figure
(its own host time, the wait of its one host read recorded apart)."""

from __future__ import annotations

import pytest
import torch

from hf_adaptive.compat import generate_cache_kwargs
from hf_adaptive.precision.decode import pick_tokens
from hf_adaptive.precision.options import DecodeOptions
from hf_adaptive.precision.sampling import sample_tokens


def test_race_draws_the_softmax_distribution():
    """Guards the sampler's law: frequencies over 40k draws match softmax(logits / T) (5 sigma bound)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    temperature, n = 0.7, 40_000
    gen = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits.expand(n, -1), temperature, gen)  # n independent rows
    freq = torch.bincount(draws, minlength=5).double() / n
    p = torch.softmax(logits[0].double() / temperature, -1)
    sigma = (p * (1 - p) / n).sqrt()
    assert freq[4] == 0  # a -inf logit is never drawn
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-12).all()), (freq, p)


def test_race_is_reproducible_and_keeps_shape():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    a = sample_tokens(logits, 1.0, torch.Generator().manual_seed(7))
    b = sample_tokens(logits, 1.0, torch.Generator().manual_seed(7))
    assert a.shape == (3,) and a.dtype == torch.int64 and torch.equal(a, b)
    opts = DecodeOptions(do_sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(pick_tokens(logits, opts), a)  # the graph engine's sampler is this one


@pytest.mark.parametrize("kwargs, message", [({"logits": torch.zeros(2, 3, 4)}, "must be"),
                                             ({"logits": torch.zeros(2, 4), "temperature": 0.0}, "temperature")])
def test_race_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_tokens(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_race_makes_no_host_sync_on_cuda():
    """Guards the point of the race: torch's sync debug mode raises on any synchronising call."""
    logits = torch.randn(4, 32000, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_tokens(logits, 0.8, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_controller_overhead_excludes_the_wait_of_its_host_read():
    """Guards the overhead figure: the time a host read blocks (on CUDA: the wait for the step's forward) is
    recorded apart as host_read_wait_us, not counted as the controller's own host time."""
    import time

    from hf_adaptive.precision.telemetry import PrecisionTelemetry, read_with_wait

    out, wait_ns = read_with_wait(lambda: time.sleep(0.02) or [0.5])
    assert out == [0.5] and wait_ns >= 20_000_000
    t = PrecisionTelemetry()
    t.record_step("int4", out, overhead_ns=3_000, wait_ns=wait_ns)
    rep = t.report()
    assert rep["controller_overhead_us"]["mean"] == 3.0
    assert rep["host_read_wait_us"]["mean"] >= 20_000


def test_controller_records_a_wait_per_step():
    from helpers import make_tiny_model

    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    tiers = prepare_tiers(make_tiny_model("llama"), tiers=("int4", "fp32"))
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with PrecisionController(tiers) as ctl:
        tiers.model.generate(ids, max_new_tokens=6, do_sample=False, logits_processor=[ctl])
    t = ctl.telemetry
    assert len(t.wait_ns) == len(t.overhead_ns) == len(t.queue_ns) == len(t.tiers) == 6
    assert all(w >= 0 for w in t.wait_ns) and all(o > 0 for o in t.overhead_ns)
    # every step was queued by __call__ and decided later: both halves are timed and add up to the overhead
    assert all(0 < q < o for q, o in zip(t.queue_ns, t.overhead_ns))
    rep = t.report()
    total = rep["controller_queue_us"]["mean"] + rep["controller_decide_us"]["mean"]
    assert abs(total - rep["controller_overhead_us"]["mean"]) < 1e-6


def test_telemetry_refuses_a_queue_half_larger_than_the_step():
    """Guards the split of the controller's host time: the queue half is part of the step's overhead, never more."""
    from hf_adaptive.precision.telemetry import PrecisionTelemetry

    t = PrecisionTelemetry()
    with pytest.raises(ValueError, match="queue_ns must be within"):
        t.record_step("int4", [0.5], overhead_ns=1_000, queue_ns=2_000)
    assert t.tiers == [] and t.queue_ns == []


def _compiled_generate_runs():
    """The same controller run through eager and through compiled (inductor, CPU) generate over one StaticCache."""
    import torch._dynamo.utils as dynamo_utils
    from helpers import make_tiny_model
    from transformers import StaticCache
    from transformers.generation.configuration_utils import CompileConfig

    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    torch._dynamo.reset()
    dynamo_utils.counters.clear()  # graph breaks counted by earlier tests are not this run's
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(60)  # confidences spread over all three bands
    tiers = prepare_tiers(model, tiers=("int4", "native", "fp32"))
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    compile_config = CompileConfig(fullgraph=False, mode="default", dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told
    cache = StaticCache(config=model.config, max_cache_len=64)
    runs = {}
    for name, kwargs in (("eager", {"disable_compile": True}), ("warm-up", {"compile_config": compile_config}),
                         ("compiled", {"compile_config": compile_config})):
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        cache.reset()
        with PrecisionController(tiers) as ctl:
            out = model.generate(ids, max_new_tokens=20, do_sample=False, logits_processor=[ctl],
                                 **generate_cache_kwargs(cache), **kwargs)
        runs[name] = (out, list(ctl.telemetry.tiers), dynamo_utils.counters["stats"]["unique_graphs"] - graphs)
    breaks = dict(dynamo_utils.counters["graph_break"])
    dynamo_utils.counters.clear()  # nor are this run's breaks the next test's
    return runs, breaks


def test_controller_in_compiled_generate_decides_like_eager_without_recompiles():
    """Guards the compiled generate path: the decision taken when generate prepares the next forward's inputs
    (eagerly, outside the compiled graph) gives the same tiers and tokens as eager generate; each tier compiles once
    and switching between them afterwards compiles nothing; the compiled step has no graph break (a settle inside
    the forward's pre-hook would be one per step)."""
    runs, breaks = _compiled_generate_runs()
    (eager, eager_tiers, _), (warm, _, warm_graphs), (out, tiers, graphs) = runs["eager"], runs["warm-up"], runs[
        "compiled"]
    assert len(set(eager_tiers)) == 3 and len(eager_tiers) == 20
    assert tiers == eager_tiers and torch.equal(out, eager) and torch.equal(warm, eager)
    assert warm_graphs == 3 and graphs == 0  # one graph per tier, then none
    assert breaks == {}, breaks


def test_controller_built_after_generate_compiled_scores_inside_the_step(monkeypatch):
    """Guards the score's place: a controller built after generate has compiled its decode step (as after any earlier
    call without one) still gets each step's confidence from inside the compiled step, so __call__ never recomputes
    it eagerly from the scores (a module hook added then would be skipped by the step compiled before it, and every
    step would pay about 17 kernel launches); turning the scores on compiles the step once, the next controller
    reuses it, and close() turns them off."""
    import torch._dynamo.utils as dynamo_utils
    from helpers import make_tiny_model
    from transformers import StaticCache
    from transformers.generation.configuration_utils import CompileConfig

    from hf_adaptive.precision import controller as controller_module
    from hf_adaptive.precision.controller import PrecisionController, default_policy_config
    from hf_adaptive.precision.tiers import prepare_tiers

    torch._dynamo.reset()
    model = make_tiny_model("llama")
    tiers = prepare_tiers(model, tiers=("int4", "native", "fp32"))
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True  # generate compiles on CUDA only unless told
    cache = StaticCache(config=model.config, max_cache_len=64)
    eager_scores = []

    def counting(logits, weights=None):
        eager_scores.append(logits.shape)
        return score(logits, weights)

    score = controller_module.confidence_score
    monkeypatch.setattr(controller_module, "confidence_score", counting)
    model.generate(ids, max_new_tokens=8, do_sample=False, compile_config=config,  # no controller
                   **generate_cache_kwargs(cache))
    graphs = []
    for _ in range(2):
        cache.reset()
        before = dynamo_utils.counters["stats"]["unique_graphs"]
        policy = default_policy_config(tiers, high=1.0, low=0.0)  # never switches: one tier, one step
        with PrecisionController(tiers, policy) as ctl:
            model.generate(ids, max_new_tokens=8, do_sample=False, compile_config=config, logits_processor=[ctl],
                           **generate_cache_kwargs(cache))
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"] - before)
        assert len(ctl.telemetry.scores) == 8 and all(0.0 <= s <= 1.0 for s in ctl.telemetry.scores)
        assert ctl.telemetry.report()["eager_score_steps"] == 0
    assert eager_scores == []
    assert graphs == [1, 0]
    assert tiers.selector.output_scores.weights is None  # close() turned them off


def test_controller_counts_the_steps_it_scores_eagerly():
    """Guards the telemetry that tells where the score came from: without the head's score (read_raw_logits=False)
    every step is scored from the processed scores and counted; with it, none is."""
    from helpers import make_tiny_model

    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    tiers = prepare_tiers(make_tiny_model("llama"), tiers=("int4", "native"))
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    for raw, expected in ((False, 5), (True, 0)):
        with PrecisionController(tiers, read_raw_logits=raw) as ctl:
            tiers.model.generate(ids, max_new_tokens=5, do_sample=False, logits_processor=[ctl])
            report = ctl.telemetry.report()
        assert report["steps"] == 5 and report["eager_score_steps"] == expected


def test_a_second_controller_takes_the_heads_scores_and_the_first_scores_its_own():
    """Guards the shared score slot of the tiered head: the controller opened last gets the head's scores (made with
    its weights); one opened earlier on the same tiers computes its own from the scores (counted as eager steps), so
    neither reads a score made with the other's weights, and closing the earlier one leaves the later one's on."""
    from helpers import make_tiny_model

    from hf_adaptive.precision.confidence import ConfidenceWeights
    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    tiers = prepare_tiers(make_tiny_model("llama"), tiers=("int4", "native"))
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    first = PrecisionController(tiers)
    second = PrecisionController(tiers, weights=ConfidenceWeights(p_max=1.0, entropy=0.0, margin=0.0))
    for ctl in (first, second):
        tiers.model.generate(ids, max_new_tokens=4, do_sample=False, logits_processor=[ctl])
    assert first.telemetry.report()["eager_score_steps"] == 4
    assert second.telemetry.report()["eager_score_steps"] == 0
    first.close()
    assert tiers.selector.output_scores.weights == second.weights
    second.close()
    assert tiers.selector.output_scores.weights is None


def test_controller_restores_prepare_inputs_on_close():
    """Guards the settle point the controller adds to ``prepare_inputs_for_generation``: it settles a queued step
    before the inputs are prepared, and close() puts back exactly what the model had (its class method, or an
    instance attribute of its own), so a model outlives its controllers unchanged."""
    from helpers import make_tiny_model

    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    model = make_tiny_model("llama")
    tiers = prepare_tiers(model, tiers=("int4", "native"))
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with PrecisionController(tiers) as ctl:
        assert "prepare_inputs_for_generation" in vars(model)
        ctl._forwarded = True
        ctl(ids, model(ids).logits[:, -1].float())
        assert len(ctl._queued) == 1
        model.prepare_inputs_for_generation(ids[:, -1:])
        assert not ctl._queued and len(ctl._telemetry.tiers) == 1
    assert "prepare_inputs_for_generation" not in vars(model)

    def own(*args, **kwargs):
        return {"input_ids": args[0]}

    model.prepare_inputs_for_generation = own
    with PrecisionController(tiers):
        assert model.prepare_inputs_for_generation is not own
    assert model.prepare_inputs_for_generation is own


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_controller_call_makes_no_host_sync_on_cuda():
    """Guards the no-extra-sync contract: __call__ only queues the scores' copy; the next forward's start reads it
    without waiting once the device caught up (as generate's own stopping read makes it)."""
    from helpers import make_tiny_model

    from hf_adaptive.precision.controller import PrecisionController
    from hf_adaptive.precision.tiers import prepare_tiers

    model = make_tiny_model("llama", dtype=torch.bfloat16).cuda()
    tiers = prepare_tiers(model, tiers=("int4", "native"))
    ids = torch.randint(1, 128, (1, 8), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with PrecisionController(tiers) as ctl:
        logits = model(ids).logits[:, -1].float()
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert ctl(ids, logits) is logits
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()  # what generate's stopping read amounts to
        model(ids[:, -1:])  # its pre-hook settles the queued step
        assert not ctl._queued and len(ctl._telemetry.tiers) == 1
        assert ctl._telemetry.wait_ns[0] < 1_000_000
