"""A decode engine with one captured CUDA graph per precision tier over one shared static KV cache.

Contract: ``GraphDecodeEngine(tiers, GraphDecodeConfig(...))`` owns a transformers ``StaticCache`` that
every tier reads and writes, static input buffers, and (on CUDA) one ``torch.cuda.CUDAGraph`` per
(tier, query length): a 1-token decode step per tier plus, if ``verify_len`` > 0, a top-tier forward of
``verify_len`` tokens for verified mode. ``forward(tier, tokens, start)`` replays the graph of that tier
(on CPU, or with ``use_cuda_graphs=False``, it runs the same function eagerly), so the per-token cost
is one graph launch whatever the tier, and the tier's kernel speed shows. ``forward_static`` is the
capturable forward itself, for callers that capture larger steps (``fused_decode.FusedStepDecoder``:
forward + token pick + tier decision in one graph per tier, over this engine's cache and buffers).

Why it works with stock transformers: the attention mask is passed as a ready 4D additive mask
(B, 1, Q, L) built inside the graph from one static position tensor, so no mask code syncs; each
static layer's ``cumulative_length`` is set from the same tensor, so a rollback (verified mode) is just
a smaller start position. Every forward runs with cuDNN SDPA excluded (``deterministic_attention``):
on an H100 it made bf16 greedy differ run to run. Limits: full-attention models (no sliding layers),
equal-length prompts (no padding), ``batch_size`` fixed at construction, ``start + Q <= max_len``.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import StaticCache

from hf_adaptive.compat import cache_kwarg_name
from hf_adaptive.precision.capture import graph_capture
from hf_adaptive.precision.tiers import PrecisionTiers
from hf_adaptive.validation import check_number, check_type

logger = logging.getLogger(__name__)

_DETERMINISTIC_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN


@dataclass(frozen=True)
class GraphDecodeConfig:
    """The engine's shapes, fixed at capture time for its whole life (one config per engine).

    Not the per-call options: how one decode call picks tiers and tokens is ``options.DecodeOptions``,
    which may change from call to call on the same engine.
    """

    batch_size: int = 1
    max_len: int = 512
    verify_len: int = 0           # > 0: also capture a top-tier forward over this many tokens
    use_cuda_graphs: bool | None = None  # None: on when the model is on CUDA
    warmup_iters: int = 2
    # True: attention never runs the cuDNN SDPA backend, which on an H100 (torch 2.11) gave different bf16
    # logits for the same inputs run to run (eval/diag_precision_graph.py part D), so top-tier greedy was
    # not reproducible and verified mode could not match it; flash / mem-efficient / math are deterministic
    deterministic_attention: bool = True
    # True: the captured steps (not the prefill) run the forward through ``torch.compile`` (inductor, static
    # shapes) before capture, so RMSNorm / RoPE / residual element-wise ops fuse into few kernels; dynamo
    # compiles once per (tier, query length). Callers own the recompile limit when many engines share a process.
    compile: bool = False

    def __post_init__(self) -> None:
        for name, minimum, fix in (("batch_size", 1, "batch_size=1"), ("max_len", 2, "max_len=512"),
                                   ("verify_len", 0, "verify_len=5 (max_draft + 1), or 0"),
                                   ("warmup_iters", 0, "warmup_iters=2")):
            check_number(getattr(self, name), f"GraphDecodeConfig.{name}", minimum=minimum, integer=True, fix=fix)
        check_type(self.use_cuda_graphs, "GraphDecodeConfig.use_cuda_graphs", (bool, type(None)),
                   "use_cuda_graphs=None (on when the model is on CUDA)")


class GraphDecodeEngine:
    """Prefill eagerly in the top tier, then decode by replaying per-tier graphs."""

    def __init__(self, tiers: PrecisionTiers, config: GraphDecodeConfig | None = None) -> None:
        self.tiers, self.config = tiers, config or GraphDecodeConfig()
        self.model = tiers.model
        mcfg = self.model.config.get_text_config(decoder=True)
        if "sliding_attention" in (getattr(mcfg, "layer_types", None) or ()):
            raise ValueError("GraphDecodeEngine: models with sliding-window layers are not supported "
                             f"(layer_types={mcfg.layer_types}); use generate() with PrecisionController")
        param = next(self.model.parameters())
        self.device = param.device
        self.use_graphs = self.device.type == "cuda" if self.config.use_cuda_graphs is None \
            else self.config.use_cuda_graphs
        b, q_max = self.config.batch_size, max(1, self.config.verify_len)
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.config.max_len)
        self.ids = torch.zeros(b, q_max, dtype=torch.long, device=self.device)  # (B, Qmax) static
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)       # first query position
        self.key_index = torch.arange(self.config.max_len, device=self.device)  # (L,)
        self.mask_dtype = self.model.dtype
        self.cache_kwarg = cache_kwarg_name(self.model.forward)
        self.graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.position = 0  # host copy of the next free position
        self._step_forward = torch.compile(self._forward, dynamic=False) if self.config.compile else self._forward

    def attention_backends(self) -> AbstractContextManager:
        """The SDPA backend restriction every forward runs under (a host-side flag read when kernels are
        chosen, i.e. at trace time under compile and at capture time under CUDA graphs)."""
        return sdpa_kernel(_DETERMINISTIC_SDPA) if self.config.deterministic_attention else nullcontext()

    def _forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Model forward of ``ids`` (B, Q) at positions pos..pos+Q-1 -> logits (B, Q', V). Capturable.
        Under ``torch.compile`` the caller holds ``attention_backends()`` (entered outside the traced code)."""
        b, q = ids.shape
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.copy_(self.pos)
        positions = self.pos + self.key_index[:q]                       # (Q,)
        blocked = self.key_index[None, :] > positions[:, None]          # (Q, L)
        mask = torch.zeros(q, self.config.max_len, dtype=self.mask_dtype, device=self.device)
        mask = mask.masked_fill(blocked, torch.finfo(self.mask_dtype).min)[None, None].expand(b, 1, q, -1)
        backends = nullcontext() if torch.compiler.is_compiling() else self.attention_backends()
        with backends:  # host-side flags, read when kernels are chosen: capture bakes the choice in
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions[None].expand(b, q),
                             use_cache=True, logits_to_keep=logits_to_keep, **{self.cache_kwarg: self.cache})
        return out.logits

    def forward_static(self, ids: torch.Tensor) -> torch.Tensor:
        """Forward of ``ids`` (B, Q) at the positions in the static ``pos`` tensor, in the active tier;
        returns logits (B, Q, V). No host work depends on data, so callers may capture it in a graph
        (and compile it: then they hold ``attention_backends()`` around the compiled call)."""
        return self._forward(ids)

    def _check_room(self, start: int, q: int) -> None:
        if start + q > self.config.max_len:
            raise ValueError(f"GraphDecodeEngine: position {start}+{q} tokens exceeds max_len="
                             f"{self.config.max_len}; build the engine with a larger GraphDecodeConfig.max_len")

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) in the top tier from position 0; returns last logits (B, V).

        Captures the decode graphs on first use (the static cache is allocated by this first forward).
        """
        if input_ids.shape[0] != self.config.batch_size:
            raise ValueError(f"GraphDecodeEngine.prefill: batch {input_ids.shape[0]} != GraphDecodeConfig."
                             f"batch_size={self.config.batch_size}; build an engine per batch size")
        self._check_room(0, input_ids.shape[1] + max(1, self.config.verify_len))
        self.pos.fill_(0)
        with self.tiers.use(self.tiers.top):
            logits = self._forward(input_ids.to(self.device), logits_to_keep=1)[:, -1]
        self.position = input_ids.shape[1]
        if self.use_graphs and not self.graphs:
            self._capture_all()
        return logits

    def _shapes(self) -> list[tuple[str, int]]:
        shapes = [(t, 1) for t in self.tiers.ladder]
        if self.config.verify_len > 1:
            shapes.append((self.tiers.top, self.config.verify_len))
        return shapes

    def _capture_all(self) -> None:
        for tier, q in self._shapes():
            with self.tiers.use(tier):
                self.graphs[(tier, q)] = self._capture(q)
        logger.info("GraphDecodeEngine: captured %d graphs %s", len(self.graphs), list(self.graphs))

    @torch.no_grad()
    def _warm_up(self, q: int) -> None:
        """Run ``warmup_iters`` forwards of Q=q dummy tokens at the first FREE position (``self.position``).

        The warm-up really executes, so it writes KV at pos..pos+q-1: those slots must be scratch
        (masked for every query before them, overwritten by the real step that first reads them). Warming
        up at position 0 (an earlier bug) overwrote the prompt's first q KV entries with token-0 KV.
        On CUDA it runs on a side stream (lazy kernels, cuBLAS workspaces), as graph capture requires.
        """
        self.pos.fill_(self.position)
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream() if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if cuda else nullcontext(), self.attention_backends():
            for _ in range(self.config.warmup_iters):  # the first one compiles (config.compile)
                self._step_forward(self.ids[:, :q])
        if cuda:
            torch.cuda.current_stream().wait_stream(stream)

    def _capture(self, q: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._warm_up(q)
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph), self.attention_backends():
            out = self._step_forward(self.ids[:, :q])
        return graph, out

    @torch.no_grad()
    def forward(self, tier: str, tokens: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Run ``tokens`` (B, Q) at positions start.. in ``tier``; returns logits (B, Q, V).

        ``start`` defaults to the next free position; the next free position becomes start + Q. The
        returned tensor is graph-owned: read it before the next ``forward`` of the same (tier, Q).
        """
        start = self.position if start is None else start
        q = tokens.shape[1]
        self._check_room(start, q)
        self.pos.fill_(start)
        self.position = start + q
        key = (tier, q)
        if key in self.graphs:
            self.ids[:, :q].copy_(tokens)
            graph, out = self.graphs[key]
            graph.replay()
            return out
        with self.tiers.use(tier):
            if self.config.compile:
                self.ids[:, :q].copy_(tokens)
                with self.attention_backends():
                    return self._step_forward(self.ids[:, :q])
            return self._forward(tokens.to(self.device))
