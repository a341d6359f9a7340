"""Whole-model latency of an original torchvision model against its converted versions.

Variants are the original, the conversion at depth multipliers 1, 2 and 4, and
"K=1, faster layers only". The last keeps a layer dense wherever the dense conv
timed faster than its separable pair at that layer's real input shape, batch and
layout; this script does that per-layer timing itself. ``--variant
NAME=JSON`` adds any other ``run_conversion`` keyword set, for example a
budget mode.

Each variant is timed at every batch size and memory layout, and shown next to
its MAC ratio (original MACs / converted MACs). Time can at best fall as fast as
MACs do, so the MAC ratio is the limit of the speedup; "share of limit" is the
measured speedup divided by the MAC ratio.

    python benchmarks/model_latency.py                              # resnet50, CPU
    python benchmarks/model_latency.py --model mobilenet_v2 --batches 1
    python benchmarks/model_latency.py --device cuda --layouts contiguous,channels_last
    python benchmarks/model_latency.py --variant 'budget 50%={"parameter_budget": 0.5}'
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from common import describe_environment, markdown_table, parse_list, time_call
from convert import run_conversion
from convert.measure import count_macs


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """Parse ``NAME=JSON`` into a label and ``run_conversion`` keyword arguments."""
    name, separator, arguments = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=JSON, e.g. 'K=3={{\"depth_multiplier\": 3}}'")
    try:
        keywords = json.loads(arguments)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: the part after '=' is not JSON ({error})") from None
    if not isinstance(keywords, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: the JSON must be an object of run_conversion keywords")
    return name, keywords


def in_layout(module: nn.Module, x: torch.Tensor, layout: str) -> tuple[nn.Module, torch.Tensor]:
    if layout == "channels_last":
        return module.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return module.to(memory_format=torch.contiguous_format), x.contiguous()


def conv_inputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Size]:
    """Return the input shape each named module receives when ``model`` runs on ``x``."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, inputs[0].shape)  # a hook that returns a value replaces the inputs

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def keep_faster_layers(original: nn.Module, converted: nn.Module, x: torch.Tensor, layout: str, min_run_time: float, device: str) -> tuple[nn.Module, int, int]:
    """Put back the dense conv wherever it timed faster than its separable pair.

    Returns the model and how many layers stayed separable and went back to dense.
    """
    model = copy.deepcopy(converted)
    names = [name for name, module in converted.named_modules() if type(module).__name__.startswith("DepthwiseSeparableConv")]
    shapes = conv_inputs(original, x, names)
    kept = reverted = 0
    for name in names:
        sample = torch.randn(shapes[name], device=device)
        dense, dense_input = in_layout(copy.deepcopy(original.get_submodule(name)), sample, layout)
        separable, separable_input = in_layout(model.get_submodule(name), sample, layout)
        dense_time = time_call(lambda: dense(dense_input), min_run_time, device)
        separable_time = time_call(lambda: separable(separable_input), min_run_time, device)
        if dense_time.median_ms <= separable_time.median_ms:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
            reverted += 1
        else:
            kept += 1
    return model, kept, reverted


def main() -> None:
    parser = argparse.ArgumentParser(description="Time a torchvision model before and after conversion.")
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default: resnet50)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--layouts", default="contiguous,channels_last", help="memory formats (default: both)")
    parser.add_argument("--multipliers", default="1,2,4", help="depth multipliers to convert at (default: 1,2,4)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default: 224)")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timing per model and setting, split over the rounds (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in which the models take turns (default: 3)")
    parser.add_argument("--layer-run-time", type=float, default=0.1, help="seconds of timing per layer for the faster-layers variant (default: 0.1)")
    parser.add_argument("--no-layer-selection", action="store_true", help="skip the 'faster layers only' variant")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=JSON", help="extra variant: a label and run_conversion keywords as JSON (repeatable)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = args.device

    original = torchvision.models.get_model(args.model).eval().to(device)
    sample = torch.randn(1, 3, args.size, args.size, device=device)
    original_macs, _ = count_macs(original, sample)

    variants: dict[str, dict[str, object]] = {f"K={k}": {"depth_multiplier": int(k)} for k in parse_list(args.multipliers)}
    variants.update(dict(args.variant))
    converted: dict[str, nn.Module] = {}
    macs: dict[str, int] = {}
    for name, keywords in variants.items():
        result = run_conversion(original, **keywords)
        converted[name] = result.model.eval()
        macs[name] = count_macs(result.model, sample)[0]
        print(f"{name}: converted {len(result.converted)} of {len(result.layers)} convs in {sum(result.seconds.values()):.2f} s", file=sys.stderr)

    rows = []
    for batch in (int(text) for text in parse_list(args.batches)):
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        for layout in parse_list(args.layouts):
            candidates = {"original": original, **converted}
            ratios = {"original": 1.0, **{name: original_macs / macs[name] for name in converted}}
            if not args.no_layer_selection and "K=1" in converted:
                selected, kept, reverted = keep_faster_layers(original, converted["K=1"], x, layout, args.layer_run_time, device)
                label = f"K=1, faster layers only ({kept} separable, {reverted} dense)"
                candidates[label] = selected
                ratios[label] = original_macs / count_macs(selected, sample)[0]

            medians = time_interleaved(candidates, x, layout, args.rounds, args.min_run_time, device)
            baseline = statistics.median(medians["original"])
            for name, values in medians.items():
                speedup = baseline / statistics.median(values)
                share = "-" if name == "original" else f"{speedup / ratios[name]:.0%}"
                rows.append([args.model, batch, layout, name, spread_text(values), f"{speedup:.2f}", f"{ratios[name]:.2f}", share])
                print(rows[-1], file=sys.stderr, flush=True)

    print(f"### {args.model} latency on {device}, input {args.size}x{args.size}\n")
    print(describe_environment(device) + "\n")
    print(
        f"Latency: median over {args.rounds} rounds, each the median of at least {args.min_run_time / args.rounds:.1f} s "
        "of calls; the models take turns in every round, so changes in machine load reach all of them. "
        "The range is the lowest and highest round.\n"
    )
    headers = ["model", "batch", "layout", "variant", "latency ms, median (range)", "speedup", "MAC ratio (limit)", "share of limit"]
    print(markdown_table(headers, rows))


def time_interleaved(
    models: dict[str, nn.Module], x: torch.Tensor, layout: str, rounds: int, min_run_time: float, device: str
) -> dict[str, list[float]]:
    """Time every model once per round, in turn; returns each model's per-round medians in ms."""
    prepared = {name: in_layout(module, x, layout) for name, module in models.items()}
    medians: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, (module, module_input) in prepared.items():
            timing = time_call(lambda: module(module_input), min_run_time / rounds, device)
            medians[name].append(timing.median_ms)
    return medians


def spread_text(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


if __name__ == "__main__":
    main()
