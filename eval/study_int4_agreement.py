"""Which decode steps can run int4 without changing the token: agreement of the int4 tier with greedy native
decoding, and how well each confidence signal predicts it (CPU, real model, real text).

For each verse of the Spanish→English dev set (the BLEU eval's prompt and ``max_new_tokens`` rule):

1. greedy decoding at the top tier (fp32 on CPU) keeps every step's logits;
2. one teacher-forced forward of the int4 tier over the same tokens gives the int4 logits of every step (dense
   matmuls over the int4 weights' dequantized values, :class:`DenseTier`; checked against the kernel's own step);
3. step t *agrees* when int4's argmax equals the native token.

A lossy controller picks the tier of step t from the logits of step t - 1 (``PrecisionController`` scores the
step it just saw), or of step t - 2 under overlapped decoding (scores read one step late). So each signal is read
on the native logits of the step one or two before (``name@1``, ``name@2``), and a policy "int4 where the signal is
at least x" is judged by two numbers: the share of steps it runs int4 and how many of those steps change the token
(disagreements per int4 step). A disagreement is where a lossy run's text starts to differ;
it is a proxy for BLEU drift, not BLEU itself (a changed token may be a synonym, and later steps follow a
different prefix). The int4 step's own p_max (``int4_p_max``) is read on the step it judges, which no controller
sees before the step: it bounds what a check after the step could do.

    HF_HUB_OFFLINE=1 .venv/bin/python eval/study_int4_agreement.py --model qwen2.5-coder-1.5b-instruct \
        --limit 96 --threads 2 --out eval/results/precision_int4_agreement_qwen1.5b_cpu
    HF_HUB_OFFLINE=1 .venv/bin/python eval/study_int4_agreement.py --limit 24 --stride 40 \
        --out eval/results/precision_int4_agreement_stride40_qwen1.5b_cpu   # the verses the cascade recordings take

Writes ``agreement.json`` (per verse and step: the signals and the agreement), ``agreement.md`` and
``agreement.png`` (disagreements per int4 step against the int4 share, one line per signal). The JSON is
rewritten after every verse, so a stopped run keeps what it finished; ``--render DIR`` only re-renders.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from _common import environment, pyplot, save_figure  # first: offline default
import torch

from hf_adaptive.compat import forward_cache_kwargs
from hf_adaptive.precision.confidence import ConfidenceWeights, confidence_metrics, score_from_metrics
from hf_adaptive.precision.weight_format import DenseWeight

SIGNALS = ("score", "p_max", "prob_margin", "margin", "neg_entropy", "min2_p_max")  # native logits, lagged
ORACLE = "int4_p_max"  # the judged step's own int4 logits: no controller sees it before the step
LAGS = (1, 2)  # 1: the controller decides from the step just seen; 2: overlapped decoding (one step later)
FIRST = 2  # steps 0 (the prefill) and 1 run native under every lag, so judged steps start here
SHARES = (0.3, 0.4, 0.46, 0.5, 0.55, 0.6, 0.7)


def step_signals(logits: torch.Tensor, weights: ConfidenceWeights | None = None) -> dict[str, list[float]]:
    """Per-step signals of (T, V) logits: the controller's score and its parts, and the top-2 probability gap."""
    m = confidence_metrics(logits.float(), variance=False)
    top2 = logits.float().softmax(-1).topk(2, dim=-1).values
    out = {"score": score_from_metrics(dict(m), weights or ConfidenceWeights()), "p_max": m["p_max"],
           "prob_margin": top2[:, 0] - top2[:, 1], "margin": m["margin"], "neg_entropy": -m["entropy"]}
    return {k: [round(float(x), 5) for x in v] for k, v in out.items()}


def verse_record(native_logits: torch.Tensor, int4_logits: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Per step t of one verse: the native logits' signals, int4's own p_max, and whether int4's argmax is the
    native token.

    Args:
        native_logits: (T, V) logits of greedy native decoding, step t giving ``tokens[t]``.
        int4_logits: (T, V) teacher-forced int4 logits of the same positions.
        tokens: (T,) the native tokens.
    """
    if native_logits.shape != int4_logits.shape or native_logits.shape[0] != tokens.shape[0]:
        raise ValueError(f"native_logits {tuple(native_logits.shape)}, int4_logits {tuple(int4_logits.shape)} and "
                         f"tokens {tuple(tokens.shape)} must describe the same T steps")
    own = confidence_metrics(int4_logits.float(), variance=False)["p_max"]
    return {"agree": [int(a) for a in (int4_logits.argmax(-1) == tokens).tolist()],
            "native": step_signals(native_logits), ORACLE: [round(float(x), 5) for x in own]}


def judged(record: dict, name: str, lag: int) -> tuple[list[float], list[int]]:
    """(signal, agreement) of the judged steps ``FIRST..T-1`` of one verse: a native signal read ``lag`` steps
    before the judged one (``min2_p_max``: the smaller p_max of that step and the one before it), or the oracle
    read on the step itself."""
    agree = record["agree"][FIRST:]
    if name == ORACLE:
        return record[ORACLE][FIRST:], agree
    if lag < 1 or lag > FIRST:
        raise ValueError(f"lag must be in 1..{FIRST}, got {lag}")
    if name == "min2_p_max":
        p = record["native"]["p_max"]
        return [min(p[t - lag], p[max(t - lag - 1, 0)]) for t in range(FIRST, len(p))], agree
    values = record["native"][name]
    return values[FIRST - lag:len(values) - lag], agree


def agreement_curve(signal: Sequence[float], agree: Sequence[int]) -> tuple[list[float], list[float]]:
    """Int4 share and disagreements per int4 step of the policies "int4 where ``signal`` >= x", for every x.

    Steps are taken in descending signal order; ties go in together (one threshold cannot split them).
    """
    if len(signal) != len(agree):
        raise ValueError(f"signal has {len(signal)} steps and agree {len(agree)}: they must match")
    n = len(signal)
    order = sorted(range(n), key=lambda i: -signal[i])
    shares, rates, bad = [], [], 0
    for k, i in enumerate(order, 1):
        bad += 1 - agree[i]
        if k == n or signal[order[k]] != signal[i]:
            shares.append(k / n)
            rates.append(bad / k)
    return shares, rates


def rate_at_share(shares: Sequence[float], rates: Sequence[float], share: float) -> float | None:
    """Disagreements per int4 step of the smallest policy that runs at least ``share`` of the steps."""
    for s, r in zip(shares, rates):
        if s >= share - 1e-12:
            return r
    return None


def pooled(records: list[dict], name: str, lag: int) -> tuple[list[float], list[int]]:
    """:func:`judged` over every verse."""
    signal, agree = [], []
    for record in records:
        s, a = judged(record, name, lag)
        signal += s
        agree += a
    return signal, agree


def curves(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Every signal's curve, keyed ``name@lag`` (the oracle once, as ``int4_p_max@0``)."""
    out = {f"{name}@{lag}": agreement_curve(*pooled(records, name, lag)) for lag in LAGS for name in SIGNALS}
    out[f"{ORACLE}@0"] = agreement_curve(*pooled(records, ORACLE, 1))
    return out


def threshold_at_share(signal: Sequence[float], share: float) -> float | None:
    """The largest x for which "int4 where ``signal`` >= x" runs at least ``share`` of the steps (None: no steps)."""
    if not signal:
        return None
    ranked = sorted(signal, reverse=True)
    return ranked[min(len(ranked), max(1, math.ceil(share * len(ranked) - 1e-9))) - 1]


def summarize(records: list[dict]) -> dict:
    """Pooled agreement and, per signal and lag, the disagreement rate at each share in ``SHARES`` and the threshold
    that reaches it."""
    _, agree = pooled(records, "p_max", 1)
    out = {"steps": len(agree), "agreement": sum(agree) / max(1, len(agree)), "signals": {}}
    for key, curve in curves(records).items():
        name, lag = key.rsplit("@", 1)
        signal, _ = pooled(records, name, max(1, int(lag)))
        out["signals"][key] = {"rates": {f"{s:g}": rate_at_share(*curve, s) for s in SHARES},
                               "thresholds": {f"{s:g}": threshold_at_share(signal, s) for s in SHARES}}
    return out


# modelled self-draft cascades: (label, longest draft, stop when the draft's own p_max is below this, or None)
CASCADES = tuple([(f"fixed k={k}", k, None) for k in (1, 2, 3, 4, 6, 8)]
                 + [(f"own p_max >= {x:g}, cap {cap}", cap, x) for cap in (8, 16) for x in (0.5, 0.7, 0.9)])
DRAFT_COSTS = (0.4, 0.5, 0.65)  # one int4 draft forward over a native one: 2.50x, 2.00x and 1.54x int4 steps
READS = ((0, 0, ""), (1, 0, ", read late"), (1, 1, ", read late after the first"))  # (lag, sync, label suffix)


def cascade_rounds(agree: Sequence[int], own: Sequence[float], cap: int, stop: float | None,
                   lag: int = 0, sync: int = 0) -> tuple[int, int, int]:
    """Model the lossless self-draft cascade over one verse from its per-step records: (rounds, tokens, draft steps).

    The prefill's token (step 0) is the top tier's. Each round drafts from the verified prefix: draft token i is int4's
    argmax there, right (``agree``) exactly while every draft before it was right, since the prefix then equals the
    native one. The draft stops at ``cap`` tokens or, with ``stop``, after the first token whose own p_max is below
    it (``lag`` more steps run when that p_max is read one step late, unless the doubtful token is among the first
    ``sync`` draft steps, which are read at once: ``DraftPolicyConfig.self_stop_sync``); one native forward then keeps
    the right prefix plus a token of its own. A read at once costs the device a launch gap, which is not priced here. Tokens past the verse's end are not counted. The records were taken with int4 K/V in
    the prefix, where a cascade's drafter sees native K/V, so they understate its agreement slightly.
    """
    n, pos = len(agree), 1
    rounds = tokens = drafted = 0
    while pos < n:
        k, right, doubtful = 0, 0, None
        while k < cap and pos + k < n and (doubtful is None or k <= doubtful + (lag if doubtful >= sync else 0)):
            step = pos + k
            right += int(right == k and bool(agree[step]))
            if doubtful is None and stop is not None and own[step] < stop:
                doubtful = k
            k += 1
        rounds, drafted = rounds + 1, drafted + k
        kept = min(right + 1, n - pos)
        tokens, pos = tokens + kept, pos + kept
    return rounds, tokens, drafted


def cascade_table(records: list[dict]) -> list[dict]:
    """Every cascade in ``CASCADES`` (a stopping one read on time, one step late, and one step late after its first
    step, ``READS``) over all verses: tokens per verify forward and the modelled speed-up over greedy native decoding
    (one native forward per token) at each ``DRAFT_COSTS``."""
    rows = []
    for label, cap, stop in CASCADES:
        for lag, sync, suffix in (READS[:1] if stop is None else READS):
            totals = [sum(v) for v in zip(*(cascade_rounds(r["agree"], r[ORACLE], cap, stop, lag, sync)
                                            for r in records))]
            rounds, tokens, drafted = totals
            row = {"cascade": label + suffix, "tokens_per_verify": tokens / rounds,
                   "acceptance": (tokens - rounds) / max(1, drafted)}
            row.update({f"speedup@{c:g}": tokens / (rounds + c * drafted) for c in DRAFT_COSTS})
            rows.append(row)
    return rows


def write_report(result: dict, out: Path) -> None:
    summary = result["summary"] = summarize(result["verses"])
    env = result["env"]
    lines = [f"# Int4 agreement with greedy native decoding — {result['model']}", "",
             f"{env.get('device_name', env.get('device', ''))}; torch {env.get('torch', '')}, transformers "
             f"{env.get('transformers', '')}; command: `{env.get('command', '')}`", "",
             f"{len(result['verses'])} verses, {summary['steps']} judged steps (steps 2 on); int4's argmax "
             f"equals the native token at {summary['agreement']:.2%} of them.", ""]
    checks = result.get("kernel_checks") or []
    if checks:
        lines += [f"The judge is {result.get('judge', 'int4')}: against the int4 kernel's own one-row step at "
                  f"{len(checks)} prompts, the largest logit difference is "
                  f"{max(c['rel_diff'] for c in checks):.2e} of the logits' range and the argmax agrees at "
                  f"{sum(c['argmax_equal'] for c in checks)} of {len(checks)}.", ""]
    lines += [
             "Disagreements per int4 step when the policy runs int4 on the given share of steps. `name@1`: read on the "
             "step before the judged one (a controller that decides from the step it just saw); `name@2`: two steps "
             "before (overlapped decoding reads scores one step late); `int4_p_max@0`: int4's own p_max on the judged "
             "step, which no controller sees in time (a bound). Steps 0 and 1 always run native and are not judged. "
             "In brackets: the threshold on the signal that runs that share.",
             "",
             "| signal | " + " | ".join(f"{s:g}" for s in SHARES) + " |",
             "|---|" + "---|" * len(SHARES)]
    for name, row in summary["signals"].items():
        cells = ["-" if row["rates"][f"{s:g}"] is None else
                 f"{row['rates'][f'{s:g}']:.2%} (≥ {row['thresholds'][f'{s:g}']:.3g})" for s in SHARES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## The self-draft cascade these records model", "",
              "Lossless: int4 drafts from the verified prefix, one native forward keeps the right prefix and adds a "
              "token (`cascade_rounds`). Speed-up = tokens / (verify forwards + cost x draft forwards), a verify costing "
              "one native step (batch 1: weight-bound); `@0.5` prices an int4 step at half a native one (2.00x, "
              "overlapped `generate` on the 8B shape), `@0.65` at 1.54x, `@0.4` at 2.50x. \"read late\": the stop is "
              "seen one draft step later, so no draft step waits for the host; \"after the first\": the first draft "
              "step is read at once (`self_stop_sync=1`; its launch gap is not priced). Acceptance = kept drafts / "
              "draft forwards.", "",
              "| cascade | tokens per verify | acceptance | " + " | ".join(f"speed-up @{c:g}" for c in DRAFT_COSTS)
              + " |", "|---|---|---|" + "---|" * len(DRAFT_COSTS)]
    for row in cascade_table(result["verses"]):
        lines.append(f"| {row['cascade']} | {row['tokens_per_verify']:.2f} | {row['acceptance']:.2%} | "
                     + " | ".join(f"{row[f'speedup@{c:g}']:.3f}" for c in DRAFT_COSTS) + " |")
    (out / "agreement.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, (shares, rates) in curves(result["verses"]).items():
        ax.plot(shares, rates, label=key, linestyle={"0": ":", "1": "-", "2": "--"}[key.rsplit("@", 1)[1]])
    ax.set_xlabel("share of decode steps run in int4")
    ax.set_ylabel("disagreements per int4 step")
    ax.set_title(f"int4 vs greedy native, {result['model']}")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out / "agreement.png")


class DenseTier:
    """Every linear computing ``tier`` in an int4 format, run as a dense matmul over that format's dequantized matrix
    (``Int4Format.reference_matrix``: the values the kernel computes with) while :meth:`active` is open.

    The CPU int4 kernel costs about as much per row as for one row (no reuse across rows), so a teacher-forced
    forward of a few hundred tokens took minutes on Qwen2.5-1.5B; the dense matrices make it seconds. They differ
    from the kernel only in summation order (:func:`kernel_check` measures it). Holds one fp32 copy of the weights,
    built once.
    """

    def __init__(self, tiers, tier: str) -> None:
        owners = tiers.modules + [g.fused for g in tiers.groups]
        self.tier = tier
        self.dense = {m: DenseWeight(m.formats[tier].reference_matrix(m.weight.detach()))
                      for m in owners if hasattr(m.formats.get(tier), "reference_matrix")}

    @contextmanager
    def active(self):
        saved = {m: m.formats[self.tier] for m in self.dense}
        try:
            for module, fmt in self.dense.items():
                module.formats[self.tier] = fmt
            yield
        finally:
            for module, fmt in saved.items():
                module.formats[self.tier] = fmt


def kernel_check(model, tiers, sequence: torch.Tensor, dense: DenseTier) -> dict:
    """The last position's logits of ``dense``'s tier from the real kernel (a one-row step over a prefix cache built
    densely) against the dense matmuls' logits of the same position: largest difference relative to the logits'
    range, and whether the argmax agrees."""
    tiers.set(dense.tier)
    try:
        with dense.active():
            dense = model(sequence)
            prefix = model(sequence[:, :-1], use_cache=True)
        kernel = model(sequence[:, -1:], use_cache=True,
                       **forward_cache_kwargs(model, prefix.past_key_values)).logits[0, -1]
    finally:
        tiers.set(tiers.top)
    ref = dense.logits[0, -1]
    return {"rel_diff": float((kernel - ref).abs().max() / (ref.max() - ref.min())),
            "argmax_equal": bool(kernel.argmax() == ref.argmax())}


def decode_verse(model, tiers, ids: torch.Tensor, max_new: int, eos: int, judge: str | None = None,
                 dense: DenseTier | None = None) -> dict:
    """:func:`verse_record` of one prompt: greedy decoding at the top tier, then one teacher-forced forward of the
    ``judge`` tier (default the fastest; ``dense``'s tier when given, through its dense matmuls) over the same
    tokens. The top tier is active again on return."""
    tiers.set(tiers.top)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=eos)
    native = torch.cat(gen.logits, 0)
    tiers.set(dense.tier if dense else judge or tiers.fast)
    try:
        with dense.active() if dense else nullcontext():
            forced = model(gen.sequences[:, :-1]).logits[0, ids.shape[1] - 1:]
    finally:
        tiers.set(tiers.top)
    return verse_record(native, forced, gen.sequences[0, ids.shape[1]:])


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from hf_adaptive.evaluation.data import DEFAULT_DEV_SET
    from hf_adaptive.evaluation.translate import TranslationConfig, build_prompt
    from hf_adaptive.models import load_model
    from hf_adaptive.precision.tiers import prepare_tiers

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    tiers = prepare_tiers(model, tiers=("int4", "fp32"))
    dense = DenseTier(tiers, tiers.fast)
    cfg = TranslationConfig()
    lines = Path(args.data or DEFAULT_DEV_SET).read_text().splitlines()
    verses = [json.loads(line) for line in lines[::args.stride][:args.limit]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"env": environment("cpu", threads=args.threads), "model": args.model, "judge": "dense int4",
              "kernel_checks": [], "verses": []}
    with torch.no_grad():
        for verse in tqdm(verses, desc="verses"):
            ids = tok(build_prompt(tok, verse["es"], cfg), return_tensors="pt", add_special_tokens=False).input_ids
            src = len(tok(verse["es"], add_special_tokens=False).input_ids)
            max_new = max(cfg.min_new_tokens_cap, int(round(cfg.new_tokens_factor * src)))
            record = decode_verse(model, tiers, ids, max_new, tok.eos_token_id, dense=dense)
            if not result["kernel_checks"] or len(result["verses"]) % 16 == 0:  # the dense judge against the kernel
                result["kernel_checks"].append(kernel_check(model, tiers, ids, dense))
            result["verses"].append({"id": verse["id"], **record})
            result["summary"] = summarize(result["verses"])
            (out / "agreement.json").write_text(json.dumps(result))
    write_report(result, out)
    print((out / "agreement.md").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results directory")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="embedded model name or checkpoint dir")
    ap.add_argument("--data", default=None, help="aligned verses (JSONL); default: the packaged dev set")
    ap.add_argument("--limit", type=int, default=96, help="verses studied")
    ap.add_argument("--stride", type=int, default=1,
                    help="take every N-th verse (40: the verses eval/record_draft_acceptance.py --stride 40 records)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--render", help="only re-render the report of this results directory")
    args = ap.parse_args(argv)
    if args.render:
        directory = Path(args.render)
        write_report(json.loads((directory / "agreement.json").read_text()), directory)
        return 0
    if not args.out:
        ap.error("--out is required (or --render DIR)")
    if args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    if args.stride < 1:
        ap.error(f"--stride must be >= 1, got {args.stride}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
