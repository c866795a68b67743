"""The weight-format seam of the precision tiers: a tiered linear runs and counts every tier through the format's
own ``linear`` and ``nbytes``, whatever the format."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model
from torch import nn

from hf_adaptive.precision.int4 import Int4Weight, dequantize_int4_reference, pack_int4
from hf_adaptive.precision.tiers import TierSelector, TieredLinear, prepare_tiers
from hf_adaptive.precision.weight_format import DenseWeight


def test_every_prepared_format_runs_the_tiered_forward():
    """Guards against the forward and the format disagreeing (a cast or a reshape lost at the seam)."""
    tiers = prepare_tiers(make_tiny_model("llama"), ("int4", "fp32"), fuse=False)
    layer = tiers.modules[0]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    for tier in ("int4", "fp32"):
        fmt = layer.formats[tier]
        with tiers.use(tier):
            y = layer(x)
        want = fmt.linear(x.reshape(-1, layer.in_features)).to(x.dtype).reshape(3, 5, -1)
        assert torch.equal(y, want if layer.bias is None else want + layer.bias)
    assert isinstance(layer.formats["int4"], Int4Weight) and isinstance(layer.formats["fp32"], DenseWeight)


def test_memory_is_the_sum_of_the_formats_bytes():
    tiers = prepare_tiers(make_tiny_model("llama"), ("int4", "fp32"))
    owners = tiers.modules + [g.fused for g in tiers.groups]
    for tier in ("int4", "fp32"):
        assert tiers.memory_bytes()[tier] == sum(m.formats[tier].nbytes() for m in owners if tier in m.formats)


def test_int4_format_answers_the_self_check():
    """The members the prepare-time self-check reads: the kernel matches its reference matrix."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    fmt = pack_int4(w, 64, torch.float32)
    assert fmt.kernel == "tinygemm" and fmt.act_dtype == torch.float32
    assert torch.equal(fmt.reference_matrix(w), dequantize_int4_reference(w, 64))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    ref = x @ fmt.reference_matrix(w).T
    assert (fmt.linear(x) - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_format_keeps_its_dtype(dtype):
    linear = nn.Linear(16, 8, bias=False)
    fmt = DenseWeight(linear.weight.detach().to(dtype))
    layer = TieredLinear(linear, TierSelector(active="native"))
    layer.formats["native"] = fmt
    x = torch.randn(2, 16)
    assert fmt.linear(x).dtype == dtype and layer(x).dtype == torch.float32
    assert fmt.nbytes() == 16 * 8 * torch.finfo(dtype).bits // 8
