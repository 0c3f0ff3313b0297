"""Training on bf16 copies of the weights, with SGD's update of the fp32 weights in one pass (Sec. 3.1).

Under bf16 autocast a training step casts every fp32 weight to bf16 for the forward pass and each bf16
weight gradient back to fp32, checks those finite, and torch's fused SGD then reads weight, gradient and
momentum and writes weight and momentum: about 36 bytes a parameter. Here the net runs on bf16 copies of
its weights (the values autocast's cast gives, so forward and backward are the same), their bf16 gradients
are checked, and one compiled loop updates each fp32 weight and its momentum and writes the weight's new
bf16 copy: about 22 bytes, a step about 2% faster for VGG-16 on a CPU (docs/benchmarks.md). The fp32
weights stay the module's own and the momenta the optimizer's, so checkpoints, validation and resuming see
what they always saw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: The layers autocast runs in bf16, whose weights the copies replace.
COPIED_LAYERS = (nn.Conv2d, nn.Linear)
#: Below this many weights the update is a small part of a step, and the copies' compile (a second or two, once a
#: process) and one call a tensor each step cost more than they save: on a 2-core EPYC the demo's 1.8 M-weight net
#: trained 8% slower with them, the bench's 16 M-weight default 2% faster (docs/benchmarks.md).
MIN_WEIGHTS = 5_000_000


def sgd_update(copy: torch.Tensor, weight: torch.Tensor, momentum_buffer: torch.Tensor, grad: torch.Tensor,
               lr: torch.Tensor, momentum: float, weight_decay: float) -> None:
    """torch's SGD (no dampening, no Nesterov) of the fp32 ``weight`` and ``momentum_buffer`` by ``grad`` (bf16 or
    fp32), writing the new weight's bf16 ``copy``; all four 1-D views of one layout."""
    new_momentum = momentum * momentum_buffer + (grad.float() + weight_decay * weight)
    new_weight = weight - lr * new_momentum
    momentum_buffer.copy_(new_momentum)
    weight.copy_(new_weight)
    copy.copy_(new_weight.to(copy.dtype))


def flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in memory order, as a 1-D view."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its memory layout is ``like``'s, else a copy in that layout: :func:`flat` views of
    the two then hold the same elements in the same places."""
    return t if t.stride() == like.stride() else torch.empty_like(like, dtype=t.dtype).copy_(t)


def refusal(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why the copies cannot train ``model`` with ``optimizer`` (None when they can): every weight must belong
    to a layer autocast runs in bf16 and be dense in memory, and the SGD be plain with momentum, as the trainer
    builds it."""
    copied = {id(p) for m in model.modules() if isinstance(m, COPIED_LAYERS) for p in m.parameters(recurse=False)}
    if any(id(p) not in copied for p in model.parameters()):
        return "a weight outside convolutions and linear layers"
    if not all(p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()):
        return "a weight not dense in memory"  # its elements could not be updated as one run of memory
    for group in optimizer.param_groups:
        if not group["momentum"] or group["dampening"] or group["nesterov"] or group["maximize"]:
            return "SGD without momentum, or with dampening, Nesterov or maximize"
    return None


class MasterWeights:
    """The bf16 copies a model trains on and the one-pass update of its fp32 weights, the masters."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, update: Callable[..., None]) -> None:
        self.model, self.optimizer, self.update = model, optimizer, update
        self.copies = {name: p.detach().to(torch.bfloat16).requires_grad_(p.requires_grad)
                       for name, p in model.named_parameters()}
        self.copy_of = dict(zip(map(id, model.parameters()), self.copies.values(), strict=True))
        self.held: dict[int, torch.Tensor] = {}  # fp32 sums of the step's earlier micro-batches, by copy
        for p, state in optimizer.state.items():  # a momentum stored in another layout (an older checkpoint)
            if "momentum_buffer" in state:
                state["momentum_buffer"] = in_layout_of(state["momentum_buffer"], p)

    def __call__(self, *args: Any) -> torch.Tensor:
        """The model's forward pass on the bf16 copies."""
        return torch.func.functional_call(self.model, self.copies, args)

    def hold_gradients(self) -> None:
        """Add the copies' bf16 gradients of a micro-batch to their fp32 sums and drop them: the sums of a step in
        micro-batches are those of autocast's fp32 gradients, added in the same order."""
        for copy in self.copies.values():
            if copy.grad is not None:
                held = self.held.get(id(copy))
                if held is None:
                    self.held[id(copy)] = in_layout_of(copy.grad.float(), copy)
                else:
                    held.add_(copy.grad)
                copy.grad = None

    def gradients(self) -> list[torch.Tensor]:
        """The step's gradients: the copies' (bf16), or with micro-batches the fp32 sums, the last one added."""
        if self.held:
            self.hold_gradients()
            return list(self.held.values())
        return [c.grad for c in self.copies.values() if c.grad is not None]

    def step(self, skip: torch.Tensor) -> None:
        """SGD's step of every weight with a gradient, at its group's settings, unless ``skip`` > 0 (a 0-d tensor on
        the CPU: a gradient not finite), after :meth:`gradients`; then the gradients are dropped."""
        if not skip.item():
            for group in self.optimizer.param_groups:
                self._update(group)
        for copy in self.copies.values():
            copy.grad = None
        self.held = {}

    def _update(self, group: dict[str, Any]) -> None:
        lr = torch.tensor(group["lr"], dtype=torch.float32)  # a tensor: a new rate compiles nothing anew
        for p in group["params"]:
            copy = self.copy_of[id(p)]
            grad = self.held.get(id(copy), copy.grad)
            if grad is not None:
                buffer, grad = self.optimizer.state[p]["momentum_buffer"], in_layout_of(grad, copy)
                self.update(flat(copy.detach()), flat(p.data), flat(buffer), flat(grad), lr, group["momentum"],
                            group["weight_decay"])


def compiled_update() -> tuple[Callable[..., None] | None, str]:
    """:func:`sgd_update` compiled into one loop (``torch.compile``, C++ on a CPU) for tensors of any size, tried
    once on 65,536 numbers (at fewer than a few thousand it would compile a loop for one thread: the size it first
    sees decides); None and the reason where it cannot compile (no C++ compiler, say)."""
    update = torch.compile(sgd_update, dynamic=True)
    size = 1 << 16
    weight, buffer = torch.ones(size), torch.zeros(size)
    try:
        update(weight.bfloat16(), weight, buffer, torch.ones(size, dtype=torch.bfloat16), torch.tensor(0.5), 0.9, 0.0)
    except Exception as error:  # noqa: BLE001 - any failure to compile means the standard update
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not torch.equal(weight, torch.full((size,), 0.5)) or not torch.equal(buffer, torch.ones(size)):
        return None, "the compiled update computed another result"
    return update, ""


def bf16_copies(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[MasterWeights | None, str]:
    """The bf16 copies of ``model``'s weights and their one-pass update, or None and why not."""
    weights = sum(p.numel() for p in model.parameters())
    if weights < MIN_WEIGHTS:
        return None, f"{weights / 1e6:.1f} M weights, too few for the copies to pay"
    why = refusal(model, optimizer)
    update, error = (None, "") if why else compiled_update()
    if why or update is None:
        return None, why or f"the update did not compile ({error})"
    return MasterWeights(model, optimizer, update), ""
