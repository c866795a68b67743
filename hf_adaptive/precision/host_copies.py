"""Device scalars copied to pinned host memory without waiting, so a decoding loop reads a step's value one step
later, when the copy is complete, instead of stalling the device queue on it.

Contract: ``HostCopies().start(values)`` queues the copy of a small (B,) tensor and returns (host tensor, event);
the host tensor is valid once ``event.synchronize()`` returns (or ``event.query()`` is True); ``settled(copy)``
waits for it and returns the host tensor. Two slots per
(device, shape), taken in turn: a copy may still be unread while the next one starts, never two. On CPU the tensor
is its own host copy and the event is None.
"""

from __future__ import annotations

import torch


class HostCopies:
    """Pinned host buffers that (B,) values are copied to without waiting, reused step after step (two slots per
    device and shape, taken in turn)."""

    def __init__(self) -> None:
        self._slots: dict[tuple, list] = {}  # (device, shape) -> [[host, event], [host, event]], next slot first

    def start(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Queue the copy of ``values``; returns (host tensor, event that fires once it is complete)."""
        if not values.is_cuda:
            return values, None
        key = (values.device, tuple(values.shape), values.dtype)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = [[torch.empty(values.shape, dtype=values.dtype, pin_memory=True),
                                         torch.cuda.Event()] for _ in range(2)]
        slots.append(slots.pop(0))
        host, event = slots[-1]
        host.copy_(values, non_blocking=True)
        event.record(torch.cuda.current_stream(values.device))  # the values' device, not the current one
        return host, event


def settled(copy: tuple[torch.Tensor, torch.cuda.Event | None]) -> torch.Tensor:
    """The host tensor of a ``HostCopies.start`` result, once its copy is complete (no wait on CPU)."""
    host, event = copy
    if event is not None:
        event.synchronize()
    return host
