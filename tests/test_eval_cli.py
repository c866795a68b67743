"""`hf-adaptive eval bleu|speed` argument parsing and sweep expansion (no model loaded)."""

from __future__ import annotations

import pytest

from hf_adaptive.cli import build_parser
from hf_adaptive.commands.eval import sweep_settings


def test_bleu_sweep_expands_settings():
    """Guards against sweep options being dropped or specs with commas being split apart."""
    args = build_parser().parse_args([
        "eval", "bleu", "--out", "r", "--limit", "5", "--settings", "baseline;kv:bits=4,residual_length=16",
        "--kv-bits", "8,4", "--kv-budgets", "8MiB", "--precision-thresholds", "0.9"])
    assert args.eval_command == "bleu" and args.limit == 5
    assert sweep_settings(args) == ("baseline", "kv:bits=4,residual_length=16", "kv8", "kv4",
                                    "kv:memory_budget=8MiB", "precision:high=0.9,low=0.6")


def test_speed_parser_and_bad_list():
    """Guards against the nested speed subcommand losing its workload options or accepting garbage lists."""
    args = build_parser().parse_args(["eval", "speed", "--out", "r", "--batch-sizes", "1,8", "--random-weights"])
    assert args.batch_sizes == (1, 8) and args.random_weights and args.func.__name__ == "eval_command"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "speed", "--out", "r", "--batch-sizes", "1,x"])
