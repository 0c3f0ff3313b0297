"""verydeep plot: learning curves of a run as a PNG."""

from __future__ import annotations

import json
import os

import pytest
from conftest import write_dataset
from PIL import Image

from verydeep.cli import main
from verydeep.paper.plot import draw_validation, loss_name, plot_run


def test_plot_writes_a_png_of_the_curves(tmp_path):
    records = [{"kind": "step", "epoch": 1 + s // 4, "step": s + 1, "loss": 2.3 - 0.1 * s,
                "lr": 0.01 if s < 8 else 1e-3, "img_s": 100.0} for s in range(12)]
    records[4:4] = [{"kind": "epoch", "epoch": 1, "step": 4, "train_loss": 2.15, "val_top1": 30.0, "val_top5": 70.0}]
    records.append({"kind": "epoch", "epoch": 3, "step": 12, "train_loss": 1.4, "val_top1": None, "val_top5": None})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = plot_run(tmp_path)
    assert path == tmp_path / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 200
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "sub" / "c.png")]) == 0
    assert (tmp_path / "sub" / "c.png").is_file()


@pytest.mark.parametrize(("figures", "expected", "loss"), [
    ({"val_top1": 30.0, "val_top5": 70.0}, {"top-1": [70.0], "top-5": [30.0]}, "cross-entropy"),  # errors
    ({"val_loc_error": 40.0}, {"localisation": [40.0]}, "Euclidean (box code)"),  # an error already
    ({}, {}, "loss")])
def test_the_validation_panel_draws_the_runs_own_figure_as_errors(figures, expected, loss):
    """A classifier's accuracies as errors, a localisation run's error as it is; nothing validated: a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [{"kind": "epoch", "epoch": 1, "step": 4, "train_loss": 1.0, **figures},
              {"kind": "epoch", "epoch": 2, "step": 8, "train_loss": 0.9, **{key: None for key in figures}}]
    fig, ax = plt.subplots()
    draw_validation(ax, epochs)
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert drawn == expected and all(list(line.get_xdata()) == [4] for line in ax.lines)
    assert [t.get_text() for t in ax.texts] == ([] if expected else ["not validated yet"])
    assert loss_name(epochs) == loss
    plt.close(fig)


def test_plot_of_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl does not exist" in err


def test_plot_refuses_an_out_matplotlib_cannot_write_naming_out(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "epoch": 1, "step": 1, "loss": 1.0, "lr": 0.01}\n')
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path / 'curves.txt'}" in err and ".png" in err
    assert not (tmp_path / "curves.txt").exists()
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.pgf")]) == 2  # LaTeX's, not matplotlib's


def test_plot_reads_a_log_an_editor_saved_with_a_byte_order_mark(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'\xef\xbb\xbf{"kind": "step", "epoch": 1, "step": 1, "loss": 1.0, '
                                             b'"lr": 0.01}\n')
    assert plot_run(tmp_path).is_file()


def test_plot_leaves_out_a_last_record_a_crash_cut_short_as_resume_does(tmp_path, capsys):
    good = '{"kind": "step", "epoch": 1, "step": 1, "loss": 1.0, "lr": 0.01}\n'
    (tmp_path / "metrics.jsonl").write_text(good + '{"kind": "step", "epoch": 1, "st')
    assert main(["plot", str(tmp_path)]) == 0 and (tmp_path / "curves.png").is_file()
    assert f"warning: {tmp_path / 'metrics.jsonl'}:2: a damaged record (cut short" in capsys.readouterr().err


@pytest.mark.parametrize(("line", "message"), [
    ("[1, 2]", "not a JSON object"),
    ('{"epoch": 1, "step": 2, "loss": 1, "lr": 0.01}', '"kind" must be "step" or "epoch"'),
    ('{"kind": "step"}', 'the step record has no "epoch"'),
    ('{"kind": "step", "epoch": 1, "loss": 1, "lr": 0.01}', 'the step record has no "step"'),
    ('{"kind": "step", "epoch": 1, "step": 2, "loss": "abc", "lr": 0.01}', '"loss" must be a finite number >= 0'),
    ('{"kind": "step", "epoch": 1, "step": 2, "loss": -1, "lr": 0.01}', '"loss" must be a finite number >= 0'),
    ('{"kind": "step", "epoch": 1, "step": 2, "loss": NaN, "lr": 0.01}', '"loss" must be a finite number >= 0'),
    ('{"kind": "step", "epoch": 1, "step": 2, "loss": 1, "lr": -1}', '"lr" must be a finite number > 0'),
    ('{"kind": "step", "epoch": 1, "step": 2.5, "loss": 1, "lr": 0.01}', '"step" must be a positive integer'),
    ('{"kind": "step", "epoch": 0, "step": 2, "loss": 1, "lr": 0.01}', '"epoch" must be a positive integer'),
    ('{"kind": "step", "epoch": 1, "step": true, "loss": 1, "lr": 0.01}', '"step" must be a positive integer'),
    ('{"kind": "epoch", "epoch": 1, "step": 2}', 'the epoch record has no "train_loss"'),
    ('{"kind": "epoch", "epoch": 1, "step": 2, "train_loss": 1, "val_top1": 101}', '"val_top1" must be a figure in %'),
    ('{"kind": "epoch", "epoch": 1, "step": 2, "train_loss": 1, "val_top5": "x"}', '"val_top5" must be a figure in %'),
    ('{"kind": "epoch", "epoch": 1, "step": 2, "train_loss": 1, "val_loc_error": -3}', '"val_loc_error" must be a'),
    ('{"kind": "st\udcff"}', "not UTF-8 text (byte 13 of the line)"),
    ('{"kind": "step", "epoch": 1, "step": 2, "loss": 1' + "0" * 400 + ', "lr": 0.01}', '"loss" must be a finite'),
    ('{"kind": "step", "epoch": 1, "step": 2, "loss": 1' + "0" * 5000 + ', "lr": 0.01}', "not a JSON record"),
])
def test_plot_refuses_a_bad_record_naming_file_and_line(tmp_path, capsys, line, message):
    good = '{"kind": "step", "epoch": 1, "step": 1, "loss": 1.0, "lr": 0.01}\n'
    (tmp_path / "metrics.jsonl").write_bytes((good + line + "\n" + good).encode(errors="surrogateescape"))
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'metrics.jsonl'}:2: " in err and message in err
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("kind", ["step", "epoch"])
def test_plot_refuses_a_log_of_two_runs_or_one_repeated_naming_the_line_that_goes_back(tmp_path, capsys, kind):
    """One run's log counts its steps and epochs up; two joined (or one copied twice) would be drawn as one run
    zig-zagging back, titled with the wrong number of epochs."""
    one = "".join(f'{{"kind": "step", "epoch": {1 + i // 2}, "step": {1 + i}, "loss": 1.0, "lr": 0.01}}\n'
                  for i in range(4))
    one += "".join(f'{{"kind": "epoch", "epoch": {e}, "step": {2 * e}, "train_loss": 1.0}}\n' for e in (1, 2))
    lines = one.splitlines(keepends=True)
    joined = one + (lines[0] if kind == "step" else lines[4])  # the next run's first record of that kind
    (tmp_path / "metrics.jsonl").write_text(joined)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"metrics.jsonl:7: {kind} 1 follows {kind} {4 if kind == 'step' else 2}" in err
    assert not (tmp_path / "curves.png").exists()
    (tmp_path / "metrics.jsonl").write_text(one)
    assert main(["plot", str(tmp_path)]) == 0


def test_plot_writes_over_none_of_its_runs_files_even_through_a_link(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    metrics = '{"kind": "step", "epoch": 1, "step": 1, "loss": 1.0, "lr": 0.01}\n'
    (run / "metrics.jsonl").write_text(metrics)
    (run / "checkpoints" / "best.pt").write_bytes(b"weights")
    (tmp_path / "best.png").symlink_to(run / "checkpoints" / "best.pt")
    (tmp_path / "metrics.png").symlink_to(run / "metrics.jsonl")
    for out in (tmp_path / "best.png", tmp_path / "metrics.png", run / "checkpoints" / "x.png"):
        assert main(["plot", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        among_its_files = out.parent == run / "checkpoints"  # refused for every command, the run read or not
        assert err.count("\n") == 1 and (f"would replace a file of the training run {run}" if among_its_files
                                         else "would write over") in err and "files" in err
    assert (run / "checkpoints" / "best.pt").read_bytes() == b"weights"
    assert (run / "metrics.jsonl").read_text() == metrics
    assert not (run / "checkpoints" / "x.png").exists()
    assert main(["plot", str(run), "--out", str(run / "curves.svg")]) == 0  # beside them: allowed


def test_plot_and_data_stats_leave_a_file_hard_linked_to_their_out_whole(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = '{"kind": "step", "epoch": 1, "step": 1, "loss": 1.0, "lr": 0.01}\n'
    (run / "metrics.jsonl").write_text(metrics)
    os.link(run / "metrics.jsonl", tmp_path / "linked.png")
    assert main(["plot", str(run), "--out", str(tmp_path / "linked.png")]) == 0
    assert (run / "metrics.jsonl").read_text() == metrics  # the out file was replaced, not written through
    with Image.open(tmp_path / "linked.png") as image:
        assert image.format == "PNG"
    data = write_dataset(tmp_path / "data", {"train": 2})
    image_file = data / "train" / "class0" / "0.png"
    before = image_file.read_bytes()
    os.link(image_file, tmp_path / "stats.json")  # no statistics: refused, not written over
    assert main(["data", "stats", str(data), "--workers", "0", "--out", str(tmp_path / "stats.json")]) == 2
    assert image_file.read_bytes() == before == (tmp_path / "stats.json").read_bytes()
    assert main(["data", "stats", str(data), "--workers", "0", "--out", str(tmp_path / "first.json")]) == 0
    first = (tmp_path / "first.json").read_text()
    os.link(tmp_path / "first.json", tmp_path / "again.json")  # earlier statistics: replaced, not written through
    argv = ["data", "stats", str(data), "--workers", "0", "--mean-only", "--out", str(tmp_path / "again.json")]
    assert main(argv) == 0
    assert (tmp_path / "first.json").read_text() == first != (tmp_path / "again.json").read_text()
