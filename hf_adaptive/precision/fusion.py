"""Sibling linears that read the same input run as ONE matmul per tier: q/k/v, and gate/up.

Why: a decode step at batch 1 under a CUDA graph is launch- and latency-bound, not byte-bound: k_proj / v_proj
at batch 1 are tiny kernels that cost nearly what q_proj costs (per-linear times against their byte floor:
``precision_int4_kernels_*`` in eval/results/README.md). One matmul over the concatenated weight (N_q + N_k + N_v, K)
replaces three, and gate/up two; each member returns a column slice (a view, no copy).

Contract: ``fuse_siblings(handle, group_size)`` (called by ``prepare_tiers(..., fuse=True)``) finds, in
every module, attribute groups from ``SIBLINGS`` that are all ``TieredLinear`` with the same input size
and bias presence, and builds a ``FusedGroup`` per group: one fused ``TieredLinear`` holding every tier's
format; the members keep no format of their own. The members' original parameters are re-pointed to
row views of the concatenated weight, so the model's own dtype is not stored twice (``state_dict``
still works). int4 quantizes per output row, so the fused int4 weight equals the members' int4 weights.

No modeling code is touched: the first member called with an input computes the fused output and
keeps it; the others, called with the very same tensor (same object, same version, same tier), take
their slice. A call with any other input recomputes (correct, just not fused), and the kept output
is dropped once every member has taken its slice. Limits: the members' biases are concatenated once
at fusion time (edit the fused group's, not the members'); modules moved later with ``.to()`` leave
the fused copy behind (prepare tiers on the final device, as for every tier).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _version(x: torch.Tensor) -> int:
    if torch.compiler.is_compiling():  # traced code has no in-place edit between sibling calls to see
        return 0
    return -1 if x.is_inference() else x._version  # inference tensors have no version counter


class FusedGroup:
    """One fused ``TieredLinear`` serving the column slices of its members."""

    def __init__(self, members: list, fused) -> None:
        self.members, self.fused = members, fused
        self._key: tuple | None = None
        self._x: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._served: set[int] = set()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The fused (..., N_total) output for input ``x`` (computed once per input and tier)."""
        key = (_version(x), self.fused.selector.active)
        if not (x is self._x and key == self._key and index not in self._served):
            self._x, self._key, self._served = x, key, set()
            self._out = self.fused(x)
        out = self._out
        self._served.add(index)
        if len(self._served) == len(self.members):  # everyone served: do not pin activations
            self._x = self._out = None
        return out

    def nbytes(self) -> dict[str, int]:
        return self.fused.format_nbytes()


def _fusable(parent: nn.Module, names: tuple[str, ...], linear_type: type) -> list | None:
    members = [getattr(parent, n, None) for n in names]
    if not all(isinstance(m, linear_type) and m.group is None for m in members):
        return None
    if len({m.in_features for m in members}) != 1 or len({m.bias is None for m in members}) != 1:
        return None
    return members


def _fuse(members: list, ladder: tuple[str, ...], group_size: int, linear_type: type) -> FusedGroup:
    weight = torch.cat([m.weight.detach() for m in members])  # (N_total, K) in the model's dtype
    bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
    shell = SimpleNamespace(in_features=members[0].in_features, out_features=weight.shape[0],
                            weight=weight, bias=bias)
    fused = linear_type(shell, members[0].selector)
    for tier in ladder:
        fused.add_format(tier, group_size)
    group = FusedGroup(members, fused)
    start = 0
    for i, m in enumerate(members):
        end = start + m.out_features
        m.weight.data = weight[start:end]  # a view: the original storage is freed, not duplicated
        m.formats.clear()
        m.group, m.group_index, m.group_slice = group, i, slice(start, end)
        start = end
    return group


def fuse_siblings(model: nn.Module, ladder: tuple[str, ...], group_size: int, linear_type: type) -> list[FusedGroup]:
    """Fuse every sibling group of ``linear_type`` modules in ``model``; returns the groups."""
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = _fusable(parent, names, linear_type)
            if members is not None:
                groups.append(_fuse(members, ladder, group_size, linear_type))
    return groups
