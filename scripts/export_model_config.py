#!/usr/bin/env python
"""Write a model's config.json + tokenizer files (never its weights) into a directory.

For speed runs on machines the weights cannot travel to (e.g. 64 MiB per transfer to the GPU host):
``hf-adaptive eval speed --model OUT_DIR --random-weights`` builds the real architecture from it with
random weights. SPEC is an embedded model name (e.g. qwen2.5-coder-1.5b-instruct) or a local checkpoint
directory / .gguf file.

    python scripts/export_model_config.py qwen2.5-coder-1.5b-instruct .gpu/qwen_cfg
"""

from __future__ import annotations

import argparse
import os
import sys

from hf_adaptive.evaluation.random_model import export_model_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="embedded model name, checkpoint directory or .gguf file")
    parser.add_argument("out_dir", help="directory to write (created)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    written = export_model_config(args.spec, args.out_dir)
    total = sum(p.stat().st_size for p in written)
    for path in written:
        print(f"{path.stat().st_size:>12,d}  {path}")
    print(f"{total:,d} bytes in {len(written)} files (no weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
