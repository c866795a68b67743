"""Generation settings compared by the evaluations: a pluggable registry of name -> factory.

Contract: a setting spec is ``name`` or ``name:key=value,key=value`` (e.g. ``kv4``,
``kv:bits=4,residual_length=16``, ``precision:high=0.8,low=0.5``). ``build_setting(spec, model)``
returns a :class:`Setting`, whose ``generate_kwargs()`` gives the extra ``model.generate`` keyword
arguments for ONE call (a fresh cache each time) and whose ``collect(kwargs)`` reads what that call
recorded (KV bytes, precision tiers). Register more with :func:`register_setting`.

Built-ins: ``baseline`` (native weights + ``DynamicCache``), ``kv`` / ``kv8`` / ``kv4`` / ``kv2``
(:class:`hf_adaptive.AdaptiveKVCache` with ``fixed_bits``, or ``memory_budget`` for a budget sweep) and
``precision`` (:class:`hf_adaptive.PrecisionController` over int4 + top-precision tiers; ``lag=1`` decides from the
step before the one just run, as overlapped decoding does on a GPU, and the ``ConfidenceWeights`` fields set the
score's terms).
``precision`` replaces the model's decoder linears in place (once, reused by later precision specs) and
leaves them at the top tier: run it after the other settings, which :func:`order_specs` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Setting:
    """One way of running ``generate``; ``params`` are recorded with the results."""

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    make_kwargs: Callable[[], dict[str, Any]] = dict
    read_stats: Callable[[dict[str, Any]], dict[str, Any]] = lambda kwargs: {}
    in_place: bool = False  # modifies the model (e.g. swaps its linears): run after the others

    def generate_kwargs(self) -> dict[str, Any]:
        """Extra ``generate`` kwargs for one call (fresh state: a new cache, a reset controller)."""
        return self.make_kwargs()

    def collect(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What the call made with ``kwargs`` recorded (JSON-serializable)."""
        return self.read_stats(kwargs)


SettingFactory = Callable[[Any, str, dict[str, str]], Setting]
_REGISTRY: dict[str, SettingFactory] = {}
_ALIASES: dict[str, tuple[str, dict[str, str]]] = {
    "kv8": ("kv", {"bits": "8"}), "kv4": ("kv", {"bits": "4"}), "kv2": ("kv", {"bits": "2"}),
}
# Settings that modify the model in place run last.
_RUN_LAST = ("precision",)


def register_setting(name: str, factory: SettingFactory) -> None:
    """Add a setting family: ``factory(model, spec, params) -> Setting`` (params are raw strings)."""
    _REGISTRY[name] = factory


def available_settings() -> list[str]:
    """Registered family names and aliases."""
    return sorted([*_REGISTRY, *_ALIASES])


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"kv:bits=4,residual_length=16"`` -> ``("kv", {"bits": "4", "residual_length": "16"})``."""
    name, _, rest = spec.partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"setting={spec!r}: parameter {item!r} has no '='; write key=value, "
                             "e.g. 'kv:bits=4'.")
        params[key.strip()] = value.strip()
    if name in _ALIASES:
        base, fixed = _ALIASES[name]
        return base, {**fixed, **params}
    return name, params


def order_specs(specs: list[str]) -> list[str]:
    """The specs with ``baseline`` first and in-place (precision) settings last, else in given order."""
    def rank(spec: str) -> int:
        family = parse_spec(spec)[0]
        return 0 if family == "baseline" else 2 if family in _RUN_LAST else 1
    return sorted(dict.fromkeys(specs), key=rank)


def spec_groups(specs: list[str]) -> list[list[str]]:
    """``order_specs`` split into [settings that leave the model alone, in-place settings] (empty dropped).

    Build and run a group before building the next: building ``precision`` already changes the model.
    """
    ordered = order_specs(specs)
    groups = [[s for s in ordered if parse_spec(s)[0] not in _RUN_LAST],
              [s for s in ordered if parse_spec(s)[0] in _RUN_LAST]]
    return [g for g in groups if g]


def build_setting(spec: str, model: Any) -> Setting:
    """The :class:`Setting` for ``spec`` on ``model``.

    Raises:
        ValueError: unknown family, naming the registered ones.
    """
    family, params = parse_spec(spec)
    if family not in _REGISTRY:
        raise ValueError(f"setting={spec!r}: unknown setting {family!r}; allowed: {available_settings()}. "
                         "Fix: e.g. --settings baseline,kv8,kv4, or register_setting() a new one.")
    return _REGISTRY[family](model, spec, params)


def _take(params: dict[str, str], key: str, cast: Callable[[str], Any], default: Any) -> Any:
    return cast(params.pop(key)) if key in params else default


def _reject_unknown(spec: str, params: dict[str, str], allowed: tuple[str, ...]) -> None:
    if params:
        raise ValueError(f"setting={spec!r}: unknown parameter(s) {sorted(params)}; allowed: {list(allowed)}.")


def _baseline(model: Any, spec: str, params: dict[str, str]) -> Setting:
    from transformers import DynamicCache

    from hf_adaptive.kv.cache import generate_cache_kwargs

    _reject_unknown(spec, dict(params), ())
    return Setting(spec, "baseline", {"cache": "DynamicCache", "weights": str(model.dtype)},
                   make_kwargs=lambda: generate_cache_kwargs(DynamicCache(config=model.config)))


_KV_KEYS = ("bits", "memory_budget", "residual_length", "block_size", "backend")


def _kv(model: Any, spec: str, params: dict[str, str]) -> Setting:
    from hf_adaptive.kv.cache import AdaptiveKVCache, generate_cache_kwargs

    params = dict(params)
    overrides = {"fixed_bits": _take(params, "bits", int, None),
                 "memory_budget": _take(params, "memory_budget", str, None),
                 "residual_length": _take(params, "residual_length", int, None),
                 "block_size": _take(params, "block_size", int, None),
                 "backend": _take(params, "backend", str, None)}
    _reject_unknown(spec, params, _KV_KEYS)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "fixed_bits" not in overrides and "memory_budget" not in overrides:
        raise ValueError(f"setting={spec!r}: kv needs bits=<16|8|4|2> or memory_budget=<bytes, e.g. 64MiB>; "
                         "got neither. Fix: 'kv:bits=4' or 'kv:memory_budget=64MiB'.")
    AdaptiveKVCache(model.config, **overrides)  # validate now, not mid-run

    def stats(kwargs: dict[str, Any]) -> dict[str, Any]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        s = cache.stats()
        return {k: s[k] for k in ("kv_bytes", "bf16_equivalent_bytes", "ratio", "switches", "bits")}

    return Setting(spec, "kv", overrides,
                   make_kwargs=lambda: generate_cache_kwargs(AdaptiveKVCache(model.config, **overrides)),
                   read_stats=stats)


_PRECISION_KEYS = ("high", "low", "combine", "fast", "top", "lag")
# the confidence score's terms (``ConfidenceWeights`` fields), e.g. ``precision:high=0.5,p_max=0,entropy=0,margin=1``
_SCORE_KEYS = ("p_max", "entropy", "margin", "variance", "entropy_scale_nats", "margin_scale", "variance_scale")


def _precision_tiers(model: Any, fast: str, top: str) -> Any:
    from hf_adaptive.precision.tiers import prepare_tiers

    key = (fast, top)
    cached = getattr(model, "_hf_adaptive_eval_tiers", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if cached is not None:
        raise ValueError(f"precision: model already prepared with tiers {cached[0]}; got {key}. "
                         "Fix: one fast/top pair per run.")
    tiers = prepare_tiers(model, tiers=(fast, top))
    model._hf_adaptive_eval_tiers = (key, tiers)
    return tiers


def _precision(model: Any, spec: str, params: dict[str, str]) -> Setting:
    from hf_adaptive.precision.confidence import ConfidenceWeights
    from hf_adaptive.precision.controller import PrecisionController, default_policy_config

    params = dict(params)
    default_top = "fp32" if str(model.dtype) == "torch.float32" else "native"
    fast, top = _take(params, "fast", str, "int4"), _take(params, "top", str, default_top)
    policy_kw = {k: _take(params, k, float, None) for k in ("high", "low")}
    policy_kw["combine"] = _take(params, "combine", str, None)
    lag = _take(params, "lag", int, None)
    score_kw = {k: _take(params, k, float, None) for k in _SCORE_KEYS}
    _reject_unknown(spec, params, _PRECISION_KEYS + _SCORE_KEYS)
    policy_kw = {k: v for k, v in policy_kw.items() if v is not None}
    score_kw = {k: v for k, v in score_kw.items() if v is not None}
    weights = ConfidenceWeights(**score_kw)
    tiers = _precision_tiers(model, fast, top)
    policy = default_policy_config(tiers, **policy_kw)
    PrecisionController(tiers, policy=policy, weights=weights, decision_lag=lag).close()  # bad values fail here

    def make() -> dict[str, Any]:
        return {"logits_processor": [PrecisionController(tiers, policy=policy, weights=weights, decision_lag=lag)]}

    def stats(kwargs: dict[str, Any]) -> dict[str, Any]:
        controller = kwargs["logits_processor"][0]
        controller.close()
        tiers.set(tiers.top)  # leave the model exact for whatever runs next
        return {"telemetry": _telemetry_summary(controller.telemetry)}

    recorded = {"fast": fast, "top": top, **policy_kw, **({"lag": lag} if lag is not None else {}), **score_kw}
    return Setting(spec, "precision", recorded, make_kwargs=make, read_stats=stats, in_place=True)


def _telemetry_summary(telemetry: Any) -> dict[str, Any]:
    """Steps, tier shares and switches from the controller's telemetry report."""
    report = telemetry.report()
    return {k: report[k] for k in ("steps", "tier_steps", "tier_fraction", "switches")}


register_setting("baseline", _baseline)
register_setting("kv", _kv)
register_setting("precision", _precision)
