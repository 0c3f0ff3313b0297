"""The paper's published figures, as data: what our runs are compared with.

Table 1 (the configurations) lives in :mod:`verydeep.nn.configs`. Here are the results: ILSVRC-2012
classification (Sec. 4, Tables 3 to 6, and Table 7's own entries: its best single net is E's row of Table 5,
the 7-net submission :data:`ILSVRC_SUBMISSION`), localisation (Appendix A, Tables 8 and 9) and the
features on other datasets (Appendix B, Tables 11 and 12). Figures are percentages as printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def scale_text(smin: int, smax: int) -> str:
    """A training scale as the paper's tables print it: ``256`` or ``[256;512]``."""
    return str(smin) if smin == smax else f"[{smin};{smax}]"


@dataclass(frozen=True, order=True)
class PaperNet:
    """A net of the paper: its configuration (Table 1) and training scale S as the tables print it."""

    config: str  # "A", "A-LRN", "B", "C", "D" or "E"
    scale: str  # "256", "384" or "[256;512]" (jittered)

    @classmethod
    def trained_at(cls, config: str, smin: int, smax: int) -> PaperNet:
        return cls(config, scale_text(smin, smax))


@dataclass(frozen=True)
class TopErrors:
    """Top-1 and top-5 classification error in %, ILSVRC-2012 validation; ``test_top5`` on the test set,
    where the paper gives it."""

    top1: float
    top5: float
    test_top5: float | None = None


# ---- classification, Sec. 4 --------------------------------------------------------------

A_256, A_LRN_256, B_256 = PaperNet("A", "256"), PaperNet("A-LRN", "256"), PaperNet("B", "256")
C_256, C_384, C_JITTERED = PaperNet("C", "256"), PaperNet("C", "384"), PaperNet("C", "[256;512]")
D_256, D_384, D_JITTERED = PaperNet("D", "256"), PaperNet("D", "384"), PaperNet("D", "[256;512]")
E_256, E_384, E_JITTERED = PaperNet("E", "256"), PaperNet("E", "384"), PaperNet("E", "[256;512]")

#: Table 3 (Sec. 4.1): dense evaluation at a single test scale, Q = S for a fixed S, Q = 384 for
#: S in [256;512].
TABLE_3: dict[PaperNet, TopErrors] = {
    A_256: TopErrors(29.6, 10.4),
    A_LRN_256: TopErrors(29.7, 10.5),
    B_256: TopErrors(28.7, 9.9),
    C_256: TopErrors(28.1, 9.4),
    C_384: TopErrors(28.1, 9.3),
    C_JITTERED: TopErrors(27.3, 8.8),
    D_256: TopErrors(27.0, 8.8),
    D_384: TopErrors(26.8, 8.7),
    D_JITTERED: TopErrors(25.6, 8.1),
    E_256: TopErrors(27.3, 9.0),
    E_384: TopErrors(26.9, 8.7),
    E_JITTERED: TopErrors(25.5, 8.0),
}

#: Table 4 (Sec. 4.2): dense evaluation at several test scales, Q = {S-32, S, S+32} for a fixed S,
#: Q = {256, 384, 512} for S in [256;512].
TABLE_4: dict[PaperNet, TopErrors] = {
    B_256: TopErrors(28.2, 9.6),
    C_256: TopErrors(27.7, 9.2),
    C_384: TopErrors(27.8, 9.2),
    C_JITTERED: TopErrors(26.3, 8.2),
    D_256: TopErrors(26.6, 8.6),
    D_384: TopErrors(26.5, 8.6),
    D_JITTERED: TopErrors(24.8, 7.5),
    E_256: TopErrors(26.9, 8.7),
    E_384: TopErrors(26.7, 8.6),
    E_JITTERED: TopErrors(24.8, 7.5),
}

#: Table 5 (Sec. 4.3): each evaluation method of Sec. 3.2 at Q = {256, 384, 512}, keyed by net and
#: protocol (``dense``, ``multicrop`` or ``dense+multicrop``).
TABLE_5: dict[tuple[PaperNet, str], TopErrors] = {
    (D_JITTERED, "dense"): TopErrors(24.8, 7.5),
    (D_JITTERED, "multicrop"): TopErrors(24.6, 7.5),
    (D_JITTERED, "dense+multicrop"): TopErrors(24.4, 7.2),
    (E_JITTERED, "dense"): TopErrors(24.8, 7.5),
    (E_JITTERED, "multicrop"): TopErrors(24.6, 7.4),
    (E_JITTERED, "dense+multicrop"): TopErrors(24.4, 7.1, test_top5=7.0),  # Table 7's best single net
}

#: Table 6 (Sec. 4.4): the posteriors of several nets averaged, keyed by the fused nets and protocol.
TABLE_6: dict[tuple[frozenset[PaperNet], str], TopErrors] = {
    (frozenset({D_JITTERED, E_JITTERED}), "dense"): TopErrors(24.0, 7.1),
    (frozenset({D_JITTERED, E_JITTERED}), "multicrop"): TopErrors(23.9, 7.2),
    (frozenset({D_JITTERED, E_JITTERED}), "dense+multicrop"): TopErrors(23.7, 6.8, test_top5=6.8),
}


#: Table 6's (and 7's) ILSVRC-2014 submission: the posteriors of 7 nets averaged (not one of our fusions).
ILSVRC_SUBMISSION = TopErrors(24.7, 7.5, test_top5=7.3)


def single_test_scale(smin: int, smax: int) -> int:
    """Table 3's test scale Q: S for a fixed S, the midpoint (384) for a jittered one."""
    return smin if smin == smax else (smin + smax) // 2


def multi_test_scales(smin: int, smax: int) -> list[int]:
    """Tables 4 to 6's test scales Q (Sec. 4.2): {S-32, S, S+32} for a fixed S, {Smin, mid, Smax} for a jittered one."""
    return [smin - 32, smin, smin + 32] if smin == smax else [smin, (smin + smax) // 2, smax]


def classification_table(protocol: str, multi_scale: bool, fusion: bool) -> int | None:
    """Which of Tables 3 to 6 reports an evaluation of this kind: 3 dense at one scale, 4 dense at
    several, 5 multi-crop (alone or with dense) at several, 6 fusion; None for the rest."""
    if fusion:
        return 6
    if protocol == "dense":
        return 4 if multi_scale else 3
    return 5 if multi_scale and protocol in ("multicrop", "dense+multicrop") else None


def classification_errors(table: int, nets: Sequence[PaperNet], protocol: str = "dense") -> TopErrors | None:
    """The errors that Table 3, 4, 5 or 6 reports for these nets under ``protocol``, or None.

    Tables 3 and 4 are dense only; Table 6 holds fusions of several nets.
    """
    if table == 6:  # a net twice (two replicas of one) is not the paper's fusion
        return TABLE_6.get((frozenset(nets), protocol)) if len(set(nets)) == len(nets) else None
    if len(nets) != 1:
        return None
    if table == 5:
        return TABLE_5.get((nets[0], protocol))
    single = {3: TABLE_3, 4: TABLE_4}.get(table, {})
    return single.get(nets[0]) if protocol == "dense" else None


# ---- localisation, Appendix A ------------------------------------------------------------


@dataclass(frozen=True)
class BoxRegression:
    """A localisation net of Table 8: which layers were fine-tuned and how boxes are regressed."""

    fine_tuned: str  # "FC1-FC2" (the first two FC layers only) or "all"
    regression: str  # "SCR" (one box for all classes) or "PCR" (a box per class)


#: Table 8: localisation error % with the ground-truth class, central crop, configuration D, S = 384.
TABLE_8: dict[BoxRegression, float] = {
    BoxRegression("FC1-FC2", "SCR"): 36.4,
    BoxRegression("FC1-FC2", "PCR"): 34.3,
    BoxRegression("all", "PCR"): 33.1,
}


@dataclass(frozen=True)
class LocalisationScales:
    """A localisation net of Table 9: its training scale S and test scales Q."""

    train: int
    test: tuple[int, ...]


def scaled_from(paper_pixels: int, ours: int, crop: int) -> bool:
    """Whether ``ours``, a size of a net of ``crop``-pixel crops, is the paper's ``paper_pixels`` (at 224) scaled
    by ``crop / 224`` and rounded either way, as a reproduction scales it (384 -> 54 at a 32-pixel crop)."""
    return abs(ours - paper_pixels * crop / 224) < 1


def table_9_row(train: int, test: Sequence[int], crop: int) -> LocalisationScales | None:
    """The row of Table 9 whose S and Q are a net's ``train`` and ``test`` scaled to its ``crop``, if any."""
    return next((key for key in TABLE_9 if scaled_from(key.train, train, crop) and len(key.test) == len(test)
                 and all(scaled_from(p, q, crop) for p, q in zip(key.test, sorted(test), strict=True))), None)


@dataclass(frozen=True)
class ValTest:
    """An error % on ILSVRC-2012 validation and, where the paper gives it, the test set."""

    val: float
    test: float | None = None


#: Table 9: top-5 localisation error % of the full protocol (dense boxes merged greedily, Appendix A).
TABLE_9: dict[LocalisationScales, ValTest] = {
    LocalisationScales(256, (256,)): ValTest(29.5),
    LocalisationScales(384, (384,)): ValTest(28.2, 26.7),
    LocalisationScales(384, (352, 384)): ValTest(27.5),
}

#: Table 9's fusion of its nets: the ILSVRC-2014 localisation winner.
TABLE_9_FUSION = ValTest(26.9, 25.3)


# ---- features on other datasets, Appendix B ----------------------------------------------


@dataclass(frozen=True)
class Recall:
    """Mean class recall % over three random splits, with its standard deviation."""

    mean: float
    std: float


@dataclass(frozen=True)
class TransferResults:
    """A row of Table 11: a linear SVM on the net's features, the ConvNet not fine-tuned."""

    voc2007_map: float  # mean average precision %
    voc2012_map: float
    caltech101_recall: Recall  # 30 training images per class
    caltech256_recall: Recall  # 60 training images per class


#: Table 11, keyed by the configurations whose features are used (two nets: descriptors stacked).
TABLE_11: dict[tuple[str, ...], TransferResults] = {
    ("D",): TransferResults(89.3, 89.0, Recall(91.8, 1.0), Recall(85.0, 0.2)),
    ("E",): TransferResults(89.3, 89.0, Recall(92.3, 0.5), Recall(85.1, 0.3)),
    ("D", "E"): TransferResults(89.7, 89.3, Recall(92.7, 0.5), Recall(86.2, 0.3)),
}

#: Table 12: VOC-2012 action classification mAP %, from the whole image alone or with the person's box.
TABLE_12: dict[str, float] = {
    "image": 79.2,
    "image and person box": 84.0,
}
