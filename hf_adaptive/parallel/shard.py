"""Turn a full host copy of a Hugging Face decoder into one rank's shard of a ``ParallelPlan``.

Contract: ``build_shard(host_model, plan, rank, device, tp_group)`` never modifies ``host_model``; it
copies what the rank needs and returns a ``Shard`` whose ``model`` is still a transformers model, so
the engine runs stages by calling the HF modules themselves (no copied modeling code).

- Pipeline stage: the decoder layers ``[first, last)`` of the model, renumbered ``0..k-1`` with the config
  sliced to match, so a ``DynamicCache(config=...)`` and transformers' mask helpers see a consistent
  k-layer model. Non-last stages replace the final norm by ``Identity`` (the last stage applies it).
- Tensor parallelism (gpt-fast style, a pass over a finished model): q/k/v and gate/up are sharded by
  output rows (column parallel), o and down by input columns (row parallel) with an all-reduce after
  them. Attention is split by whole KV-head groups, so uneven splits (SmolLM2: 3 KV heads on 2 ranks)
  work. Embeddings and ``lm_head`` stay replicated.
- Copies to a CUDA device are asynchronous and read the host copy directly: row slices as they are, column
  slices by moving the whole matrix and slicing it on the device (a strided host copy is far slower than the
  extra bytes). ``pin_host_copy`` page-locks the host copy once, so those copies run at full link speed; the
  caller synchronises before using or timing the shard.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hf_adaptive.parallel.plans import ParallelPlan

logger = logging.getLogger(__name__)


@dataclass
class Shard:
    """One rank's part of a plan: a (sliced, sharded) HF model plus where it sits in the plan."""

    model: nn.Module
    plan: ParallelPlan
    dp_index: int
    stage: int
    tp_rank: int
    layer_range: tuple[int, int]

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.plan.pp - 1

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``parts`` contiguous chunks of ``range(n)``, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def build_shard(host_model: nn.Module, plan: ParallelPlan, rank: int, device: torch.device | str,
                tp_group: Any = None) -> Shard:
    """Copy ``rank``'s part of ``plan`` out of ``host_model`` onto ``device``.

    Args:
        host_model: the full ``*ForCausalLM`` on the host; left untouched.
        plan: the layout; ``rank`` is a global rank in ``[0, plan.world_size)``.
        device: where the shard's weights go.
        tp_group: the process group of this rank's TP peers (needed when ``plan.tp > 1``).
    """
    dp_index, stage, tp_rank = plan.coords(rank)
    n_layers = host_model.config.num_hidden_layers
    first, last = split_evenly(n_layers, plan.pp)[stage]
    model = _copy_stage(host_model, first, last, is_last=stage == plan.pp - 1)
    if plan.tp > 1:
        if tp_group is None:
            raise ValueError(f"tp_group is required for plan {plan.name} (tp={plan.tp}); pass the rank's TP group")
        apply_tp(model, tp_rank, plan.tp, tp_group, device)
    model.to(device, non_blocking=True)  # what apply_tp left on the host: embeddings, norms, lm_head, or all
    return Shard(model=model, plan=plan, dp_index=dp_index, stage=stage, tp_rank=tp_rank, layer_range=(first, last))


def _copy_stage(host_model: nn.Module, first: int, last: int, is_last: bool) -> nn.Module:
    # Copy the module tree of the stage (swap the other layers out for the copy, then back), but not the
    # weights: the copy's parameters are new Parameter objects over the host tensors' storage, so building a
    # shard reads the host copy once (into the device, or into TP slices) instead of duplicating it on the
    # host first. ``model.to(device)`` then replaces the copy's tensors and never touches the host's.
    decoder = host_model.model
    all_layers = decoder.layers
    decoder.layers = nn.ModuleList(all_layers[first:last])
    try:
        memo = {id(p): nn.Parameter(p.data, requires_grad=False) for p in host_model.parameters()}
        memo.update({id(b): b for b in host_model.buffers()})  # buffers are re-assigned, not mutated, by .to()
        model = copy.deepcopy(host_model, memo)
    finally:
        decoder.layers = all_layers
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    text_config.num_hidden_layers = last - first
    if getattr(text_config, "layer_types", None) is not None:
        text_config.layer_types = list(text_config.layer_types[first:last])
    for local_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = local_idx  # the stage's cache holds only its own layers
    if not is_last:
        model.model.norm = nn.Identity()
    return model


def pin_host_copy(model: nn.Module) -> int:
    """Move ``model``'s parameters into one page-locked host buffer, in place; returns its size in bytes.

    Host-to-device copies from pageable memory are staged through a driver buffer and run at a fraction of the
    link's speed; from page-locked memory they run at full speed and asynchronously. One buffer rather than one
    per tensor, since the CUDA host allocator rounds every allocation up to a power of two. Parameters must be
    on the CPU; tied parameters (one ``Parameter`` object) are moved once. Needs CUDA.
    """
    params = list(dict.fromkeys(model.parameters()))
    if not params:
        return 0
    if any(p.device.type != "cpu" for p in params):
        raise ValueError("pin_host_copy needs the model's parameters on the CPU (the host copy); "
                         f"found one on {next(p.device for p in params if p.device.type != 'cpu')}")
    align = 256
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // align) * align
    flat = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    for p, offset in zip(params, offsets):
        nbytes = p.numel() * p.element_size()
        view = flat[offset:offset + nbytes].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view
    return total


def apply_tp(model: nn.Module, tp_rank: int, tp_size: int, group: Any, device: torch.device | str = "cpu") -> None:
    """Shard every decoder layer's attention and MLP of ``model`` in place over ``group``, onto ``device``.

    The shards are new tensors on ``device`` (copies even when it is the CPU); the parameters ``model`` held
    before, the host copy's, are only read.
    """
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    n_heads, n_kv = text_config.num_attention_heads, text_config.num_key_value_heads
    kv_lo, kv_hi = split_evenly(n_kv, tp_size)[tp_rank]
    group_size = n_heads // n_kv
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd = attn.head_dim
        q_rows = (kv_lo * group_size * hd, kv_hi * group_size * hd)
        kv_rows = (kv_lo * hd, kv_hi * hd)
        _shard_rows(attn.q_proj, *q_rows, device)
        _shard_rows(attn.k_proj, *kv_rows, device)
        _shard_rows(attn.v_proj, *kv_rows, device)
        _shard_cols(attn.o_proj, *q_rows, keep_bias=tp_rank == 0, group=group, device=device)
        ff_lo, ff_hi = split_evenly(mlp.gate_proj.out_features, tp_size)[tp_rank]
        _shard_rows(mlp.gate_proj, ff_lo, ff_hi, device)
        _shard_rows(mlp.up_proj, ff_lo, ff_hi, device)
        _shard_cols(mlp.down_proj, ff_lo, ff_hi, keep_bias=tp_rank == 0, group=group, device=device)


def _shard_rows(linear: nn.Linear, lo: int, hi: int, device: torch.device | str) -> None:
    # A row slice is contiguous: copied straight from the host copy.
    linear.weight = nn.Parameter(linear.weight.data[lo:hi].to(device, non_blocking=True, copy=True),
                                 requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[lo:hi].to(device, non_blocking=True, copy=True),
                                   requires_grad=False)
    linear.out_features = hi - lo


def _shard_cols(linear: nn.Linear, lo: int, hi: int, keep_bias: bool, group: Any, device: torch.device | str) -> None:
    # A column slice is strided: the whole matrix goes to the device, which cuts it (on the CPU the ``.to`` is a
    # no-op and ``contiguous`` makes the copy).
    linear.weight = nn.Parameter(linear.weight.data.to(device, non_blocking=True)[:, lo:hi].contiguous(),
                                 requires_grad=False)
    if linear.bias is not None and not keep_bias:
        linear.bias = None  # the bias must be added once, after the sum over ranks
    linear.in_features = hi - lo
    linear.register_forward_hook(_make_all_reduce_hook(group))


def _make_all_reduce_hook(group: Any):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # Row-parallel partial sums: every rank ends with the same full activation.
        dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
        return output

    return hook
