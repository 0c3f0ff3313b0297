"""The reproduction's nets trained (Sec. 3.1): each net from its parent under the paper's protocol,
resumed where an interrupted run stopped and reused once finished, then measured on the test images
at once, so that a cut-short reproduction still reports; a ``--shard``'s share of the nets.

A net, or its cached evaluation, already in ``--out`` is reused only when it was trained (measured)
with the settings and data this run would use: one that differs is refused before anything in
``--out`` is written, since its figures would be reported under the new settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from verydeep.data.datasets import split_apart
from verydeep.data.splits import open_split
from verydeep.errors import UserError
from verydeep.eval.nets import derive_scales
from verydeep.io.atomic import atomic_write
from verydeep.io.rundir import RunDir
from verydeep.nn.tasks import Classification
from verydeep.paper.measure import Measured, evaluate_net
from verydeep.paper.plot import REPORTED, read_metrics
from verydeep.paper.presets import Net, Preset
from verydeep.runtime.device import pick_device
from verydeep.train import train
from verydeep.train.data import TrainingData, path_digest, relative_paths
from verydeep.train.recipe import TrainConfig, stored_settings

SUMMARY = "train_summary.json"
EVAL_SETTINGS = "settings.json"  # in an evaluation cache: what it was measured with

#: Settings that say how a net is trained, not what it learns (the running group: device, workers,
#: progress, resume...), and the statistics, which the data decides: another invocation may differ in them.
HOW = {f.name for f in fields(TrainConfig) if f.metadata["group"] == "running"} | {"preprocess"}
LEARNED = {f.name for f in fields(TrainConfig)} - HOW


def train_net(net: Net, by_name: dict[str, Net], preset: Preset, data: Path, out: Path, device: str,
              progress: bool) -> Path:
    """Train one net unless it is done (an interrupted run resumes; :func:`check_reuse` has vouched for both);
    returns its run directory."""

    nets_dir = out / "nets"
    done = nets_dir / net.name / SUMMARY
    if not done.is_file():
        summary = train(preset.train_config(net, by_name, data, nets_dir, device, progress))
        text = json.dumps(summary.to_dict(), indent=1)
        atomic_write(done, lambda tmp: Path(tmp).write_text(text))
    return nets_dir / net.name


def learned(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of a run record (or :meth:`TrainConfig.to_dict`) that decide what the net learns,
    comparable across invocations: the weights as the name of the net they come from; the data apart
    (:func:`places_of_recorded_data`), since a path given relative to another folder reads alike."""
    kept = {key: value for key, value in settings.items() if key in LEARNED and key != "data"}
    if kept.get("weights") is not None:  # NETS/PARENT/checkpoints/last.pt: --out may have moved since
        kept["weights"] = Path(kept["weights"]).parents[1].name
    return kept


def places_of_recorded_data(stored: dict[str, Any], run_dir: Path) -> set[Path]:
    """Where the data a run record names may be now: the resolved path it recorded; the same place
    relative to the run directory as when it was recorded (``--out`` and ``--data`` given from one folder:
    both moved together, as the demo's data inside its ``--out``); and the path as given, from here."""
    data, out = stored.get("data"), stored.get("out")
    places = {Path(stored["data_resolved"])} if stored.get("data_resolved") else set()
    if data and out and Path(data).is_absolute() == Path(out).is_absolute():
        places.add(run_dir / os.path.relpath(data, out))
    if data:
        places.add(Path(data))
    return {place.resolve() for place in places}


def first_change(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting of ``new`` that ``old`` holds with another value: (name, old, new)."""
    return next(((key, old[key], value) for key, value in new.items() if key in old and old[key] != value), None)


def refusal(out: Path, what: str, change: tuple[str, Any, Any], remedy: str) -> UserError:
    """The one-line refusal to reuse ``what`` in ``out``, naming the first setting that differs."""
    key, old, new = change
    return UserError(f"--out {out}: {what} with {key} {old!r}, but this run would use {key} {new!r}; give "
                     f"another --out, or {remedy}")


def check_net(net: Net, by_name: dict[str, Net], preset: Preset, data: Path, out: Path) -> None:
    """Refuse a net in ``out`` trained (or begun) with other settings or data than this run's."""
    run_dir = out / "nets" / net.name
    stored = stored_settings(run_dir) if run_dir.is_dir() else {}
    if not stored:
        return
    cfg = preset.train_config(net, by_name, data, out / "nets", "cpu", False)  # device: not compared
    change = first_change(learned(stored), learned(cfg.to_dict()))
    if change is None and stored.get("data") and data.resolve() not in places_of_recorded_data(stored, run_dir):
        change = ("data", stored["data"], str(data))
    trained_on = stored.get("training", {}).get("sha256") if isinstance(stored.get("training"), dict) else None
    if change is None and trained_on is not None:  # the same folder, but other images in it
        now = TrainingData(cfg, Classification(), "cpu").record()["training"]["sha256"]
        change = ("training images", trained_on[:16], now[:16]) if now != trained_on else None
    if change:
        raise refusal(out, f"net {net.name} was trained", change, f"delete {out} to start anew")


def split_digest(split: Path) -> str:
    """A short digest of the test images of a split, by their paths within it (class folder included); fewer
    than two is a :class:`UserError`: the paired test compares nets image by image."""
    paths = relative_paths(open_split(split, lambda path: None))
    if len(paths) < 2:
        raise UserError(f"{split}: {len(paths)} test image(s); the paired test of two nets needs 2 at least")
    return path_digest(paths)[:16]


def eval_settings(net: Net, preset: Preset, test: Path, digest: str, run_dir: Path) -> dict[str, Any]:
    """What a net's evaluation is measured with: the test images (their folder, and ``digest``, the
    :func:`split_digest` of their paths), protocols, test scales and the training it measures (a digest of the
    net's summary, which a new training rewrites)."""
    protocols = ("dense", "multicrop", "dense+multicrop") if net.jittered else preset.fixed_protocols
    summary = run_dir / SUMMARY
    trained = hashlib.sha256(summary.read_bytes()).hexdigest()[:16] if summary.is_file() else None
    scales = derive_scales({"crop": preset.crop, "scale": list(preset.scale(net.scale))})
    out, images = run_dir.parents[1].resolve(), test.resolve()  # RUN = OUT/nets/NAME
    data = f"OUT/{images.relative_to(out)}" if images.is_relative_to(out) else str(images)  # moves with --out
    return {"data": data, "images": digest, "limit_test": preset.limit_test,
            "protocols": list(protocols), "scales": scales, "trained": trained}


def read_eval_settings(cache: Path) -> dict[str, Any] | None:
    """The settings an evaluation cache was measured with; None without a finished evaluation or a
    readable record of them (it is measured again)."""
    finished = all((cache / name).is_file() for name in ("results.json", "posteriors.npz", EVAL_SETTINGS))
    try:
        return json.loads((cache / EVAL_SETTINGS).read_text()) if finished else None
    except ValueError:  # not UTF-8, not JSON, or an integer of thousands of digits
        return None


def check_reuse(order: list[Net], preset: Preset, data: Path, out: Path, device: str) -> tuple[Path, str]:
    """Every option and every net of ``order`` already in ``out`` checked before anything is written:
    the device, the data, each net's training and each finished net's cached evaluation (see the
    module's docstring); returns the test images' folder and its :func:`split_digest` (listed once)."""
    pick_device(device)
    if preset.limit_test is not None and preset.limit_test < 2:
        raise UserError(f"--limit-test {preset.limit_test}: the paired test of two nets needs 2 images at least")
    test = split_apart(data, "test", "the paper's errors are measured on images no net trained on")
    images = split_digest(test)
    by_name = {n.name: n for n in preset.members()}
    for net in order:
        check_net(net, by_name, preset, data, out)
        run_dir, cache = out / "nets" / net.name, out / "eval" / net.name
        cached = read_eval_settings(cache)
        if cached is not None and (run_dir / SUMMARY).is_file():
            change = first_change(cached, eval_settings(net, preset, test, images, run_dir))
            if change:
                raise refusal(out, f"the evaluation of net {net.name} was measured", change, f"delete {cache}")
    return test, images


def measure(net: Net, preset: Preset, test: Path, images: str, run_dir: Path, out: Path, device: str,
            progress: bool) -> tuple[list[Measured], float]:
    """A trained net's rows on the test images: its cached evaluation when that measured this training
    with these settings, else a new one (the cache's settings written first, so a cut-short evaluation
    is redone)."""
    cache, wanted = out / "eval" / net.name, eval_settings(net, preset, test, images, run_dir)
    if read_eval_settings(cache) != wanted:  # none yet, or of an earlier training of the net
        for name in ("results.json", "posteriors.npz"):
            (cache / name).unlink(missing_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        text = json.dumps(wanted, indent=1)
        atomic_write(cache / EVAL_SETTINGS, lambda tmp: Path(tmp).write_text(text))
    return evaluate_net(net.name, run_dir, test, tuple(wanted["protocols"]), preset.limit_test, out, device,
                        preset.workers, progress)


def epochs_of(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch records of a trained net, each with what the report reads (:data:`~verydeep.paper.plot.REPORTED`):
    none is a :class:`UserError` (a log whose last lines were lost)."""
    epochs = read_metrics(run_dir, REPORTED)[1]
    if not epochs:
        raise UserError(f"{RunDir(run_dir).metrics}: no epoch record of a trained net (its last lines lost?); remove "
                        f"{run_dir} to train the net again")
    return epochs


@dataclass(frozen=True)
class Trained:
    """The nets trained and measured so far: their run directories, rows and time spent."""

    run_dirs: dict[str, Path]
    measured: list[Measured]
    seconds: dict[str, float]


def train_and_measure(order: list[Net], preset: Preset, data: Path, out: Path, device: str,
                      progress: bool) -> Trained:
    """Train each net of ``order`` (resumably, each from its parent under the paper's protocol) and
    evaluate it on the test images as soon as it is trained, so that a cut-short run still reports;
    the options and the nets already in ``out`` are checked first (:func:`check_reuse`)."""

    test, images = check_reuse(order, preset, data, out, device)
    by_name = {n.name: n for n in preset.members()}
    out.mkdir(parents=True, exist_ok=True)
    done = Trained({}, [], {"training": 0.0, "evaluation": 0.0})
    for net in order:
        run_dir = done.run_dirs[net.name] = train_net(net, by_name, preset, data, out, device, progress)
        done.seconds["training"] += sum(r["seconds"] for r in epochs_of(run_dir))
        rows, spent = measure(net, preset, test, images, run_dir, out, device, progress)
        done.seconds["evaluation"] += spent
        done.measured.extend(rows)
    return done


def shard_of(preset: Preset, part: int, parts: int) -> list[Net]:
    """The nets of part ``part`` (1-based) of ``parts``: those whose seed is ``part - 1`` modulo
    ``parts``. A replica's parent has its seed, so each part trains on its own; several processes
    (one per core) train a seeded reproduction side by side into the same ``--out``."""
    return [net for net in preset.members() if net.seed % parts == part - 1]
