"""``verydeep bench`` and the measured choice of precision on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny, write_dataset
from PIL import Image

from verydeep import vgg
from verydeep.bench import ceiling, peer, roofline
from verydeep.bench.data import bench_data, first_photo
from verydeep.bench.measure import count_macs
from verydeep.bench.ours import as_run, inference_net, open_trainer, steady_img_s
from verydeep.bench.reference import best_contenders
from verydeep.bench.settings import Settings
from verydeep.bench.summary import summarise
from verydeep.cli import main
from verydeep.errors import UserError
from verydeep.runtime import precision as precision_choice
from verydeep.runtime.device import cpu_model, pick_device
from verydeep.train import train

#: The JSON keys that carry a measurement, each a positive finite number.
MEASURED = ("train_img_s", "infer_img_s", "torchvision_fp32_train_img_s", "torchvision_fp32_infer_img_s",
            "train_ratio_vs_torchvision_fp32", "infer_ratio_vs_torchvision_fp32", "train_roofline_share",
            "infer_roofline_share", "roofline_tflops", "end_to_end_img_s", "end_to_end_vs_step",
            "train_ratio_at_roofline", "infer_ratio_at_roofline",
            "dense_s_per_image", "multicrop_s_per_image", "peak_memory_gib",
            "torchvision_best_train_img_s", "torchvision_best_infer_img_s", "train_ratio_vs_torchvision_best",
            "infer_ratio_vs_torchvision_best", "torchvision_best_train_roofline_share",
            "torchvision_best_infer_roofline_share")
#: The roofline shares of a run, each at most 1 (no contender beats the fastest kernel).
SHARES = ("train_roofline_share", "infer_roofline_share", "torchvision_fp32_train_roofline_share",
          "torchvision_fp32_infer_roofline_share", "torchvision_best_train_roofline_share",
          "torchvision_best_infer_roofline_share")


def test_bench_tiny_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A width-1/16 net on 32-pixel crops, one round, 72 generated JPEGs: every figure positive and
    finite, the ratios and shares consistent with the rates, no share above 1, torchvision at its best
    the faster of its eager and compiled runs, the roofline its precision's fastest kernel."""
    jpegs = write_dataset(tmp_path / "jpegs", {"train": 18}, size=(48, 40), ext="jpg")
    assert main(["bench", "--config", "A", "--size", "32", "--width", "0.0625", "--batch", "4", "--rounds", "1",
                 "--device", "cpu", "--workers", "0", "--data", str(jpegs), "--json"]) == 0
    capsys_text = capsys.readouterr().out
    result = json.loads(capsys_text.strip().splitlines()[-1])
    for key in MEASURED:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["train_ratio_vs_torchvision_fp32"] == pytest.approx(
        result["train_img_s"] / result["torchvision_fp32_train_img_s"], rel=0.01)
    for mode in ("train", "infer"):
        assert result[f"{mode}_ratio_vs_torchvision_best"] == pytest.approx(
            result[f"{mode}_img_s"] / result[f"torchvision_best_{mode}_img_s"], rel=0.01)
        best = result["torchvision_best"]
        rates = {v: best[f"{v}_{mode}_img_s"] for v in ("eager", "compiled")}
        assert result[f"torchvision_best_{mode}_img_s"] == rates[best[mode]] == max(rates.values()), rates
    assert all(0 < result[key] <= 1 for key in SHARES), {key: result[key] for key in SHARES}
    assert result["infer_ratio_vs_torchvision_fp32"] == pytest.approx(
        result["infer_img_s"] / result["torchvision_fp32_infer_img_s"], rel=0.01)
    assert result["end_to_end_vs_step"] == pytest.approx(result["end_to_end_img_s"] / result["train_img_s"], rel=0.01)
    achieved = result["train_img_s"] * result["train_flops_per_image"] / 1e12  # one round: its own share
    assert result["train_roofline_share"] == pytest.approx(achieved / result["roofline_tflops"], rel=0.01)
    precision = result["precision"]
    assert result["roofline_tflops"] == max(result["gemm_tflops"][precision], result["conv_tflops"][precision])
    assert result["roofline_kernel"] == result["rooflines"][precision]["kernel"]
    assert result["roofline_kernel"].startswith("mm " if result["roofline_tflops"] ==
                                                result["gemm_tflops"][precision] else "conv ")
    assert result["torchvision_best"]["precision"] == precision and result["torchvision_best"]["compile_error"] is None
    assert result["train_flops_per_image"] == 3 * result["infer_flops_per_image"]
    assert result["settings"]["size"] == 32 and result["settings"]["data"] == str(jpegs)
    assert {"cpu", "avx2", "avx512_bf16", "amx", "torch", "cores"} <= set(result["machine"])
    for mode in ("train", "infer"):  # one round: the kernel ceiling's figures are its own rates'
        ceiling_rate = result[f"{mode}_kernel_ceiling_img_s"] * result[f"{mode}_flops_per_image"] / 1e12
        assert ceiling_rate > 0 and result[f"{mode}_kernel_ceiling_roofline_share"] == pytest.approx(
            ceiling_rate / result["roofline_tflops"], rel=0.01)
        assert result[f"{mode}_share_of_kernel_ceiling"] == pytest.approx(
            result[f"{mode}_img_s"] / result[f"{mode}_kernel_ceiling_img_s"], rel=0.01)
        assert result[f"torchvision_best_{mode}_share_of_kernel_ceiling"] == pytest.approx(
            result[f"torchvision_best_{mode}_img_s"] / result[f"{mode}_kernel_ceiling_img_s"], rel=0.01)
    assert "kernel ceiling" in capsys_text


def test_ratios_and_shares_are_medians_of_each_rounds_own() -> None:
    """Rounds where the machine slowed down for every contender at once: each round's ratio and roofline
    share are kept (a median of ratios), not ratios of medians taken from different rounds; the roofline
    over torchvision's FLOP rate is the ratio at a roofline share of 1."""
    rounds = {"gemm_bf16_tflops": [1.0, 0.5, 1.0], "gemm_fp32_tflops": [0.5, 0.25, 0.5],
              "torchvision_train": [10.0, 2.0, 8.0], "torchvision_infer": [30.0, 10.0, 30.0],
              "train": [30.0, 12.0, 20.0], "infer": [60.0, 20.0, 45.0], "end_to_end": [27.0, 12.0, 18.0],
              "multicrop_s": [1.0, 1.0, 1.0], "dense_s": [0.2, 0.2, 0.2]}
    settings = Settings("D", 32, 1.0, 4, 3, 1, "cpu", 64)
    result = summarise(rounds, 10**9, torch.bfloat16, settings, "test", {}, 1.0)
    assert result["train_ratio_vs_torchvision_fp32"] == 3.0  # rounds: 3, 6, 2.5 (medians' ratio: 20/8)
    assert result["infer_ratio_vs_torchvision_fp32"] == 2.0  # rounds: 2, 2, 1.5
    assert result["end_to_end_vs_step"] == 0.9  # rounds: 0.9, 1, 0.9
    assert result["roofline_tflops"] == 1.0 and result["precision"] == "bf16"
    assert result["train_roofline_share"] == pytest.approx(0.144)  # rounds: 0.18, 0.144, 0.12
    assert result["train_ratio_at_roofline"] == pytest.approx(1e12 / (8.0 * 6e9), rel=1e-3)
    assert result["infer_ratio_at_roofline"] == pytest.approx(1e12 / (30.0 * 2e9), rel=1e-3)


def test_rooflines_per_round_and_torchvision_at_its_best() -> None:
    """Each round's roofline is the faster of its matrix product and its convolutions, named by the kernel
    that set it most often; torchvision at its best is its variant of the higher median (compiled for
    training, eager for inference here), and our ratios to it and its shares are each round's own."""
    rounds = {"gemm_bf16_tflops": [1.0, 0.5, 1.0], "conv_bf16_tflops": [0.8, 0.6, 1.2],
              "gemm_fp32_tflops": [0.5, 0.25, 0.5], "conv_fp32_tflops": [0.4, 0.2, 0.4],
              "torchvision_train": [10.0, 2.0, 8.0], "torchvision_infer": [30.0, 10.0, 30.0],
              "torchvision_best_eager_train": [10.0, 5.0, 9.0], "torchvision_best_compiled_train": [12.0, 4.0, 11.0],
              "torchvision_best_eager_infer": [40.0, 15.0, 30.0], "torchvision_best_compiled_infer": [35.0, 16.0, 29.0],
              "train": [30.0, 12.0, 20.0], "infer": [60.0, 20.0, 45.0], "end_to_end": [27.0, 12.0, 18.0],
              "multicrop_s": [1.0, 1.0, 1.0], "dense_s": [0.2, 0.2, 0.2]}
    kernels = {"gemm_bf16_tflops": ["mm 64"] * 3, "conv_bf16_tflops": ["conv a", "conv b", "conv b"],
               "gemm_fp32_tflops": ["mm 64"] * 3, "conv_fp32_tflops": ["conv a"] * 3}
    peer = {"precision": "bf16", "channels_last": True, "update": "SGD, fused", "compile_error": None}
    result = summarise(rounds, 10**9, torch.bfloat16, Settings("D", 32, 1.0, 4, 3, 1, "cpu", 64), "test", {}, 1.0,
                       kernels, peer)
    assert result["roofline_tflops"] == 1.0 and result["roofline_kernel"] == "conv b"  # rounds: 1, 0.6, 1.2
    assert result["rooflines"]["fp32"] == {"tflops": 0.5, "kernel": "mm 64"}
    assert result["train_roofline_share"] == pytest.approx(0.12)  # rounds: 0.18, 0.12, 0.1
    assert result["torchvision_best"]["train"] == "compiled" and result["torchvision_best"]["infer"] == "eager"
    assert result["torchvision_best_train_img_s"] == 11.0 and result["torchvision_best_infer_img_s"] == 30.0
    assert result["train_ratio_vs_torchvision_best"] == 2.5  # rounds: 2.5, 3, 1.82
    assert result["infer_ratio_vs_torchvision_best"] == 1.5  # rounds: 1.5, 1.33, 1.5
    assert result["torchvision_best_train_roofline_share"] == pytest.approx(0.055)  # rounds: 0.072, 0.04, 0.055
    assert result["torchvision_best"]["eager_train_img_s"] == 9.0


def test_roofline_keeps_the_fastest_kernel_and_names_it() -> None:
    """Two calls of the same kernel, one counted as a million times the work: that one sets the roofline. Each is
    warmed up and timed once when the roofline is made, then timed back to back (100 calls: it is short)."""
    calls = []
    measure = roofline.Roofline({"small": (lambda: calls.append(1), 1e3), "large": (lambda: calls.append(1), 1e9)},
                                torch.device("cpu"), repeats=2)
    assert len(calls) == 4 and measure.calls == {"small": 100, "large": 100}
    assert measure() > 1e9 / 1e12 and measure.winners == ["large"] and len(calls) == 4 + 2 * 2 * 100


def test_short_kernels_are_timed_back_to_back() -> None:
    """A kernel is called back to back for at least MIN_TIMING_S a timing (at most 100 calls), so that neither
    the waits for a GPU nor the caches other kernels left cold count as the kernel's time."""
    assert roofline.back_to_back(1e-4) == math.ceil(roofline.MIN_TIMING_S / 1e-4)
    assert roofline.back_to_back(1e-9) == 100 and roofline.back_to_back(1.0) == 1


def test_conv_shapes_of_a_tiny_net_by_hand() -> None:
    """Net A at width 1/16 on 32x32 (as in the MACs test): each distinct convolution but the first, with
    its input side; each kernel of the roofline counts the convolution's FLOPs."""
    model = vgg("A", num_classes=10, width=1 / 16, input_size=32)
    shapes = roofline.conv_shapes(model, 32)
    assert shapes == [(4, 8, 3, 16), (8, 16, 3, 8), (16, 16, 3, 8), (16, 32, 3, 4), (32, 32, 3, 4), (32, 32, 3, 2)]
    kernels = roofline.conv_kernels(shapes[0], 2, torch.device("cpu"), torch.float32)
    assert len(kernels) == 6 and {flops for _, flops in kernels.values()} == {2 * 2 * 8 * 4 * 9 * 16 * 16}
    assert all(run() is not None for run, _ in kernels.values())


def test_the_kernel_ceiling_names_only_timed_kernels_and_keeps_the_faster_layout() -> None:
    """Every kernel the ceiling of a tiny net A sums is timed (the roofline's convolutions or the ceiling's own:
    the first convolution, never its backward to the input, and the FC products, which cannot set the roofline);
    each pass takes its faster layout; inference sums forward passes only; FLOPs are the model's."""
    model = vgg("A", num_classes=10, width=1 / 16, input_size=32)
    cpu = torch.device("cpu")
    extra = ceiling.layer_kernels(model, 32, 2, cpu, None)
    measure = roofline.conv_roofline(model, 32, 2, cpu, None, extra)
    measure()
    assert measure.winners[0].startswith("conv ") and measure.winners[0] not in extra
    assert not any(name.endswith(roofline.TO_INPUT) and name.startswith("conv 3->") for name in extra)
    net = ceiling.layers(model, 32, 2)
    assert len(net) == 8 + 3 and set(net[0][0]) == {roofline.FORWARD, roofline.TO_WEIGHTS}
    assert all(set(names) == set(roofline.PASSES) for names, _ in net[1:])
    named = {name for names, _ in net for options in names.values() for name in options}
    assert named <= set(measure.rates[0]) and sum(flops for _, flops in net) == 2 * 2 * count_macs(model, 32)
    rates = dict.fromkeys(named, 1e9)  # each kernel at 1 GFLOP/s: the ceiling's seconds are its FLOPs' over 1e9
    train_flops = sum(flops for _, flops in net) * 3
    assert ceiling.seconds(rates, net, roofline.PASSES) == pytest.approx((train_flops - net[0][1]) / 1e9)
    assert ceiling.seconds(rates, net, (roofline.FORWARD,)) == pytest.approx(train_flops / 3 / 1e9)
    nchw = next(name for name in named if name.endswith("NCHW forward"))
    faster = ceiling.seconds(rates | {nchw: 2e9}, net, roofline.PASSES)
    slower = ceiling.seconds(rates | {nchw: 0.5e9}, net, roofline.PASSES)
    assert faster < ceiling.seconds(rates, net, roofline.PASSES) == pytest.approx(slower)
    figures = ceiling.per_round([rates, rates | {nchw: 2e9}], net, train_flops, train_flops / 3)
    assert figures["ceiling_train_tflops"][0] == pytest.approx(train_flops / (train_flops - net[0][1]) * 1e-3)
    assert figures["ceiling_infer_tflops"][0] == pytest.approx(1e-3)
    assert figures["ceiling_infer_tflops"][1] > 1e-3


def test_the_peer_without_a_compiler_runs_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails on this machine leaves torchvision at its best eager, the error reported in a line;
    the peer trains in channels_last with the fused update."""

    def broken(model: torch.nn.Module) -> object:
        def run(*args: object) -> None:
            raise RuntimeError("no C++ compiler\nmore")

        return run

    monkeypatch.setattr(peer.torch, "compile", broken)
    model = vgg("A", num_classes=10, width=1 / 16, input_size=32)
    contenders, info = peer.peer_contenders(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), None, 1, 1)
    assert set(contenders) == {"torchvision_best_eager_train", "torchvision_best_eager_infer"}
    assert info["compile_error"] == "RuntimeError: no C++ compiler" and info["precision"] == "fp32"
    assert all(f() > 0 for f in contenders.values())
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_the_compiled_peer_left_out_on_request() -> None:
    """``--no-compiled-peer`` (``compiled_peer=False``): torchvision at its best is measured eager alone."""
    settings = Settings("A", 32, 1 / 16, 2, 1, 1, "cpu", 64, compiled_peer=False)
    contenders, info = best_contenders(settings, 10, torch.device("cpu"), None)
    assert set(contenders) == {"torchvision_best_eager_train", "torchvision_best_eager_infer"}
    assert info["compile_error"] is None and info["precision"] == "fp32"


def test_bench_compile_runs_the_compiled_trainer_and_inference(tmp_path: Path) -> None:
    """``--compile`` benches the trainer as ``train --compile`` builds it (compiled on its first step), and inference
    as ``eval --compile`` runs it."""
    jpegs = write_dataset(tmp_path / "jpegs", {"train": 18}, size=(48, 40), ext="jpg")
    for compiled in (False, True):
        settings = Settings("A", 32, 1 / 16, 4, 1, 1, "cpu", 64, jpegs, 0, compiled)
        scratch = tmp_path / str(compiled)
        scratch.mkdir()
        root, _ = bench_data(jpegs, scratch, 32, 0)
        trainer = open_trainer(settings, root, scratch)
        assert trainer.cfg.compile is compiled
        uncompiled = (trainer.model, trainer.stepper.masters)  # the net itself, or on bf16 copies of its weights
        assert (trainer.stepper.forward_model not in uncompiled) is compiled
        assert isinstance(trainer.stepper.forward_model, torch._dynamo.eval_frame.OptimizedModule) is compiled
        # inference and evaluation as `eval --compile` runs them
        assert isinstance(as_run(trainer, inference_net(trainer)), torch._dynamo.eval_frame.OptimizedModule) is compiled


def test_end_to_end_rate_from_the_trainers_step_records(tmp_path: Path) -> None:
    records = [{"kind": "epoch"}, {"kind": "step", "step": 1, "img_s": 1.0}, {"kind": "step", "step": 2, "img_s": 8.0},
               {"kind": "step", "step": 3, "img_s": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert steady_img_s(tmp_path, 3, 2, 4) == pytest.approx(8 / (0.5 + 2))  # steps 2 and 3: 0.5 s and 2 s


def test_the_timed_photo_is_the_first_readable_image_of_any_format(tmp_path: Path) -> None:
    """Data of PNGs (no JPEG at all) gives the evaluation's photo too; an unreadable file is passed over."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(b"not an image")
    Image.new("RGB", (40, 30)).save(folder / "1.png")
    assert first_photo(tmp_path) == folder / "1.png"
    (folder / "1.png").unlink()
    with pytest.raises(UserError, match="no readable training image"):
        first_photo(tmp_path)


def test_bench_generates_jpegs_without_data(tmp_path: Path) -> None:
    root, source = bench_data(None, tmp_path, 32, 12)
    assert len(list((root / "train").rglob("*.jpg"))) == 12 and (root / "val").is_dir()
    assert source.startswith("12 generated")


def test_bench_refuses_a_config_torchvision_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--config", "C", "--device", "cpu"]) == 2
    assert "--config C" in capsys.readouterr().err


def test_macs_of_a_tiny_net_by_hand() -> None:
    """Net A at width 1/16 on 32x32: convs 3-4-8-16-16-32-32-32-32 at sides 32, 16, 8, 8, 4, 4, 2, 2
    (3x3 kernels), then FC 32-256-256-10 on the 1x1 map."""
    convs = [(3, 4, 32), (4, 8, 16), (8, 16, 8), (16, 16, 8), (16, 32, 4), (32, 32, 4), (32, 32, 2), (32, 32, 2)]
    fcs = [(32, 256), (256, 256), (256, 10)]
    by_hand = sum(9 * c_in * c_out * side**2 for c_in, c_out, side in convs) + sum(a * b for a, b in fcs)
    assert count_macs(vgg("A", num_classes=10, width=1 / 16, input_size=32), 32) == by_hand


def test_precision_measured_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(precision_choice.PRECISION_ENV, raising=False)
    timings = []
    monkeypatch.setattr(precision_choice, "bf16_matmul_speedup", lambda: timings.append(1) or 3.0)
    assert precision_choice.cpu_precision() == "bf16"
    cache = json.loads((tmp_path / "verydeep" / "precision.json").read_text())
    assert list(cache.values()) == ["bf16"] and cpu_model() in next(iter(cache))
    monkeypatch.setattr(precision_choice, "bf16_matmul_speedup", lambda: timings.append(1) or 0.1)
    assert precision_choice.cpu_precision() == "bf16" and len(timings) == 1  # reused, not measured again
    (tmp_path / "verydeep" / "precision.json").unlink()
    assert precision_choice.cpu_precision() == "fp32" and len(timings) == 2


def test_precision_forced_or_from_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(precision_choice.PRECISION_ENV, "fp32")
    assert precision_choice.autocast_dtype(pick_device("cpu"), "auto") is None
    monkeypatch.setenv(precision_choice.PRECISION_ENV, "fp16")
    with pytest.raises(UserError, match=precision_choice.PRECISION_ENV):
        precision_choice.cpu_precision()
    monkeypatch.delenv(precision_choice.PRECISION_ENV)

    def failing() -> float:
        raise RuntimeError("no bf16 kernels")

    monkeypatch.setattr(precision_choice, "bf16_matmul_speedup", failing)
    assert precision_choice.cpu_precision() == ("bf16" if precision_choice.cpu_has_fast_bf16() else "fp32")
    assert not (tmp_path / "verydeep" / "precision.json").exists()


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def test_bf16_training_tracks_fp32(data: Path, tmp_path: Path) -> None:
    """The same tiny training (batch norm, no dropout, 3 epochs of 4 steps) in bf16 and in fp32: both
    learn, and the mean losses of their last epochs are within 0.1 of each other. At a learning rate where
    fp32 itself learns without spikes (at 0.05 a bf16 spike in the last epoch came and went with the
    number of threads, whose order of summation changes the rounding)."""
    losses = {p: step_losses(Path(train(tiny(data, tmp_path / p, precision=p, epochs=3, batch_norm=True,
                                                 dropout=0.0, lr=0.02)).run_dir)) for p in ("fp32", "bf16")}
    last = {p: sum(values[-4:]) / 4 for p, values in losses.items()}
    assert all(last[p] < 0.6 * losses[p][0] for p in losses)
    assert abs(last["bf16"] - last["fp32"]) < 0.1


def test_bench_counts_the_readable_images_of_data_and_names_its_own_flags(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dataset(tmp_path / "data", {"train": 1}, ext="jpg")
    for name in ("broken.jpg", "empty.png"):
        (data / "train" / "class0" / name).write_bytes(b"not an image"[: 12 if name == "broken.jpg" else 0])
    argv = ["bench", "--config", "A", "--size", "32", "--width", "0.0625", "--batch", "4", "--rounds", "1",
            "--device", "cpu", "--workers", "0", "--data", str(data)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size" not in err
    assert err.startswith(f"verydeep bench: error: --data {data}: 4 readable training images (2 files unreadable), "
                          "fewer than the ") and "--batch" in err
    (tmp_path / "scratch").mkdir()
    assert bench_data(data, tmp_path / "scratch", 32, 4)[1] == str(data)  # enough when no more are needed


def test_a_timed_step_that_read_no_image_is_a_one_line_error(tmp_path: Path) -> None:
    records = [{"kind": "step", "step": 1, "img_s": 8.0}, {"kind": "step", "step": 3, "img_s": 4.0}]  # step 2: none
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError, match="a timed training step read none of its images"):
        steady_img_s(tmp_path, 3, 2, 4)
    assert steady_img_s(tmp_path, 3, 1, 4) == 4.0
