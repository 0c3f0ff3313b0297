"""The training step's check that gradients are finite."""

from __future__ import annotations

import pytest
import torch

from verydeep.train.step import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_infinity_or_nan_is_caught_and_large_finite_gradients_pass(dtype):
    grads = [torch.randn(100, dtype=dtype), torch.randn(3, 3, dtype=dtype)]
    assert all_finite(grads)
    for bad in (float("inf"), float("-inf"), float("nan")):
        broken = [g.clone() for g in grads]
        broken[1][2, 1] = bad
        assert not all_finite(broken), bad
    large = [torch.full((10,), 1e25, dtype=dtype)]  # finite, though their squares overflow a norm
    assert all_finite(large) and not torch.nn.utils.get_total_norm(large).isfinite()
    assert all_finite([])
