"""Evaluation: real-text data (Bible verses via SWORD), BLEU/chrF drift and decode speed.

Submodules: ``bible`` (pure parsing of diatheke output), ``data`` (datasets loading), ``metrics``
(sacrebleu through ``evaluate``), ``settings`` (baseline / KV / precision registry), ``translate``
(the translation runner), ``speed`` (latency/throughput), ``report`` (JSON/Markdown/PNG writer).
Nothing is imported here, so ``import hf_adaptive.evaluation`` stays cheap.
"""
