#!/usr/bin/env python
"""Write a model's config.json + tokenizer files (never its weights) into a directory.

For speed runs on machines the weights cannot travel to (e.g. 64 MiB per transfer to the GPU host):
``hf-adaptive eval speed --model OUT_DIR --random-weights`` builds the real architecture from it with
random weights. SPEC is an embedded model name (e.g. qwen2.5-coder-1.5b-instruct) or a local checkpoint
directory / .gguf file.

    python scripts/export_model_config.py qwen2.5-coder-1.5b-instruct .gpu/qwen_cfg

``--set KEY=VALUE`` (JSON values) overrides config fields, for a sibling shape that shares the tokenizer, e.g.
Qwen2.5-7B's published dimensions on the Qwen2.5 tokenizer:

    python scripts/export_model_config.py qwen2.5-coder-1.5b-instruct .gpu/qwen7b_cfg --set hidden_size=3584 \
        intermediate_size=18944 num_hidden_layers=28 num_attention_heads=28 num_key_value_heads=4 \
        max_window_layers=28 tie_word_embeddings=false
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hf_adaptive.evaluation.random_model import export_model_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="embedded model name, checkpoint directory or .gguf file")
    parser.add_argument("out_dir", help="directory to write (created)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config.json fields (values parsed as JSON, else kept as strings)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    written = export_model_config(args.spec, args.out_dir, overrides)
    total = sum(p.stat().st_size for p in written)
    for path in written:
        print(f"{path.stat().st_size:>12,d}  {path}")
    print(f"{total:,d} bytes in {len(written)} files (no weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
