#!/usr/bin/env python
"""Build the BLEU dev set and the perplexity text from the Debian SWORD Bible packages.

Needs ``apt-get install -y diatheke sword-text-sparv sword-text-web sword-text-kjv``. Source:
Spanish Reina-Valera 1909 (spaRV1909eb); references: World English Bible (engWEB2015eb) and King James
Version (engKJV2006eb); all public domain. Parsing and cleaning live in hf_adaptive.evaluation.bible.

    python scripts/build_bible_data.py                       # dev set (Matt, Mark) + english_ppl.txt
    python scripts/build_bible_data.py --books Luke,John --out eval/data/luke_john.jsonl --no-ppl
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from hf_adaptive.evaluation.bible import (
    OSIS_BOOKS,
    align_verses,
    parse_books_arg,
    parse_diatheke,
    verses_to_paragraphs,
)

SOURCE_MODULE = "spaRV1909eb"
REFERENCE_MODULES = {"en_web": "engWEB2015eb", "en_kjv": "engKJV2006eb"}
DATA_DIR = Path(__file__).resolve().parents[1] / "hf_adaptive" / "evaluation" / "corpus"


def run_diatheke(module: str, key: str) -> str:
    """Raw default-format output of ``diatheke -b module -k key``."""
    if shutil.which("diatheke") is None:
        sys.exit("diatheke not found; install it: apt-get install -y diatheke sword-text-sparv "
                 "sword-text-web sword-text-kjv")
    proc = subprocess.run(["diatheke", "-b", module, "-k", key], capture_output=True, text=True, check=True)
    if not proc.stdout.strip():
        sys.exit(f"diatheke -b {module} -k {key!r} printed nothing; is the module installed? "
                 "(diatheke -b system -k modulelist)")
    return proc.stdout


def read_book(module: str, osis: str) -> dict[str, str]:
    """Verse id -> clean text for one whole book of one module."""
    return parse_diatheke(run_diatheke(module, OSIS_BOOKS[osis]))


def build_parallel(books: list[str]) -> list[dict[str, str]]:
    """Aligned records for the given OSIS books, in canonical order."""
    records: list[dict[str, str]] = []
    for osis in books:
        source = read_book(SOURCE_MODULE, osis)
        refs = {field: read_book(module, osis) for field, module in REFERENCE_MODULES.items()}
        aligned = align_verses(source, refs)
        print(f"{osis}: {len(source)} source verses, {len(aligned)} aligned", file=sys.stderr)
        records.extend(aligned)
    return records


def write_jsonl(records: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", default="Matt,Mark", help="comma-separated OSIS ids or English names")
    parser.add_argument("--out", type=Path, default=DATA_DIR / "dev_matthew_mark.jsonl")
    parser.add_argument("--ppl-key", default="Genesis 1-10",
                        help="diatheke key for the English perplexity text (WEB); not in the dev set")
    parser.add_argument("--ppl-out", type=Path, default=DATA_DIR / "english_ppl.txt")
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexity text")
    args = parser.parse_args(argv)
    write_jsonl(build_parallel(parse_books_arg(args.books)), args.out)
    if not args.no_ppl:
        text = verses_to_paragraphs(parse_diatheke(run_diatheke(REFERENCE_MODULES["en_web"], args.ppl_key)))
        args.ppl_out.write_text(text, encoding="utf-8")
        print(f"wrote {len(text)} characters to {args.ppl_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
