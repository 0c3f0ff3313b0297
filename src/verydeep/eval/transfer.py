"""Linear SVMs on very deep features (Appendix B, Table 11); the ConvNet is never fine-tuned.

The descriptors are :mod:`verydeep.eval.features`' (stored, or extracted on the way). One-vs-rest linear
SVMs (scikit-learn's ``LinearSVC``) are trained on the training part only, their C chosen there by
stratified cross-validation; the test part is scored once.

- ``caltech``: single-label classes. Several random splits, each with ``train_per_class`` training
  images per class and the rest (or ``test_per_class``) tested; the figure is the mean class recall
  (the mean over classes of the fraction of their test images classified correctly), mean and
  standard deviation over the splits (Table 11: 30 a class on Caltech-101, 60 on Caltech-256, three
  splits). A dataset with its own ``train/`` and ``test/`` parts is one given split.
- ``voc``: multi-label images. A binary SVM per class (images whose only instances of the class
  are difficult are left out of that class), its C chosen by average precision; per class the
  average precision of the test part's scores, VOC-2007's 11-point interpolated AP and the area
  under the precision-recall curve with interpolated precision (the VOC devkit's from 2010 on);
  their means over the classes are the two mAPs. Tied scores share a threshold.
- ``voc-action``: VOC-2012 action classification (Table 12), the ``voc`` protocol over persons
  (:mod:`verydeep.eval.box_features`, ``features --regions``): a binary SVM per action, AP per action and
  mAP on the ``val`` part, beside the paper's figures, which are on the test set (scored by VOC's
  evaluation server, whose labels are not public).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verydeep.errors import UserError
from verydeep.eval.box_features import REGIONS
from verydeep.eval.feature_store import Features
from verydeep.eval.features import (
    add_extraction_flags,
    describe,
    features_from_args,
    given_extraction_flags,
    origin,
)
from verydeep.eval.image_sets import open_image_set
from verydeep.io.jsonable import to_json_dict
from verydeep.options import output_file, positive_int, refuse_repeated, seed_number, split_count
from verydeep.paper.figures import TABLE_11, TABLE_12
from verydeep.paper.report import Column, Row, Table, join_markdown, percent

PROTOCOLS = ("caltech", "voc", "voc-action")
#: The C values cross-validation chooses from.
DEFAULT_C = (0.01, 0.1, 1.0, 10.0, 100.0)
#: Cross-validation folds that choose C.
FOLDS = 3
#: Caltech's random splits, and the training images per class in each (Sec. 4.5 / Appendix B: 30 for Caltech-101).
SPLITS, TRAIN_PER_CLASS = 3, 30
#: The kinds of average precision, by the name the results give them.
AP_KINDS = {
    "11point": "VOC-2007's 11-point interpolated average precision",
    "area": "area under the precision-recall curve, precision interpolated (VOC devkit from 2010)",
}


# ---- metrics --------------------------------------------------------------------------------


def class_recalls(predicted: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """Per class, the fraction of its images predicted as it (NaN for a class without images)."""
    recalls = np.full(classes, np.nan)
    for c in np.unique(truth):
        recalls[c] = np.mean(predicted[truth == c] == c)
    return recalls


def precision_recall(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score taken as the threshold, highest first."""
    positives = np.asarray(positives, dtype=bool)
    if not positives.any():
        raise ValueError("average precision needs at least one positive")
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked, hits = np.asarray(scores)[order], positives[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last image of each tie
    true_positives = np.cumsum(hits)[last]
    return true_positives / (last + 1), true_positives / positives.sum()


def average_precision(scores: np.ndarray, positives: np.ndarray, kind: str = "area") -> float:
    """Average precision of ``scores`` against the boolean ``positives``: ``11point`` (VOC-2007, the mean of
    the highest precision at recall >= 0, 0.1, ..., 1) or ``area`` (the area under the precision-recall
    curve, each precision raised to the highest precision at any higher recall, as VOC from 2010)."""
    precision, recall = precision_recall(scores, positives)
    if kind == "11point":
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))
    if kind != "area":
        raise ValueError(f"kind must be one of {', '.join(AP_KINDS)}; got {kind!r}")
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * envelope))


# ---- SVMs -----------------------------------------------------------------------------------


def check_folds(counts: dict[str, int], folds: int | None) -> None:
    """Every group (``counts``: a class, or a class's positives or negatives, and its training images) has a
    training image, and with ``folds`` (None: one C, no cross-validation) one in every fold of stratified
    cross-validation; else a :class:`UserError`."""
    group, smallest = min(counts.items(), key=lambda item: item[1])
    if smallest == 0:
        raise UserError(f"{group}: no training images; the SVMs cannot learn it")
    if folds is None:
        return
    if smallest < 2:
        raise UserError(f"{group}: {smallest} training images; choosing C by cross-validation needs at least 2")
    if folds > smallest:
        raise UserError(f"--folds {folds} is more than the {smallest} training images of {group}: give --folds "
                        f"{smallest} or fewer")


#: scikit-learn's seeds are below 2**32; a larger ``--seed`` (any of torch's) is taken modulo it.
SKLEARN_SEEDS = 2**32


def fit_svm(x: np.ndarray, y: np.ndarray, c_grid: Sequence[float], folds: int, seed: int, scoring: str,
            groups: Sequence[str]) -> tuple[object, float]:
    """A one-vs-rest ``LinearSVC`` on ``(x, y)``, its C chosen from ``c_grid`` by ``folds``-fold stratified
    cross-validation on these images alone, refitted on all; ``groups`` names each label value ``y`` may take
    (all of which need training images, at least ``folds`` each). A grid of one C has nothing to choose: the
    SVM is fitted with it, without cross-validation."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import LinearSVC

    state = seed % SKLEARN_SEEDS
    counts = {name: int(np.sum(y == value)) for value, name in enumerate(groups)}
    check_folds(counts, folds if len(c_grid) > 1 else None)  # one C: no cross-validation
    if len(c_grid) == 1:
        return LinearSVC(C=c_grid[0], max_iter=10_000, random_state=state).fit(x, y), float(c_grid[0])
    cv = StratifiedKFold(folds, shuffle=True, random_state=state)
    search = GridSearchCV(LinearSVC(max_iter=10_000, random_state=state), {"C": list(c_grid)}, scoring=scoring, cv=cv)
    search.fit(x, y)
    return search.best_estimator_, float(search.best_params_["C"])


# ---- caltech --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitResult:
    """One split: its mean class recall, the C chosen, and how many images trained and were tested."""

    mean_class_recall: float
    C: float
    train: int
    test: int


@dataclass
class CaltechResult:
    """Mean class recall over the splits (fractions), its standard deviation (None for one split), per
    class (mean over splits), and each split's figures. Every class is tested in every split."""

    features: str  # how they were made
    classes: list[str]
    class_names: list[str]
    train_per_class: int | None  # None: a given split
    mean_class_recall: float
    mean_class_recall_std: float | None
    per_class_recall: dict[str, float]
    splits: list[SplitResult]
    protocol: str = "caltech"


def caltech_splits(labels: np.ndarray, splits: Sequence[str], classes: Sequence[str], train_per_class: int,
                   test_per_class: int | None, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training, test) indices: the data's own parts when it has them, else ``count`` random splits with
    ``train_per_class`` images of each class to train and the rest (at most ``test_per_class``) to test."""
    if any(splits):
        parts = np.array(splits)
        return [(np.flatnonzero(parts == "train"), np.flatnonzero(parts == "test"))]
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    few = [(classes[c], int(np.sum(labels == c))) for c in present if np.sum(labels == c) <= train_per_class]
    if few:
        raise UserError(f"class {few[0][0]} has {few[0][1]} images; --train-per-class {train_per_class} leaves "
                        "none to test")
    drawn = []
    for _ in range(count):
        train, test = [], []
        for c in present:
            chosen = rng.permutation(np.flatnonzero(labels == c))
            train.append(chosen[:train_per_class])
            test.append(chosen[train_per_class:][:test_per_class])
        drawn.append((np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return drawn


def refuse_repeated_images(features: Features, rows_per_person: bool = False) -> None:
    """An image listed twice (in both parts of a given split, or twice in one) is a :class:`UserError` naming it:
    tested after training on it, or counted twice. ``rows_per_person``: an image's rows are its persons (VOC
    action), several in one part."""
    seen: dict[str, str] = {}
    for path, part in zip(features.paths, features.splits, strict=True):
        if path in seen and not (rows_per_person and seen[path] == part):
            where = f"twice in {part or 'the data'}" if seen[path] == part else f"in both {seen[path]} and {part}"
            raise UserError(f"image {path} is {where}: each image must be listed once")
        seen[path] = part


def refuse_untested_classes(features: Features, test: np.ndarray) -> None:
    """A class without test images (``test``: their indices) is a :class:`UserError` naming it: a mean over
    the classes tested would leave it out."""
    untested = [name for c, name in enumerate(features.classes) if not np.any(features.labels[test] == c)]
    if untested:
        unread = f" ({len(features.skipped)} images could not be read)" if features.skipped else ""
        several = len(untested) > 1
        raise UserError(f"class{'es' if several else ''} {', '.join(untested)} {'have' if several else 'has'} no "
                        f"test images{unread}: the mean class recall would leave {'them' if several else 'it'} out")


def run_caltech(features: Features, train_per_class: int = TRAIN_PER_CLASS, test_per_class: int | None = None,
                splits: int = SPLITS, c_grid: Sequence[float] = DEFAULT_C, folds: int = FOLDS,
                seed: int = 0, source: str = "the features") -> CaltechResult:
    """The ``caltech`` protocol (see the module's description); ``source`` names the features in errors."""
    refuse_other_protocol(features, "caltech", source)
    x, labels, n = features.features, features.labels, len(features.classes)
    if n < 2:
        raise UserError(f"{source}: one class ({features.classes[0]}); the caltech protocol tells classes apart: "
                        "describe images of two or more")
    refuse_repeated_images(features)
    groups = [f"class {name}" for name in features.classes]
    results, recalls = [], []
    for i, (train, test) in enumerate(caltech_splits(labels, features.splits, features.classes, train_per_class,
                                                     test_per_class, splits, seed)):
        refuse_untested_classes(features, test)
        model, c = fit_svm(x[train], labels[train], c_grid, folds, seed + i, "balanced_accuracy", groups)
        recall = class_recalls(model.predict(x[test]), labels[test], n)
        recalls.append(recall)
        results.append(SplitResult(float(np.mean(recall)), c, len(train), len(test)))
    means = [r.mean_class_recall for r in results]
    return CaltechResult(
        origin(features.settings), list(features.classes), list(features.class_names),
        None if any(features.splits) else train_per_class,
        float(np.mean(means)), float(np.std(means, ddof=1)) if len(means) > 1 else None,
        dict(zip(features.classes, map(float, np.mean(recalls, axis=0)), strict=True)), results)


# ---- voc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassAP:
    """One class: its average precision of each kind, the C chosen, and its positive images in the training
    and the test part (difficult-only images left out)."""

    ap: dict[str, float]
    C: float
    train_positives: int
    test_positives: int


@dataclass
class VOCResult:
    """mAP of each kind (:data:`AP_KINDS`, fractions) over all the classes, and per class."""

    features: str  # how they were made
    classes: list[str]
    class_names: list[str]
    map: dict[str, float]
    ap_kinds: dict[str, str]
    per_class_ap: dict[str, ClassAP]
    protocol: str = "voc"


@dataclass(frozen=True)
class ClassScores:
    """One class's SVM on the test part: its decision scores and which are positives, the C chosen, and the
    positives of each part."""

    scores: np.ndarray
    positives: np.ndarray
    C: float
    train_positives: int
    test_positives: int


def class_parts(features: Features, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class ``c``'s training and test images (masks; those labelled 0, ignored, for it left out), and its
    positives (a mask)."""
    parts, y = np.array(features.splits), features.labels[:, c]
    return (parts == "train") & (y != 0), (parts == "test") & (y != 0), y > 0


def class_scores(features: Features, c: int, c_grid: Sequence[float] = DEFAULT_C, folds: int = FOLDS,
                 seed: int = 0) -> ClassScores:
    """Class ``c``'s binary SVM, trained on the training part, its C chosen there by cross-validated average
    precision; its scores of the test part. Images labelled 0 (ignored) for the class take no part."""
    train, test, positive = class_parts(features, c)
    name, x = features.classes[c], features.features
    model, chosen = fit_svm(x[train], positive[train], c_grid, folds, seed, "average_precision",
                            [f"class {name}'s negatives", f"class {name}'s positives"])
    return ClassScores(model.decision_function(x[test]), positive[test], chosen, int(np.sum(positive[train])),
                       int(np.sum(positive[test])))


def check_classes_scored(features: Features, folds: int | None, unit: str, scored: str) -> None:
    """Before any SVM is trained: every class (``unit``: class or action) has positives in both parts, else the
    mAP would leave it out, and enough training positives and negatives for ``folds`` folds; else a
    :class:`UserError` naming the classes (``scored``: the test part's name)."""
    lacking, groups = [], {}
    for c, name in enumerate(features.classes):
        train, test, positive = class_parts(features, c)
        positives = int(np.sum(positive[train])), int(np.sum(positive[test]))
        lacking += [f"{name} ({positives[0]} train, {positives[1]} {scored} positives)"] if min(positives) == 0 else []
        groups |= {f"{unit} {name}'s positives": positives[0],
                   f"{unit} {name}'s negatives": int(np.sum(train & ~positive))}
    if lacking:
        several = len(lacking) > 1
        units = {"class": "classes"}.get(unit, f"{unit}s") if several else unit
        raise UserError(f"{units} {', '.join(lacking)} lack{'' if several else 's'} positives "
                        f"in a part: the mAP would leave {'them' if several else 'it'} out")
    check_folds(groups, folds)


def per_class_ap(features: Features, c_grid: Sequence[float], folds: int, seed: int, unit: str = "class",
                 scored: str = "test") -> tuple[dict[str, float], dict[str, ClassAP]]:
    """Each class's average precisions (:func:`class_scores`) and their means over all the classes."""
    check_classes_scored(features, folds if len(c_grid) > 1 else None, unit, scored)
    per_class = {}
    for c, name in enumerate(features.classes):
        s = class_scores(features, c, c_grid, folds, seed)
        ap = {k: average_precision(s.scores, s.positives, k) for k in AP_KINDS}
        per_class[name] = ClassAP(ap, s.C, s.train_positives, s.test_positives)
    return {k: float(np.mean([r.ap[k] for r in per_class.values()])) for k in AP_KINDS}, per_class


def run_voc(features: Features, c_grid: Sequence[float] = DEFAULT_C, folds: int = FOLDS, seed: int = 0) -> VOCResult:
    """The ``voc`` protocol (see the module's description)."""
    refuse_other_protocol(features, "voc")
    refuse_repeated_images(features)
    means, per_class = per_class_ap(features, c_grid, folds, seed)
    return VOCResult(origin(features.settings), list(features.classes), list(features.class_names), means,
                     dict(AP_KINDS), per_class)


@dataclass
class ActionResult(VOCResult):
    """The ``voc-action`` protocol's result: VOC's, per action, for persons described by ``regions``
    (``image`` or ``image+box``), scored on ``scored_part``."""

    regions: str = "image"
    scored_part: str = "val"
    protocol: str = "voc-action"


def run_voc_action(features: Features, c_grid: Sequence[float] = DEFAULT_C, folds: int = FOLDS,
                   seed: int = 0) -> ActionResult:
    """The ``voc-action`` protocol (see the module's description)."""
    regions = features.settings.get("regions")
    if regions not in REGIONS or not features.multilabel:
        raise UserError("these features are not of VOC action persons; make them with verydeep features --regions "
                        f"{' or '.join(REGIONS)}")
    refuse_repeated_images(features, rows_per_person=True)
    means, per_action = per_class_ap(features, c_grid, folds, seed, "action", ActionResult.scored_part)
    return ActionResult(origin(features.settings), list(features.classes), list(features.class_names), means,
                        dict(AP_KINDS), per_action, regions=regions)


# ---- tables ---------------------------------------------------------------------------------

#: Table 11's rows of the paper, by the configurations whose features were used.
PAPER_ROWS = {("D",): "VGG Net-D (16 layers)", ("E",): "VGG Net-E (19 layers)", ("D", "E"): "VGG Net-D & Net-E"}


def table_11(result: CaltechResult | VOCResult) -> Table:
    """Our figure beside the paper's Table 11 (VOC mAP, Caltech mean class recall, in %)."""
    if isinstance(result, CaltechResult):
        header = "this run: mean class recall %"
        std = result.mean_class_recall_std
        ours = percent(result.mean_class_recall) + ("" if std is None else f" ± {percent(std)}")
    else:
        header = "this run: mAP % (11-point / area)"
        ours = f"{percent(result.map['11point'])} / {percent(result.map['area'])}"
    paper_columns = [Column("paper VOC-2007 mAP", True), Column("paper VOC-2012 mAP", True),
                     Column("paper Caltech-101 (30/class)", True), Column("paper Caltech-256 (60/class)", True)]
    rows = [Row((f"ours: {result.features}", ours))]
    for nets, figures in TABLE_11.items():
        paper = (f"{figures.voc2007_map:.1f}", f"{figures.voc2012_map:.1f}",
                 f"{figures.caltech101_recall.mean:.1f} ± {figures.caltech101_recall.std:.1f}",
                 f"{figures.caltech256_recall.mean:.1f} ± {figures.caltech256_recall.std:.1f}")
        rows.append(Row((f"paper: {PAPER_ROWS[nets]}", ""), paper))
    return Table("Table 11: linear SVMs on very deep features, the ConvNet not fine-tuned",
                 [Column("image features"), Column(header, True)], rows, paper_columns, show_paper=True)


#: Table 12's rows, by the ``--regions`` setting whose features they use.
TABLE_12_ROWS = {"image": "image", "image+box": "image and person box"}


def table_12(result: ActionResult) -> Table:
    """Our mAP beside the paper's Table 12 (VOC-2012 action classification, in %): ours on the val part,
    the paper's on the test set, scored by VOC's evaluation server."""
    rows = []
    for regions, label in TABLE_12_ROWS.items():
        ours = f"{percent(result.map['11point'])} / {percent(result.map['area'])}" if regions == result.regions else ""
        rows.append(Row((label, ours), (f"{TABLE_12[label]:.1f}",)))
    return Table(f"Table 12: VOC-2012 action classification, linear SVMs on very deep features ({result.features})",
                 [Column("features"), Column(f"this run: {result.scored_part} mAP % (11-point / area)", True)], rows,
                 [Column("paper: test mAP % (evaluation server)", True)], show_paper=True)


def tables(result: CaltechResult | VOCResult) -> list[Table]:
    """What ``transfer`` prints: the paper's table (11, or 12 for actions) with ours, then per class."""
    return [table_12(result) if isinstance(result, ActionResult) else table_11(result), per_class_table(result)]


def per_class_table(result: CaltechResult | VOCResult) -> Table:
    """Each class's recall (caltech, mean over splits) or average precisions (voc, voc-action), in %."""
    names = [Column("class"), Column("name")]
    if isinstance(result, CaltechResult):
        rows = [Row((c, name, percent(result.per_class_recall[c])))
                for c, name in zip(result.classes, result.class_names, strict=True)]
        return Table("Per class", [*names, Column("recall %", True)], rows)
    action = isinstance(result, ActionResult)  # its actions are their own names
    rows = []
    for c, name in zip(result.classes, result.class_names, strict=True):
        r = result.per_class_ap[c]
        rows.append(Row((c, *(() if action else (name,)), *(percent(r.ap[k]) for k in AP_KINDS),
                         f"{r.C:g}", str(r.train_positives), str(r.test_positives))))
    scored = result.scored_part if action else "test"
    columns = [*([Column("action")] if action else names), Column("AP % (11-point)", True), Column("AP % (area)", True),
               Column("C", True), Column("train positives", True), Column(f"{scored} positives", True)]
    return Table("Per action" if action else "Per class", columns, rows)


# ---- the command ----------------------------------------------------------------------------


def transfer(features: Features, protocol: str, train_per_class: int = TRAIN_PER_CLASS,
             test_per_class: int | None = None, splits: int = SPLITS, c_grid: Sequence[float] = DEFAULT_C,
             folds: int = FOLDS, seed: int = 0, source: str = "the features") -> CaltechResult | VOCResult:
    """Linear SVMs on ``features`` under ``protocol`` (``caltech``, ``voc`` or ``voc-action``); ``source`` names
    them in errors."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if folds < 2:
        raise UserError(f"--folds must be at least 2; got {folds}")
    if not c_grid or min(c_grid) <= 0:
        raise UserError(f"--c-grid must be positive numbers; got {list(c_grid)}")
    refuse_other_protocol(features, protocol, source)
    if protocol == "voc":
        return run_voc(features, c_grid, folds, seed)
    if protocol == "voc-action":
        return run_voc_action(features, c_grid, folds, seed)
    return run_caltech(features, train_per_class, test_per_class, splits, c_grid, folds, seed, source)


#: What each protocol's features are of, as a refusal says it.
FEATURES_OF = {"caltech": "single-label images", "voc": "multi-label (VOC) images", "voc-action": "VOC action persons"}


def protocol_of(features: Features) -> str:
    """The protocol ``features`` were made for: ``voc-action`` for persons (``--regions``), ``voc`` for images of
    several labels, else ``caltech``."""
    return "voc-action" if "regions" in features.settings else "voc" if features.multilabel else "caltech"


def refuse_other_protocol(features: Features, protocol: str, source: str = "the features") -> None:
    """Features made for another protocol than ``protocol`` are a :class:`UserError` naming ``source`` and the
    protocol they are for."""
    theirs = protocol_of(features)
    if theirs != protocol:
        raise UserError(f"{source}: these features are of {FEATURES_OF[theirs]}; use --protocol {theirs}")


def parse_floats(text: str) -> list[float]:
    """``0.1,1,10`` -> [0.1, 1.0, 10.0], each a positive number."""
    try:
        values = [float(v) for v in text.split(",")]  # an empty entry (0.1,,1) too is refused
    except ValueError:
        values = []
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers such as 0.1,1,10; got {text!r}")
    refuse_repeated(values, text, "a value", "each is tried once")
    return values


def check_regions(args: argparse.Namespace) -> None:
    """``--regions`` only where it takes effect: extracting persons' features for ``voc-action``, which needs it."""
    if args.regions is not None and args.protocol != "voc-action":
        raise UserError(f"--regions describes persons of VOC action data, for --protocol voc-action, not "
                        f"{args.protocol}")
    if args.regions is not None and args.features is not None:
        raise UserError(f"--features {args.features} holds the descriptors already; --regions would make others: "
                        "give one of the two")
    if args.protocol == "voc-action" and args.data is not None and args.regions is None:
        raise UserError("--protocol voc-action with --data: give --regions image or image+box (Table 12's two rows)")


#: The caltech protocol's flags that draw its random splits, and their defaults.
SPLIT_FLAGS = {"train_per_class": TRAIN_PER_CLASS, "test_per_class": None, "splits": SPLITS}


def random_split_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that draw the random splits, which only ``--protocol caltech`` draws."""
    given = [f"--{name.replace('_', '-')}" for name in SPLIT_FLAGS if getattr(args, name) is not None]
    if given and args.protocol != "caltech":
        raise UserError(f"{', '.join(given)} draw the random splits of --protocol caltech, not {args.protocol}")
    return given


def refuse_with_given_split(flags: list[str], source: str, splits: Sequence[str]) -> None:
    """Random-split ``flags`` are refused for images with their own train/test split (``splits``), which
    is used as it is."""
    if flags and any(splits):
        raise UserError(f"{', '.join(flags)}: {source} holds its own training and test images (its split folders), "
                        "used as they are; drop the flags")


def refuse_extraction_beside_features(args: argparse.Namespace) -> None:
    """``--features`` holds the descriptors: the flags that would make others, or say how, are refused beside it."""
    if args.features is None:
        return
    if args.data is not None or args.weights or args.raw_pixels:
        extra = "--data" if args.data is not None else "--weights" if args.weights else "--raw-pixels"
        raise UserError(f"--features {args.features} holds the descriptors already; {extra} would make others: "
                        "give one of the two")
    unused = given_extraction_flags(args) + (["--out"] if args.out is not None else [])
    if unused:
        raise UserError(f"--features {args.features} holds the descriptors already; {', '.join(unused)} "
                        f"{'acts' if len(unused) == 1 else 'act'} only on an extraction (--data): drop "
                        f"{'it' if len(unused) == 1 else 'them'}")


def run_cli(args: argparse.Namespace) -> int:
    refuse_extraction_beside_features(args)
    check_regions(args)
    flags = random_split_flags(args)
    if args.features is not None:
        source = f"--features {args.features}"
        features = Features.load(args.features)
        refuse_with_given_split(flags, source, features.splits)
    elif args.data is not None:
        source = f"--data {args.data}"
        if args.checkpoint_every is not None and args.out is None:  # the work is saved to OUT.partial
            raise UserError(f"--checkpoint-every {args.checkpoint_every} saves the work to OUT.partial: give "
                            "--out OUT.npz, or drop it")
        refuse_with_given_split(flags, source, open_image_set(args.data).splits if flags else [])
        features = features_from_args(args, args.out)
    else:
        raise UserError("give --features FEATURES (from verydeep features), or --data DIR with --weights SOURCE")
    if args.folds is not None and len(args.c_grid) == 1:
        raise UserError(f"--folds {args.folds}: cross-validation chooses C from --c-grid, which holds one value "
                        f"({args.c_grid[0]:g}): drop --folds, or give several C values")
    drawing = {name: default if getattr(args, name) is None else getattr(args, name)
               for name, default in SPLIT_FLAGS.items()}
    result = transfer(features, args.protocol, c_grid=args.c_grid, folds=args.folds or FOLDS, seed=args.seed,
                      source=source, **drawing)
    print(join_markdown(tables(result)))
    print(f"\n{describe(features)}")
    if args.json:
        print(json.dumps(to_json_dict(result)))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("transfer", help="linear SVMs on very deep features: VOC mAP, Caltech mean class "
                              "recall, VOC action mAP (Appendix B, Tables 11 and 12)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=PROTOCOLS, required=True,
                   help="caltech: mean class recall over random splits; voc: AP per class and mAP; voc-action: AP "
                        "per action and mAP over persons (features --regions)")
    p.add_argument("--features", type=Path, default=None, metavar="FEATURES.npz", help="from verydeep features")
    add_extraction_flags(p, data_required=False)
    p.add_argument("--out", type=output_file, default=None, metavar="FEATURES.npz",
                   help="with --data: keep the features extracted here (an interrupted extraction continues)")
    p.add_argument("--train-per-class", type=positive_int, default=None,
                   help=f"caltech: training images per class of each random split (default {TRAIN_PER_CLASS})")
    p.add_argument("--test-per-class", type=positive_int, default=None,
                   help="caltech: at most this many test images per class of each random split (default: the rest)")
    p.add_argument("--splits", type=split_count, default=None, help=f"caltech: random splits (default {SPLITS})")
    p.add_argument("--c-grid", type=parse_floats, default=list(DEFAULT_C),
                   help="SVM C values cross-validation chooses from (default 0.01,0.1,1,10,100)")
    p.add_argument("--folds", type=positive_int, default=None,
                   help=f"cross-validation folds (default {FOLDS}), at most the training images of the smallest class "
                        "(voc: a class's positives or negatives)")
    p.add_argument("--seed", type=seed_number, default=0, help="seed of the random splits and folds")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object, last")
    p.set_defaults(func=run_cli)
