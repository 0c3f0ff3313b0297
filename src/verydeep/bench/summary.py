"""The bench's result: the rounds' medians, paired ratios and roofline shares as one JSON-ready dict, the
machine they belong to, and the short table printed."""

from __future__ import annotations

import datetime
import resource
import statistics
from dataclasses import asdict
from typing import Any

import torch

from verydeep.bench import roofline
from verydeep.bench.peer import VARIANTS, best_variant
from verydeep.bench.settings import WARMUP_STEPS, Settings
from verydeep.eval.nets import paper_scales
from verydeep.runtime.precision import precision_name


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory: the device's allocations on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def sig(value: float) -> float:
    """``value`` to four significant digits."""
    return float(f"{value:.4g}")


def paired(numerator: list[float], denominator: list[float], scale: float = 1.0) -> float:
    """The median over the rounds of each round's ``scale * numerator / denominator``."""
    return sig(statistics.median(scale * a / b for a, b in zip(numerator, denominator, strict=True)))


def peer_fields(rounds: dict[str, list[float]], peer: dict[str, Any], roof: list[float],
                flops: dict[str, int]) -> dict[str, Any]:
    """The peer at its best (its faster variant at each of ``train`` and ``infer``, named): its rates, our
    ratios to them and its share of its precision's roofline ``roof`` (per round)."""
    info = dict(peer)
    fields: dict[str, Any] = {"torchvision_best": info}
    for mode in ("train", "infer"):
        variant = info[mode] = best_variant(rounds, mode)
        for v in VARIANTS:
            key = f"torchvision_best_{v}_{mode}"
            info[f"{v}_{mode}_img_s"] = sig(statistics.median(rounds[key])) if key in rounds else None
        best = rounds[f"torchvision_best_{variant}_{mode}"]
        fields[f"torchvision_best_{mode}_img_s"] = sig(statistics.median(best))
        fields[f"{mode}_ratio_vs_torchvision_best"] = paired(rounds[mode], best)
        fields[f"torchvision_best_{mode}_roofline_share"] = paired(best, roof, flops[mode] / 1e12)
    return fields


def ceiling_fields(rounds: dict[str, list[float]], roof: list[float], flops: dict[str, int],
                   peer: dict[str, Any] | None) -> dict[str, Any]:
    """The kernel ceiling (:mod:`.ceiling`) of training and inference: its rate, its share of the roofline
    ``roof`` (per round), our share of it and, where ``peer`` (torchvision at its best, its variants chosen) runs
    in our precision, the peer's; each the median of the rounds' own."""
    fields: dict[str, Any] = {}
    for mode in ("train", "infer"):
        ceiling = rounds[f"ceiling_{mode}_tflops"]
        fields[f"{mode}_kernel_ceiling_img_s"] = sig(statistics.median(ceiling) * 1e12 / flops[mode])
        fields[f"{mode}_kernel_ceiling_roofline_share"] = paired(ceiling, roof)
        fields[f"{mode}_share_of_kernel_ceiling"] = paired(rounds[mode], ceiling, flops[mode] / 1e12)
        if peer is not None:
            best = rounds[f"torchvision_best_{peer[mode]}_{mode}"]
            fields[f"torchvision_best_{mode}_share_of_kernel_ceiling"] = paired(best, ceiling, flops[mode] / 1e12)
    return fields


def summarise(rounds: dict[str, list[float]], macs: int, dtype: torch.dtype | None, settings: Settings,
              source: str, hardware: dict[str, Any], peak_gib: float, kernels: dict[str, list[str]] | None = None,
              peer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Medians, ratios and roofline shares (each the median of the rounds' own, against each round's roofline)
    of the rounds' measurements, as one JSON-ready dict; ``kernels``: the kernel that set each roofline
    measurement, ``peer``: what torchvision at its best is (its rounds ``torchvision_best_*``)."""
    m = {name: statistics.median(values) for name, values in rounds.items()}
    precision = precision_name(dtype)
    roofs = {p: roofline.per_round(rounds, kernels or {}, p) for p in roofline.DTYPES
             if f"gemm_{p}_tflops" in rounds or f"conv_{p}_tflops" in rounds}
    top = {p: roofline.summary(*measured) for p, measured in roofs.items()}
    flops = {"train": 6 * macs, "infer": 2 * macs}

    def share(name: str, mode: str, p: str = precision) -> float:
        return paired(rounds[name], roofs[p][0], flops[mode] / 1e12)

    def at_roofline(mode: str) -> float:  # the roofline over torchvision fp32's rate, in its FLOPs
        return sig(top[precision]["tflops"] * 1e12 / (m[f"torchvision_{mode}"] * flops[mode]))

    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": hardware,
        "settings": {**asdict(settings), "data": source, "warmup_steps": WARMUP_STEPS,
                     "test_scales": paper_scales(settings.size)},
        "precision": precision,
        "gemm_tflops": {p: sig(m[f"gemm_{p}_tflops"]) for p in roofs if f"gemm_{p}_tflops" in m},
        "conv_tflops": {p: sig(m[f"conv_{p}_tflops"]) for p in roofs if f"conv_{p}_tflops" in m},
        "rooflines": {p: {"tflops": sig(t["tflops"]), "kernel": t["kernel"]} for p, t in top.items()},
        "roofline_tflops": sig(top[precision]["tflops"]), "roofline_kernel": top[precision]["kernel"],
        "macs_per_image": macs, "train_flops_per_image": flops["train"], "infer_flops_per_image": flops["infer"],
        "train_img_s": sig(m["train"]), "infer_img_s": sig(m["infer"]),
        "torchvision_fp32_train_img_s": sig(m["torchvision_train"]),
        "torchvision_fp32_infer_img_s": sig(m["torchvision_infer"]),
        "train_ratio_vs_torchvision_fp32": paired(rounds["train"], rounds["torchvision_train"]),
        "infer_ratio_vs_torchvision_fp32": paired(rounds["infer"], rounds["torchvision_infer"]),
        "train_ratio_at_roofline": at_roofline("train"), "infer_ratio_at_roofline": at_roofline("infer"),
        "train_roofline_share": share("train", "train"), "infer_roofline_share": share("infer", "infer"),
        "torchvision_fp32_train_roofline_share": share("torchvision_train", "train", "fp32"),
        "torchvision_fp32_infer_roofline_share": share("torchvision_infer", "infer", "fp32"),
    }
    if peer is not None:
        result.update(peer_fields(rounds, peer, roofs[peer["precision"]][0], flops))
    if "ceiling_train_tflops" in rounds:
        same = result.get("torchvision_best") if peer is not None and peer["precision"] == precision else None
        result.update(ceiling_fields(rounds, roofs[precision][0], flops, same))
    return result | {
        "end_to_end_img_s": sig(m["end_to_end"]),
        "end_to_end_vs_step": paired(rounds["end_to_end"], rounds["train"]),
        "dense_s_per_image": sig(m["dense_s"]), "multicrop_s_per_image": sig(m["multicrop_s"]),
        "multicrop_vs_dense": sig(m["multicrop_s"] / m["dense_s"]),
        "peak_memory_gib": sig(peak_gib),
        "rounds": {name: [sig(v) for v in values] for name, values in rounds.items()},
        "roofline_kernels": kernels or {},
    }


def row(name: str, result: dict[str, Any], rate: str, share: str) -> str:
    """A contender's line of the table: training and inference rates (``rate`` and ``share`` formatted with
    ``train``, ``infer``) and roofline shares."""
    return (f"{name:<26}{result[rate.format('train')]:>12.1f}{result[share.format('train')]:>8.0%}"
            f"{result[rate.format('infer')]:>13.1f}{result[share.format('infer')]:>8.0%}")


def peer_rows(result: dict[str, Any]) -> list[str]:
    """The table's lines of torchvision at its best, when measured: its row, our ratios to it, its compiler's
    failure."""
    if "torchvision_best" not in result:
        return []
    best = result["torchvision_best"]
    lines = [row(f"torchvision best {best['precision']}", result, "torchvision_best_{}_img_s",
                 "torchvision_best_{}_roofline_share"),
             f"{'':<4}({best['train']} for training, {best['infer']} for inference; ratio vs it: train "
             f"{result['train_ratio_vs_torchvision_best']:.2f}x, "
             f"inference {result['infer_ratio_vs_torchvision_best']:.2f}x)"]
    if best["compile_error"]:
        lines.append(f"{'':<4}(not compiled: {best['compile_error']})")
    return lines


def ceiling_rows(result: dict[str, Any]) -> list[str]:
    """The table's line of the kernel ceiling, when measured."""
    if "train_kernel_ceiling_img_s" not in result:
        return []
    peer = (f", torchvision at its best {result['torchvision_best_train_share_of_kernel_ceiling']:.0%} and "
            f"{result['torchvision_best_infer_share_of_kernel_ceiling']:.0%}"
            if "torchvision_best_train_share_of_kernel_ceiling" in result else "")
    return [f"kernel ceiling (each layer's kernels alone, at their best): train "
            f"{result['train_kernel_ceiling_img_s']:.1f} img/s = {result['train_kernel_ceiling_roofline_share']:.0%} "
            f"of the roofline, inference {result['infer_kernel_ceiling_img_s']:.1f} = "
            f"{result['infer_kernel_ceiling_roofline_share']:.0%}; ours {result['train_share_of_kernel_ceiling']:.0%} "
            f"and {result['infer_share_of_kernel_ceiling']:.0%} of it{peer}"]


def render(result: dict[str, Any]) -> str:
    """The result as a short table."""
    s, hw = result["settings"], result["machine"]
    where = hw.get("gpu") or f"{hw['cpu']}, {hw['threads']} threads"
    lines = [
        f"VGG-{s['config']} width {s['width']:g}, {s['size']}x{s['size']}, batch {s['batch']}, on {where}; "
        f"precision {result['precision']}{', ours compiled (train and eval --compile)' if s.get('compile') else ''}; "
        f"{s['rounds']} rounds, "
        f"medians; images: {s['data']}",
        *(f"roofline {p}: {r['tflops']:.3f} TFLOP/s ({r['kernel']})" for p, r in result["rooflines"].items()),
        f"{'':<26}{'train img/s':>12}{'share':>8}{'infer img/s':>13}{'share':>8}",
        row("torchvision fp32 NCHW", result, "torchvision_fp32_{}_img_s", "torchvision_fp32_{}_roofline_share"),
        *peer_rows(result),
        row(f"verydeep {result['precision']}", result, "{}_img_s", "{}_roofline_share"),
        f"ratio vs torchvision fp32: train {result['train_ratio_vs_torchvision_fp32']:.2f}x "
        f"(at the roofline {result['train_ratio_at_roofline']:.2f}x), inference "
        f"{result['infer_ratio_vs_torchvision_fp32']:.2f}x (at the roofline {result['infer_ratio_at_roofline']:.2f}x)",
        *ceiling_rows(result),
        f"end to end (data loading included): {result['end_to_end_img_s']:.1f} img/s, "
        f"{result['end_to_end_vs_step']:.0%} of the step",
        f"evaluation per image over Q={','.join(map(str, s['test_scales']))}: dense "
        f"{result['dense_s_per_image']:.3f} s, 150 crops {result['multicrop_s_per_image']:.3f} s "
        f"({result['multicrop_vs_dense']:.1f}x)",
        f"peak memory {result['peak_memory_gib']:.2f} GiB; {result['macs_per_image'] / 1e9:.3f} GMACs per image",
    ]
    return "\n".join(lines)
