"""Record the tier schedule and verified-mode acceptance of the real SmolLM2 on CPU, for GPU replay.

The GPU benchmark (eval/bench_precision.py) runs random-init weights of a real shape when no checkpoint
is at hand; their confidences mean nothing, so it replays what this script records from the real model:
per decode step the policy band (fast / mid / top) the controller chose, and per verified-mode round the
draft length and the number of accepted drafts. CPU tiers: int4 (g=64) draft / fp32 top.

Caveat: the embedded SmolLM2 is converted from a Q4_1 GGUF (4-bit, blocks of 32), so its weights already
sit on a 4-bit grid: int4 at g=32 re-quantizes them exactly (100 % draft acceptance, measured), while
g=64 (recorded here) quantizes that grid once more, so acceptance is lower than an RTN int4 of a
bf16-trained model would typically give. The recorded numbers are a pessimistic real-model sample.

    HF_HUB_OFFLINE=1 .venv/bin/python eval/record_chat_schedule.py \
        --out eval/data/precision_schedule_smollm2.json --new-tokens 64
"""

from __future__ import annotations

import argparse

from _common import policy_bands, record_verified, schedule_policies, write_schedule  # first: offline default
import torch
from tqdm import tqdm

from hf_adaptive.models import load_model
from hf_adaptive.policy.precision_policy import PrecisionPolicyConfig
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.decode import decode
from hf_adaptive.precision.graph_decode import GraphDecodeConfig, GraphDecodeEngine
from hf_adaptive.precision.options import DecodeOptions
from hf_adaptive.precision.tiers import prepare_tiers

PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three tips for staying productive when working from home.",
    "Translate to French: The weather is nice today and we are going to the park.",
)


def _ids(tok, text: str) -> torch.Tensor:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def _record_lossy(tiers, ids: torch.Tensor, n: int, policy: PrecisionPolicyConfig) -> dict:
    ctl = PrecisionController(tiers, policy)
    engine = GraphDecodeEngine(tiers, GraphDecodeConfig(max_len=ids.shape[1] + n + 8))
    decode(engine, ids, DecodeOptions(max_new_tokens=n, controller=ctl))
    ctl.close()
    t = ctl.telemetry
    return {"bands": policy_bands(t.scores, policy), "scores": [round(s, 4) for s in t.scores], "tiers": t.tiers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval/data/precision_schedule_smollm2.json")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-draft", type=int, default=4)
    args = ap.parse_args()
    model, tok = load_model(None, device="cpu", dtype="float32")
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    policy, always = schedule_policies()
    records = []
    for text in tqdm(PROMPTS, desc="prompts"):
        ids = _ids(tok, text)
        records.append({"prompt": text, "lossy": _record_lossy(tiers, ids, args.new_tokens, policy),
                        "verified": record_verified(tiers, ids, args.new_tokens, policy, args.max_draft),
                        "verified_always": record_verified(tiers, ids, args.new_tokens, always, args.max_draft)})
    write_schedule(args.out, "smollm2-135m-instruct", records, policy, args.max_draft, new_tokens=args.new_tokens)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
