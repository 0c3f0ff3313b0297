"""The one-pass SGD update of fp32 weights from bf16 gradients, against torch's fused SGD."""

from __future__ import annotations

import pytest
import torch

from verydeep.train.master_weights import compiled_update, flat, in_layout_of, sgd_update


def bf16_exact(*shape: int) -> torch.Tensor:
    """Random fp32 numbers that bf16 holds exactly: a bf16 gradient cast to fp32, as autocast's is."""
    return torch.randn(*shape).bfloat16().float()


@pytest.mark.parametrize("compiled", [False, True])
def test_the_update_is_torchs_sgd_and_the_copy_its_weight_in_bf16(compiled):
    update = compiled_update()[0] if compiled else sgd_update
    assert update is not None, compiled_update()[1]
    torch.manual_seed(0)
    weight = torch.randn(64, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    reference = weight.clone().requires_grad_()
    sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    buffer, copy = torch.zeros_like(weight), weight.bfloat16()
    for _ in range(3):
        grad = bf16_exact(64, 3, 3, 3).contiguous(memory_format=torch.channels_last)
        reference.grad = grad.clone()
        sgd.step()
        update(flat(copy), flat(weight), flat(buffer), flat(grad.bfloat16()), torch.tensor(0.1), 0.9, 5e-4)
        torch.testing.assert_close(weight, reference.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(buffer, sgd.state[reference]["momentum_buffer"], rtol=1e-6, atol=1e-7)
        assert torch.equal(copy, weight.bfloat16())


def test_flat_views_of_one_layout_pair_the_same_elements():
    weight = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    other = in_layout_of(torch.arange(48.0).reshape(4, 3, 2, 2), weight)  # contiguous in, channels_last out
    assert other.stride() == weight.stride() and torch.equal(other, torch.arange(48.0).reshape(4, 3, 2, 2))
    assert in_layout_of(weight, weight) is weight
    assert torch.equal(flat(weight.mul(2)), flat(weight) * 2)
