"""The decode-kernel A/B report (the GPU timing itself runs on a device; its report is checked here on CPU)."""

from __future__ import annotations

import json

import pytest

from helpers import load_eval_script


def _result() -> dict:
    env = {"card": "test card", "torch": "t", "triton": "x", "command": "bench_kernel_variants.py --variants ..."}
    rows = [dict(variant=v, view=view, batch=8, context=32768, bits=4, mixed=True, chunk=c, maxreg=r, us=us,
                 GBps=134e6 / us / 1e3, rel_err=4e-3)
            for v, base_us in (("base", 425.0), ("new", 291.0)) for view in ("plain", "book")
            for c in (32, 64) for r, us in ((None, base_us), (128, base_us * 0.9))]
    return {"env": env, "variants": {"base": {"path": "a.py", "sha256": "0" * 64},
                                     "new": {"path": "b.py", "sha256": "1" * 64}}, "rows": rows}


def test_report_lists_every_row_and_plots_the_defaults(tmp_path):
    """Guards against a report that drops configurations or mislabels the register cap: every timed row appears
    once, an uncapped row reads '-', and the PNG of the default launch is written."""
    pytest.importorskip("matplotlib")
    script = load_eval_script("bench_kernel_variants")
    result = _result()
    (tmp_path / "results.json").write_text(json.dumps(result))
    assert script.main(["--render", str(tmp_path / "results.json"), "--out", str(tmp_path)]) == 0
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| 8 |")]
    assert len(table) == len(result["rows"])
    # new, two views, two chunks, uncapped; an older row without stages, warps or waves fields reads 3 stages,
    # '-' warps and the launcher's default of 2 waves
    assert sum("| - | 3 | - | 2 | 291.0 |" in line for line in table) == 4
    assert (tmp_path / "variants.png").stat().st_size > 0


def test_empty_variant_list_is_refused(tmp_path):
    """Guards against a run that times nothing: --variants must name at least one kernel source."""
    script = load_eval_script("bench_kernel_variants")
    with pytest.raises(SystemExit, match="--variants is empty"):
        script.run(script.parse_args(["--out", str(tmp_path)]))


def test_book_mask_view_is_the_mask_generate_passes():
    """Guards the A/B against timing a path generate never takes: the ``book_mask`` view must carry a key mask over
    the static view's whole capacity, attending every stored key and none past them (as the static cache's padded
    mask does), while ``plain`` and ``book`` carry none."""
    import torch

    from hf_adaptive.kv.build import pack_dense_kv
    from test_attention_triton import _as_static

    script = load_eval_script("bench_kernel_variants")
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 83, 32, generator=g), torch.randn(2, 2, 83, 32, generator=g)
    packed = pack_dense_kv(k, v, [4, 8, 4, 16, 4], block_size=16, value_group=16, spare_slots=2, seed=0)
    assert script._view("plain", packed, _as_static)[1] is None
    assert script._view("book", packed, _as_static)[1] is None
    view, mask = script._view("book_mask", packed, _as_static)
    assert view.book is not None and mask.dtype == torch.bool
    assert mask.shape == (2, view.max_tokens) and view.max_tokens > packed.num_tokens
    assert mask[:, : packed.num_tokens].all() and not mask[:, packed.num_tokens:].any()


def test_shapes_option_parses_and_refuses_bad_text():
    """Guards the --shapes subset: BATCHxCONTEXTxBITS with an optional m for a mixed history, and a clear error
    naming the option for anything else."""
    script = load_eval_script("bench_kernel_variants")
    args = script.parse_args(["--out", "x", "--shapes", "8x32768x4,8x32768x8m"])
    assert args.shapes == [(8, 32768, 4, False), (8, 32768, 8, True)]
    assert script.parse_args(["--out", "x"]).shapes == script.SHAPES
    with pytest.raises(SystemExit):
        script.parse_args(["--out", "x", "--shapes", "8x32k"])
