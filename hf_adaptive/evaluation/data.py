"""Evaluation data: the aligned Bible verses (JSONL shipped in ``corpus/``) through ``datasets``, and the
perplexity text. Any other file of the same layout can be passed as ``path``.

Contract: ``load_parallel(path, limit)`` returns a ``datasets.Dataset`` with ``id``, the source field and
the reference fields, first ``limit`` rows (dev-set order, so ``--limit`` is reproducible). Never
contacts a hub.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"  # package data: found the same way when installed
DEFAULT_DEV_SET = CORPUS_DIR / "dev_matthew_mark.jsonl"
DEFAULT_PPL_TEXT = CORPUS_DIR / "english_ppl.txt"
DEFAULT_REFERENCE_FIELDS = ("en_web", "en_kjv")


def load_parallel(path: str | Path = DEFAULT_DEV_SET, limit: int | None = None,
                  source_field: str = "es",
                  reference_fields: Sequence[str] = DEFAULT_REFERENCE_FIELDS) -> Any:
    """The verses of a JSONL file as a ``datasets.Dataset`` (first ``limit`` rows if given).

    Raises:
        FileNotFoundError: the file is missing (says how to build it).
        ValueError: a bad ``limit`` or missing fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data={str(path)!r} does not exist. Fix: build it with "
                                "`python scripts/build_bible_data.py --out <path>` (see eval/data/README.md).")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive int or None; got {limit}. Fix: e.g. --limit 100.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset

    dataset = Dataset.from_json(str(path))
    missing = [f for f in ("id", source_field, *reference_fields) if f not in dataset.column_names]
    if missing:
        raise ValueError(f"data={str(path)!r} lacks field(s) {missing}; it has {dataset.column_names}. "
                         "Fix: pass --source-field / --references matching the file.")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def references_of(dataset: Any, reference_fields: Sequence[str] = DEFAULT_REFERENCE_FIELDS) -> list[list[str]]:
    """Per example, its references in ``reference_fields`` order."""
    columns = [dataset[f] for f in reference_fields]
    return [list(refs) for refs in zip(*columns)]
