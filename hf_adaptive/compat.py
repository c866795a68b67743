"""Differences between the transformers versions this package supports, decided in one place.

transformers 5.23 renamed the cache argument of ``generate`` and of the models' ``forward`` from
``past_key_values`` to ``cache`` (the old name is deprecated there, absent before). ``generate`` takes
``**kwargs``, so its name is decided from the installed version; a ``forward`` tells by its signature, which
also covers a model class that has not caught up with its library.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

CACHE_RENAME_RELEASE = (5, 23)  # first transformers release whose generate/forward take ``cache=``


def _installed_release() -> tuple[int, ...]:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release


def cache_kwarg_name(forward: Callable[..., Any] | None = None) -> str:
    """``"cache"`` or ``"past_key_values"``: from ``forward``'s signature when given, else from the version."""
    if forward is not None:
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return "cache" if _installed_release() >= CACHE_RENAME_RELEASE else "past_key_values"


def generate_cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` on transformers >= 5.23, else ``{"past_key_values": cache}``.

    Use as ``model.generate(**inputs, **generate_cache_kwargs(cache))``.
    """
    return {cache_kwarg_name(): cache}


def forward_cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The cache keyword of ``model.forward`` bound to ``cache``: ``model(ids, **forward_cache_kwargs(model, c))``."""
    return {cache_kwarg_name(model.forward): cache}


def _rewindable(layer: Any) -> bool:
    """A full-attention static layer of a release whose ``StaticLayer`` has no ``crop`` (before 5.18): its length is
    one device counter, and the entries past it are masked until a later forward overwrites them."""
    import torch

    return (not getattr(layer, "is_sliding", False) and not callable(getattr(layer, "crop", None))
            and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor))


def crop_cache(cache: Any, tokens_to_remove: int) -> None:
    """Remove the last ``tokens_to_remove`` (>= 0) tokens of ``cache``: its own ``crop`` where it has one, else
    (``StaticCache`` of transformers < 5.18) the static layers' device lengths are rewound, as later releases do."""
    if tokens_to_remove < 0:
        raise ValueError(f"crop_cache: tokens_to_remove must be >= 0 (a count), got {tokens_to_remove}")
    if tokens_to_remove == 0:
        return
    layers = getattr(cache, "layers", None)
    if layers and all(_rewindable(layer) for layer in layers):
        lengths = [layer.cumulative_length for layer in layers if getattr(layer, "is_initialized", True)]
        if lengths:
            import torch

            torch._foreach_sub_(lengths, tokens_to_remove)  # one launch for every layer, not one per layer
        return
    cache.crop(-tokens_to_remove)


def ensure_croppable(cache: Any) -> bool:
    """Whether ``cache.crop(-n)`` can take tokens back off ``cache``, giving it that ability where only the release
    lacks it: a ``StaticCache`` of transformers < 5.18 gets an instance-level ``crop`` that rewinds its layers' device
    lengths (``crop_cache``), and ``is_croppable`` reads True through ``cache_can_crop``."""
    if bool(getattr(cache, "is_croppable", False)):
        return True
    layers = getattr(cache, "layers", None)
    if not layers or not all(_rewindable(layer) for layer in layers):
        return False
    if "crop" not in vars(cache):

        def crop(tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError(f"crop: tokens_to_remove must be <= 0 (minus the tokens to take off), got "
                                 f"{tokens_to_remove}")
            crop_cache(cache, -tokens_to_remove)

        cache.crop = crop
    return True


def cache_can_crop(cache: Any) -> bool:
    """``cache.is_croppable``, or a crop that ``ensure_croppable`` gave it."""
    return bool(getattr(cache, "is_croppable", False)) or "crop" in vars(cache)


def activate_past_recording(cache: Any, states_to_keep: int) -> None:
    """Make ``cache``'s sliding-window (and recurrent) layers keep what a later crop may restore, for up to
    ``states_to_keep`` tokens where the release takes that count (later 5.x), else all of it (5.17)."""
    method = cache.activate_past_recording
    if "recurrent_states_to_keep" in inspect.signature(method).parameters:
        method(recurrent_states_to_keep=states_to_keep)
    else:
        method()
