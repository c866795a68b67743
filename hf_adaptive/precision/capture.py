"""CUDA-graph capture that Python's garbage collector cannot break."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def graph_capture(graph: torch.cuda.CUDAGraph) -> Iterator[None]:
    """``torch.cuda.graph(graph)`` with the garbage collector run before and paused during the capture.

    torch no longer collects before a capture (``torch.compiler.config.force_cudagraph_gc`` is off by default), so a
    collection triggered by the allocations of the captured code could free dead CUDA objects of earlier work in the
    middle of it (pinned host buffers, events), whose CUDA calls are not permitted while a stream captures in the
    global mode. Collecting first and pausing the collector rules that out. The symptom it was written for, a capture
    failing at an unrelated kernel ("operation failed due to a previous error during capture") only after certain
    earlier tests, went away with it; a minimal reproduction with dead pinned buffers and events did not fail, so the
    collector is the likely, not the proven, cause.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            yield
    finally:
        if enabled:
            gc.enable()


def begin_graph_step(call, model) -> None:
    """Before a forward through ``call``: where it is a compiled call (not ``model`` itself), tell cudagraph trees a
    new step begins, so the graph it replays is a root of its tree whatever graph ran before it.

    Without the mark, cudagraph trees record a graph invoked after a different graph as that graph's child: a loop
    that interleaves several graphs (the cascade's verify widths and its int4 draft step) in an order that changes
    from round to round records a new path whenever an order is new, and the H100 replay of the cascade counted 10
    captures inside its timed calls. The mark allows the outputs of earlier replays to be overwritten, so a caller
    copies what it keeps of a forward's output before the next one (the cascade does).
    """
    if call is not model:
        torch.compiler.cudagraph_mark_step_begin()
