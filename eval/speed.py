#!/usr/bin/env python
"""Decode speed per setting: same as `hf-adaptive eval speed ...` (see --help)."""

import sys

from hf_adaptive.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "speed", *sys.argv[1:]]))
