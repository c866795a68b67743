"""Overlapped decoding in ``model.generate``: the host queues step n + 1 while the device still runs step n.

``generate``'s decode loop reads, every step, whether all sequences have finished (``unfinished.max() == 0``). On
CUDA that read waits for the step's forward, so the host's own work for the next step (input preparation, dynamo's
guard checks, the CUDA-graph launch, logits processors) starts only once the device is idle: each step costs host
time plus device time. transformers ships the cure, ``DeferredStopCheck``: the flag is copied without waiting and read
one step late, and the one extra forward it may run after the last token is undone (the cache cropped by one token).
Up to the releases this package supports, transformers turns it on for Apple's ``mps`` device only.

This module lets it run on CUDA as well, for the caches that opt in (class attribute ``defers_stop_check = True``:
``AdaptiveStaticKVCache``; ``defer_stop_checks(cache)`` opts any cache object in) and, after
``enable_overlapped_decoding()``, for every cache that can undo a step (the condition transformers itself applies: no
cache, a croppable cache, or one that is not handed back). A step then costs about max(host, device) instead of their
sum. Tokens are unchanged: the stopping decision is the same, one step later, and the extra step leaves no trace in
the output or the cache (logits processors do see it).

Where the stop check is deferred, a ``PrecisionController`` decides each forward's tier from the step before the last
(``stop_check_deferred`` tells it), since reading the last step's confidence would wait for the device again.

Mechanism: ``DeferredStopCheck.is_supported`` (a static method ``generate`` asks once per call, after the prefill) is
wrapped once, on first use; the wrapper adds the CUDA case and otherwise answers as the original. Releases without
``DeferredStopCheck`` keep the per-step read (``overlap_available()`` is False).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hf_adaptive.compat import cache_can_crop, ensure_croppable

_DEVICES = ("cuda",)  # where a deferred check needs the pinned copies and events it records
_state = threading.local()  # .deferred: whether the generate call running on this thread defers its stop check
_lock = threading.Lock()
_enabled_for_all = False
_original: Any = None  # DeferredStopCheck.is_supported before wrapping (None: not wrapped yet)


def _stop_check_class() -> Any:
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:
        return None
    return DeferredStopCheck


def overlap_available() -> bool:
    """Whether the installed transformers can defer its stop check (it has ``DeferredStopCheck``)."""
    cls = _stop_check_class()
    return cls is not None and callable(getattr(cls, "is_supported", None))


def _cache_can_undo(cache: Any, cache_is_returned: bool) -> bool:
    """transformers' own condition: the extra forward can be undone, or nobody sees the cache it wrote."""
    return cache is None or not cache_is_returned or cache_can_crop(cache)


def _is_supported(device: Any, cache: Any, cache_is_returned: bool, is_assistant: bool) -> bool:
    answer = bool(_original(device, cache, cache_is_returned, is_assistant))
    if not answer and getattr(device, "type", None) in _DEVICES and not is_assistant:
        opted_in = _enabled_for_all or bool(getattr(cache, "defers_stop_check", False))
        answer = opted_in and _cache_can_undo(cache, cache_is_returned)
    _state.deferred = answer
    return answer


def install() -> bool:
    """Wrap ``DeferredStopCheck.is_supported`` once (idempotent, thread-safe). Returns whether overlap is available.

    Caches that opt in call this when they are built; nothing changes for any other cache until
    ``enable_overlapped_decoding()``."""
    global _original
    cls = _stop_check_class()
    if cls is None or not callable(getattr(cls, "is_supported", None)):
        return False
    with _lock:
        if _original is None:
            _original = cls.is_supported
            cls.is_supported = staticmethod(_is_supported)
    return True


def enable_overlapped_decoding(enabled: bool = True) -> bool:
    """Let ``model.generate`` on CUDA defer its stop check for every cache that can undo a step (``DynamicCache``,
    ``StaticCache`` from transformers 5.18 on, generate's own caches), not only for the caches that opt in
    (``defer_stop_checks`` opts in a ``StaticCache`` of an older release).

    Args:
        enabled: False goes back to the opted-in caches only.

    Returns:
        Whether the installed transformers can defer its stop check at all.

    Raises:
        TypeError: ``enabled`` is not a bool.
    """
    global _enabled_for_all
    if not isinstance(enabled, bool):
        raise TypeError(f"enable_overlapped_decoding: enabled must be a bool, got {type(enabled).__name__}. "
                        "Fix: enable_overlapped_decoding(True) or enable_overlapped_decoding(False)")
    available = install()
    _enabled_for_all = enabled
    return available


@contextmanager
def overlapped_decoding(enabled: bool = True) -> Iterator[bool]:
    """``enable_overlapped_decoding(enabled)`` for the duration of a block, then the previous setting back (a
    process-wide setting: do not interleave blocks with different values across threads).

    Yields:
        Whether the installed transformers can defer its stop check at all.
    """
    previous = _enabled_for_all
    available = enable_overlapped_decoding(enabled)
    try:
        yield available
    finally:
        enable_overlapped_decoding(previous)


def defer_stop_checks(cache: Any, enabled: bool = True) -> bool:
    """Opt one cache object in (or out) of overlapped decoding, whatever its class says.

    Args:
        cache: the cache to be passed to ``generate`` (any ``transformers.Cache``).
        enabled: False makes generate read the stop flag every step with this cache, as transformers does.

    Returns:
        Whether generate on CUDA will defer with it: overlap is available and the cache can undo a step. A
        ``StaticCache`` of transformers < 5.18, which has no ``crop``, gets one that rewinds its device lengths
        (``compat.ensure_croppable``), as later releases do.

    Raises:
        TypeError: ``enabled`` is not a bool, or ``cache`` is not a ``transformers.Cache``.
    """
    from transformers import Cache

    if not isinstance(enabled, bool):
        raise TypeError(f"defer_stop_checks: enabled must be a bool, got {type(enabled).__name__}. "
                        "Fix: defer_stop_checks(cache, True) or defer_stop_checks(cache, False)")
    if not isinstance(cache, Cache):
        raise TypeError(f"defer_stop_checks: cache must be a transformers Cache, got {type(cache).__name__}. Fix: "
                        "pass the cache object you give generate, or call enable_overlapped_decoding() for "
                        "generate's own caches")
    available = install()
    cache.defers_stop_check = enabled
    return available and enabled and ensure_croppable(cache)


def stop_check_deferred() -> bool:
    """Whether the ``generate`` call in progress on this thread reads its stop flag one step late (set once per call,
    after the prefill; the value of the last call once it returned)."""
    return bool(getattr(_state, "deferred", False))


def forget_stop_check() -> None:
    """Clear ``stop_check_deferred`` on this thread: a new call's prefill runs before generate decides, and decoding
    modes that never ask (beam search, assisted decoding) read their stop flag every step."""
    _state.deferred = False
