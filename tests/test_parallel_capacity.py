"""Memory-aware batch admission and the queue-head length signal (pure), and shards that read the host copy
without duplicating it (CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.parallel.capacity import ReplicaMemory, admit, replica_rows
from hf_adaptive.parallel.plans import ParallelPlan
from hf_adaptive.parallel.requests import Request, route
from hf_adaptive.policy.parallel_policy import ParallelPolicyConfig, WorkloadSummary, threshold_rule

QWEN7B = SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4)


def _req(i: int, prompt: int, new: int = 64) -> Request:
    r = Request(f"r{i}", 0.0, new)
    r.prompt_ids = [1] * prompt
    return r


def test_replica_memory_by_hand():
    """Guards the per-device arithmetic against hand-computed values: Qwen2.5-7B's KV is 2 x 28 layers x 4 KV
    heads x 128 x 2 bytes per token on one device; TP=2 halves the KV heads and the MLP, PP=2 the layers."""
    one = ReplicaMemory.for_plan(QWEN7B, ParallelPlan(), 2)
    assert one.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert one.prefill_bytes_per_token == (3 * 3584 + (28 + 8) * 128 + 3 * 18944) * 2
    tp = ReplicaMemory.for_plan(QWEN7B, ParallelPlan(tp=2), 2)
    assert tp.kv_bytes_per_token == one.kv_bytes_per_token / 2
    assert tp.prefill_bytes_per_token == (3 * 3584 + (14 + 4) * 128 + 3 * 9472) * 2
    pp = ReplicaMemory.for_plan(QWEN7B, ParallelPlan(pp=2), 2)
    assert pp.kv_bytes_per_token == one.kv_bytes_per_token / 2 and pp.prefill_bytes_per_token == one.prefill_bytes_per_token
    assert one.batch_bytes(2, 100, 28) == 2 * (128 * one.kv_bytes_per_token + 100 * one.prefill_bytes_per_token + 100 ** 2)


def test_admission_takes_what_fits_per_replica():
    """Guards the reason admission exists: under a 20 GiB budget per device, DP (all of Qwen2.5-7B's 15.2 GB of
    weights on each device) has room for one 12k-token document per replica, TP=2 (8.7 GB per device) for six;
    short chats fill the row cap either way; a document too big for the plan still runs alone (flagged)
    instead of stalling the queue."""
    docs = [_req(i, 12_000, 128) for i in range(10)]
    chats = [_req(i, 200) for i in range(40)]
    budget = 20 * 2**30 * 0.85
    dp, tp = ParallelPlan(dp=2), ParallelPlan(tp=2)
    dp_mem, tp_mem = ReplicaMemory.for_plan(QWEN7B, dp, 2), ReplicaMemory.for_plan(QWEN7B, tp, 2)
    dp_free, tp_free = budget - 15.2e9, budget - 8.7e9
    assert admit(docs, dp, dp_free, dp_mem, 8, route) == (2, True)  # one document per replica
    assert admit(docs, tp, tp_free, tp_mem, 8, route) == (6, True)
    assert admit(chats, dp, dp_free, dp_mem, 8, route) == (16, True)
    assert admit(chats, tp, tp_free, tp_mem, 8, route) == (8, True)
    assert admit(docs, dp, 1e9, dp_mem, 8, route) == (1, False)
    assert admit([], dp, dp_free, dp_mem, 8, route)[0] == 0
    with pytest.raises(ValueError, match="max_rows_per_replica"):
        admit(docs, dp, dp_free, dp_mem, 0, route)


def _summary(arrived_p50: float, queue: tuple[int, ...]) -> WorkloadSummary:
    return WorkloadSummary(seq_len_p50=arrived_p50, seq_len_p90=arrived_p50, seq_len_max=int(arrived_p50),
                           token_weighted_p50=arrived_p50, memory_fraction_max=0.5, concurrent_requests=len(queue),
                           arrival_rate_per_s=5.0, queue_seq_lens=queue)


def test_queue_head_length_signal():
    """Guards the serving signal: documents arriving behind a backlog of chats must not move the layout while
    the next batches are still chats (queue_head_requests > 0), and must once they reach the head; the default
    (arrival window) keeps the window's behaviour."""
    backlog = (200,) * 40 + (12_000,) * 10
    head = ParallelPolicyConfig(queue_head_requests=16)
    assert threshold_rule(_summary(12_000, backlog), "dp", head)[0] == "dp"
    assert threshold_rule(_summary(12_000, backlog), "dp", ParallelPolicyConfig())[0] == "hybrid"
    strategy, reason = threshold_rule(_summary(200, backlog[40:] + (200,) * 5), "dp", head)
    assert strategy == "hybrid" and "next 16 queued" in reason
    assert threshold_rule(_summary(12_000, ()), "tp", head)[0] == "hybrid"  # empty queue: the window decides
    with pytest.raises(ValueError, match="queue_head_requests"):
        ParallelPolicyConfig(queue_head_requests=-1)


def test_shard_reads_the_host_copy_without_duplicating_or_touching_it():
    """Guards re-sharding memory: a shard's weights share the host tensors' storage until moved, and moving the
    shard (here to the meta device) or slicing it for TP leaves the host copy's tensors where and what they were."""
    from helpers import make_tiny_model

    from hf_adaptive.parallel.shard import build_shard

    host = make_tiny_model("llama", seed=1)
    before = {n: p.detach().clone() for n, p in host.named_parameters()}
    shard = build_shard(host, ParallelPlan(), 0, "cpu")
    host_ptrs = {p.data_ptr() for p in host.parameters()}
    assert all(p.data_ptr() in host_ptrs for p in shard.model.parameters())
    shard.model.to("meta")
    pp = build_shard(host, ParallelPlan(pp=2), 1, "meta")
    assert len(pp.model.model.layers) == host.config.num_hidden_layers - host.config.num_hidden_layers // 2
    for n, p in host.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, before[n]), n


def test_batch_cap_per_replica_or_per_device():
    """Guards the batch cap's two scopes: per replica (DP over 4 GPUs batches 4x the rows of TP4, as one engine per
    replica does) and per device (every 4-GPU plan batches 32 rows), and that admission applies the cap it gets."""
    plans = {"dp4": ParallelPlan(dp=4), "tp4": ParallelPlan(tp=4), "pp4": ParallelPlan(pp=4),
             "tp2xpp2": ParallelPlan(tp=2, pp=2), "tp2xdp2": ParallelPlan(tp=2, dp=2)}
    per_replica = {k: p.dp * replica_rows(p, 8) for k, p in plans.items()}
    per_device = {k: p.dp * replica_rows(p, 8, "device") for k, p in plans.items()}
    assert per_replica == {"dp4": 32, "tp4": 8, "pp4": 8, "tp2xpp2": 8, "tp2xdp2": 16}
    assert per_device == dict.fromkeys(plans, 32)
    chats = [_req(i, 200) for i in range(40)]
    tp = ParallelPlan(tp=2)
    memory = ReplicaMemory.for_plan(QWEN7B, tp, 2)
    assert admit(chats, tp, 8e9, memory, replica_rows(tp, 8, "device"), route) == (16, True)
    with pytest.raises(ValueError, match="--max-batch-per"):
        replica_rows(tp, 8, "gpu")
    with pytest.raises(ValueError, match="--max-batch"):
        replica_rows(tp, 0)
