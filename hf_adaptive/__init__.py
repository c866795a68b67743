"""hf_adaptive: workload-adaptive inference for Hugging Face Transformers.

Public API (imported lazily, so ``import hf_adaptive`` has no side effects and stays cheap):

- ``AdaptiveKVCache``: a ``transformers.Cache`` that stores KV at 16 bits and steps down to 8/4 bits
  under memory pressure.
- ``PrecisionController``: a ``LogitsProcessor`` that picks each step's compute precision from the
  model's confidence.
- ``load_model`` / ``resolve_model_dir``: offline model resolution (embedded PyPI-shipped models).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_model": "hf_adaptive.models",
    "resolve_model_dir": "hf_adaptive.models",
    "AdaptiveKVCache": "hf_adaptive.kv.cache",
    "AdaptiveStaticKVCache": "hf_adaptive.kv.static",
    "CacheFullError": "hf_adaptive.kv.static",
    "KVCacheConfig": "hf_adaptive.kv.config",
    "KVPolicyConfig": "hf_adaptive.policy.kv_policy",
    "BudgetPressure": "hf_adaptive.kv.pressure",
    "GPUMemoryPressure": "hf_adaptive.kv.pressure",
    "ScriptedPressure": "hf_adaptive.kv.pressure",
    "KVBudgetExceededError": "hf_adaptive.kv.pressure",
    "parse_bytes": "hf_adaptive.units",
    "enable_overlapped_decoding": "hf_adaptive.overlap",
    "PrecisionController": "hf_adaptive.precision.controller",
    "prepare_tiers": "hf_adaptive.precision.tiers",
    "GraphDecodeEngine": "hf_adaptive.precision.graph_decode",
    "GraphDecodeConfig": "hf_adaptive.precision.graph_decode",
    "FusedStepDecoder": "hf_adaptive.precision.fused_decode",
    "DecodeOptions": "hf_adaptive.precision.options",
    "DraftOptions": "hf_adaptive.precision.options",
    "FusedOptions": "hf_adaptive.precision.options",
    "CascadeCandidateGenerator": "hf_adaptive.precision.drafting",
    "cascade_decoding": "hf_adaptive.precision.cascade",
    "install_decode_graphs": "hf_adaptive.precision.decode_graphs",
    "DecodeGraphs": "hf_adaptive.precision.decode_graphs",
    "DraftPolicyConfig": "hf_adaptive.policy.draft_policy",
    "register_attention": "hf_adaptive.attention.interface",
    "enable_fused_attention": "hf_adaptive.attention.enable",
    "triton_decode_attention": "hf_adaptive.attention.triton_decode",
    "reference_decode_attention": "hf_adaptive.attention.reference",
    "ParallelPolicy": "hf_adaptive.policy.parallel_policy",
    "ParallelPolicyConfig": "hf_adaptive.policy.parallel_policy",
    "WorkloadSignals": "hf_adaptive.policy.parallel_policy",
    "ParallelPlan": "hf_adaptive.parallel.plans",
    "LaunchConfig": "hf_adaptive.parallel.launch",
    "build_launch": "hf_adaptive.parallel.launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_adaptive' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
