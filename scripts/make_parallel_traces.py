"""Generate the parallelism scenario traces under eval/traces/ (deterministic, seeded).

    .venv/bin/python scripts/make_parallel_traces.py --out eval/traces

- chat_bursts: bursts of 48 short chats (prompt 30-200 tokens, 32-64 new) every 8 s;
- long_documents: one 1500-3500-token document every 1.5 s (128 new);
- offline_batch: 256 short prompts (50-200 tokens, 32 new) all at t=0;
- mixed: the phases one after another (chat, long documents, batch, chat), so the best plan changes;
- mixed_small: a shorter mixed trace for the real multi-GPU engine benchmark;
- memory_phases: a stream of short chats (20/s for 10 s), then a stream of 9-11k-token documents (2/s for
  13 s): sized for a ~7B model under a per-device memory budget, where data parallelism (all weights on every
  device) holds one document per replica and the model-splitting plans several, while the chats want DP;
- memory_phases_strict: 180 chats (20/s), then 10 documents of 11.5-12.5k tokens (2/s): under an 18 GiB budget
  a Qwen2.5-7B-shape document does not fit a DP replica at all (DP must refuse it), while TP=2 holds five;
- memory_phases_short: the same shape, 128 chats then 4 documents: every plan replays it
  within the device's 10-minute calls (on 4 H200s the strict trace's adaptive and TP=4 runs passed 3 minutes).
Prompts are sized with ``prompt_tokens`` (synthetic ids), so traces need no text and fit any tokenizer.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from hf_adaptive.parallel.requests import Request, write_trace


def chat_bursts(rng: random.Random, start_s: float, bursts: int, prefix: str) -> list[Request]:
    out = []
    for b in range(bursts):
        t0 = start_s + 8.0 * b
        for i in range(48):
            out.append(Request(f"{prefix}{b}-{i}", t0 + rng.uniform(0, 0.5), rng.randint(32, 64),
                               prompt_tokens=rng.randint(30, 200)))
    return out


def long_documents(rng: random.Random, start_s: float, count: int, prefix: str) -> list[Request]:
    return [Request(f"{prefix}{i}", start_s + 1.5 * i, 128, prompt_tokens=rng.randint(1500, 3500))
            for i in range(count)]


def offline_batch(rng: random.Random, start_s: float, count: int, prefix: str) -> list[Request]:
    return [Request(f"{prefix}{i}", start_s, 32, prompt_tokens=rng.randint(50, 200)) for i in range(count)]


def memory_phases(rng: random.Random) -> list[Request]:
    chats = [Request(f"mp-chat-{i}", i / 20.0, rng.randint(48, 80), prompt_tokens=rng.randint(100, 300))
             for i in range(200)]
    docs = [Request(f"mp-doc-{i}", 10.0 + i / 2.0, 128, prompt_tokens=rng.randint(9000, 11000)) for i in range(26)]
    return chats + docs


def memory_phases_strict(rng: random.Random, n_chats: int = 180, n_docs: int = 10,
                         prefix: str = "ms") -> list[Request]:
    chats = [Request(f"{prefix}-chat-{i}", i / 20.0, rng.randint(48, 80), prompt_tokens=rng.randint(100, 300))
             for i in range(n_chats)]
    docs = [Request(f"{prefix}-doc-{i}", n_chats / 20.0 + i / 2.0, 128, prompt_tokens=rng.randint(11500, 12500))
            for i in range(n_docs)]
    return chats + docs


def build_all(seed: int = 0) -> dict[str, list[Request]]:
    rng = random.Random(seed)
    mixed = (chat_bursts(rng, 0.0, 3, "m-chat-a") + long_documents(rng, 25.0, 16, "m-doc")
             + offline_batch(rng, 50.0, 192, "m-batch") + chat_bursts(rng, 75.0, 2, "m-chat-b"))
    return {"chat_bursts": chat_bursts(rng, 0.0, 5, "chat"),
            "long_documents": long_documents(rng, 0.0, 24, "doc"),
            "offline_batch": offline_batch(rng, 0.0, 256, "batch"),
            "mixed": mixed,
            # small enough for every plan of the real engine to replay within minutes (eval/parallel_serve_bench.py)
            "mixed_small": (chat_bursts(rng, 0.0, 1, "s-chat-a") + long_documents(rng, 6.0, 6, "s-doc")
                            + offline_batch(rng, 16.0, 96, "s-batch") + chat_bursts(rng, 24.0, 1, "s-chat-b")),
            "memory_phases": memory_phases(random.Random(seed + 1)),
            "memory_phases_strict": memory_phases_strict(random.Random(seed + 2)),
            "memory_phases_short": memory_phases_strict(random.Random(seed + 3), 128, 4, "msh")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval/traces")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, requests in build_all(args.seed).items():
        write_trace(out / f"{name}.jsonl", sorted(requests, key=lambda r: r.arrival_s))
        print(f"{name}: {len(requests)} requests")


if __name__ == "__main__":
    main()
