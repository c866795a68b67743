"""Evaluation: real-text data (Bible verses via SWORD), BLEU/chrF drift and decode speed.

Submodules: ``bible`` (pure parsing of diatheke output), ``data`` (datasets loading), ``metrics``
(sacrebleu through a local ``evaluate`` module), ``settings`` (baseline / KV / precision registry),
``translate`` (the translation runner), ``speed`` (latency/throughput of one workload), ``bleu`` and
``speed_eval`` (the two evaluations end to end), ``report`` (JSON/Markdown/PNG writer).
Nothing is imported here, so ``import hf_adaptive.evaluation`` stays cheap.
"""
