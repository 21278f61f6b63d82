"""Statistics accumulate in fp32 whatever the model's dtype (a bf16 model gives fp32 results
that agree with the fp32 model's to bf16 precision)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tl_sinks
from tests.conftest import random_prompts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_give_fp32_statistics(tiny_llama_dir, tiny_llama, dtype):
    half = tl_sinks.load_model(tiny_llama_dir, device="cpu", dtype=dtype)
    assert next(half.parameters()).dtype == dtype
    prompts = random_prompts([12, 9, 16, 12], seed=3)
    ref = tl_sinks.scan(tiny_llama, prompts, progress=False)
    got = tl_sinks.scan(half, prompts, progress=False)
    for stage in ("sinks", "aggregation", "super_neurons", "disparity"):
        a, b = getattr(ref, stage), getattr(got, stage)
        for f in dataclasses.fields(a):
            y = getattr(b, f.name)
            if isinstance(y, torch.Tensor) and y.is_floating_point():
                assert y.dtype == torch.float32, f"{stage}.{f.name} is {y.dtype}"
    # The numbers are the fp32 model's, to the model's own rounding.
    torch.testing.assert_close(got.sinks.values, ref.sinks.values, atol=0.02, rtol=0.05)
    torch.testing.assert_close(got.aggregation.values, ref.aggregation.values, atol=1e-3, rtol=0.1)
    assert got.sinks.sink_rate(0) == pytest.approx(ref.sinks.sink_rate(0), abs=0.1)
