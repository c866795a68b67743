"""The sliding-window layer of the adaptive cache: transformers' bounded exact window, never quantized.

Contract: ``keys`` / ``values`` are transformers' ``DynamicSlidingWindowLayer`` window; the layer adds the byte
accounting and telemetry the cache reads from every layer (``live_bytes``, ``reserved_bytes``, ``stats``).
"""

from __future__ import annotations

from transformers.cache_utils import DynamicSlidingWindowLayer

from hf_adaptive.kv.layer import bf16_bytes, tensor_bytes


class AdaptiveSlidingLayer(DynamicSlidingWindowLayer):
    """Sliding-window layer: a bounded exact window (transformers' own logic), never quantized.

    Its memory is bounded by ``sliding_window`` tokens, so quantizing it would save little and cost accuracy.
    """

    def reset(self) -> None:
        """Drop the window (transformers 5.17 only zeroes it, so the next turn would append to stale zeros)."""
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0

    def live_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return tensor_bytes(self.keys, self.values)

    reserved_bytes = live_bytes

    def demotable_above(self, bits: int) -> int:
        return 0

    def stats(self) -> dict:
        stored = self.keys.shape[-2] if self.is_initialized else 0
        return {"type": "sliding_attention", "tokens": self.get_seq_length(), "stored_tokens": stored,
                "tokens_by_bits": {"16": stored, "8": 0, "4": 0, "2": 0}, "live_bytes": self.live_bytes(),
                "reserved_bytes": self.live_bytes(), "bf16_bytes": bf16_bytes(self)}
