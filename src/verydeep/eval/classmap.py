"""The data's classes among a net's outputs: evaluating a 1000-class ImageNet net on a dataset whose
class folders are some of its synsets (Imagenette's ten, say).

Each class of the data is found among the net's classes by its synset id, else by its readable
name. By default the net is scored over its full softmax, as on ILSVRC (Sec. 4): a prediction of a
class the data does not hold is wrong. ``over_data_classes`` scores it over the data's classes
only (the net's posteriors of those, renormalised), the usual figure for a subset benchmark.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verydeep.errors import UserError
from verydeep.io.weights import unnamed_classes


@dataclass(frozen=True)
class ClassMap:
    """Per class of the data, the index of its output in the nets (``columns``, in the first net's order), the nets'
    number of outputs, whether scoring is over the data's classes only, and per net the order that puts its
    outputs in the first net's."""

    columns: tuple[int, ...]
    net_classes: int
    over_data_classes: bool = False
    orders: tuple[tuple[int, ...] | None, ...] = (None,)  # per net, its outputs of the first net's classes

    @property
    def identity(self) -> bool:
        """The nets predict exactly the data's classes, in its order."""
        return self.columns == tuple(range(self.net_classes))

    @property
    def scored_classes(self) -> int:
        """How many classes the posteriors being scored have."""
        return len(self.columns) if self.over_data_classes else self.net_classes

    def targets(self, targets: Tensor) -> Tensor:
        """The data's labels as indices of the scored posteriors."""
        if self.identity or self.over_data_classes:
            return targets
        return torch.tensor(self.columns, dtype=torch.long)[targets]

    def posteriors(self, posteriors: Tensor, net: int = 0) -> Tensor:
        """Net ``net``'s posteriors (N, net classes) as scored, in the first net's class order: all of them, or
        the data's classes renormalised."""
        order = self.orders[net]
        if order is not None:
            posteriors = posteriors[:, list(order)]
        if self.identity or not self.over_data_classes:
            return posteriors
        kept = posteriors[:, list(self.columns)]
        return kept / kept.sum(dim=1, keepdim=True).clamp(min=torch.finfo(kept.dtype).tiny)

    def describe(self) -> str:
        """How the evaluation scores, in words for the report (and why top-5 error is 0 over 5 classes or fewer)."""
        trivial = f"; top-5 error is 0 over {self.scored_classes} classes" if self.scored_classes <= 5 else ""
        return self._over() + trivial

    def _over(self) -> str:
        if self.identity:
            return f"over the {self.net_classes} classes of the net and the data"
        if sorted(self.columns) == list(range(self.net_classes)):
            return f"over the {self.net_classes} classes of the net and the data (the net's in another order)"
        if self.over_data_classes:
            return f"over the data's {len(self.columns)} classes (the net's posteriors of them, renormalised)"
        return f"over the net's full softmax of {self.net_classes} classes (the data holds {len(self.columns)})"


def columns_of(net_classes: Sequence[str], net_names: Sequence[str], classes: Sequence[str], names: Sequence[str],
               source: str, roles: tuple[str, str] = ("the data's", "the net's")) -> tuple[int, ...]:
    """Per data class, its index among the net's: by synset id, else by readable name (:func:`named_as`);
    ``roles`` names the two lists in errors (whose ``classes``, whose ``net_classes``)."""
    ours, theirs = roles
    by_id = {c: i for i, c in enumerate(net_classes)}
    named = named_as(net_names)
    columns = []
    for cls, name in zip(classes, names, strict=True):
        hits = [by_id[cls]] if cls in by_id else named(str(name))
        if len(hits) > 1:
            raise UserError(f"{source}: {ours} class {cls} ({name}) is named as {len(hits)} of {theirs} classes "
                            f"({', '.join(str(net_classes[i]) for i in hits)}): name its folder by synset id")
        if not hits:
            raise UserError(f"{source}: {ours} class {cls} ({name}) is not among {theirs} {len(net_classes)} classes")
        columns.append(hits[0])
    if len(set(columns)) != len(columns):
        raise UserError(f"{source}: two of {ours} classes map to the same one of {theirs} classes")
    return tuple(columns)


def named_as(net_names: Sequence[str]) -> Callable[[str], list[int]]:
    """The net's classes a readable name gives: those of exactly that name, else, case aside, those of it
    (ImageNet has "Cardigan", the dog, and "cardigan", the sweater; and two classes named "crane")."""
    exact: dict[str, list[int]] = {}
    folded: dict[str, list[int]] = {}
    for i, net_name in enumerate(net_names):
        exact.setdefault(plain(net_name), []).append(i)
        folded.setdefault(plain(net_name).casefold(), []).append(i)
    return lambda name: exact.get(plain(name)) or folded.get(plain(name).casefold(), [])


def plain(name: object) -> str:
    """A name as names are compared: Unicode's composed form (macOS writes file names decomposed, ``e`` then
    the accent) and single spaces."""
    return " ".join(unicodedata.normalize("NFC", str(name)).split())


def recipe_columns(recipe: dict[str, Any], outputs: int, classes: Sequence[str], names: Sequence[str],
                   source: str | Path) -> tuple[int, ...]:
    """Where the data's ``classes`` (readable ``names``) sit among the ``outputs`` classes a net's ``recipe`` lists
    (a recipe that lists none, or only numbers them as a file of weights without names does, where the data's are
    not those numbers: the data's own, as many as they are, in their order)."""
    listed = recipe.get("classes")
    if listed is None or (unnamed_classes(recipe) and not set(classes) <= set(listed)):
        if outputs != len(classes):
            raise UserError(f"{source}: predicts {outputs} classes; the data has {len(classes)}")
        return tuple(range(outputs))
    if len(listed) != outputs:
        raise UserError(f"{source}: its recipe lists {len(listed)} classes for {outputs} outputs")
    return columns_of(listed, recipe.get("class_names") or listed, classes, names, str(source))


def fusion_orders(nets: Sequence[Any]) -> tuple[tuple[int, ...] | None, ...]:
    """Per net, where the first net's classes sit among its outputs (None: the same list, in the same order): nets
    fused must predict the same classes, matched by synset id or name, in any order."""
    if len(nets) == 1:
        return (None,)
    if any(n.recipe.get("classes") is None for n in nets):
        raise UserError("fusion needs every checkpoint's recipe to list its classes")
    first = nets[0]
    theirs = list(first.recipe["classes"])
    orders: list[tuple[int, ...] | None] = [None]
    for net in nets[1:]:
        ours = list(net.recipe["classes"])
        if ours == theirs:
            orders.append(None)
            continue
        if len(ours) != len(theirs):
            raise UserError(f"the nets to fuse predict different classes: {net.checkpoint} {len(ours)}, "
                            f"{first.checkpoint} {len(theirs)}; fuse nets of the same classes")
        try:
            orders.append(columns_of(ours, net.recipe.get("class_names") or ours, theirs,
                                     first.recipe.get("class_names") or theirs, net.checkpoint))
        except UserError:
            raise UserError(f"the nets to fuse predict different classes: {net.checkpoint}'s are not "
                            f"{first.checkpoint}'s; fuse nets of the same classes") from None
    return tuple(orders)


def class_map(nets: Sequence[Any], classes: Sequence[str], names: Sequence[str],
              over_data_classes: bool = False) -> ClassMap:
    """Where the data's ``classes`` (readable ``names``) sit among the nets' outputs; nets given as objects with
    ``recipe``, ``model`` and ``checkpoint``. Nets fused together predict the same classes, each in its own order
    (:func:`fusion_orders`: their posteriors are put in the first net's). ``over_data_classes`` is refused for
    nets of the data's classes alone, which it would leave as they are."""
    orders, outputs = fusion_orders(nets), nets[0].model.num_classes
    columns = recipe_columns(nets[0].recipe, outputs, classes, names, nets[0].checkpoint)
    if over_data_classes and len(columns) == outputs:
        raise UserError(f"--over-data-classes: the net's {outputs} classes are the data's: there is nothing to "
                        "restrict; drop the flag")
    return ClassMap(columns, outputs, over_data_classes, orders)
