"""Record a precision schedule from a model (default SmolLM2) translating the Spanish dev set on CPU, for GPU replay.

Per verse (the BLEU eval's prompt and ``max_new_tokens`` rule, greedy, batch 1): the lossy run's
per-step confidences and tiers (``generate`` + ``PrecisionController``, int4 g=64 / fp32 tiers, default
thresholds 0.9 / 0.6), and the verified rounds (drafted k, accepted) of the adaptive and always-draft
variants over the lossy run's length. Same JSON layout as the chat-prompt recording
(eval/data/precision_schedule_smollm2.json), so ``eval/bench_precision.py --schedule FILE`` replays it.
The confidences come from the lossy run itself (steps in int4 score int4 logits), so thresholds other
than 0.9 replayed from this file are an approximation. Same caveat on SmolLM2's Q4_1-derived weights as
the chat recording (int4 re-quantization of a 4-bit grid: acceptance is a pessimistic sample).

    HF_HUB_OFFLINE=1 .venv/bin/python eval/record_translate_schedule.py --limit 16 \
        --out eval/data/precision_schedule_smollm2_translate.json
    HF_HUB_OFFLINE=1 .venv/bin/python eval/record_translate_schedule.py --model qwen2.5-coder-1.5b-instruct \
        --limit 8 --threads 2 --out eval/data/precision_schedule_qwen2.5-coder-1.5b_translate.json
    # every 40th verse of Matthew + Mark: narrative, dialogue and lists, not only the genealogy of Matthew 1
    HF_HUB_OFFLINE=1 .venv/bin/python eval/record_translate_schedule.py --model qwen2.5-coder-1.5b-instruct \
        --limit 12 --stride 40 --threads 2 --out eval/data/precision_schedule_qwen2.5-coder-1.5b_translate_stride40.json

The file is rewritten after every verse, so a stopped run keeps the verses it finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import policy_bands, record_verified, schedule_policies, write_schedule  # first: offline default
import torch
from tqdm import tqdm

from hf_adaptive.evaluation.data import DEFAULT_DEV_SET
from hf_adaptive.evaluation.translate import TranslationConfig, build_prompt
from hf_adaptive.models import load_model
from hf_adaptive.precision.controller import PrecisionController
from hf_adaptive.precision.tiers import prepare_tiers

POLICY, ALWAYS = schedule_policies()


def _lossy(tiers, ids: torch.Tensor, max_new: int, eos: int) -> dict:
    ctl = PrecisionController(tiers, POLICY)
    out = tiers.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                               do_sample=False, logits_processor=[ctl], pad_token_id=eos)
    ctl.close()
    tiers.set(tiers.top)
    t = ctl.telemetry
    return {"scores": [round(s, 4) for s in t.scores], "tiers": t.tiers, "bands": policy_bands(t.scores, POLICY),
            "new_tokens": out.shape[1] - ids.shape[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval/data/precision_schedule_smollm2_translate.json")
    ap.add_argument("--data", default=str(DEFAULT_DEV_SET))
    ap.add_argument("--limit", type=int, default=16, help="verses recorded")
    ap.add_argument("--stride", type=int, default=1,
                    help="take every N-th verse of the dev set (a mix of passages, not only the first ones)")
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--model", default=None, help="embedded model name or checkpoint dir (default SmolLM2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    cfg = TranslationConfig()
    if args.stride < 1:
        raise SystemExit(f"--stride must be >= 1, got {args.stride}")
    lines = Path(args.data).read_text().splitlines()
    verses = [json.loads(line) for line in lines[::args.stride][:args.limit]]
    records: list[dict] = []
    with torch.no_grad():
        for verse in tqdm(verses, desc="verses"):
            ids = tok(build_prompt(tok, verse["es"], cfg), return_tensors="pt", add_special_tokens=False).input_ids
            src = len(tok(verse["es"], add_special_tokens=False).input_ids)
            max_new = max(cfg.min_new_tokens_cap, int(round(cfg.new_tokens_factor * src)))
            lossy = _lossy(tiers, ids, max_new, tok.eos_token_id)
            n = max(2, lossy["new_tokens"])
            records.append({"prompt": verse["id"], "lossy": lossy,
                            "verified": record_verified(tiers, ids, n, POLICY, args.max_draft),
                            "verified_always": record_verified(tiers, ids, n, ALWAYS, args.max_draft)})
            write_schedule(args.out, args.model or "smollm2-135m-instruct", records, POLICY,  # after every verse
                           args.max_draft, task=f"es->en translation, {args.data}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
