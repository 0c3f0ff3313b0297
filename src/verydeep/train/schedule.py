"""The learning-rate schedule (Sec. 3.1) and the sums of an epoch's steps, both saved in checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class Schedule:
    """Sec. 3.1: lr /= 10 when the validation score (higher is better) has not improved for ``patience``
    validations, at most ``max_drops`` times, then stop; or, with ``milestones``, lr /= 10 after each
    listed epoch. With ``stop_patience``, training also stops once the score has not improved for that
    many validations in a row, whatever the lr: the epoch budget becomes an upper bound."""

    def __init__(self, lr: float, patience: int = 2, max_drops: int = 3, milestones: list[int] | None = None,
                 stop_patience: int | None = None) -> None:
        self.base_lr = self.lr = lr
        self.patience = patience
        self.max_drops = max_drops
        self.milestones = sorted(milestones or [])
        self.stop_patience = stop_patience
        self.best = -math.inf
        self.bad = 0
        self.since_best = 0
        self.drops = 0
        self.stopped = False

    def update(self, epochs_done: int, score: float | None) -> bool:
        """Account for an epoch (``score`` None when not validated); True when the score improved."""
        improved = score is not None and score > self.best
        if improved:
            self.best, self.bad, self.since_best = score, 0, 0
        elif score is not None:
            self.since_best += 1
            self.stopped |= self.stop_patience is not None and self.since_best >= self.stop_patience
        if self.milestones:
            self.follow_milestones(epochs_done)
        elif score is not None and not improved:
            self.bad += 1
            if self.bad >= self.patience:
                if self.drops < self.max_drops:
                    self.lr /= 10
                    self.drops += 1
                    self.bad = 0
                else:
                    self.stopped = True
        return improved

    def follow_milestones(self, epochs_done: int) -> float:
        """Set lr for ``epochs_done`` from the milestones alone, the one rule of an uninterrupted and a
        resumed run (which may move or add them): divided by 10 once for each milestone passed; returns it."""
        self.drops = sum(milestone <= epochs_done for milestone in self.milestones)
        self.lr = lr_after(self.base_lr, self.drops)
        return self.lr

    @property
    def stop_reason(self) -> str:
        """Why the run stopped: ``stop_patience`` (no better score for that many validations, whatever the lr),
        else ``plateau`` (no drop of the lr left); meaningful once :attr:`stopped`."""
        stalled = self.stop_patience is not None and self.since_best >= self.stop_patience
        return "stop_patience" if stalled else "plateau"

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "best": self.best, "bad": self.bad, "since_best": self.since_best,
                "drops": self.drops, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.best, self.bad = state["lr"], state["best"], state["bad"]
        self.since_best = state.get("since_best", state["bad"])  # older checkpoints counted only ``bad``
        self.drops, self.stopped = state["drops"], state["stopped"]
        self._judge_again()

    def _judge_again(self) -> None:
        """The stored state judged by this rule, which a resume may change (``patience``, ``max_drops``,
        ``stop_patience``, milestones): a drop it calls for that the stored rule did not make (no drops left, or a
        longer patience) is made now, as it would have been at that validation; the run stops if this rule
        stops it, and goes on if only the stored one did. The same rule judges the same state the same."""
        by_stop_patience = self.stop_patience is not None and self.since_best >= self.stop_patience
        if not self.milestones and self.bad >= self.patience and self.drops < self.max_drops:
            self.lr /= 10
            self.drops += 1
            self.bad = 0
        self.stopped = by_stop_patience or (not self.milestones and self.bad >= self.patience)


def lr_after(lr: float, drops: int) -> float:
    """``lr`` divided by 10 ``drops`` times, one division at a time as the plateau rule divides, so that every rule
    (and the check of a resumed run's state) reaches the same float."""
    for _ in range(drops):
        lr /= 10
    return lr


@dataclass
class EpochTotals:
    """Sums over the steps done so far in the current epoch (carried across a resume)."""

    loss: float = 0.0
    images: float = 0.0
    seconds: float = 0.0
    skipped: float = 0.0

    def add(self, loss: float, images: float, seconds: float, skipped: float) -> None:
        self.loss += loss
        self.images += images
        self.seconds += seconds
        self.skipped += skipped

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.images, 1)
