"""Hostile input to every command that reads files or numbers: each file input (weights, boxes files
of each format, XML folders, ``.npz`` features, recipes, images) damaged, truncated, emptied,
non-finite, foreign or oversized, and each numeric option given zero, a negative, NaN, a huge or a
mistyped value. Every case must end in exit 0 with a result that counts something, or exit 2 with
one line naming the file or the option; never a traceback; no input file changed.

``make test`` runs every file case and a sample of the option cases; ``make reliability``
(``VERYDEEP_RELIABILITY=full``) runs them all. ``pytest -s`` prints the counts."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, save, tiny, write_dataset
from safetensors.torch import save_file

from verydeep.cli import build_parser, main
from verydeep.eval.localize.task import Localisation
from verydeep.io.checkpoint import load_checkpoint, save_checkpoint
from verydeep.train import train

FULL = os.environ.get("VERYDEEP_RELIABILITY") == "full"

#: A tiny training run's flags (a case that trains by mistake takes a moment); two steps at most.
TINY = ("--width 0.0625 --crop 32 --scale 32:40 --batch-size 16 --epochs 1 --workers 0 --precision fp32 "
        "--device cpu --no-progress --stop-after-steps 2")

# ---- the files, and what is done to them ------------------------------------------------------


def damaged(data: bytes) -> bytes:
    """The same length of bytes, scrambled past the first sixteen (a format's magic number survives)."""
    noise = np.random.default_rng(len(data)).bytes(max(len(data) - 16, 0))
    return data[:16] + noise


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def emptied(data: bytes) -> bytes:
    return b""


#: The changes every kind of file gets; each kind adds its own (non-finite, foreign, oversized).
BYTE_CHANGES = {"damaged": damaged, "truncated": truncated, "empty": emptied}


def text_changes(valid: str, numbers: str) -> dict[str, str]:
    """Text files' own variants: the valid text with its numbers replaced (``numbers`` is a regex of
    what to replace on the first data line)."""
    def swap(value: str) -> str:
        return re.sub(numbers, value, valid, count=1)

    return {"nan": swap("nan"), "inf": swap("inf"), "huge": swap("1e300"), "negative": swap("-5"),
            "mistyped": swap("abc"), "binary": "\x00\x01\x02\xff" * 8}


# ---- the world the cases run in --------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small dataset with boxes (a text file and an XML folder), a classification run, a localisation
    run, a features file, a recipe and a photo: the valid inputs the variants are made from."""
    root = tmp_path_factory.mktemp("hostile")
    data = write_dataset(root / "data", {"train": 8, "val": 2})
    images = sorted(data.rglob("*.png"))
    (data / "boxes.txt").write_text("".join(f"{p.relative_to(data).as_posix()} 4 5 30 28\n" for p in images))
    for path in images:
        xml = root / "Annotations" / path.relative_to(data).with_suffix(".xml")
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text("<annotation><object><name>x</name><bndbox><xmin>4</xmin><ymin>5</ymin><xmax>30</xmax>"
                       "<ymax>28</ymax></bndbox></object></annotation>")
    run, loc = root / "run", root / "loc"
    train(tiny(data, run, epochs=1))
    train(tiny(data, loc, epochs=1, weights=str(run), scale=(32, 32)), task=Localisation("scr"))
    assert main(["features", "--weights", str(run), "--data", str(data), "--out", str(root / "features.npz"),
                 "--scales", "32", "--no-progress"]) == 0
    (root / "recipe.toml").write_text("lr = 0.01\nepochs = 1\n")
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    save_file({k: v.contiguous() for k, v in state["model"].items()}, root / "torchvision.safetensors")
    return {"root": root, "data": data, "run": run, "loc": loc, "image": save(photo(60, 50), root / "photo.png"),
            "checkpoint": run / "checkpoints" / "last.pt", "safetensors": run / "model.safetensors",
            "boxes": data / "boxes.txt", "xml": root / "Annotations", "features": root / "features.npz",
            "recipe": root / "recipe.toml", "state": state}


def variants(world: dict, kind: str, folder: Path) -> dict[str, Path]:
    """The bad versions of one kind of input, written into ``folder``, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    source = {"weights": world["checkpoint"], "safetensors": world["safetensors"], "boxes": world["boxes"],
              "features": world["features"], "recipe": world["recipe"], "image": world["image"]}.get(kind)
    out: dict[str, Path] = {}
    if source is not None:
        data = source.read_bytes()
        for name, change in BYTE_CHANGES.items():
            out[name] = folder / f"{name}{source.suffix}"
            out[name].write_bytes(change(data))
    if kind == "weights":
        state = world["state"]
        model = {k: v * float("nan") if v.is_floating_point() else v for k, v in state["model"].items()}
        save_checkpoint(dict(state, model=model), folder / "nan.pt")
        out["nan"] = folder / "nan.pt"
        out["foreign"] = folder / "foreign.pt"
        torch.save({"optimizer": {"lr": 0.1}}, out["foreign"])
    if kind == "safetensors":
        out["nan"] = folder / "nan.safetensors"
        save_file({k: torch.full(v.shape, float("nan")) if v.is_floating_point() else v.contiguous()
                   for k, v in world["state"]["model"].items()}, out["nan"])
        out["foreign"] = folder / "foreign.safetensors"
        save_file({"embedding.weight": torch.zeros(3, 4)}, out["foreign"])
        out["oversized"] = folder / "oversized.safetensors"  # a header that claims 8 TB
        header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40, 2], "data_offsets": [0, 8 << 40]}}).encode()
        out["oversized"].write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    if kind == "boxes":
        valid = world["boxes"].read_text()
        for name, text in text_changes(valid, r"(?<= )4(?= )").items():
            out[name] = folder / f"{name}.txt"
            out[name].write_text(text)
        out["foreign"] = folder / "foreign.csv"
        out["foreign"].write_text("ImageId,Label\nx,1\n")
    if kind == "xml":
        for name, text in {"nan": "nan", "huge": "1e300", "mistyped": "abc", "negative": "-5"}.items():
            copy = folder / name
            for xml in world["xml"].rglob("*.xml"):
                target = copy / xml.relative_to(world["xml"])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(xml.read_text().replace("<xmin>4</xmin>", f"<xmin>{text}</xmin>"))
            out[name] = copy
        broken = folder / "broken"
        for xml in world["xml"].rglob("*.xml"):
            target = broken / xml.relative_to(world["xml"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(xml.read_text()[:40])
        out["truncated"] = broken
        (folder / "empty").mkdir()
        out["empty"] = folder / "empty"
    if kind == "features":
        saved = dict(np.load(world["features"], allow_pickle=False))
        for name, change in {"nan": lambda a: np.full_like(a, np.nan), "zero-dimension": lambda a: a[:, :0]}.items():
            out[name] = folder / f"{name}.npz"
            np.savez(out[name], **{**saved, "features": change(saved["features"])})
        out["foreign"] = folder / "foreign.npz"
        np.savez(out["foreign"], x=np.zeros(3))
        out["bad-labels"] = folder / "bad-labels.npz"
        np.savez(out["bad-labels"], **{**saved, "labels": saved["labels"] + 1000})
    if kind == "recipe":
        for name, text in {"nan": "lr = nan\n", "mistyped": 'lr = "abc"\n', "negative": "epochs = -1\n",
                           "huge": "dropout = 1e300\n", "unknown": "learning_rate = 0.1\n",
                           "foreign": "[tool.black]\nline-length = 3\n"}.items():
            out[name] = folder / f"{name}.toml"
            out[name].write_text(text)
    if kind == "image":
        out["foreign"] = folder / "text.jpg"
        out["foreign"].write_text("not an image\n")
        out["oversized"] = folder / "bomb.png"  # a header that claims 100000 x 100000 pixels
        png = (world["image"]).read_bytes()
        out["oversized"].write_bytes(png[:16] + (100000).to_bytes(4, "big") * 2 + png[24:])
    return out


#: Per kind of input, the command lines that read it: ``{x}`` is the bad file, the others the world's.
READERS = {
    "weights": ["eval --weights {x} --data {data} --workers 0 --no-progress", "predict --weights {x} {image}",
                "export --weights {x} --format torchscript {new}.pt", "convert {x} {new}.safetensors",
                "features --weights {x} --data {data} --out {new}.npz --scales 32 --no-progress",
                f"train --weights {{x}} --data {{data}} --out {{new}} {TINY}",
                "localize eval --protocol dense --checkpoint {loc} --classifier {x} --data {data}"],
    "safetensors": ["eval --weights {x} --data {data} --workers 0 --no-progress", "predict --weights {x} {image}",
                    "convert {x} {new}.safetensors"],
    "boxes": [f"localize train --data {{data}} --boxes {{x}} --weights {{run}} --out {{new}} {TINY}",
              "localize eval --checkpoint {loc} --data {data} --boxes {x}"],
    "xml": ["localize eval --checkpoint {loc} --data {data} --boxes {x}"],
    "features": ["transfer --protocol caltech --features {x}"],
    "recipe": [f"train --recipe {{x}} --data {{data}} --out {{new}} {TINY}"],
    "image": ["predict --weights {run} {x}", "localize predict --checkpoint {loc} --classifier {run} --out {new} {x}"],
}

RAN: Counter[str] = Counter()
COMMANDS: dict[str, set[str]] = {"file": set(), "option": set()}


@pytest.fixture(scope="module", autouse=True)
def counts():
    """After the module, one line with the counts."""
    yield
    print(f"\nhostile input: {RAN['file']} bad files to {len(COMMANDS['file'])} commands and {RAN['option']} bad "
          f"numbers to {len(COMMANDS['option'])}; exit 0 (a result) {RAN['exit 0']}, exit 2 (one line) {RAN['exit 2']}")


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under ``root`` by its hash: what no case may change."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 2
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_outcome(code: int, out: str, err: str, names: list[str]) -> None:
    """Exit 0 with a result that counts something, or exit 2 with one line naming one of ``names``."""
    assert "Traceback" not in out + err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("verydeep"), err
        assert any(name in err for name in names), (names, err)
    else:
        assert not re.search(r"\b0 (images|boxes|validation images)\b|\"images\": 0\b", out + err), out + err
    RAN[f"exit {code}"] += 1


FILE_CASES = [(kind, line) for kind, lines in READERS.items() for line in lines]


@pytest.mark.parametrize(("kind", "line"), FILE_CASES, ids=[f"{k}: {line.split(' --')[0]}" for k, line in FILE_CASES])
def test_a_bad_file_is_a_result_or_one_line_naming_it(world, kind, line, tmp_path, capsys):
    bad = variants(world, kind, tmp_path / "bad")
    before = fingerprint(world["root"]) | fingerprint(tmp_path / "bad")
    for name, path in bad.items():
        new = tmp_path / f"new-{name}"
        argv = shlex.split(line.format(x=path, new=new, **{k: v for k, v in world.items() if isinstance(v, Path)}))
        code, out, err = run_case(argv, capsys)
        try:
            check_outcome(code, out, err, [str(path), path.name])
        except AssertionError as error:
            raise AssertionError(f"{name} {kind}: verydeep {' '.join(argv)}") from error
        RAN["file"] += 1
        COMMANDS["file"].add(" ".join(argv[:2]) if argv[0] == "localize" else argv[0])
    assert fingerprint(world["root"]) | fingerprint(tmp_path / "bad") == before, "an input was changed"


# ---- numeric options ----------------------------------------------------------------------------

#: A valid, quick invocation of each command whose numeric options are tried.
VALID = {
    ("summary",): "D",
    ("data", "stats"): "{data} --workers 0 --sample 8 --out {new}.json",
    ("reproduce",): "--data {data} --out {new} --nets A --budget 1 --width 0.0625 --batch-size 16 --limit-train 32 "
                    "--limit-test 8 --workers 0 --no-progress",
    ("train",): f"--data {{data}} --out {{new}} {TINY}",
    ("eval",): "--weights {run} --data {data} --workers 0 --no-progress --protocol dense",
    ("predict",): "--weights {run} {image}",
    ("features",): "--weights {run} --data {data} --out {new}.npz --scales 32 --no-progress",
    ("transfer",): "--protocol caltech --features {features}",
    ("localize", "eval"): "--checkpoint {loc} --data {data}",
    ("localize", "predict"): "--checkpoint {loc} --classifier {run} --out {new} {image}",
}

#: Options that set how much work to do: a huge value is work asked for, not bad input (tried with
#: the other values only).
BUDGETS = {"--epochs", "--stop-after-steps", "--checkpoint-every", "--keep-last", "--val-every", "--limit",
           "--limit-train", "--limit-val", "--max-drops", "--patience", "--stop-patience", "--folds", "--topk",
           "--top", "--sample", "--budget", "--finetune-budget", "--seeds", "--limit-test", "--val-split"}

VALUES = ("0", "-1", "nan", "1e12", "12x")


def numeric_options(path: tuple[str, ...]) -> list[str]:
    """The numeric flags of a command, from its parser."""
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    numeric = []
    for action in parser._actions:
        flag = next((s for s in action.option_strings if s.startswith("--")), None)
        if flag and action.type is not None and takes_numbers(action.type):
            numeric.append(flag)
    return sorted(set(numeric))


def takes_numbers(kind) -> bool:
    """Whether an argument type reads a number (or a list of them) from ``"2"``."""
    try:
        value = kind("2")
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, list) and all(isinstance(v, int) for v in value))


OPTION_CASES = [(path, flag, value) for path in VALID for flag in numeric_options(path) for value in VALUES
                if not (flag in BUDGETS and value == "1e12")]
SAMPLED = OPTION_CASES if FULL else OPTION_CASES[::5]


@pytest.mark.parametrize(("path", "flag", "value"), SAMPLED,
                         ids=[f"{' '.join(p)} {f} {v}" for p, f, v in SAMPLED])
def test_a_bad_number_is_a_result_or_one_line_naming_the_option(world, path, flag, value, tmp_path, capsys):
    before = fingerprint(world["root"])
    line = VALID[path].format(new=tmp_path / "new", **{k: v for k, v in world.items() if isinstance(v, Path)})
    argv = [*path, *shlex.split(line), flag, value]
    code, out, err = run_case(argv, capsys)
    check_outcome(code, out, err, [flag])
    RAN["option"] += 1
    COMMANDS["option"].add(" ".join(path))
    assert fingerprint(world["root"]) == before, "an input was changed"
