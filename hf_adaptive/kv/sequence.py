"""The ``DynamicLayer`` face of a layer stored as history blocks followed by an exact tail.

Contract: transformers' ``DynamicLayer`` users (generation's dict outputs and assisted decoding, user code) read
``layer.keys`` / ``layer.values`` as the whole sequence, (B, H, seq_len, D). :class:`WholeSequence` gives them
that for :class:`hf_adaptive.kv.layer.AdaptiveFullLayer` and its static subclass: the history dequantized, then the
exact tail, built on the first read and cached until the layer changes. The per-step path never reads them, so no
step dequantizes for them. :func:`tokens_to_crop` applies the installed transformers' rules for ``crop``'s argument.
Knows nothing about pools or quantization: the host layer assembles its history (``_history``).
"""

from __future__ import annotations

import operator

import torch


class WholeSequence:
    """Mixin for a layer stored as history blocks + exact tail: read-only ``keys`` / ``values`` of the whole sequence.

    The host class provides ``is_initialized``, ``block_bits`` (one entry per history block), ``tail_keys`` /
    ``tail_values`` (B, H, T, D), ``_history()`` (the dequantized history, (B, H, n_blocks * block_size, D)) and
    ``_sync_pending()``, and sets ``self._full = None`` whenever its stored content changes. While cached, the
    whole sequence holds one dequantized copy of the layer (not counted in ``live_bytes``).
    """

    _full: tuple | None = None  # (stamp, keys, values) of the last build

    @property
    def keys(self) -> torch.Tensor | None:
        """All keys of the sequence, (B, H, seq_len, D) in logical order; None before the first update.

        The history blocks dequantized (lossy for 8/4/2-bit blocks), then the exact tail. Built on the first read
        and cached until the layer next changes (update, crop, a demotion, a batch operation, reset); with no
        history it is the exact tail itself. Read-only: change the layer through its methods.
        """
        whole = self._whole_sequence()
        return None if whole is None else whole[0]

    @keys.setter
    def keys(self, value) -> None:
        _refuse_assignment(type(self).__name__, "keys", value)

    @property
    def values(self) -> torch.Tensor | None:
        """All values of the sequence, (B, H, seq_len, D); built and cached like :attr:`keys`."""
        whole = self._whole_sequence()
        return None if whole is None else whole[1]

    @values.setter
    def values(self, value) -> None:
        _refuse_assignment(type(self).__name__, "values", value)

    def _whole_sequence(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.is_initialized:
            return None
        if not self.block_bits:
            return self.tail_keys, self.tail_values  # the tail is the whole sequence: no copy
        # the stamp also catches changes made without a method of the layer (a static step committing its rows)
        stamp = (len(self.block_bits), self.tail_keys.shape[-2])
        if self._full is None or self._full[0] != stamp:
            self._sync_pending()
            history_k, history_v = self._history()
            self._full = (stamp, torch.cat([history_k, self.tail_keys], -2),
                          torch.cat([history_v, self.tail_values], -2))
        return self._full[1], self._full[2]


def _refuse_assignment(owner: str, name: str, value) -> None:
    # the base classes' constructors and resets assign None: the host layer clears its own state
    if value is None:
        return
    raise AttributeError(f"{owner}.{name} is read-only: it is the whole sequence assembled from the history blocks "
                         f"and the exact tail; got an assignment of {type(value).__name__}. Fix: change the layer "
                         "through update(), crop(), reorder_cache(), batch_select_indices(), "
                         "batch_repeat_interleave() or reset().")


def tokens_to_crop(tokens_to_remove: int) -> int:
    """How many tokens ``crop(tokens_to_remove)`` removes, by transformers' ``DynamicLayer.crop`` rules: a negative
    int removes that many, 0 none; a positive value (once "keep that many") is refused, as there."""
    try:  # any integer (numpy, a 0-d integer tensor), but not a float or a bool
        count = None if isinstance(tokens_to_remove, bool) else operator.index(tokens_to_remove)
    except TypeError:
        count = None
    if count is None:
        raise TypeError(f"crop(tokens_to_remove) takes an int; got {tokens_to_remove!r} "
                        f"({type(tokens_to_remove).__name__}). Fix: crop(-n) removes the last n tokens.")
    if count > 0:
        raise ValueError(f"crop(tokens_to_remove={count}): a positive value is not supported (as in transformers' "
                         "DynamicLayer.crop); pass a negative int, the number of tokens to remove. Fix: crop(-n) "
                         f"removes the last n tokens; to keep {count} tokens, crop({count} - cache.get_seq_length()).")
    return -count
