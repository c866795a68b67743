"""Outputs of eval/bench_precision.py (a helper module of that script, not a script itself): the verified-mode
cost model, results.json, results.md, speed.png.

The cost model (``hf_adaptive.policy.precision_policy.verified_speedup``) answers whether verified mode
can reach a target speedup on this card: a round costs k draft steps + one verify forward of k + 1
tokens and emits (accepted + 1) tokens, which native decode makes in as many native steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import pyplot, save_figure

from hf_adaptive.policy.precision_policy import expected_tokens_per_round, verified_speedup


def acceptance_rate(rounds: list[tuple[int, int]]) -> float:
    """Per-token acceptance of recorded (k, accepted) rounds: accepted / (accepted + first rejections)."""
    accepted = sum(a for k, a in rounds if k)
    rejected = sum(1 for k, a in rounds if k and a < k)
    return accepted / (accepted + rejected) if accepted + rejected else 0.0


def replayed_speedup(rounds: list[tuple[int, int]], native: float, draft: float, verify: float) -> float:
    """Predicted speedup of the recorded rounds on these step times (k = 0: one native step)."""
    tokens = sum(a + 1 for _, a in rounds)
    cost = sum(k * draft + verify if k else native for k, _ in rounds)
    return tokens * native / cost if cost else 0.0


def verified_cost_model(step_ms: dict, rounds: dict, max_draft: int, target: float = 1.5) -> dict:
    """What verified mode can reach with the measured native / int4 / verify step times."""
    n, d, v = step_ms["native_1"], step_ms["int4_1"], step_ms[f"native_{max_draft + 1}"]
    k = max_draft
    # draft step time that would reach ``target`` with every draft accepted: (k+1) n / target = k d + v
    d_needed = ((k + 1) * n / target - v) / k
    out = {"draft_speed_ratio": n / d, "verify_cost_in_native_steps": v / n,
           "upper_bound_all_accepted": verified_speedup(n, d, v, k + 1, k),
           f"draft_speed_ratio_needed_for_{target}x_all_accepted": n / d_needed if d_needed > 0 else None}
    for key, recorded in rounds.items():
        alpha = acceptance_rate(recorded)
        best = max((verified_speedup(n, d, v, expected_tokens_per_round(j, alpha), j), j) for j in range(1, k + 1))
        out[key] = {"accept_rate": alpha, "predicted_speedup_recorded_rounds": replayed_speedup(recorded, n, d, v),
                    "best_fixed_draft_len": best[1], "predicted_speedup_best_fixed_draft": best[0]}
    return out


def _mode_rows(res: dict) -> list[str]:
    rows = ["| mode | decode tok/s | ms/step | × native |", "|---|---|---|---|"]
    for mode, r in res.items():
        if isinstance(r, dict) and "seconds" in r:
            rows.append(f"| {mode} | {r['decode_tokens_per_s']:.1f} | {r['ms_per_step']:.3f} | "
                        f"{r.get('speedup_vs_native', float('nan')):.2f} |")
    return rows


def _overhead_lines(res: dict) -> list[str]:
    lines = []
    for prefix in ("", "compiled_"):
        parts = [f"{100 * res[k]:.2f} % of a step at {lag}" for k, lag in (
            (f"{prefix}controller_overhead_fraction", "lag 0 (one event wait per step)"),
            (f"{prefix}controller_lag1_overhead_fraction", "lag 1")) if k in res]  # either may be absent
        if parts:
            lines.append(f"{prefix or 'fused '}controller overhead (in-graph decision): " + ", ".join(parts))
    if "eager_controller_overhead_fraction" in res:
        lines.append(f"previous path (eager confidence + .tolist() per step, one-token graphs): "
                     f"{100 * res['eager_controller_overhead_fraction']:.2f} % vs fused native")
    return lines


def _verified_lines(res: dict) -> list[str]:
    lines = []
    for prefix in ("", "compiled_"):
        lines += _verified_prefix_lines(res, prefix)
    return lines


def _verified_prefix_lines(res: dict, prefix: str) -> list[str]:
    lines = []
    for mode in (f"{prefix}verified", f"{prefix}verified_always_draft"):
        if "token_identical" in res.get(mode, {}):  # absent while a run is being saved mid-mode
            v = res[mode]
            tie = "" if v["token_identical"] else (
                f", greedy top-2 gap there {v['greedy_gap_at_mismatch']:.4g} vs bf16 rounding step "
                f"{v['rounding_step']:.4g}: near-tie {v['near_tie']}")
            lines.append(f"{mode}: token-identical to native greedy: {v['token_identical']} (first mismatch: "
                         f"{v['first_mismatch']}{tie}; rounds with a draft {v['rounds_with_draft']}/{v['rounds']}, "
                         f"drafted/round {v['drafted_per_round']:.2f}, accepted/round {v['accepted_per_round']:.2f}, "
                         f"rounds settled by a 1-token forward at a near-tie {v.get('near_tie_rounds', 'n/a')})")
    if f"{prefix}verified_cost_model" in res:
        steps = {k: round(x, 4) for k, x in res[f"{prefix}step_ms"].items()}
        lines += ["", f"{prefix}step ms (graph replay): {json.dumps(steps)}",
                  f"{prefix}verified cost model: `{json.dumps(res[f'{prefix}verified_cost_model'])}`", ""]
    return lines


def write_outputs(out_dir: Path, result: dict) -> None:
    """results.json, results.md (one table per batch size) and speed.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Precision switching benchmark ({result['card']})", "",
             f"torch {result['torch']}, transformers {result['transformers']}, weights: {result['weights']}",
             f"command: `{result['command']}`", "",
             f"tier weight bytes (lm_head tiered, q/k/v + gate/up fused): {result['tier_weight_bytes']}",
             f"replayed schedules: {result['schedules']}",
             f"int4 fraction of each replayed schedule per threshold: {result['schedule_fast_fraction']}", ""]
    if "compile_error" in result:
        lines += [f"compile section failed: `{json.dumps(result['compile_error'])[:600]}`", ""]
    for batch, res in result["batches"].items():
        lines += [f"## batch {batch}", ""] + _mode_rows(res) + [""] + _overhead_lines(res) + _verified_lines(res)
        if "prev_prep_tier_weight_bytes" in res:
            lines.append(f"previous preparation (decoder linears only, unfused) tier bytes: "
                         f"{res['prev_prep_tier_weight_bytes']}")
        lines.append("")
    if "wall_seconds" in result:
        lines.append(f"wall time: {result['wall_seconds']:.0f} s")
    (out_dir / "results.md").write_text("\n".join(lines))
    plot_speed(out_dir / "speed.png", result)


def plot_speed(path: Path, result: dict) -> None:
    """One bar chart per batch size: decode speed of every mode relative to native."""
    plt = pyplot()

    batches = list(result["batches"])
    fig, axes = plt.subplots(1, len(batches), figsize=(8 * len(batches), 4.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        res = {m: r for m, r in result["batches"][batch].items()
               if isinstance(r, dict) and "speedup_vs_native" in r}
        ax.bar(range(len(res)), [r["speedup_vs_native"] for r in res.values()], color="tab:blue")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(1.3, color="tab:red", lw=0.8, ls="--", label="lossy target 1.3x")
        ax.set_title(f"batch {batch}: decode speed vs native (compiled_* vs compiled_native)")
        ax.set_xticks(range(len(res)), list(res), rotation=40, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['card']} - {result['weights']}", fontsize=10)
    save_figure(fig, path, dpi=110)
