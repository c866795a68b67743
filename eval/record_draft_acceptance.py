"""Record the lossless draft cascade's acceptance per drafter and per round on the dev set's verses (CPU).

Tasks (``--task``): ``translate`` (the Spanish verse into English, the BLEU eval's prompt) and ``modernize`` (the
King James verse rewritten in modern English, keeping the words that can stay: an input-grounded task, where much of
the output copies the prompt, the case prompt lookup is built for).

Per verse (the BLEU eval's prompt and ``max_new_tokens`` rule, batch 1, greedy): plain ``model.generate`` at the top
tier (fp32 on CPU), then ``model.generate(custom_generate=cascade_decoding, ...)`` with each drafter alone and with
both (prompt lookup over the prompt and the output so far; the int4 self-draft of ``prepare_tiers``, group 64 on
SmolLM2's hidden 576, 128 on Qwen2.5-Coder-1.5B's 1536), the drafter and length chosen per round by the draft policy
(expected tokens per unit of cost, a self-draft token costing ``--self-draft-cost`` of a native forward, capped by
the confidence bands 0.9 / 0.6, each drafter's acceptance learned over the run: one generator per run, its records
carried from verse to verse at the policy's share). It records whether each run is token-identical to greedy (the
lossless claim, checked on real text), proposals, accepted tokens, acceptance rate and tokens per verify forward per
drafter, and every round's (drafter, proposed, accepted, emitted, confidence), and ``modelled_speedup``: emitted
tokens per native-forward cost, (verify forwards + cost x self-drafted tokens), at the stated cost. No speed
figures: CPU timings on a shared host are noise; the JSON keeps the host draft/verify milliseconds only as a record
of the run.

    HF_HUB_OFFLINE=1 .venv/bin/python eval/record_draft_acceptance.py --limit 8 --stride 40 \
        --out eval/results/quality_draft_acceptance_smollm2_cpu
    HF_HUB_OFFLINE=1 .venv/bin/python eval/record_draft_acceptance.py --model qwen2.5-coder-1.5b-instruct \
        --limit 24 --stride 40 --out eval/results/quality_draft_acceptance_qwen1.5b_cpu
    HF_HUB_OFFLINE=1 .venv/bin/python eval/record_draft_acceptance.py --model qwen2.5-coder-1.5b-instruct \
        --task modernize --limit 16 --stride 40 --threads 2 --out eval/results/quality_draft_acceptance_modernize_qwen1.5b_cpu
    HF_HUB_OFFLINE=1 .venv/bin/python eval/record_draft_acceptance.py --model qwen2.5-coder-1.5b-instruct \
        --limit 24 --stride 40 --runs self --self-stop 0.7 --max-self-draft 8 \
        --out eval/results/quality_draft_acceptance_selfstop_qwen1.5b_cpu   # drafts that end at their own first doubt

The report (JSON + Markdown) is rewritten after every verse, so a stopped run keeps the verses it finished
(``verses_done`` against ``verses_planned``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import environment  # first: sets the offline default
from _generate_timing import choice_list
import torch

from hf_adaptive.evaluation.data import DEFAULT_DEV_SET
from hf_adaptive.evaluation.report import markdown_table, write_report
from hf_adaptive.evaluation.translate import TranslationConfig, build_prompt, greedy_generation_kwargs
from hf_adaptive.models import load_model
from hf_adaptive.policy.draft_policy import DraftPolicyConfig
from hf_adaptive.precision.cascade import cascade_decoding
from hf_adaptive.precision.drafting import CascadeCandidateGenerator
from hf_adaptive.precision.tiers import prepare_tiers
from hf_adaptive.validation import arg_number

RUNS = {"lookup": ("lookup",), "self": ("self",), "cascade": ("lookup", "self")}
# task -> (the verse field the prompt holds, the prompt; TranslationConfig names its one field {es} whatever the text)
TASKS = {
    "translate": ("es", TranslationConfig().prompt),
    "modernize": ("en_kjv", "Rewrite this verse of the King James Bible in modern English. Keep every word that can "
                            "stay as it is. Reply with the verse only.\n\n{es}"),
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval/results/quality_draft_acceptance_smollm2_cpu", help="output folder")
    ap.add_argument("--data", default=str(DEFAULT_DEV_SET))
    ap.add_argument("--limit", type=arg_number(minimum=1, integer=True), default=8, help="verses recorded")
    ap.add_argument("--stride", type=arg_number(minimum=1, integer=True), default=1,
                    help="take every N-th verse of the dev set (a mix of passages, not only the first ones)")
    ap.add_argument("--max-lookup-tokens", type=arg_number(minimum=1, integer=True), default=8)
    ap.add_argument("--max-self-draft", type=arg_number(minimum=1, integer=True), default=4)
    ap.add_argument("--self-draft-cost", type=arg_number(minimum=0.0), default=0.65,
                    help="one int4 draft forward as a fraction of a native one (default: the 8B shape's; see the "
                         "results index)")
    ap.add_argument("--self-stop", type=arg_number(minimum=0.0, maximum=1.0, min_open=True, max_open=True),
                    default=None, help="end each self-draft after its first token whose own int4 p_max is below this "
                                       "(DraftPolicyConfig.self_stop; the length is then capped by --max-self-draft "
                                       "alone); default: lengths from the confidence bands")
    ap.add_argument("--runs", default=",".join(RUNS),
                    help=f"comma-separated subset of {','.join(RUNS)} (each run is one generate per verse)")
    ap.add_argument("--model", default=None, help="embedded model name or checkpoint dir (default SmolLM2)")
    ap.add_argument("--threads", type=arg_number(minimum=1, integer=True), default=1, help="torch CPU threads")
    ap.add_argument("--task", choices=sorted(TASKS), default="translate",
                    help="translate: Spanish -> English; modernize: King James English -> modern English (the "
                         "output copies much of the input)")
    return ap


def _verse_record(tiers, tok, source: str, verse_id: str, cfg: TranslationConfig, generators: dict) -> dict:
    """Greedy and every cascade run of one verse: identity with greedy, telemetry and rounds per run. Each run keeps
    one generator over the verses, as a user would, so its drafters' records carry from verse to verse."""
    model = tiers.model
    ids = tok(build_prompt(tok, source, cfg), return_tensors="pt", add_special_tokens=False).input_ids
    src = len(tok(source, add_special_tokens=False).input_ids)
    gen_kwargs = greedy_generation_kwargs(tok, max(cfg.min_new_tokens_cap, round(cfg.new_tokens_factor * src)))
    ref = model.generate(ids, **gen_kwargs)
    record = {"id": verse_id, "prompt_tokens": ids.shape[1], "new_tokens": ref.shape[1] - ids.shape[1], "runs": {}}
    for name, gen in generators.items():
        gen.telemetry.reset()
        out = model.generate(ids, custom_generate=cascade_decoding, candidate_generator=gen, **gen_kwargs)
        record["runs"][name] = {"token_identical": bool(torch.equal(out, ref)), **gen.telemetry.report()}
    return record


def _totals(records: list[dict], cost: float) -> list[dict]:
    """One row per (run, drafter): totals over the verses, and how many verses were token-identical."""
    rows = []
    for run in records[0]["runs"] if records else ():
        identical = sum(r["runs"][run]["token_identical"] for r in records)
        verifies = sum(r["runs"][run]["verify_forwards"] for r in records)
        emitted = sum(r["runs"][run]["emitted_tokens"] for r in records)
        drafters = sorted({d for r in records for d in r["runs"][run]["drafters"]})
        self_drafted = sum(r["runs"][run]["drafters"].get("self", {}).get("proposed", 0) for r in records)
        cost_units = verifies + cost * self_drafted
        for drafter in drafters:
            stats = [r["runs"][run]["drafters"].get(drafter) for r in records]
            proposed = sum(s["proposed"] for s in stats if s)
            accepted = sum(s["accepted"] for s in stats if s)
            rows.append({"run": run, "drafter": drafter, "rounds": sum(s["rounds"] for s in stats if s),
                         "proposed": proposed, "accepted": accepted,
                         "acceptance_rate": accepted / proposed if proposed else None,
                         "run_tokens_per_verify": emitted / verifies if verifies else None,
                         "modelled_speedup": emitted / cost_units if cost_units else None,
                         "verses_token_identical": f"{identical}/{len(records)}"})
    return rows


def _shown(path: str) -> str:
    """A data path as results record it: relative to the repository when inside it (no machine's paths)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def _write(args, records: list[dict], planned: int) -> None:
    rows = _totals(records, args.self_draft_cost)
    payload = {"model": args.model or "smollm2-135m-instruct", "tiers": ["int4", "fp32"], "data": _shown(args.data),
               "task": args.task, "prompt": TASKS[args.task][1],
               "stride": args.stride, "max_lookup_tokens": args.max_lookup_tokens,
               "max_self_draft": args.max_self_draft, "self_draft_cost": args.self_draft_cost,
               "self_stop": args.self_stop, "verses_planned": planned, "verses_done": len(records),
               "totals": rows, "verses": records}
    notes = ("\nCounts only: CPU timings on a shared host are noise. `run_tokens_per_verify` = tokens emitted per "
             "top-tier forward over the whole run (1.0 = no gain from drafting); `modelled_speedup` = emitted tokens "
             f"per native-forward cost, a self-drafted token costing {args.self_draft_cost} of a native forward. "
             + (f"Each self-draft ends after its first token whose own int4 p_max is below {args.self_stop} (at most "
                f"{args.max_self_draft} tokens). " if args.self_stop is not None else "")
             + "Per-round records are in the JSON.\n")
    write_report(args.out, "draft_acceptance", payload, environment("cpu"),
                 markdown_table(rows), f"Draft cascade acceptance, dev set, task {args.task}", notes)


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    args.runs = choice_list(ap, args.runs, tuple(RUNS), "--runs")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    generators = {name: CascadeCandidateGenerator(tiers, DraftPolicyConfig(
        drafters=d, max_lookup_tokens=args.max_lookup_tokens, max_self_draft=args.max_self_draft,
        self_draft_cost=args.self_draft_cost, self_stop=args.self_stop)) for name, d in RUNS.items() if name in args.runs}
    field, prompt = TASKS[args.task]
    cfg = TranslationConfig(prompt=prompt)
    lines = Path(args.data).read_text(encoding="utf-8").splitlines()
    verses = [json.loads(line) for line in lines[::args.stride][:args.limit]]
    records: list[dict] = []
    with torch.no_grad():
        for i, verse in enumerate(verses):
            records.append(_verse_record(tiers, tok, verse[field], verse["id"], cfg, generators))
            _write(args, records, len(verses))  # after every verse: a stopped run keeps what it finished
            print(f"verse {i + 1}/{len(verses)} {verse['id']}: "
                  + ", ".join(f"{k} identical={v['token_identical']} tokens/verify={v['tokens_per_verify']:.2f}"
                              for k, v in records[-1]["runs"].items()), flush=True)
    print(f"wrote {args.out}/draft_acceptance.json and .md")


if __name__ == "__main__":
    main()
