"""Evaluation: real-text data (Bible verses via SWORD), BLEU/chrF drift and decode speed.

Submodules: ``bible`` (pure parsing of diatheke output), ``data`` (datasets loading), ``metrics``
(sacrebleu through a local ``evaluate`` module), ``settings`` (baseline / KV / precision registry),
``translate`` (the translation runner), ``timing`` (latency/throughput of one setting), ``bleu`` and
``speed`` (the two evaluations end to end), ``kv_quality`` (a cache against DynamicCache), ``report``
(JSON/Markdown/PNG writer).
Nothing is imported here, so ``import hf_adaptive.evaluation`` stays cheap.
"""
