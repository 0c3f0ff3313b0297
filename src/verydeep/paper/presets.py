"""The reproduction's nets and presets (Sec. 3.1, 4): the paper's ablation nets, each with its
configuration, training scale, the net it starts from and its seed; and the presets that scale the
paper's sizes by ``crop / 224`` and set every net's budget, schedule (the plateau rule or fixed
milestones), seeds and validation split, down to each net's training settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from verydeep.io.rundir import RunDir
from verydeep.paper.figures import PaperNet
from verydeep.train.recipe import TrainConfig


@dataclass(frozen=True)
class Net:
    """One net of the reproduction: a configuration, its training scale (paper's pixels), the net it
    starts from under the paper's protocol (Sec. 3.1) and its seed."""

    name: str
    config: str
    scale: tuple[int, int]  # at the paper's 224-pixel crop
    parent: str | None = None
    seed: int = 0

    @property
    def jittered(self) -> bool:
        return self.scale[0] != self.scale[1]

    @property
    def base(self) -> str:
        """The name of the net this one replicates with another seed (its own name at seed 0)."""
        return self.name.removesuffix(f"-s{self.seed}") if self.seed else self.name

    @property
    def paper_net(self) -> PaperNet:
        """The paper's net of this configuration and training scale, whose figures ours stand beside."""
        return PaperNet.trained_at(self.config, *self.scale)

    def replica(self, seed: int, seeded: Sequence[str]) -> Net:
        """This net trained with another seed; it starts from its parent's replica of that seed when the
        parent is seeded too, so that replicas share no training."""
        parent = f"{self.parent}-s{seed}" if self.parent in seeded else self.parent
        return replace(self, name=f"{self.name}-s{seed}", parent=parent, seed=seed)


#: The ablations: depth (A, B, D, E), LRN (A-LRN), 1x1 vs 3x3 (C vs D), S = 256 vs 384 vs jittered,
#: and the two jittered nets whose fusion is Table 6. Parents follow Sec. 3.1: A from random weights,
#: the deeper nets from A's first four convs and three FC layers, S = 384 from S = 256 (lr 1e-3), the
#: jittered nets from S = 384. A-LRN is as shallow as A and starts from random weights too.
NETS = (
    Net("A", "A", (256, 256)),
    Net("A-LRN", "A-LRN", (256, 256)),
    Net("B", "B", (256, 256), parent="A"),
    Net("C", "C", (256, 256), parent="A"),
    Net("C-384", "C", (384, 384), parent="C"),
    Net("C-jitter", "C", (256, 512), parent="C-384"),
    Net("D", "D", (256, 256), parent="A"),
    Net("D-384", "D", (384, 384), parent="D"),
    Net("D-jitter", "D", (256, 512), parent="D-384"),
    Net("E", "E", (256, 256), parent="A"),
    Net("E-384", "E", (384, 384), parent="E"),
    Net("E-jitter", "E", (256, 512), parent="E-384"),
)


PROTOCOLS = ("paper", "scratch")


@dataclass(frozen=True)
class Preset:
    """Sizes and budget of a reproduction; every paper size is scaled by ``crop / 224``.

    ``protocol``: ``paper`` trains each net from its parent (Sec. 3.1; a same-configuration parent is
    fine-tuned with ``finetune_lr`` for at most ``finetune_epochs``), ``scratch`` every net from random
    weights. ``epochs`` is an upper bound: a net stops once validation has not improved for
    ``stop_patience`` epochs. ``seeds`` > 1 trains the ``seeded`` nets that many times.
    """

    crop: int
    width: float
    epochs: int
    batch_size: int = 128
    lr: float = 0.01
    init: str = "he"
    nets: tuple[str, ...] = tuple(n.name for n in NETS)
    protocol: str = "paper"
    finetune_lr: float = 1e-3
    finetune_epochs: int = 6
    stop_patience: int | None = 4
    seeds: int = 1
    seeded: tuple[str, ...] = ("A", "D")
    limit_train: int | None = None
    limit_test: int | None = None
    limit_val: int | None = 1000  # the class-balanced test images that the plateau rule watches
    val_split: int | None = None  # instead: validate on this many held-out training images (test images decide nothing)
    milestones: tuple[int, ...] = ()  # a fixed schedule (lr / 10 after each), instead of the plateau rule
    workers: int = 2
    patience: int = 2  # the paper's rule: lr / 10 when validation top-1 stops improving, at most 3 times
    fixed_protocols: tuple[str, ...] = ("dense",)  # jittered nets always get dense, multi-crop and both

    def scale(self, paper: tuple[int, int]) -> tuple[int, int]:
        """A training scale of the paper (224-pixel crops) at this preset's crop."""
        factor = self.crop / 224
        return (math.floor(paper[0] * factor), math.floor(paper[1] * factor))

    def starts_from(self, net: Net) -> str | None:
        """The net whose weights ``net`` starts from under this preset's protocol (None: random weights)."""
        return net.parent if self.protocol == "paper" else None

    def fine_tuned(self, net: Net, by_name: dict[str, Net]) -> bool:
        """Whether ``net`` continues a parent of its own configuration (every weight copied, lr 1e-3)."""
        parent = self.starts_from(net)
        return parent is not None and by_name[parent].config == net.config

    def train_config(self, net: Net, by_name: dict[str, Net], data: Path, nets_dir: Path, device: str,
                     progress: bool) -> TrainConfig:
        """``net``'s training settings: the paper's (TrainConfig's defaults), overridden by every field of
        this preset that is also a training setting (crop, width, epochs, batch size, lr, ...), then by
        where ``net`` starts from under the protocol."""
        shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(self)} - {"milestones"}
        run_dir = nets_dir / net.name
        cfg = replace(TrainConfig(), **{name: getattr(self, name) for name in shared}, data=str(data),
                      out=str(run_dir), config=net.config, scale=self.scale(net.scale), seed=net.seed,
                      device=device, progress=progress, resume=RunDir(run_dir).last.is_file(),
                      milestones=list(self.milestones))
        parent = self.starts_from(net)
        if parent is None:
            return acting(cfg)
        cfg = replace(cfg, weights=str(RunDir(nets_dir / parent).last))
        if self.fine_tuned(net, by_name):  # a short fine-tuning: the plateau rule within its few epochs; every
            # layer is copied, so the init is left at its default (one set is refused then: it initialises nothing)
            return acting(replace(cfg, lr=self.finetune_lr, epochs=self.finetune_epochs, milestones=[],
                                  init=TrainConfig.init))
        return acting(replace(cfg, warm_start=True))  # Sec. 3.1: A's first four convs and FC6-8 into a deeper net

    def members(self) -> list[Net]:
        """Every net this preset trains, in training order: the preset's order (what matters most
        first), each net's parents before it under the paper's protocol, then the seed replicas."""
        by_name = {n.name: n for n in NETS}
        order: list[Net] = []

        def add(name: str) -> None:
            net = by_name[name]
            parent = self.starts_from(net)
            if parent is not None:
                add(parent)
            if net not in order:
                order.append(net)

        for name in self.nets:
            add(name)
        replicas = [net.replica(seed, self.seeded) for seed in range(1, self.seeds)
                    for net in order if net.name in self.seeded]
        return order + replicas


PRESETS: dict[str, Preset] = {
    "cifar10": Preset(crop=32, width=0.25, epochs=14, finetune_epochs=5, seeds=2,
                      nets=("A", "D", "B", "E", "A-LRN", "C", "D-jitter", "E-jitter")),
    "imagenette": Preset(crop=128, width=0.25, epochs=30, batch_size=64),
    # the depth claim trained to convergence: A, B, D and E, four seeds each, a fixed schedule, validation
    # held out of the training images (docs/REPRODUCTION.md)
    "cifar10-depth": Preset(crop=32, width=0.25, epochs=45, milestones=(25, 35, 40), nets=("A", "D", "B", "E"),
                            seeds=4, seeded=("A", "B", "D", "E"), stop_patience=None, limit_val=None,
                            val_split=2000, workers=1),
    # the demo: 8x8 digits lose too much under S in [36, 73], so one net A at S = 36, all protocols
    "digits": Preset(crop=32, width=0.25, epochs=12, batch_size=32, nets=("A",), limit_val=None,
                     fixed_protocols=("dense", "multicrop", "dense+multicrop")),
}


def within_budget(preset: Preset) -> Preset:
    """``preset`` without its early stop where its budget gives a net too few validations for it to act: not in
    force, so not reported either."""
    return replace(preset, stop_patience=None) if (preset.stop_patience or 0) >= preset.epochs else preset


def acting(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` without the preset's early stop where its net validates too few times for it to act (a short
    budget): training refuses a setting that could not take effect."""
    return replace(cfg, stop_patience=None) if (cfg.stop_patience or 0) >= cfg.validations() else cfg
