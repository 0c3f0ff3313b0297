"""verydeep.runtime.precision's autocast regions, nested in a caller's autocast or in a run's own modes."""

from __future__ import annotations

import torch

from verydeep.runtime.precision import autocast, own_modes

CPU = torch.device("cpu")


def test_an_autocast_region_inside_another_sees_weights_changed_between_regions():
    """Autocast keeps its casts of the weights until the outermost autocast ends: nested in a caller's (or in
    own_modes'), a region would reuse the cast of a weight the update has since changed."""
    linear, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    for outer in (torch.autocast("cpu", dtype=torch.bfloat16), own_modes()):
        with outer:
            with autocast(CPU, torch.bfloat16):
                before = linear(x)
            with torch.no_grad():
                linear.weight.add_(1.0)  # the update
            with autocast(CPU, torch.bfloat16):
                after = linear(x)
        assert not torch.equal(before, after)


def test_fp32_is_fp32_inside_a_callers_autocast_and_own_modes_lift_its_no_grad():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast(CPU, None):
            assert (a @ b).dtype == torch.float32
        with autocast(CPU, torch.bfloat16):
            assert (a @ b).dtype == torch.bfloat16
    with torch.no_grad(), own_modes():
        assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
