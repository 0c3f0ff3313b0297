"""Every command, given missing, unknown or invalid arguments, exits with status 2 and one line on
stderr that starts with ``verydeep``, never a traceback; ``--help`` still prints the full help.

Commands and their options are discovered from the parser, so a new command or flag is covered by
the generic cases (no arguments, an unknown flag, a flag missing its value, a value its type
refuses); the named cases add bad numbers, missing or damaged files, and files where folders are
expected and the reverse. ``pytest -s`` prints how many cases ran."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny, write_dataset

from verydeep.cli import build_parser, main
from verydeep.io.checkpoint import load_checkpoint, save_checkpoint
from verydeep.train import train

Parsers = dict[tuple[str, ...], argparse.ArgumentParser]


def command_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Parsers:
    """Every parser under ``parser`` by its command path: the top level (``()``), groups such as
    ``("data",)`` and the commands that run, such as ``("data", "stats")``."""
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= command_parsers(sub, (*path, name))
    return found


def is_group(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


PARSERS = command_parsers(build_parser())
COMMANDS = {path: p for path, p in PARSERS.items() if not is_group(p)}
GROUPS = {path: p for path, p in PARSERS.items() if is_group(p)}

#: The flags of a tiny training run: should a case train by mistake, it takes a moment, not an hour.
TINY = ("--data {data} --out {new} --width 0.0625 --crop 32 --scale 32:40 --batch-size 16 --epochs 1 --workers 0 "
        "--precision fp32 --device cpu --no-progress")

#: A valid invocation of each command, to which the generic cases add one mistake (a command not
#: listed here gets none: its required arguments then fail first, which is still one line).
VALID = {
    ("summary",): "D",
    ("data", "stats"): "{data} --workers 0",
    ("train",): TINY,
    ("plot",): "{run}",
    ("eval",): "--checkpoint {run} --data {data} --workers 0 --no-progress",
    ("predict",): "--checkpoint {run} {image}",
    ("localize", "eval"): "--checkpoint {run} --data {data}",
    ("localize", "predict"): "--checkpoint {run} --classifier {run} --out {folder} {image}",
    ("convert",): "{run} {new}.safetensors",
    ("download",): "vgg16 --weights-dir {new}",
    ("export",): "--weights {run} --format torchscript {new}.pt",
    ("features",): "--weights {run} --data {data} --out {new}.npz",
    ("transfer",): "--protocol caltech --features {new}.npz",
    ("reproduce",): "--data {data} --out {new} --no-progress",
    ("demo",): "--out {new} --no-progress",
    ("bench",): "--config A --size 32 --width 0.0625 --batch 4 --rounds 1 --device cpu --data {data}",
}

#: What the generic cases give an option whose type refuses it (numbers, lists of numbers, devices).
NOT_A_VALUE = "x"

#: (command line, text the error must hold, or None). Placeholders are the
#: files of the ``files`` fixture; ``{new}`` is a path that does not exist yet.
NAMED = [
    # bad numbers
    ("summary D --input 0", "--input"),
    ("summary D --input -3", "--input"),
    ("summary D --width 0", "--width"),
    ("summary D --width nan", "--width"),
    ("summary D --num-classes 0", "--num-classes"),
    ("summary D --crop 33", "--crop 33: a multiple of 32"),
    ("summary Z", "'Z'"),
    ("data stats {data} --sample 0 --workers 0", "--sample"),
    ("data stats '' --workers 0", "argument dir: an empty path names no file or folder"),  # not the working folder
    ("plot ''", "argument run_dir: an empty path names no file or folder"),
    ("predict --weights {run} ''", "argument IMAGE: an empty path names no file or folder"),
    ("eval --weights {run} --data ''", "argument --data: an empty path names no file or folder"),
    ("data stats {data} --workers -1", "--workers"),
    (f"train {TINY} --workers x", "--workers"),
    (f"train {TINY} --limit-val x", "--limit-val"),
    (f"train {TINY} --stop-after-steps 0", "--stop-after-steps"),
    (f"train {TINY} --epochs -1", "--epochs"),
    (f"train {TINY} --epochs 0", "--epochs"),
    (f"train {TINY} --lr nan", "--lr"),
    (f"train {TINY} --lr -1", "--lr"),
    (f"train {TINY} --width 0", "--width"),
    (f"train {TINY} --scale 0,abc", "--scale"),
    (f"train {TINY} --scale 40:32", "--scale"),
    (f"train {TINY} --crop 0", "--crop"),
    (f"train {TINY} --crop 48 --scale 48", "--crop"),
    (f"train {TINY} --limit-train 0", "--limit-train"),
    (f"train {TINY} --micro-batch 0", "--micro-batch"),
    (f"train {TINY} --workers -1", "--workers"),
    (f"train {TINY} --milestones 3,x", "--milestones"),
    (f"train {TINY} --milestones 1,1", "--milestones"),
    (f"train {TINY} --milestones 0", "--milestones"),
    (f"train {TINY} --milestones 2", "--milestones 2: epoch 2 is after the last, --epochs 1"),
    (f"train {TINY} --milestones 1 --patience 3", "--patience 3 would be ignored"),
    (f"train {TINY} --micro-batch 17", "--micro-batch 17 is larger than --batch-size 16"),
    (f"train {TINY} --val-every 5", "--val-every 5 is beyond --epochs 1: the last epoch is validated anyway"),
    (f"train {TINY} --stop-patience 1", "--stop-patience 1: the run validates 1 time(s)"),
    (f"train {TINY} --epochs 4 --val-every 2 --stop-patience 2", "validates 2 time(s) (--epochs 4, --val-every 2)"),
    (f"train {TINY} --batch-size 1000", "--batch-size"),
    (f"train {TINY} --device bogus", "--device"),
    (f"train {TINY} --config F", "--config: unknown VGG configuration 'F'"),
    ("eval --checkpoint {run} --data {data} --batch-size x", "--batch-size"),
    ("eval --checkpoint {run} --data {data} --batch-size 0", "--batch-size"),
    ("eval --checkpoint {run} --data {data} --limit 0", "--limit"),
    ("eval --checkpoint {run} --data {data} --workers -1", "--workers"),
    ("eval --checkpoint {run} --data {data} --scales 0,abc", "--scales"),
    ("eval --checkpoint {run} --data {data} --scales 0", "--scales"),
    ("eval --checkpoint {run} --data {data} --scales 8 --workers 0 --no-progress", "--scales"),
    ("eval --checkpoint {run} --data {data} --protocol tencrop", "--protocol"),
    ("eval --checkpoint {run} --data {data} --precision fp8", "--precision"),
    ("eval --checkpoint {run} --data {data} --device bogus", "--device"),
    ("predict --checkpoint {run} {image} --topk 0", "--topk"),
    ("predict --checkpoint {run} {image} --topk -2", "--topk"),
    ("predict --checkpoint {run} {image} --scales 0,abc", "--scales"),
    ("predict --checkpoint {run} {image} --scales 8", "--scales"),
    ("predict --checkpoint {run} {image} --weights-dir {folder}", "{run} name files or folders; drop --weights-dir"),
    ("features --weights {run} --data {data} --out {new}.npz --weights-dir {folder}", "drop --weights-dir"),
    ("convert {run} {new}.safetensors --weights-dir {folder}", "drop --weights-dir"),
    ("predict --checkpoint {run} {image} --device bogus", "--device"),
    ("reproduce --data {data} --out {new} --budget 0", "--budget"),
    ("reproduce --data {data} --out {new} --budget -1", "--budget"),
    ("reproduce --data {data} --out {new} --width 0", "--width"),
    ("reproduce --data {data} --out {new} --width nan", "--width"),
    ("reproduce --data {data}/train --out {new} --val-split 4", "no test split (val/ or test/)"),
    ("reproduce --data {data} --out {new} --milestones x,2",
     "argument --milestones: --milestones must be comma-separated"),
    ("reproduce --data {data} --out {new} --batch-size x", "--batch-size"),
    ("reproduce --data {data} --out {new} --batch-size 0", "--batch-size"),
    ("reproduce --data {data} --out {new} --limit-train 0", "--limit-train"),
    ("reproduce --data {data} --out {new} --limit-test 0", "--limit-test"),
    ("reproduce --data {data} --out {new} --workers -1", "--workers"),
    ("reproduce --data {data} --out {new} --nets A,Z", "--nets"),
    ("reproduce --data {data} --out {new} --nets ,", "--nets"),
    ("reproduce --data {data} --out {new} --preset imagenet", "--preset"),
    ("reproduce --data {data} --out {new} --device bogus", "--device"),
    ("demo --out {new} --epochs 0", "--epochs"),
    ("demo --out {new} --epochs -1", "--epochs"),
    ("demo --out {new} --device bogus", "--device"),
    # sizes and counts beyond what the machine holds (verydeep.runtime.limits)
    ("features --weights {run} --data {data} --out {new}.npz --scales 256,100000",
     "argument --scales: a test scale Q must be from 1 to 2048 pixels"),
    ("features --raw-pixels 100000 --data {data} --out {new}.npz", "argument --raw-pixels: the side must be from 1"),
    ("transfer --protocol caltech --raw-pixels 100000 --data {data}", "argument --raw-pixels"),
    ("features --weights {run} --data {data} --out {new}.npz --workers 100000",
     "argument --workers: data-loading processes must be from 0 to"),
    ("data stats {data} --workers 100000", "argument --workers: data-loading processes must be from 0 to"),
    ("bench --config A --size 32 --width 0.0625 --batch 4 --rounds 1 --device cpu --workers 100000",
     "argument --workers"),
    ("bench --config A --size 1824 --device cpu", "--size 1824: must be a multiple of 32, at most 1792"),
    ("bench --config A --size 32 --device cpu --data {new}", "--data {new} does not exist"),
    (f"train {TINY} --workers 100000", "--workers must be from 0 to"),
    (f"train {TINY} --dropout 1.5", "--dropout is the probability of dropping an FC activation"),
    ("eval --checkpoint {run} --data {data} --scales 100000 --workers 0 --no-progress",
     "a test scale Q must be from 1 to 2048 pixels"),
    # missing files and folders
    ("data stats /nonexistent --workers 0", "/nonexistent"),
    (f"train {TINY} --data /nonexistent", "/nonexistent"),
    (f"train {TINY} --weights /nonexistent", "/nonexistent"),
    (f"train {TINY} --recipe /nonexistent.toml", "/nonexistent.toml"),
    (f"train {TINY} --preprocess /nonexistent.json", "/nonexistent.json"),
    (f"train {TINY} --preprocess /nonexistent", "/nonexistent"),
    (f"train {TINY} --resume", "--resume"),
    ("train --out {new} --resume", "--resume: {new} holds no run to resume"),
    (f"train {TINY} --weights {{wrong}}", "{wrong}"),
    ("plot /nonexistent", "/nonexistent"),
    ("eval --checkpoint {run} --data /nonexistent", "/nonexistent"),
    ("eval --checkpoint /nonexistent --data {data}", "/nonexistent"),
    ("eval --checkpoint /nonexistent.safetensors --data {data}", "/nonexistent.safetensors"),
    ("eval --checkpoint {run} --data {trainonly}", "no val"),
    ("predict --checkpoint /nonexistent {image}", "/nonexistent"),
    ("predict --checkpoint {run} /nonexistent.jpg", "/nonexistent.jpg"),
    ("predict --checkpoint {run} {image} /nonexistent.jpg", "/nonexistent.jpg"),
    ("reproduce --data /nonexistent --out {new}", "/nonexistent"),
    ("reproduce --data {trainonly} --out {new}", "no val"),
    # a file where a folder is expected, and the reverse
    ("data stats {file} --workers 0", "{file}"),
    ("data stats {data} --workers 0 --out {folder}", "{folder}"),
    (f"train {TINY} --data {{file}}", "{file}"),
    (f"train {TINY} --out {{file}}", "{file}"),
    (f"train {TINY} --weights {{folder}}", "{folder}"),
    (f"train {TINY} --recipe {{folder}}", "{folder}"),
    (f"train {TINY} --preprocess {{folder}}", "{folder}"),
    (f"train {TINY} --preprocess {{file}}", "{file}"),
    ("plot {file}", "{file}"),
    ("plot {run} --out {folder}", "{folder}"),
    ("eval --checkpoint {run} --data {file}", "{file}"),
    ("eval --checkpoint {folder} --data {data}", "{folder}"),
    ("eval --checkpoint {run} --data {data} --out {file}", "{file}"),
    ("predict --checkpoint {folder} {image}", "{folder}"),
    ("predict --checkpoint {run} {folder}", "{folder}"),
    ("predict --checkpoint {run} {file}", "{file}"),
    ("reproduce --data {file} --out {new}", "{file}"),
    ("reproduce --data {data} --out {file}", "{file}"),
    ("demo --out {file}", "{file}"),
    # damaged checkpoints and weights
    ("eval --checkpoint {empty} --data {data}", "{empty}"),
    ("eval --checkpoint {file} --data {data}", "{file}"),
    ("eval --checkpoint {random} --data {data}", "{random}"),
    ("eval --checkpoint {wrong} --data {data} --workers 0 --no-progress", "{wrong}"),
    ("eval --checkpoint {nan} --data {data} --workers 0 --no-progress", "{nan}"),
    ("eval --checkpoint {huge} --data {data} --workers 0 --no-progress", "{huge}: the net's outputs are not finite"),
    ("eval --checkpoint {run} --checkpoint {random} --data {data}", "{random}"),
    ("predict --checkpoint {empty} {image}", "{empty}"),
    ("predict --checkpoint {random} {image}", "{random}"),
    ("predict --checkpoint {wrong} {image}", "{wrong}"),
    ("predict --checkpoint {nan} {image}", "{nan}"),
    ("predict --checkpoint {huge} {image}", "{huge}: the net's outputs are not finite"),
    (f"train {TINY} --weights {{empty}}", "{empty}"),
    (f"train {TINY} --weights {{random}}", "{random}"),
    (f"train {TINY} --weights {{nan}}", "{nan}"),
    (f"train {TINY} --weights {{wrong}} --config B", None),
    (f"train {TINY} --recipe {{toml}}", "{toml}"),
    (f"train {TINY} --out {{run}}", "--resume"),
    # sizes and counts beyond what the machine can hold or run
    ("predict --checkpoint {run} {image} --scales 100000", "argument --scales: a test scale Q"),
    ("eval --checkpoint {run} --data {data} --scales 100000", "argument --scales: a test scale Q"),
    ("eval --checkpoint {run} --data {data} --scales 35,,40", "argument --scales: expected comma-separated integers"),
    # an option of one value given twice: argparse would keep the last silently
    ("eval --checkpoint {run} --data {data} --protocol dense --protocol center", "--protocol is given twice"),
    ("eval --checkpoint {run} --data {data} --protocol dense,dense", "a protocol is listed twice in 'dense,dense'"),
    ("reproduce --data {data} --nets A,A", "--nets A,A: a net is listed twice"),
    ("reproduce --data {data} --budget 2 --stop-patience 5", "--stop-patience 5: a net validates 2 time(s)"),
    ("predict --checkpoint {run} {image} --topk 1 --top=2", "--topk is given twice; give it once"),
    (f"train {TINY} --epochs 1 --epochs 2", "--epochs is given twice"),
    (f"train {TINY} --progress", "--progress/--no-progress is given twice"),  # TINY says --no-progress
    ("eval --checkpoint {run} --data {data} --json --json", "--json is given twice; give it once"),  # a switch
    ("predict --checkpoint {run} {image} --no-flip --no-flip", "--no-flip is given twice; give it once"),
    ("summary D --json --json", "--json is given twice; give it once"),
    ("localize eval --checkpoint {run} --data {data} --protocol dense --scales 100000",
     "argument --scales: a test scale Q"),
    ("localize predict --checkpoint {run} --classifier {run} --out {folder} {image} --scales 100000",
     "argument --scales: a test scale Q"),
    ("eval --checkpoint {run} --data {data} --workers 100000", "argument --workers"),
    ("localize eval --checkpoint {run} --data {data} --workers 100000", "argument --workers"),
    ("reproduce --data {data} --out {new} --workers 100000", "argument --workers"),
]


def generic_cases() -> list[tuple[str, str | None]]:
    """The cases every command and group gets, from what the parser declares."""
    cases: list[tuple[str, str | None]] = []
    for path in GROUPS:  # the top level, ``()``, first: no command at all
        cases += [(" ".join(path), None), (" ".join((*path, "no-such-command")), "no-such-command")]
    for path, parser in COMMANDS.items():
        name = " ".join(path)
        valid = f"{name} {VALID.get(path, '')}".strip()
        if any(action.required for action in parser._actions):
            cases.append((name, "required"))
        cases.append((f"{valid} --no-such-flag", "--no-such-flag"))
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
                continue
            flag = action.option_strings[-1]
            cases.append((f"{valid} {flag}", flag))  # its value missing
            if action.choices is not None:
                cases.append((f"{valid} {flag} no-such-choice", flag))
            elif action.type is not None and refuses(action.type, NOT_A_VALUE):
                cases.append((f"{valid} {flag} {NOT_A_VALUE}", flag))
    return cases


def refuses(kind, text: str) -> bool:
    try:
        kind(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return True
    return False


CASES = generic_cases() + NAMED
RAN: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def summary_line():
    """After the module, one line: how many cases ran, over how many commands."""
    yield
    print(f"\nCLI reliability: {RAN['case']} bad command lines over {len(COMMANDS)} commands and {len(GROUPS)} "
          f"groups, each exit 2 with one line and no traceback; {RAN['help']} --help pages whole, exit 0")


@pytest.fixture(scope="module")
def files(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A trained tiny run and the bad inputs the cases name."""
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    train(tiny(data, run))
    state = load_checkpoint(run / "checkpoints" / "last.pt")

    def scaled(factor: float) -> dict:
        return dict(state, model={k: v * factor if v.is_floating_point() else v for k, v in state["model"].items()})

    save_checkpoint(scaled(float("nan")), root / "nan.pt")
    save_checkpoint(scaled(1e12), root / "huge.pt")  # finite weights, outputs beyond float32
    save_checkpoint(dict(state, recipe=dict(state["recipe"], width=1 / 8)), root / "wrong.pt")  # shapes differ
    (root / "empty.pt").write_bytes(b"")
    (root / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(512))
    (root / "file.txt").write_text("not an image, a checkpoint or a folder\n")
    (root / "folder").mkdir()
    (root / "bad.toml").write_text("lr = [\n")
    trainonly = write_dataset(root / "trainonly", {"train": 1})
    return {"data": str(data), "run": str(run), "image": str(data / "val" / "class0" / "0.png"),
            "file": str(root / "file.txt"), "folder": str(root / "folder"), "empty": str(root / "empty.pt"),
            "random": str(root / "random.safetensors"), "nan": str(root / "nan.pt"), "huge": str(root / "huge.pt"),
            "wrong": str(root / "wrong.pt"), "toml": str(root / "bad.toml"), "trainonly": str(trainonly)}


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int | str | None, str, str]:
    """``verydeep ARGV`` in this process: its exit status, stdout and stderr."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def case_id(line: str) -> str:
    return line.replace(TINY, "TINY") or "(nothing)"


#: Cases whose commands do not yet take the bounded types of ``verydeep.cli`` (``parse_scales``, ``test_scale``,
#: ``worker_count``); ``run=False`` where the unbounded value would start that many processes.
def mistake_replacing_its_flag(argv: list[str]) -> list[str]:
    """``argv`` with a flag given again (a case's mistake after TINY's value) given only there: argparse would
    take the last, but verydeep refuses a flag given twice."""
    kept: list[str] = []
    for i, token in enumerate(argv):
        if token in argv[i + 1:] and token.startswith("--"):
            continue  # the earlier flag; its value, if any, is dropped next
        if i and argv[i - 1] in argv[i:] and argv[i - 1].startswith("--") and not token.startswith("--"):
            continue
        kept.append(token)
    return kept


@pytest.mark.parametrize(
    "line, expected",
    [pytest.param(line, expected, id=case_id(line)) for line, expected in CASES],
)
def test_bad_command_line_is_one_line_and_exit_2(line, expected, files, tmp_path, capsys, request):
    paths = {**files, "new": str(tmp_path / "new")}
    argv = shlex.split(line.format(**paths))
    if "given twice" not in (expected or ""):
        argv = mistake_replacing_its_flag(argv)
    RAN["case"] += 1
    code, out, err = run_main(argv, capsys)
    assert "Traceback" not in out + err, err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("verydeep"), (code, err)
    if expected is not None:
        assert expected.format(**paths) in err, err
    assert not (tmp_path / "new" / "checkpoints").exists(), "trained before refusing"


def test_localize_train_help_shows_its_own_defaults(capsys):
    code, out, _ = run_main(["localize", "train", "--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "configuration of Table 1: A, A-LRN, B, C, D, E (default D)" in flat
    assert "initial learning rate (default 0.001)" in flat  # Appendix A's fine-tuning, not train's 0.01


@pytest.mark.parametrize("path", list(PARSERS), ids=lambda path: " ".join(path) or "(top level)")
def test_help_is_whole_and_exit_0(path, capsys):
    code, out, err = run_main([*path, "--help"], capsys)
    assert code == 0 and not err and out.startswith("usage: verydeep")
    for action in PARSERS[path]._actions:
        if action.help != argparse.SUPPRESS:
            for option in action.option_strings:
                assert option in out, option
    RAN["help"] += 1


@pytest.mark.parametrize("argv, expected", [
    ([], "the following arguments are required: COMMAND"),
    (["summary", "D", "--input", "0"], "verydeep summary: error: argument --input"),
    (["data", "stats", "/nonexistent", "--workers", "0"], "verydeep data stats: error: "),
    (["eval", "--checkpoint"], "verydeep eval: error: argument --checkpoint: expected one argument"),
])
def test_the_installed_command_prints_one_line(argv, expected):
    """As a process, as a user runs it: exit 2, one line on stderr, nothing on stdout."""
    proc = subprocess.run([sys.executable, "-m", "verydeep.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not proc.stdout, proc
    assert len(proc.stderr.splitlines()) == 1 and expected in proc.stderr, proc.stderr


@pytest.mark.parametrize(("argv", "status"), [(["summary", "E"], 141), (["train", "--help"], 0)])
def test_a_reader_that_leaves_early_ends_the_command_quietly(argv, status):
    """``verydeep summary E | head -1``: the pipe closed before the output was written is no bug to show with a
    traceback; the command ends as other tools do, with SIGPIPE's status (argparse's help, which leaves through
    exit status 0, ignores the closed pipe itself)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as in a shell
    proc = subprocess.Popen([sys.executable, "-m", "verydeep.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    proc.stdout.close()  # before a byte is read: the first write meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status and err == b"", err.decode()


def test_ctrl_c_while_the_commands_are_imported_is_one_line(monkeypatch, capsys):
    import verydeep.cli as cli

    def interrupted() -> argparse.ArgumentParser:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "verydeep: interrupted\n"


def test_a_path_the_system_refuses_is_one_line_naming_it(tmp_path, capsys):
    """A file where a folder must go, or a name too long for the file system: the system's refusal, one line."""
    data = write_dataset(tmp_path / "data", {"train": 2, "val": 1})
    (tmp_path / "afile").write_text("not a folder\n")
    long = tmp_path / ("L" * 300)
    cases = [(["data", "stats", str(data), "--workers", "0", "--out", str(tmp_path / "afile" / "s.json")],
              f"verydeep data stats: error: {tmp_path / 'afile'}: a file, where a folder is needed"),
             (["train", "--data", str(data), "--out", str(tmp_path / "afile" / "run"), "--crop", "32", "--scale",
               "36", "--width", "0.0625", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress"],
              f"verydeep train: error: {tmp_path / 'afile' / 'run'}: Not a directory"),
             (["convert", str(data), str(long) + ".safetensors"], "verydeep: error: "),
             ]
    for argv, start in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1, err

