"""Training settings: every option once, recipes, and the run record (Sec. 3.1).

:class:`TrainConfig` is the one place an option is declared: its default (the paper's), its help
text, its command-line group and its bounds live in the field's metadata, and both the ``train``
command's flags (:func:`add_flags`) and :meth:`TrainConfig.check` are generated from them.
Recipes are TOML files of these fields (``verydeep/train/recipes/``: the paper's protocols). A run
directory's ``recipe.json`` is the run record: the settings plus what the data decided (classes,
preprocessing), read and written only here.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import operator
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from verydeep.data import Preprocess
from verydeep.data.preprocess import PREPROCESS_FILE, read_preprocess
from verydeep.errors import MissingFileError, UserError
from verydeep.io.atomic import atomic_write
from verydeep.io.checkpoint import load_checkpoint
from verydeep.io.rundir import RunDir, run_data_folder
from verydeep.nn import configs
from verydeep.nn.init import PROTOCOLS
from verydeep.options import DEVICE_HELP, MAX_SEED, PRECISION_HELP, PRECISIONS, WEIGHTS_HELP, WORKERS_HELP
from verydeep.runtime.limits import MAX_SIDE, check_width, check_workers, whole_number

#: Command-line groups of ``verydeep train --help``, in order.
GROUPS = ("model", "images", "optimisation", "running")


def scale_flag(scale: Sequence[int]) -> str:
    """A training scale as ``--scale`` takes it: ``36`` or ``36:73``."""
    smin, smax = scale
    return str(smin) if smin == smax else f"{smin}:{smax}"


def parse_scale(value: Any) -> tuple[int, int]:
    """``256``, ``"384"``, ``"256:512"`` or ``[256, 512]`` -> ``(Smin, Smax)``."""
    try:
        parts = [whole_number(v) for v in (value if isinstance(value, (list, tuple)) else str(value).split(":"))]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 0 < parts[0] <= parts[1] <= MAX_SIDE:
        raise UserError(f"--scale must be S or Smin:Smax with 0 < Smin <= Smax <= {MAX_SIDE} (e.g. 256 or 256:512); "
                        f"got {value!r}")
    return parts[0], parts[1]


def parse_milestones(value: Any) -> list[int]:
    """``"30,60"`` or ``[30, 60]`` -> ``[30, 60]``, checked by :func:`check_milestones`."""
    try:
        milestones = [whole_number(v) for v in (value if isinstance(value, (list, tuple)) else str(value).split(","))
                      if str(v).strip()]
    except ValueError:
        raise UserError(f"--milestones must be comma-separated epochs (e.g. 30,60); got {value!r}") from None
    return check_milestones(milestones)


def check_milestones(milestones: list[int]) -> list[int]:
    """``milestones`` when they are distinct epochs from 1 on (lr /= 10 once after each), else a
    :class:`UserError` naming ``--milestones``."""
    shown = ",".join(map(str, milestones))
    if any(milestone < 1 for milestone in milestones):
        raise UserError(f"--milestones {shown}: each must be an epoch, from 1 on, after which lr /= 10")
    if len(set(milestones)) < len(milestones):
        raise UserError(f"--milestones {shown}: an epoch is listed twice; lr /= 10 once after each epoch listed")
    return milestones


def parse_preprocess(value: Any) -> Preprocess | None:
    """A ``Preprocess``, its dict (from ``recipe.json``), or a ``preprocess.json`` file or a folder
    holding one (which must exist: a statistics file named by the user is never replaced by ImageNet's)."""
    if value is None or isinstance(value, Preprocess):
        return value
    if isinstance(value, dict):
        return Preprocess.from_dict(value)
    path = Path(value)
    if path.is_dir():
        path = path / PREPROCESS_FILE
    if not path.is_file():
        raise MissingFileError(f"--preprocess {value}: no such statistics file ({PREPROCESS_FILE}, or a folder "
                               "holding one)")
    return read_preprocess(path)


def check_crop(value: int, name: str) -> int:
    """``value`` when it is a crop side the net's five 2x2 poolings divide (a multiple of 32), else a
    :class:`UserError`."""
    if value % 32:
        raise UserError(f"{name} must be a multiple of 32 (five 2x2 poolings); got {value}")
    return value


def check_dropout(value: float, name: str) -> float:
    """``value`` when it is a dropout probability, from 0 up to but not including 1, else a :class:`UserError`."""
    if not 0 <= value < 1:
        raise UserError(f"{name} is the probability of dropping an FC activation: at least 0 and below 1 (1 drops "
                        f"them all); got {value}")
    return value


#: The shape of a layer name ``--freeze`` takes; whether the net has that layer is known once it is built.
LAYER_NAME = re.compile(r"features|conv\d+_\d+|fc[678]")


def check_config(value: str, name: str) -> str:
    """``value`` when it names a configuration of Table 1, else a :class:`UserError` naming ``name``."""
    try:
        return configs.canonical(value)
    except UserError as error:
        raise UserError(f"{name}: {error}") from None


def check_layer_name(value: str, name: str) -> str:
    """``value`` when it is ``features`` or has a layer name's shape (``conv4_3``, ``fc6``), else a
    :class:`UserError` naming ``name`` (a recipe file's setting is then named before any net is built)."""
    if not LAYER_NAME.fullmatch(value):
        raise UserError(f"{name} must be features or a layer name (conv4_3, fc6); got {value!r}")
    return value


def below(bound: float, why: str) -> Callable[[float, str], float]:
    """A :class:`TrainConfig` check: the value must be below ``bound`` (``why`` says what larger would mean)."""
    def check(value: float, name: str) -> float:
        if not value < bound:
            raise UserError(f"{name} must be below {bound:g} ({why}); got {value}")
        return value

    return check


def option(default: Any, help: str, group: str, *, minimum: float | None = None, choices: tuple[str, ...] = (),
           parse: Callable[[Any], Any] | None = None, check: Callable[[Any, str], Any] | None = None,
           resumable: bool = False, show: Callable[[Any], str] = lambda values: ",".join(map(str, values))) -> Any:
    """A :class:`TrainConfig` field: its default, help text, command-line group, lower bound
    (``minimum``), allowed values, the parser of its command-line or file value, a further check of the
    value (``check(value, name)`` raises a :class:`UserError` naming ``name``), whether a resumed run
    may change it (``resumable``; the others must stay what the run was trained with), and how help shows a
    default of several values as the flag takes it (``show``: ``30,60``)."""
    metadata = {"help": help, "group": group, "minimum": minimum, "choices": choices, "parse": parse,
                "check": check, "resumable": resumable, "show": show}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


POSITIVE = 1e-300  # the ``minimum`` of a setting that must be > 0


@dataclass
class TrainConfig:
    """Every training option, defaulting to the paper's (Sec. 3.1)."""

    data: str = option("", "dataset folder with train/ and val/ (or test/) class folders", "images", resumable=True)
    out: str = option("", "run directory (checkpoints, metrics.jsonl, recipe.json, model.safetensors)", "running",
                      resumable=True)
    recipe: str | None = option(None, "a recipe name or TOML file (its settings come before these flags)", "running",
                                resumable=True)
    # model
    config: str = option("A", "configuration of Table 1: A, A-LRN, B, C, D, E", "model", parse=configs.canonical,
                         check=check_config)
    width: float = option(1.0, "width multiplier (1 = the paper's)", "model", minimum=POSITIVE, check=check_width)
    batch_norm: bool = option(False, "batch norm after each conv (not the paper's)", "model")
    dropout: float = option(0.5, "dropout probability on FC6/FC7, in [0, 1)", "model", check=check_dropout)
    init: str = option("he", "random init: he (learns at every depth and width), paper (N(0, 0.01): trains A, the "
                             "deeper nets only from A's weights, Sec. 3.1), xavier/glorot, kaiming", "model",
                       choices=PROTOCOLS)
    weights: str | None = option(None, f"the weights to start from, {WEIGHTS_HELP}: their architecture, input "
                                       "convention and crop (unless --crop is given; a crop other than 224 brings "
                                       "their training scale too, unless --scale is given), every layer that "
                                       "fits copied, FC8 new when the classes differ",
                                 "model")
    warm_start: bool = option(False, "with --weights of another configuration (net A's run), build the net --config "
                                     "names and copy A's first four convs and FC6-8 into it, the rest random "
                                     "(Sec. 3.1)", "model")
    weights_dir: str | None = option(None, "where named weights are looked for (default $VERYDEEP_WEIGHTS_DIR, "
                                           "else ~/.cache/verydeep)", "model",
                                     resumable=True)
    freeze: str | None = option(None, "freeze the layers up to this one: features (every conv layer) or a layer "
                                      "name (conv4_3, fc6)", "model", check=check_layer_name)
    # images
    crop: int = option(224, "crop size, a multiple of 32 (224; 32 for CIFAR-10)", "images", minimum=1,
                       check=check_crop)
    scale: tuple[int, int] = option((256, 256), "training scale S (256, 384) or jittered Smin:Smax (256:512); "
                                                "for another --crop, 256 scaled with it (36 for 32)",
                                    "images", parse=parse_scale, show=scale_flag)
    alpha_std: float = option(0.1, "std of the PCA colour shift's alphas (0 = off)", "images", minimum=0,
                              check=below(1.0, "AlexNet's 0.1 weighs each eigenvalue by a tenth"))
    preprocess: Preprocess | None = option(None, "preprocess.json with mean/std/eigen (default: --weights' own, "
                                                 "else beside --data, else ImageNet's)", "images",
                                           parse=parse_preprocess)
    limit_train: int | None = option(None, "train on at most this many images, a class-balanced subset", "images",
                                     minimum=1, parse=int)
    limit_val: int | None = option(None, "validate on at most this many images, a class-balanced subset", "images",
                                   minimum=1, parse=int)
    val_split: int | None = option(None, "validate on this many training images, held out class-balanced (chosen "
                                         "by --seed) and not trained on, instead of val/: the test images then "
                                         "decide nothing", "images", minimum=1, parse=int)
    # optimisation
    lr: float = option(1e-2, "initial learning rate", "optimisation", minimum=POSITIVE)
    lr_copied: float | None = option(None, "initial learning rate of the layers copied from --weights (default "
                                           "--lr)", "optimisation", minimum=POSITIVE, parse=float)
    momentum: float = option(0.9, "SGD momentum", "optimisation", minimum=0,
                             check=below(1.0, "at 1 or more the velocity never decays and training diverges"))
    weight_decay: float = option(5e-4, "L2 weight decay", "optimisation", minimum=0,
                                 check=below(1.0, "the paper's is 5e-4; a decay of 1 or more outweighs the loss"))
    batch_size: int = option(256, "global batch size over all processes", "optimisation", minimum=1)
    micro_batch: int | None = option(None, "images per forward pass per process (gradient accumulation), at most "
                                           "the batch per process", "optimisation", minimum=1, parse=int,
                                     resumable=True)
    epochs: int = option(74, "epoch budget", "optimisation", minimum=1, resumable=True)
    patience: int = option(2, "validations without improvement before lr /= 10", "optimisation", minimum=1,
                           resumable=True)
    max_drops: int = option(3, "lr divisions before a plateau stops training", "optimisation", minimum=0,
                            resumable=True)
    milestones: list[int] = option([], "comma-separated distinct epochs, 1 to --epochs, after which lr /= 10, "
                                       "instead of the plateau rule (--patience, --max-drops)", "optimisation",
                                   parse=parse_milestones, resumable=True)
    stop_patience: int | None = option(None, "stop when validation has not improved for N validations, whatever "
                                              "the lr (--epochs becomes an upper bound)", "optimisation", minimum=1,
                                       parse=int, resumable=True)
    seed: int = option(0, "seed of init, data order and augmentation", "optimisation", minimum=0,
                       check=below(MAX_SEED + 1, "torch's seeds are 64-bit"))
    # running
    workers: int | None = option(None, f"per training process, {WORKERS_HELP}", "running", minimum=0, parse=int,
                                 check=check_workers, resumable=True)
    device: str = option("auto", DEVICE_HELP, "running", resumable=True)
    decode: str = option("auto", "where JPEGs are decoded: auto (the GPU when training on CUDA), cpu, gpu",
                         "running", choices=("auto", "cpu", "gpu"), resumable=True)
    precision: str = option("auto", PRECISION_HELP, "running", choices=PRECISIONS, resumable=True)
    channels_last: bool = option(True, "channels_last memory format", "running", resumable=True)
    compile: bool = option(False, "torch.compile the model", "running", resumable=True)
    val_every: int = option(1, "validate every N epochs", "running", minimum=1, resumable=True)
    checkpoint_every: int = option(0, "also write checkpoints/last.pt every N steps (0: epoch ends only)",
                                   "running", minimum=0, resumable=True)
    keep_last: int = option(3, "epoch checkpoints to keep", "running", minimum=0, resumable=True)
    progress: bool = option(True, "progress bars", "running", resumable=True)
    tensorboard: bool = option(False, "also log the metrics as TensorBoard scalars in --out's tensorboard/ "
                                      "(pip install 'verydeep[tensorboard]')", "running", resumable=True)
    overwrite: bool = option(False, "start anew in an --out that holds a run (its checkpoints and logs are deleted)",
                             "running", resumable=True)
    resume: bool = option(False, "continue the run in --out from checkpoints/last.pt (its recipe.json supplies "
                                 "the settings)", "running", resumable=True)
    stop_after_steps: int | None = option(None, "leave after N steps without a final checkpoint (a simulated "
                                                "crash)", "running", minimum=1, parse=int, resumable=True)

    def __post_init__(self) -> None:
        """A value of a structured field (``scale``, ``milestones``, ``preprocess``) given as its flag gives it
        (``"256:512"``, ``"30,60"``, a file) is parsed as the flag's, a bad one a :class:`UserError`; a text the
        flag's parser names (``config="vgg16"``) is stored as the flag stores it, and a numpy number as
        a plain one, which the run record can hold."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type.removesuffix(" | None")
            if structured(f) and value is not None or kind == "str" and f.metadata["parse"] and isinstance(value, str):
                setattr(self, f.name, parsed(f, value))
            elif kind == "int" and isinstance(value, numbers.Integral) and type(value) not in (bool, int):
                setattr(self, f.name, operator.index(value))
            elif kind == "float" and isinstance(value, numbers.Real) and type(value) not in (bool, int, float):
                setattr(self, f.name, float(value))  # numpy's float64 too, a float that torch.save pickles

    def check_each(self) -> None:
        """Raise :class:`UserError` naming the first option that is bad on its own (type, bounds, choices)."""
        for f in fields(self):
            check_field(f, getattr(self, f.name), flag_name(f))

    def check(self) -> None:
        """Raise :class:`UserError` naming the first bad option, alone or beside the others."""
        self.check_each()
        if not self.out:  # first: a resumed run's --data comes from the run in --out
            raise UserError("--out (the run directory) is required")
        if not self.data:
            raise UserError("--data is required")
        smin, smax = self.scale
        if not self.crop <= smin <= smax:
            raise UserError(f"--scale needs crop <= Smin <= Smax; got scale {smin}:{smax} with crop {self.crop}")
        if self.warm_start and not self.weights:
            raise UserError("--warm-start copies the layers of --weights: give --weights (net A's run)")
        if self.weights_dir is not None and not self.weights:
            raise UserError(f"--weights-dir {self.weights_dir} is where named --weights are looked for: give --weights")
        if self.lr_copied is not None and not self.weights:
            raise UserError("--lr-copied is the learning rate of the layers copied from --weights: give --weights")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other: continue the run, or start it anew")
        if self.val_split is not None and self.limit_val is not None:
            raise UserError(f"--limit-val {self.limit_val} and --val-split {self.val_split}: the split is the "
                            "validation set, its size is --val-split; give one")
        if self.micro_batch is not None and self.micro_batch > self.batch_size:
            raise UserError(f"--micro-batch {self.micro_batch} is larger than --batch-size {self.batch_size}: a "
                            "micro-batch is a part of a step's batch")
        self.check_schedule()
        self.check_validations()

    def validations(self) -> int:
        """How many times the run validates: every ``val_every`` epochs, and after the last."""
        return -(-self.epochs // self.val_every)

    def check_validations(self) -> None:
        """Raise :class:`UserError` when ``--val-every`` or ``--stop-patience`` could not act in ``--epochs``: the
        last epoch is validated whatever ``--val-every`` says, and a stop needs that many validations after
        the best."""
        if self.val_every > self.epochs:
            raise UserError(f"--val-every {self.val_every} is beyond --epochs {self.epochs}: the last epoch is "
                            "validated anyway, so it would change nothing; drop it or raise --epochs")
        validations = self.validations()
        if self.stop_patience is not None and self.stop_patience >= validations:
            raise UserError(f"--stop-patience {self.stop_patience}: the run validates {validations} time(s) (--epochs "
                            f"{self.epochs}, --val-every {self.val_every}), so it could never stop early; lower it "
                            "or raise --epochs")

    def check_schedule(self) -> None:
        """Raise :class:`UserError` when ``--milestones`` are not distinct epochs of the run, or come with
        the plateau rule's settings, which they replace (Sec. 3.1)."""
        check_milestones(self.milestones)  # a Python caller's list was not parsed
        shown = ",".join(map(str, self.milestones))
        late = [milestone for milestone in self.milestones if milestone > self.epochs]
        if late:
            raise UserError(f"--milestones {shown}: epoch {late[0]} is after the last, --epochs {self.epochs}, so "
                            "its lr /= 10 would never happen; drop it or raise --epochs")
        plateau = {"--patience": (self.patience, TrainConfig.patience),
                   "--max-drops": (self.max_drops, TrainConfig.max_drops)}
        refuse_ignored_plateau(self.milestones,
                               [f"{flag} {value}" for flag, (value, default) in plateau.items() if value != default])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (paths as strings, the preprocessing as its dict)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(data=str(self.data), out=str(self.out), scale=list(self.scale), milestones=list(self.milestones))
        out["preprocess"] = self.preprocess.to_dict() if self.preprocess is not None else None
        return out


def changed_settings(cfg: TrainConfig) -> set[str]:
    """The settings of ``cfg`` that differ from their defaults (what a Python caller gave)."""
    default = TrainConfig()
    return {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def flag_name(f: Field) -> str:
    return flag_of(f.name)


def flag_of(name: str) -> str:
    """The flag of the setting ``name``: ``--stop-patience`` for ``stop_patience``."""
    return "--" + name.replace("_", "-")


#: The values a field of each declared type takes, and how an error says so (types with a parser are its).
KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str, os.PathLike), "text"), "bool": ((bool,), "true or false"),
    "int": ((numbers.Integral,), "a whole number"), "float": ((numbers.Real,), "a number"),
}


def check_field(f: Field, value: Any, name: str) -> None:
    """Raise a :class:`UserError` naming ``name`` when ``value`` is not of ``f``'s type, or outside its
    bounds, choices or check; None passes where the field allows it."""
    if value is None and f.type.endswith("| None"):
        return
    kinds, described = KINDS.get(f.type.removesuffix(" | None"), ((object,), ""))
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise UserError(f"{name} must be {described}; got {value!r}")
    meta = f.metadata
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        return
    if meta["minimum"] is not None and not value >= meta["minimum"]:  # `not >=` also catches NaN
        bound = "positive" if meta["minimum"] == POSITIVE else f"at least {meta['minimum']:g}"
        raise UserError(f"{name} must be {bound}; got {value}")
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{name} must be one of {', '.join(meta['choices'])}; got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be finite; got {value}")
    if meta["check"] is not None:
        meta["check"](value, name)


def make_config(settings: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from plain values (recipe file, ``recipe.json``, command line), each parsed by its
    field's parser; keys that are not settings are ignored."""
    known = {f.name: f for f in fields(TrainConfig)}
    values = {}
    for key, value in settings.items():
        if key in known:  # a structured field is parsed by TrainConfig itself
            f = known[key]
            values[key] = parsed(f, value) if f.metadata["parse"] and not structured(f) and value is not None \
                else value
    return TrainConfig(**values)


def structured(f: Field) -> bool:
    """Whether the field holds a value of its own type (a scale, milestones, a preprocess), which its
    parser makes from the flag's text."""
    return f.type.removesuffix(" | None") not in KINDS and f.metadata["parse"] is not None


def parsed(f: Field, value: Any) -> Any:
    """``value`` parsed by the field's parser; one it cannot parse is a :class:`UserError` naming its flag."""
    try:
        return f.metadata["parse"](value)
    except (TypeError, ValueError) as error:
        if isinstance(error, UserError):  # its own words, named by the flag where they do not name it
            raise error if str(error).startswith("--") else UserError(f"{flag_name(f)}: {error}") from None
        raise UserError(f"{flag_name(f)}: not a valid value: {value!r}") from None


# ---- recipes ----------------------------------------------------------------------------------


#: The shipped recipe files (package data).
RECIPES = resources.files("verydeep.train") / "recipes"


def recipe_names() -> list[str]:
    """The recipes shipped in ``verydeep/recipes`` (the paper's protocols)."""
    return sorted(p.name.removesuffix(".toml") for p in RECIPES.iterdir() if p.name.endswith(".toml"))


def read_recipe(name_or_file: str | Path) -> dict[str, Any]:
    """The settings of a recipe: a shipped name (``a-paper``) or a TOML file of TrainConfig fields."""
    path = Path(name_or_file)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write first, left out
        except UnicodeDecodeError as error:
            raise UserError(f"{path}: not a TOML recipe (not UTF-8 text at byte {error.start})") from None
        except OSError as error:
            raise UserError(f"{path}: cannot be read ({error.strerror})") from None
    elif str(name_or_file) in recipe_names():
        path = Path(f"{name_or_file}.toml")
        text = RECIPES.joinpath(path.name).read_text()
    else:
        shipped = ", ".join(recipe_names())
        raise MissingFileError(f"--recipe {name_or_file}: no such file or recipe (shipped: {shipped})")
    try:
        settings = tomllib.loads(text)
    except ValueError as error:  # TOMLDecodeError, or an integer of thousands of digits
        raise UserError(f"{path}: not valid TOML ({str(error)[:200]})") from error
    places = {key: f"{path}:{number}" for key, number in setting_lines(text, settings).items()}
    unknown = [key for key in settings if key not in {f.name for f in fields(TrainConfig)}]
    if unknown:
        place = places.get(unknown[0], path)
        raise UserError(f"{place}: unknown setting {unknown[0]!r} (settings are TrainConfig fields)")
    once = [key for key in ONCE if key in settings]
    if once:  # an action of one invocation: a recipe that resumed or cleared every run it is given to
        raise UserError(f"{places.get(once[0], path)}: {once[0]} is an action of one command line "
                        f"({flag_name(next(f for f in fields(TrainConfig) if f.name == once[0]))}), not a recipe "
                        "setting; drop it")
    if "recipe" in settings:  # read once, from the command line: a recipe's own recipe would be ignored
        raise UserError(f"{places.get('recipe', path)}: recipe = {settings['recipe']!r}: a recipe cannot name "
                        "another; copy its settings in")
    check_settings(settings, path, places)
    return settings


def setting_lines(text: str, settings: dict[str, Any]) -> dict[str, int]:
    """The line on which each top-level key of a TOML text is set (tomllib gives no positions), so that an
    error names it; a key found on no line (written in an unusual way) is left out."""
    lines = {}
    for key in settings:
        name = re.escape(key)
        setting = rf"^[ \t]*(?:{name}|\"{name}\"|'{name}')[ \t]*[=.]"  # key = value, or key.sub = value
        table = rf"^[ \t]*\[+[ \t]*{name}[ \t]*[\].]"  # [key] or [[key]]
        pattern = re.compile(f"{setting}|{table}", re.M)
        match = pattern.search(text)
        if match:
            lines[key] = text.count("\n", 0, match.start()) + 1
    return lines


def check_settings(settings: dict[str, Any], path: str | Path, places: dict[str, str] | None = None) -> None:
    """Check each setting read from the file ``path`` (a recipe, a run record) as its field does; a bad
    value is a :class:`UserError` naming the file (``places``: file and line, by key) and the setting.
    Other keys are not settings' and pass."""
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in settings.items():  # typed values (TOML, JSON): only the other fields' parsers apply
        if key not in known:
            continue
        place = (places or {}).get(key, path)
        parse = known[key].metadata["parse"]
        typed = parse is None or known[key].type.removesuffix(" | None") in KINDS
        try:
            check_field(known[key], value if typed else parse(value), f"{place}: {key}")
        except UserError as error:
            raise UserError(f"{place}: {key}: {error}" if str(error).startswith("--") else str(error)) from None
        except (TypeError, ValueError):
            raise UserError(f"{place}: {key}: not a valid value: {value!r}") from None


# ---- the run record ---------------------------------------------------------------------------


#: Settings that belong to the invocation that gave them, not to the run.
ONCE = ("resume", "stop_after_steps", "overwrite")


def write_run_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``run_dir/recipe.json`` atomically: the settings plus what the data decided."""
    text = json.dumps(record, indent=2) + "\n"
    return atomic_write(RunDir(run_dir).record, lambda tmp: Path(tmp).write_text(text))


#: The settings that end a run: a resume that finds the run finished records these alone.
ENDING = ("epochs", "patience", "max_drops", "milestones", "stop_patience", "val_every")


def record_run(run_dir: str | Path, record: dict[str, Any], finished: bool) -> None:
    """Write the run record as the run starts. A run that has finished (a resume with nothing to do) keeps its
    stored record but for the settings that end it (:data:`ENDING`: a stricter ``--stop-patience``, fewer
    ``--epochs``), so that a plain ``--resume`` later finds it finished too; this call's ``--workers``, its spelling
    of ``--data`` and the like leave the record as trained."""
    if finished and RunDir(run_dir).record.is_file():
        stored = read_run_record(run_dir)
        record = {**stored, **{key: record[key] for key in ENDING if key in record}}
        if record == stored:
            return
    write_run_record(run_dir, record)


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """The run record of ``run_dir``; a missing or damaged file is one line naming it."""
    path = RunDir(run_dir).record
    if not path.is_file():
        raise MissingFileError(f"{path}: no run record (was this run directory written by verydeep train?)")
    try:
        record = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark an editor wrote, left out
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, an integer of thousands of digits, too deep
        raise UserError(f"{path}: damaged run record ({str(error)[:200]})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: damaged run record (not a JSON object)")
    return record


def record_lines(path: Path, keys: Iterable[str]) -> dict[str, str]:
    """``path:line`` of each of ``keys`` in a run record, where its key stands least indented (the record's own, not
    a nested dict's of the same name), so that an error names it; a key found on no line is left out."""
    text, places = path.read_text(encoding="utf-8-sig"), {}
    for key in keys:
        found = [(len(m.group(1)), m.start()) for m in re.finditer(rf'^([ \t]*)"{re.escape(key)}"[ \t]*:', text, re.M)]
        if found:
            line = text.count("\n", 0, min(found)[1]) + 1
            places[key] = f"{path}:{line}"
    return places


def stored_settings(run_dir: str | Path) -> dict[str, Any]:
    """The settings a run was trained with: its run record, else the one its last checkpoint holds
    (a crash may lose ``recipe.json``, never the checkpoint's copy); empty when it has neither."""
    source = stored_settings_file(run_dir)
    if source == RunDir(run_dir).record:
        return read_run_record(run_dir)
    return load_checkpoint(source)["recipe"] if source.is_file() else {}


def started_with(cfg: TrainConfig, run_dir: str | Path) -> bool:
    """Whether the run in ``run_dir`` was started with ``cfg``'s settings (those its record keeps; the
    actions of one command line, and those left open for the run to decide (None), aside)."""
    stored = stored_settings(run_dir)
    return all(stored[name] == value for name, value in cfg.to_dict().items()
               if name in stored and name not in ONCE and value is not None)


def stored_settings_file(run_dir: str | Path) -> Path:
    """The file :func:`stored_settings` reads: the run record, else the last checkpoint."""
    run = RunDir(run_dir)
    return run.record if run.record.exists() else run.last


# ---- the command line -------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """One flag per :class:`TrainConfig` field, in the groups of :data:`GROUPS`, defaults suppressed
    (so that a flag not given leaves the recipe's or the stored run's value); ``defaults``: a command's
    own, which its help shows (``localize train``'s configuration D and lr 1e-3)."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(TrainConfig):
        meta = f.metadata
        default = (defaults or {}).get(f.name, f.default_factory() if f.default is MISSING else f.default)
        shown = meta["show"](default) if isinstance(default, (list, tuple)) else default  # as the flag takes it
        help_text = meta["help"] + ("" if shown in (None, "", []) else f" (default {shown})")
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        elif isinstance(default, (int, float)):
            kwargs["type"] = type(default)
        groups[meta["group"]].add_argument(flag_name(f), **kwargs)


def settings_from_flags(given: dict[str, Any]) -> dict[str, Any]:
    """The settings of a ``train`` invocation: the stored run's (with ``--resume``), then the recipe's,
    then the flags given. A stored value that these leave is checked naming the file it was read from."""
    recipe = read_recipe(given["recipe"]) if given.get("recipe") else {}
    settings: dict[str, Any] = {}
    if given.get("resume") and given.get("out"):
        if not stored_settings_file(given["out"]).is_file():
            raise MissingFileError(f"--resume: {given['out']} holds no run to resume (no recipe.json or "
                                   "checkpoints/last.pt)")
        stored = {key: value for key, value in stored_settings(given["out"]).items() if key not in ONCE}
        kept = {key: value for key, value in stored.items() if key not in recipe and key not in given}
        source = stored_settings_file(given["out"])
        check_settings(kept, source, record_lines(source, kept) if source.suffix == ".json" else None)
        if not (stored.get("data") or recipe.get("data") or given.get("data")):
            raise UserError(f"{stored_settings_file(given['out'])}: names no training data (a damaged run record?); "
                            "give --data")
        if given.get("data") is None and recipe.get("data") is None:
            stored["data"] = run_data_folder(stored)
        milestones = given["milestones"] if "milestones" in given else recipe.get("milestones")  # those in effect
        if parse_milestones(milestones or []):  # they replace the stored plateau rule: no clash with it
            stored = {key: value for key, value in stored.items() if key not in PLATEAU}
        settings.update(stored)
        refuse_changed_settings(stored, given, recipe)
    settings.update(recipe)
    settings.update(given)
    refuse_plateau_flags_beside_milestones(settings, given)
    return settings


def refuse_changed_settings(stored: dict[str, Any], given: dict[str, Any], recipe: dict[str, Any]) -> None:
    """A setting that cannot change on resuming, given (by a flag, else by the ``--recipe``) as another value than
    the stored one, is refused naming where it came from, before the settings are checked together (a new crop
    would be blamed on the old scale, a new --freeze on the --weights a resumed run is not given). A value of
    another type than the stored one (a flag's text) is compared once normalised, by the trainer."""
    for f in fields(TrainConfig):
        old = stored.get(f.name)
        origin, new = ((flag_name(f), given[f.name]) if f.name in given
                       else (recipe_origin(given.get("recipe"), f.name), recipe.get(f.name)))
        if f.metadata["resumable"] or f.name not in stored or new is None:
            continue
        value = comparable(f, new)
        if old == value or (old is not None and type(old) is not type(value)):
            continue
        shown = new if isinstance(new, str) and not isinstance(old, str) else repr(new)  # a flag's text as typed
        raise unresumable(origin, given["out"], old, shown)


def unresumable(origin: str, run_dir: str | Path, old: Any, shown: str) -> UserError:
    """The error for a setting (named by ``origin``) that a resumed run cannot change from ``old``."""
    return UserError(f"{origin} cannot change when resuming {run_dir} (trained with {old!r}, given {shown}); "
                     "start a new run with --weights")


def comparable(f: Field, value: Any) -> Any:
    """``value`` of ``f`` as a run record stores it: a text parsed by the field's parser (``"384"`` -> [384, 384],
    ``"vgg11"`` -> ``"A"``), tuples as lists; a text its parser refuses is left as it is, for the settings' own
    check to name."""
    if f.metadata["parse"] is not None and isinstance(value, str):
        try:
            value = parsed(f, value)
        except UserError:
            return value
    return list(value) if isinstance(value, tuple) else value


def setting_origins(given: dict[str, Any], settings: dict[str, Any]) -> dict[str, str]:
    """Where each of ``settings`` (:func:`settings_from_flags`) came from, as an error names it: its flag
    (``--config``), the recipe's key (``--recipe s384's config``) or the stored run's."""
    recipe = read_recipe(given["recipe"]) if given.get("recipe") else {}
    stored = stored_settings_file(given["out"]) if given.get("resume") and given.get("out") else None

    def origin(name: str) -> str:
        if name in given:
            return flag_of(name)
        if name in recipe:
            return recipe_origin(given["recipe"], name)
        return f"{stored}'s {name}"
    return {name: origin(name) for name in settings}


def as_flags_given(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, str]]:
    """A Python caller's ``cfg`` applied as the command line applies flags (:func:`settings_from_flags`): with
    ``resume`` the run's stored settings, then the recipe's, then those the caller set (that differ from their
    defaults: one set to its default cannot be told from one left open, so the run's or the recipe's wins);
    and where each setting came from."""
    given = {name: getattr(cfg, name) for name in changed_settings(cfg)}
    settings = settings_from_flags(given)
    return make_config(settings), setting_origins(given, settings)


def recipe_origin(recipe: str, name: str) -> str:
    """How an error names a setting a recipe gave: ``--recipe s384's config``."""
    return f"--recipe {recipe}'s {name}"


#: The plateau rule's settings, which milestones replace (Sec. 3.1).
PLATEAU = ("patience", "max_drops")


def refuse_plateau_flags_beside_milestones(settings: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise :class:`UserError` when the plateau rule's flags are given on the command line, even at
    their defaults, to a run that follows milestones (a recipe's plateau settings simply give way)."""
    refuse_ignored_plateau(parse_milestones(settings.get("milestones") or []),
                           [f"{flag_of(name)} {given[name]}" for name in PLATEAU if name in given])


def refuse_ignored_plateau(milestones: list[int], ignored: list[str]) -> None:
    """Raise :class:`UserError` when ``milestones``, which replace the plateau rule (Sec. 3.1), come
    with the rule's settings ``ignored`` (``--patience 2``...)."""
    if milestones and ignored:
        raise UserError(f"--milestones {','.join(map(str, milestones))} replaces the plateau rule, so "
                        f"{' and '.join(ignored)} would be ignored: give the milestones or the plateau rule's "
                        "settings, not both")
