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
