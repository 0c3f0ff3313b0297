"""Where a new run's model starts: a random init, published or trained weights, or net A's (Sec. 3.1).

``train --weights SOURCE`` takes the architecture, the input convention and the crop of the weights
(any source :func:`verydeep.load` reads), copies every layer whose shape fits the
new net, and leaves the others (FC8 when the number of classes differs) to the random init; with
``--warm-start``, the paper's protocol instead: net A's first four convs and FC6-8 copied into the
net ``--config`` names. ``--freeze`` stops the gradients of the layers up to a named one
(``features``: every convolutional layer); ``--lr-copied`` gives the copied layers a learning rate
of their own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verydeep.data import Preprocess
from verydeep.errors import UserError
from verydeep.io.checkpoint import model_from_recipe
from verydeep.io.sources import LoadedNet, load
from verydeep.io.weights import unnamed_classes
from verydeep.nn import configs
from verydeep.nn.init import REASONS as INIT_REASONS
from verydeep.nn.init import warm_start, whole_layer
from verydeep.nn.model import HEAD_NAMES, VGG, make_trunk
from verydeep.runtime.limits import MAX_SIDE
from verydeep.train.recipe import TrainConfig, flag_of, parse_scale, read_recipe, scale_flag

#: The settings of the architecture that ``--weights`` decide unless ``--warm-start`` says otherwise.
FROM_WEIGHTS = ("config", "width", "batch_norm")


def from_weights(cfg: TrainConfig) -> tuple[str, ...]:
    """What ``--weights`` decide: the whole architecture, or with ``--warm-start`` (the net ``--config``
    names) its width and batch norm, which the copied layers' shapes fix."""
    return FROM_WEIGHTS[1:] if cfg.warm_start else FROM_WEIGHTS


def by_flag(given: Mapping[str, str], name: str) -> bool:
    """Whether the setting ``name`` was given by its flag (not by a recipe or a stored run)."""
    return given.get(name) == flag_of(name)


def refuse_contradictions(cfg: TrainConfig, given: Mapping[str, str], source: dict[str, Any]) -> None:
    """The weights decide the architecture (:func:`from_weights`): a setting given (``given`` maps it to
    where it came from: its flag, a recipe) that says otherwise is a :class:`UserError` naming both."""
    for name in from_weights(cfg):
        if name in given and getattr(cfg, name) != source[name]:
            flag = flag_of(name)
            remedy = f"drop {flag}" if by_flag(given, name) else f"give {flag} {source[name]}"
            advice = (f"with --warm-start the weights still decide it (the layers copied keep theirs): {remedy}"
                      if cfg.warm_start else "the architecture comes from the weights; to copy net A's layers into "
                      f"another configuration give --warm-start (Sec. 3.1), else {remedy}")
            raise UserError(f"{given[name]} {getattr(cfg, name)} contradicts --weights {cfg.weights} ({name} "
                            f"{source[name]}): {advice}")
    if cfg.warm_start:
        refuse_other_warm_start(cfg, source)


def refuse_other_warm_start(cfg: TrainConfig, source: dict[str, Any]) -> None:
    """``--warm-start`` is Sec. 3.1's start of a deeper net from net A: weights of another net, or of the
    configuration being trained (whose layers plain ``--weights`` copies all), are a :class:`UserError`."""
    theirs, ours = configs.canonical(source["config"]), configs.canonical(cfg.config)
    if not theirs.startswith("A"):
        raise UserError(f"--warm-start copies net A's first four convs and FC layers (Sec. 3.1); --weights "
                        f"{cfg.weights} are net {theirs}: give net A's weights, or drop --warm-start")
    if theirs == ours:
        raise UserError(f"--warm-start copies net A's layers into a deeper net; --config {ours} is the net of "
                        f"--weights {cfg.weights}: drop --warm-start (every layer that fits is copied)")


def checked_settings(cfg: TrainConfig, given: Mapping[str, str]) -> tuple[TrainConfig, LoadedNet | None]:
    """A new run's settings checked and those ``--weights`` decide taken (:func:`adopt_weights`): each option
    alone before any file is read, then all of them together, the crop the weights may decide among them."""
    with named_by_origin(given):
        cfg.check_each()
    refuse_recipe_scale_of_another_crop(cfg, given)
    adopted, published = adopt_weights(cfg, given)
    adopted = scale_for_crop(adopted, given, published.recipe if published else None)
    with named_by_origin(given):
        adopted.check()
        _, trunk = make_trunk(adopted.config, adopted.batch_norm, width=1 / 64)  # the names alone: a small trunk
        refuse_unknown_layer(adopted.freeze, [*trunk, *HEAD_NAMES], f"VGG-{adopted.config}")
    return adopted, published


def scale_for_crop(cfg: TrainConfig, given: Mapping[str, str], source: dict[str, Any] | None) -> TrainConfig:
    """The default training scale, S = 256, belongs to the default 224 crop (Sec. 3.1): a new run with another crop
    and no scale given, nor brought by its weights (``source``: their recipe; :func:`input_size` brings theirs with
    their crop), takes it scaled with the crop as the ``reproduce`` presets do (36 for crops of 32), not crops of an
    eighth of the image."""
    brought = source is not None and bool(source.get("scale")) and cfg.crop == source.get("crop")
    if cfg.resume or "scale" in given or cfg.crop == TrainConfig.crop or brought:
        return cfg
    side = min(math.floor(TrainConfig.scale[0] * cfg.crop / TrainConfig.crop), MAX_SIDE)
    return replace(cfg, scale=(side, side))


def refuse_recipe_scale_of_another_crop(cfg: TrainConfig, given: Mapping[str, str]) -> None:
    """A recipe that states a crop and a training scale S (256 to 224) gives S for that crop: with another
    ``--crop`` and no ``--scale`` it is a :class:`UserError`, not a run rescaling to S for crops it was never
    meant for."""
    if cfg.resume or not cfg.recipe or not by_flag(given, "crop") or "scale" not in given or by_flag(given, "scale"):
        return
    crop = read_recipe(cfg.recipe).get("crop")
    if crop is not None and crop != cfg.crop:
        raise UserError(f"--recipe {cfg.recipe}'s scale {scale_flag(cfg.scale)} is for crops of {crop}, not "
                        f"--crop {cfg.crop}: give --scale for crops of {cfg.crop} too")


@contextmanager
def named_by_origin(given: Mapping[str, str]) -> Iterator[None]:
    """A :class:`UserError` of the settings' checks, which name each setting by its flag, naming those a recipe
    or the stored run gave by where they came from (``--recipe r.toml's patience``)."""
    try:
        yield
    except UserError as error:
        message = str(error)
        for name, origin in given.items():
            if origin != flag_of(name):
                flag = rf"(?<![\w-]){re.escape(flag_of(name))}(?![\w-])"
                message = re.sub(flag, lambda _, text=origin: text, message)
        raise UserError(message) from None


def adopt_weights(cfg: TrainConfig, given: Mapping[str, str]) -> tuple[TrainConfig, LoadedNet | None]:
    """A new run from ``--weights`` takes their architecture and input convention (the settings ``given``
    that contradict them refused); their tensors are copied by :func:`initial_model`."""
    if not cfg.weights or cfg.resume:
        return cfg, None
    published = load(cfg.weights, cfg.weights_dir)
    source = published.recipe
    refuse_contradictions(cfg, given, source)
    convention = Preprocess.from_dict(source["preprocess"]) if source.get("preprocess") else None
    refuse_other_convention(cfg, convention)
    architecture = {name: source[name] for name in from_weights(cfg)}
    return replace(cfg, **architecture, **input_size(cfg, given, source),
                   preprocess=cfg.preprocess or convention), published


def refuse_other_convention(cfg: TrainConfig, convention: Preprocess | None) -> None:
    """``--preprocess`` may give the statistics a net from ``--weights`` is fine-tuned with, not another channel
    order or value scale than the weights take (Caffe's BGR on 0..255): a :class:`UserError` naming both."""
    given = cfg.preprocess
    if given is None or convention is None:
        return
    if (given.channels, given.value_scale) != (convention.channels, convention.value_scale):
        raise UserError(f"--preprocess gives {given.channels} input on 0..{given.value_scale:g}, but --weights "
                        f"{cfg.weights} take {convention.channels} on 0..{convention.value_scale:g}: drop "
                        "--preprocess (the weights' convention is used), or give statistics in theirs")


def input_size(cfg: TrainConfig, given: Mapping[str, str], source: dict[str, Any]) -> dict[str, Any]:
    """The crop of the weights unless ``--crop`` is given (FC6 sees its (crop/32)^2 map), and with another
    crop than the default 224 their training scales unless ``--scale`` is given: the default S of 256
    belongs to the 224 crop, a net of 32-pixel crops was trained at its own (the cifar10 recipe's 36:73).
    A recipe's crop other than the weights' is a :class:`UserError`: FC6 would start anew unasked."""
    brings_scale = source.get("scale") and source.get("crop") != TrainConfig.crop and not by_flag(given, "scale")
    own_scale = f" --scale {scale_flag(parse_scale(source['scale']))}" if brings_scale else ""
    if "crop" in given and not by_flag(given, "crop") and source.get("crop") and cfg.crop != source["crop"]:
        raise UserError(f"{given['crop']} {cfg.crop} is not the crop of --weights {cfg.weights} ({source['crop']}), "
                        f"so FC6 would not be copied: give --crop {source['crop']}{own_scale} to keep it (the weights' "
                        f"crop{' and training scale' if own_scale else ''}), or --crop {cfg.crop} to train FC6 anew")
    if not source.get("crop") or ("crop" in given and cfg.crop != source["crop"]):
        return {}
    crop = source["crop"]  # the weights', or --crop restating it
    inherit_scale = crop != TrainConfig.crop and "scale" not in given and source.get("scale")
    return ({} if "crop" in given else {"crop": crop}) | (
        {"scale": parse_scale(source["scale"])} if inherit_scale else {})



def same_classes(source: dict[str, Any], classes: list[str]) -> bool:
    """Whether a net of recipe ``source`` predicts ``classes`` in this order: its named classes are
    these, or it names none (``0``, ``1``, ...) and has as many."""
    theirs = [str(c) for c in source.get("classes") or []]
    return theirs == list(classes) or (unnamed_classes(source) and len(theirs) == len(classes))


def initial_model(cfg: TrainConfig, record: dict[str, Any], published: LoadedNet | None,
                  warn: Callable[[str], None], given: Mapping[str, str]) -> tuple[VGG, str, dict[str, Any] | None]:
    """A new run's net as ``record`` describes it, initialised by ``cfg.init`` and then from the weights
    (:func:`from_published`, :func:`warm_started`); how it started, in words; the run record's ``start``.
    An init or learning rate ``given`` for new layers when every layer is copied is a :class:`UserError`."""
    if published is None:
        return model_from_recipe(record, init=cfg.init), f"{cfg.init} init", None
    if cfg.warm_start:
        return warm_started(cfg, record, published, warn)
    model, how, start = from_published(cfg, record, published, warn)
    if len(start["copied"]) == len(list(model.parameters())):
        refuse_settings_for_new_layers(cfg, given)
    return model, how, start


def start_record(init: str, start: dict[str, Any], copied: Collection[str], model: nn.Module) -> dict[str, Any]:
    """The run record's ``start`` and the ``init_reason`` it leaves (``copied``: the tensors copied, checked): the
    init's reason for the layers not copied from the weights, or none when every tensor was."""
    if len(copied) == len(list(model.parameters())):
        return {"start": start, "init_reason": "every tensor copied from the weights (start): none initialised"}
    return {"start": start, "init_reason": f"{INIT_REASONS[init]} (the layers not copied from the weights)"}


def refuse_settings_for_new_layers(cfg: TrainConfig, given: Mapping[str, str]) -> None:
    """Every layer copied from ``--weights``: an init given would initialise nothing, and beside ``--lr-copied``
    no layer would learn at ``--lr`` (which the log would report); each is a :class:`UserError`."""
    if "init" in given:
        raise UserError(f"{given['init']} {cfg.init}: every layer is copied from --weights "
                        f"{cfg.weights}, so none is initialised; drop it")
    if cfg.lr_copied is not None:
        raise UserError(f"--lr-copied {cfg.lr_copied:g}: every layer is copied from --weights {cfg.weights}, so none "
                        "learns at --lr; give their learning rate as --lr instead")


def from_published(cfg: TrainConfig, record: dict[str, Any], published: LoadedNet,
                   warn: Callable[[str], None]) -> tuple[VGG, str, dict[str, Any]]:
    """The new net with every tensor of ``--weights`` that fits copied (:func:`copy_matching`)."""
    model = model_from_recipe(record, init=cfg.init)
    source = published.model.state_dict()
    if not published.has_fc_layers:  # a file without FC layers (Keras' notop kind): its conv layers only
        source = {name: value for name, value in source.items() if name.startswith("features.")}
    if not same_outputs(published.recipe, record):  # FC8's rows say something else
        fc8 = f"{model.tap_names['fc8']}."  # (Appendix A: a box regressor's last layer starts random)
        source = {name: value for name, value in source.items() if not name.startswith(fc8)}
    copied, new = copy_matching(model, source)
    tap_of = {module: tap for tap, module in model.tap_names.items()}
    layers = sorted({tap_of.get(prefix, prefix) for prefix in (name.rsplit(".", 1)[0] for name in new)},
                    key=lambda tap: list(model.tap_names).index(tap) if tap in model.tap_names else 0)
    if layers:
        warn(f"{cfg.weights}: not copied (not in the file, another shape, other classes or another task), "
             f"{cfg.init} init: {', '.join(layers)}")
    how = f"{published.format} weights {cfg.weights}: {len(copied)} tensors copied"
    return model, how, {"weights": str(cfg.weights), "format": published.format, "source": published.source,
                        "copied": copied}


def same_outputs(source: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether FC8 of a net of recipe ``source`` gives the outputs of the run of ``record``: the same task's, for
    the same classes in the same order (:func:`same_classes`)."""
    same_task = source.get("task", "classification") == record.get("task", "classification")
    return same_task and same_classes(source, record["classes"])


def warm_started(cfg: TrainConfig, record: dict[str, Any], published: LoadedNet, warn: Callable[[str], None]
                 ) -> tuple[VGG, str, dict[str, Any]]:
    """Sec. 3.1: the new net of ``--config``, net A's first four convs (with their batch norm) and FC6-8 copied
    from ``--weights``, FC8 only where it scores the same classes; the rest from the random init."""
    model = model_from_recipe(record, init=cfg.init)
    fc8 = same_outputs(published.recipe, record)
    if not fc8:
        warn(f"{cfg.weights}: not copied (other classes or another task), {cfg.init} init: fc8")
    layers = warm_start(model, published.model, fc8=fc8)
    tensors = {id(tensor) for layer in layers for tensor in whole_layer(model, layer).values()}
    copied = [name for name, parameter in model.named_parameters() if id(parameter) in tensors]
    how = f"warm start from {cfg.weights} ({', '.join(layers)}), the rest {cfg.init} init"
    return model, how, {"weights": str(cfg.weights), "format": published.format, "source": published.source,
                        "warm_start": layers, "copied": copied}


def copy_matching(model: nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy into ``model`` every layer whose tensors ``weights`` all hold, by name and shape: a layer is
    copied whole or not at all (never FC6's bias without its weight). Returns the names of the
    parameters copied and of those left as initialised."""
    state = model.state_dict()
    layers: dict[str, list[str]] = {}
    for name in state:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    fits = {name: weights[name] for names in layers.values()
            if all(n in weights and weights[n].shape == state[n].shape for n in names) for name in names}
    model.load_state_dict(fits, strict=False)
    parameters = [name for name, _ in model.named_parameters()]
    return [name for name in parameters if name in fits], [name for name in parameters if name not in fits]


def frozen_modules(model: VGG, upto: str) -> list[str]:
    """The module prefixes (``features.0`` ...) of the layers up to and including ``upto``: a layer
    name of ``model.tap_names`` (``conv4_3``, ``fc6``), or ``features`` for every convolutional layer."""
    taps = list(model.tap_names.items())
    names = [name for name, _ in taps]
    if upto == "features":
        last = max(i for i, (_, module) in enumerate(taps) if module.startswith("features."))
    elif upto in model.tap_names:
        last = names.index(upto)
        if upto.startswith("conv") and f"bn{upto[4:]}" in names:  # a conv's batch norm belongs to its layer
            last = names.index(f"bn{upto[4:]}")
    else:
        refuse_unknown_layer(upto, names, model.name)
    return [module for _, module in taps[: last + 1]]


def refuse_unknown_layer(upto: str | None, names: Sequence[str], net: str) -> None:
    """``--freeze``'s layer that is not ``features`` nor among the tap ``names`` of the net ``net`` is a
    :class:`UserError` listing its layers."""
    if upto is not None and upto != "features" and upto not in names:
        known = ", ".join(name for name in names if name.startswith(("conv", "fc")))
        raise UserError(f"--freeze {upto}: not a layer of {net} (features, or one of {known})")


def freeze(model: VGG, upto: str | None, copied: Collection[str] = ()) -> list[str]:
    """Stop the gradients of the layers up to ``upto`` (None: none) and hold their batch norms in eval
    mode (their running statistics unchanged by training); returns the frozen parameters' names.
    Freezing every layer leaves nothing to train, freezing one not ``copied`` from ``--weights`` keeps it
    random for good: each a :class:`UserError`."""
    if upto is None:
        return []
    modules = frozen_modules(model, upto)
    prefixes = tuple(f"{module}." for module in modules)
    frozen = [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
    if len(frozen) == len(list(model.parameters())):
        raise UserError(f"--freeze {upto} freezes every layer of {model.name}: nothing would be trained; freeze "
                        "fewer (features, or a layer before fc8)")
    kept = set(copied)
    random = [name.rsplit(".", 1)[0] for name in frozen if name not in kept]
    if random:
        tap = {module: name for name, module in model.tap_names.items()}.get(random[0], random[0])
        raise UserError(f"--freeze {upto} would freeze {tap}, which is not copied from --weights: it would stay at "
                        "its random init; freeze only layers copied from --weights")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen and parameter.requires_grad)
    model.frozen_norms = [m for m in modules if isinstance(model.get_submodule(m), nn.modules.batchnorm._BatchNorm)]
    model.train(model.training)
    return frozen


def copied_tensors(start: Any, record: str | Path) -> list[str]:
    """The names of the tensors a run copied from its ``--weights``, from its ``record``'s ``start`` (None: a run
    from scratch); they make the ``--lr-copied`` group and what ``--freeze`` holds. An entry of another form (an
    edited record) is a :class:`UserError` naming the file."""
    if start is None:
        return []
    copied = start.get("copied") if isinstance(start, dict) else None
    if not (isinstance(copied, list) and all(isinstance(name, str) for name in copied)):
        raise UserError(f"{record}: start must hold 'copied', the names of the tensors copied from the weights; "
                        f"got {str(start)[:80]}")
    return copied


def param_groups(model: nn.Module, copied: list[str], lr: float, lr_copied: float | None) -> list[dict[str, Any]]:
    """SGD parameter groups: the copied layers at ``lr_copied`` (when given), the others at ``lr``;
    frozen parameters are left out. Each group keeps its ``lr_ratio`` to the run's learning rate,
    which the schedule divides."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if lr_copied is None:
        return [{"params": [p for _, p in trainable], "lr": lr, "lr_ratio": 1.0}]
    copied_set = set(copied)
    groups = [
        {"params": [p for name, p in trainable if name in copied_set], "lr": lr_copied, "lr_ratio": lr_copied / lr},
        {"params": [p for name, p in trainable if name not in copied_set], "lr": lr, "lr_ratio": 1.0},
    ]
    return [group for group in groups if group["params"]]
