"""What the generating subcommands (``generate``, ``precision``) share: their common arguments, loading the model
offline, the chat prompt, the sampling switch and a wall clock that waits for the GPU.

Contract: argparse namespaces and plain values in; no printing. Imports torch lazily, so ``hf-adaptive --help``
stays fast.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hf_adaptive.devices import device_argument
from hf_adaptive.validation import arg_number

SAMPLING_TEMPERATURE = 0.7  # --sample: mild sampling; greedy otherwise
MODEL_HELP = ("embedded model name (default smollm2-135m-instruct), checkpoint directory, .gguf file, or a Hugging "
              "Face Hub id (org/name: fetched when the network allows, else read from the local Hugging Face cache)")


def add_generation_arguments(parser: argparse.ArgumentParser, default_prompt: str, max_new_tokens: int,
                             sample_help: str, json_help: str) -> None:
    """The arguments every generating subcommand takes: the prompt, ``--model``, ``--max-new-tokens``,
    ``--sample``, ``--device`` and ``--json`` (read back by ``load_for_command`` and the commands)."""
    parser.add_argument("prompt", nargs="?", default=default_prompt, help="the user message")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--max-new-tokens", type=arg_number(minimum=1, integer=True), default=max_new_tokens)
    parser.add_argument("--sample", action="store_true", help=sample_help)
    parser.add_argument("--device", default=None, type=device_argument,
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", dest="json_path", default=None, help=json_help)


def load_for_command(args: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of ``args.model`` on ``args.device``, offline unless it names a Hugging Face Hub id;
    refuses a ``--max-new-tokens`` below 1 before loading anything."""
    from hf_adaptive.models import offline_unless_hub

    offline_unless_hub(args.model)
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}. Fix: e.g. --max-new-tokens 64.")
    from hf_adaptive.models import load_model

    return load_model(args.model, device=args.device)


def chat_inputs(tokenizer: Any, prompt: str) -> Any:
    """The prompt as one user turn of the tokenizer's chat template (plain text if it has none): a
    ``BatchEncoding`` with ``input_ids`` (1, T) and ``attention_mask``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    return tokenizer(prompt, return_tensors="pt")


def sampling_kwargs(sample: bool) -> dict[str, Any]:
    """``generate`` keywords: sampling at ``SAMPLING_TEMPERATURE`` or greedy."""
    return {"do_sample": True, "temperature": SAMPLING_TEMPERATURE} if sample else {"do_sample": False}


@contextmanager
def wall_clock(device: Any) -> Iterator[dict[str, float]]:
    """Times the block into ``clock["seconds"]``, waiting for the GPU at the end so the time covers its work."""
    clock = {"seconds": 0.0}
    start = time.perf_counter()
    yield clock
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()
    clock["seconds"] = time.perf_counter() - start
