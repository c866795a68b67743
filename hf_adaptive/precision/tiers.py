"""Precision tiers of a model's decoder linears, prepared once, switched per forward.

Contract: ``prepare_tiers(model, tiers=("int4", "native"))`` replaces every ``nn.Linear`` inside the
decoder layers, and the output projection (lm_head, unless ``lm_head=False``; the input embedding is a
lookup and stays as it is), with a ``TieredLinear`` holding the weight in each requested format, and
returns a ``PrecisionTiers`` handle. ``handle.set(name)`` picks the format the next forward
uses. Tiers, cheapest first:

- ``"int4"``: group-wise int4; on CUDA through PyTorch's tinygemm (``int4.py``, the default: fastest at one
  row) or our Triton kernel (``int4_triton.py``, ``int4_kernel="triton"``); on CPU through PyTorch's CPU kernel.
  Sibling linears (q/k/v, gate/up) run as one matmul per tier by default (``fusion.py``).
- ``"fp8"``: e4m3 weights, per-row scales, ``torch._scaled_mm`` (sm89+ only).
- ``"native"``: the 16-bit weight (the model's own if it is bf16/fp16, else a bf16 copy).
- ``"fp32"``: the fp32 weight; only for models kept in fp32.

Each tier's weight is a ``weight_format.WeightFormat`` (``DenseWeight``, ``Int4Weight``, ``TritonInt4Weight``,
``Fp8Weight``): ``TieredLinear`` packs it in ``add_format`` and otherwise only calls its ``linear`` and ``nbytes``.

The selector is a plain Python attribute, read when a forward runs: eager code follows it each step,
while a captured CUDA graph bakes the tier it was captured under (so ``graph_decode`` captures one graph
per tier). Under ``generate``'s ``torch.compile`` the selector's state is all the step is guarded on among the tiered
linears' attributes (``lean_guards``, ``guards.py``): prepare once, then leave the tiered modules' attributes as they
are. Memory: every tier keeps its own copy of the tiered linears; a tier in the model's own dtype
shares the original weight (counted in ``memory_bytes``: for a tied lm_head that is the embedding
matrix, which the model holds anyway). int4 costs 0.5 byte per weight plus a bf16 (scale, zero) pair
per group: (0.5 + 4 / g) / 2 of bf16, ~0.27x at g=128, ~0.28x at g=64. ``handle.memory_bytes()`` gives each
tier's bytes; a benchmark records them as ``tier_weight_bytes`` (the precision results in
eval/results/README.md). Fusion adds nothing: the members' weights become views of the fused one.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from hf_adaptive.precision import guards
from hf_adaptive.precision.confidence import ConfidenceWeights, confidence_score
from hf_adaptive.precision.fp8 import pack_fp8
from hf_adaptive.precision.fusion import fuse_siblings
from hf_adaptive.precision.int4 import choose_group_size, out_multiple_for, pack_int4
from hf_adaptive.precision.int4_triton import HAS_TRITON, pack_int4_triton, triton_group_size
from hf_adaptive.precision.weight_format import DenseWeight, Int4Format, WeightFormat
from hf_adaptive.validation import check_decoder_only, check_number, check_type

logger = logging.getLogger(__name__)

TIER_RANK = {"int4": 0, "fp8": 1, "native": 2, "fp32": 3}
INT4_KERNELS = ("auto", "triton", "tinygemm")


class OutputScores:
    """The confidence of each forward, computed by the tiered output projection for a ``PrecisionController``.

    Why not a forward hook on the output projection: a hook added after ``generate`` compiled its decode step is not
    part of that step (dynamo does not guard on module hooks), so a controller built after a first ``generate`` found
    no score and computed it eagerly from the scores on every step (about 17 kernel launches and 0.3-0.5 ms of host
    time per token on the 8B shape). The output ``TieredLinear`` reads ``weights`` (None: off) in its forward, a
    value the compiled step guards on: switching the scores on compiles the step once more, with the confidence
    inside it; equal weights keep the guarded object, so the next controller reuses that step.
    """

    def __init__(self) -> None:
        self.weights: ConfidenceWeights | None = None
        self.score: torch.Tensor | None = None  # (B,) of the last forward that ran the output projection
        self._owner: object | None = None  # the controller the scores are computed for (the last one enabled)

    def enable(self, weights: ConfidenceWeights, owner: object) -> None:
        """Compute the confidence with ``weights`` for ``owner`` in every forward from now on. A controller opened
        earlier on the same tiers loses the scores (it computes its own, counted as eager steps), so no controller
        reads a score made with another's weights."""
        if self.weights != weights:
            self.weights = weights
        self.score, self._owner = None, owner

    def disable(self, owner: object) -> None:
        """``owner`` stops using the scores: off if it is the one they are computed for (the step compiled without
        them is used again)."""
        if self._owner is owner:
            self.weights = self.score = self._owner = None

    def take(self, owner: object) -> torch.Tensor | None:
        """The last forward's (B,) scores for ``owner``, once (None if no forward computed them since, or if they
        are computed for another controller)."""
        if self._owner is not owner:
            return None
        score, self.score = self.score, None
        return score


@dataclass
class TierSelector:
    """The tier every ``TieredLinear`` of one model runs; shared, so one assignment switches them all."""

    active: str = "native"
    int4_kernel: str = "auto"  # CUDA int4 format: "tinygemm" ("auto"), or "triton"
    output_scores: OutputScores = field(default_factory=OutputScores)


class TieredLinear(nn.Module):
    """A linear layer that holds its weight in several formats and dispatches on a shared selector."""

    def __init__(self, linear: nn.Linear, selector: TierSelector) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.selector = selector
        self.bias = linear.bias
        self.weight = linear.weight  # the original parameter (keeps state_dict / tying intact)
        self.formats: dict[str, WeightFormat] = {}  # tier -> this layer's weight in that tier's format
        self.group = None  # a fusion.FusedGroup computing this layer's output with its siblings'
        self.group_index, self.group_slice = 0, slice(None)
        self.is_output = False  # the model's output projection: computes selector.output_scores when they are on

    def add_format(self, tier: str, group_size: int) -> bool:
        """Prepare ``tier``; returns False (and keeps the 16-bit weight for it) if the shape cannot."""
        w = self.weight.detach()
        if tier == "fp32":
            self.formats[tier] = DenseWeight(w if w.dtype == torch.float32 else w.float())
        elif tier == "native":
            self.formats[tier] = DenseWeight(w if w.dtype in (torch.bfloat16, torch.float16) else w.to(torch.bfloat16))
        elif tier == "fp8":
            self.formats[tier] = pack_fp8(w)
        elif tier == "int4" and w.is_cuda and self.selector.int4_kernel == "triton":
            g = triton_group_size(self.in_features, self.out_features, group_size)
            if g is None:
                return False
            self.formats[tier] = pack_int4_triton(w, g, torch.bfloat16)
        elif tier == "int4":
            g = choose_group_size(self.in_features, self.out_features, group_size, out_multiple_for(w.device))
            if g is None:
                return False
            act = self.weight.dtype if not w.is_cuda else torch.bfloat16
            try:
                self.formats[tier] = pack_int4(w, g, act)
            except RuntimeError as err:  # a packer limit this torch build adds: the shape falls back, not the run
                logger.warning("prepare_tiers: int4 packer refused a (%d, %d) weight (%s); it runs a slower tier",
                               self.out_features, self.in_features, str(err).splitlines()[0])
                return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype, computed in the active tier's format."""
        if self.group is not None:  # fused with its siblings: a column slice of the group's output
            return self.group.output(x, self.group_index)[..., self.group_slice]
        fmt = self.formats.get(self.selector.active)
        if fmt is None:  # tier not preparable for this shape: fall back to the next slower one present
            fmt = self.formats[self._fallback()]
        y = fmt.linear(x.reshape(-1, self.in_features))  # (M, K) -> (M, N)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias
        if self.is_output and self.selector.output_scores.weights is not None:
            sink = self.selector.output_scores
            sink.score = confidence_score(y if y.dim() == 2 else y[:, -1, :], sink.weights)
        return y

    def _fallback(self) -> str:
        rank = TIER_RANK[self.selector.active]
        return min((t for t in self.formats if TIER_RANK[t] > rank), key=TIER_RANK.get)

    def format_nbytes(self) -> dict[str, int]:
        """Bytes each tier's weight copy holds (a copy shared with the original counts as the original)."""
        return {tier: fmt.nbytes() for tier, fmt in self.formats.items()}


@dataclass
class PrecisionTiers:
    """Handle returned by ``prepare_tiers``: the tier ladder of one model and its switch."""

    model: nn.Module
    ladder: tuple[str, ...]  # cheapest first; ladder[-1] is the top (reference) tier
    selector: TierSelector
    modules: list[TieredLinear] = field(default_factory=list)
    unsupported: dict[str, int] = field(default_factory=dict)  # tier -> linears that fall back
    groups: list = field(default_factory=list)  # fusion.FusedGroup: sibling linears run as one matmul
    lean_guards: bool = False  # generate's compiled step filters the guards the tiered linears fix (guards.py)

    @property
    def top(self) -> str:
        return self.ladder[-1]

    @property
    def fast(self) -> str:
        return self.ladder[0]

    @property
    def active(self) -> str:
        return self.selector.active

    def set(self, tier: str) -> None:
        """Make ``tier`` the format of the next forward (a Python assignment; no device work)."""
        if tier not in self.ladder:
            raise ValueError(f"PrecisionTiers.set: tier must be one of {self.ladder}, got {tier!r}; "
                             "prepare it with prepare_tiers(model, tiers=(...)) first")
        self.selector.active = tier

    @contextmanager
    def use(self, tier: str) -> Iterator[None]:
        """Run a block under ``tier`` and restore the previous one."""
        previous = self.selector.active
        self.set(tier)
        try:
            yield
        finally:
            self.selector.active = previous

    def memory_bytes(self) -> dict[str, int]:
        """Weight bytes each tier holds across all tiered linears."""
        total: dict[str, int] = {t: 0 for t in self.ladder}
        for m in self.modules:  # a fused member holds no format: its group's fused weight counts
            for tier, n in m.format_nbytes().items():
                total[tier] += n
        for g in self.groups:
            for tier, n in g.nbytes().items():
                total[tier] += n
        return total


def _decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear under a ModuleList named ``layers``."""
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList):
            for parent in module.modules():
                for attr, child in parent.named_children():
                    if isinstance(child, nn.Linear):
                        found.append((parent, attr, child))
            break
    return found


def _self_check_int4(handle: PrecisionTiers) -> None:
    """Compare one packed int4 layer with its dequantized reference, so a kernel layout change in a new
    torch release (tinygemm) or a kernel bug on a new card (Triton) fails loudly at prepare time instead of
    producing garbage tokens."""
    owners = handle.modules + [g.fused for g in handle.groups]
    module = next((m for m in owners if "int4" in m.formats), None)
    if module is None:
        return
    fmt: Int4Format = module.formats["int4"]
    reference = fmt.reference_matrix(module.weight.detach())  # (N, K) fp32
    gen = torch.Generator().manual_seed(0)  # leave the caller's global RNG untouched
    errs = []
    for rows in (1, 4):  # Triton: the one-row (tuned) kernel and the several-rows kernel
        x = torch.randn(rows, module.in_features, generator=gen).to(module.weight.device, fmt.act_dtype)
        ref = x.float() @ reference.T
        errs.append((fmt.linear(x).float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
    err = max(errs)
    if err > 0.05:  # host read, once per prepare_tiers
        raise RuntimeError(f"prepare_tiers: int4 {fmt.kernel} kernel self-check failed (relative error "
                           f"{float(err):.3f} on {module.weight.device}, torch {torch.__version__}); use int4_kernel='tinygemm' "
                           "or drop 'int4' from tiers=, and report it")


def _output_linear(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, lm_head) if the model's output embedding is a plain nn.Linear, else []."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if child is head:
                return [(module, attr, head)]
    return []


def prepare_tiers(model: nn.Module, tiers: tuple[str, ...] = ("int4", "native"),
                  group_size: int = 128, lm_head: bool = True, fuse: bool = True,
                  int4_kernel: str = "auto", lean_guards: bool = True) -> PrecisionTiers:
    """Prepare the requested weight formats once and return the switch handle.

    Args:
        model: a causal LM whose decoder blocks live in a ``layers`` ModuleList (Llama, Qwen2, Gemma3...).
        tiers: names from ``TIER_RANK``; at least one. The highest-ranked one is the reference tier.
        group_size: preferred int4 group size; smaller supported sizes are used where K needs it
            (SmolLM2's hidden 576 gets 64).
        lm_head: also tier the output projection (default). For Llama-3.2-1B its 128256 x 2048 matrix
            is 21 % of the bf16 bytes a decode step reads; left in bf16 it caps the int4 tier's gain.
        fuse: run q/k/v and gate/up as one matmul per tier (``fusion.py``); every tier is fused alike,
            so tier-vs-tier comparisons stay fair.
        int4_kernel: the CUDA int4 kernel: ``"auto"`` / ``"tinygemm"`` (PyTorch's; the fastest at one row) or
            ``"triton"`` (ours, tuned per shape at prepare time; slower than tinygemm at one row, faster at
            several rows on the large matrices; see ``precision_int4_kernels_*`` in eval/results/README.md).
            CPU weights always use PyTorch's CPU int4 kernel.
        lean_guards: make ``generate``'s compiled step skip dynamo's guards on what the tiered linears fix at
            preparation, keeping those on the active tier and the output scores (``guards.py``): a step's guard
            lookup drops 2.75× with one tier, to about the plain model's, and 1.87× with a switch every step (CPU,
            ``precision_guards_cpu``).
            ``False`` keeps dynamo's full guard set.
    Returns:
        ``PrecisionTiers`` with ``set(tier)``; the top tier is active.

    Call it after the model is on its final device: the extra formats are plain tensors that
    ``model.to(...)`` does not move.
    """
    check_type(tiers, "prepare_tiers: tiers", (tuple, list), "tiers=('int4', 'native')")
    check_number(group_size, "prepare_tiers: group_size", minimum=1, integer=True, fix="group_size=128")
    check_type(lean_guards, "prepare_tiers: lean_guards", bool, "lean_guards=True")
    bad = [t for t in tiers if t not in TIER_RANK]
    if not tiers or bad:
        raise ValueError(f"prepare_tiers: tiers must be a non-empty subset of {tuple(TIER_RANK)}, got "
                         f"{tiers!r}; e.g. tiers=('int4', 'native')")
    if int4_kernel not in INT4_KERNELS:
        raise ValueError(f"prepare_tiers: int4_kernel must be one of {INT4_KERNELS}, got {int4_kernel!r}")
    if int4_kernel == "triton" and not HAS_TRITON:
        raise ValueError("prepare_tiers: int4_kernel='triton' needs triton (pip install triton); "
                         "or pass int4_kernel='tinygemm'")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        check_decoder_only(config, "prepare_tiers")
    ladder = tuple(sorted(set(tiers), key=TIER_RANK.get))
    targets = _decoder_linears(model)
    head = _output_linear(model) if targets and lm_head else []
    targets += head
    if not targets:
        raise ValueError("prepare_tiers: found no nn.Linear under a `layers` ModuleList in model; "
                         "is it already prepared, or not a decoder-only transformers model?")
    selector = TierSelector(active=ladder[-1], int4_kernel=int4_kernel)
    handle = PrecisionTiers(model, ladder, selector)
    output = head[0][2] if head else None
    with torch.no_grad():
        for parent, attr, linear in targets:
            tiered = TieredLinear(linear, selector)
            tiered.is_output = linear is output
            for tier in ladder:
                if not tiered.add_format(tier, group_size):
                    handle.unsupported[tier] = handle.unsupported.get(tier, 0) + 1
            setattr(parent, attr, tiered)
            handle.modules.append(tiered)
    if fuse:
        handle.groups = fuse_siblings(model, ladder, group_size, TieredLinear)
    _self_check_int4(handle)
    handle.lean_guards = lean_guards and guards.install(model, handle.modules)
    if handle.unsupported:
        logger.warning("prepare_tiers: linears whose shape a tier's kernel cannot take run the next slower "
                       "prepared tier instead (tier: count): %s", handle.unsupported)
    return handle
