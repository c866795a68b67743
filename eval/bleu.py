#!/usr/bin/env python
"""BLEU drift on the Bible dev set: same as `hf-adaptive eval bleu ...` (see --help)."""

import sys

from hf_adaptive.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "bleu", *sys.argv[1:]]))
