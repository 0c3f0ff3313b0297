"""The one-pass SGD update of fp32 weights from bf16 gradients, against torch's fused SGD."""

from __future__ import annotations

import pytest
import torch

from verydeep.train.master_weights import compiled_update, flat, in_layout_of, refusal, sgd_update


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


def test_the_copies_refuse_what_they_cannot_train():
    def sgd(model, **options):
        return torch.optim.SGD(model.parameters(), lr=0.1, **{"momentum": 0.9, **options})

    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert refusal(plain, sgd(plain)) is None
    assert "momentum" in refusal(plain, sgd(plain, momentum=0.0))
    assert "Nesterov" in refusal(plain, sgd(plain, nesterov=True))
    normed = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert "outside convolutions" in refusal(normed, sgd(normed))  # batch norm runs in fp32 under autocast
    strided = torch.nn.Linear(4, 6)
    strided.weight = torch.nn.Parameter(torch.randn(4, 6).t())  # a transposed view: not one run of memory
    assert "dense" in refusal(strided, sgd(strided))
