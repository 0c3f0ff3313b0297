"""The reproduction's nets trained (Sec. 3.1): each net from its parent under the paper's protocol,
resumed where an interrupted run stopped and left alone once finished, then measured on the test
images at once, so that a cut-short reproduction still reports; a ``--shard``'s share of the nets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verydeep.data import find_split
from verydeep.io.atomic import atomic_write
from verydeep.paper.measure import Measured, evaluate_net
from verydeep.paper.plot import read_metrics
from verydeep.paper.presets import Net, Preset
from verydeep.train import train


def train_net(net: Net, by_name: dict[str, Net], preset: Preset, data: Path, out: Path, device: str,
              progress: bool) -> Path:
    """Train one net unless it is done (an interrupted run resumes); returns its run directory."""

    nets_dir = out / "nets"
    done = nets_dir / net.name / "train_summary.json"
    if not done.is_file():
        summary = train(preset.train_config(net, by_name, data, nets_dir, device, progress))
        text = json.dumps(summary.to_dict(), indent=1)
        atomic_write(done, lambda tmp: Path(tmp).write_text(text))
    return nets_dir / net.name


def epochs_of(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir)[1]


@dataclass(frozen=True)
class Trained:
    """The nets trained and measured so far: their run directories, rows and time spent."""

    run_dirs: dict[str, Path]
    measured: list[Measured]
    seconds: dict[str, float]


def train_and_measure(order: list[Net], preset: Preset, data: Path, out: Path, device: str,
                      progress: bool) -> Trained:
    """Train each net of ``order`` (resumably, each from its parent under the paper's protocol) and
    evaluate it on the test images as soon as it is trained, so that a cut-short run still reports."""

    find_split(data, "train")
    test = find_split(data, "val")
    by_name = {n.name: n for n in preset.members()}
    out.mkdir(parents=True, exist_ok=True)
    done = Trained({}, [], {"training": 0.0, "evaluation": 0.0})
    for net in order:
        run_dir = done.run_dirs[net.name] = train_net(net, by_name, preset, data, out, device, progress)
        done.seconds["training"] += sum(r["seconds"] for r in epochs_of(run_dir))
        protocols = ("dense", "multicrop", "dense+multicrop") if net.jittered else preset.fixed_protocols
        rows, spent = evaluate_net(net.name, run_dir, test, protocols, preset.limit_test, out, device, progress)
        done.seconds["evaluation"] += spent
        done.measured.extend(rows)
    return done


def shard_of(preset: Preset, part: int, parts: int) -> list[Net]:
    """The nets of part ``part`` (1-based) of ``parts``: those whose seed is ``part - 1`` modulo
    ``parts``. A replica's parent has its seed, so each part trains on its own; several processes
    (one per core) train a seeded reproduction side by side into the same ``--out``."""
    return [net for net in preset.members() if net.seed % parts == part - 1]
