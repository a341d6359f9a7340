"""Conversion time across torchvision models, split into copy, tracing, factorization and swap.

Each model is built with random weights and converted ``--repeats`` times at
depth multiplier 1. The table shows the median of each phase as
``run_conversion`` records it in ``ConversionResult.seconds``. The time per
converted layer shows how the cost grows with the number of layers.

    python benchmarks/conversion_models.py
    python benchmarks/conversion_models.py --models resnet50,convnext_tiny --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torchvision

from common import describe_environment, markdown_table, parse_list
from convert import run_conversion

DEFAULT_MODELS = "resnet18,resnet50,resnet101,resnet152,mobilenet_v2,convnext_tiny,regnet_y_1_6gf,efficientnet_b0"
PHASES = ("copy", "trace", "factorize", "swap")


def time_model(name: str, repeats: int, depth_multiplier: int) -> list[object]:
    """Convert one model ``repeats`` times and return its table row of median phase times."""
    model = torchvision.models.get_model(name).eval()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
    totals = []
    for _ in range(repeats):
        result = run_conversion(model, depth_multiplier=depth_multiplier)
        for phase in PHASES:
            phases[phase].append(result.seconds.get(phase, 0.0))
        totals.append(sum(result.seconds.values()))
    converted = len(result.converted)
    total = statistics.median(totals)
    return [
        name,
        f"{parameters / 1e6:.1f}",
        len(result.layers),
        converted,
        *(f"{statistics.median(phases[phase]) * 1e3:.0f}" for phase in PHASES),
        f"{total * 1e3:.0f} ({min(totals) * 1e3:.0f}-{max(totals) * 1e3:.0f})",
        f"{total * 1e3 / max(converted, 1):.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Time the conversion of several torchvision models.")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated torchvision model names")
    parser.add_argument("--repeats", type=int, default=3, help="conversions per model; the median is shown (default: 3)")
    parser.add_argument("--depth-multiplier", type=int, default=1, help="depth multiplier (default: 1)")
    args = parser.parse_args()
    torch.manual_seed(0)

    # Warm-up: the first SVD and the first trace pay one-time library initialization.
    run_conversion(torchvision.models.resnet18())

    rows = []
    for name in parse_list(args.models):
        rows.append(time_model(name, args.repeats, args.depth_multiplier))
        print(rows[-1], file=sys.stderr, flush=True)
    headers = ["model", "params (M)", "convs", "converted", "copy ms", "trace ms", "factorize ms", "swap ms", "total ms (min-max)", "ms per converted layer"]
    print(f"### Conversion time at depth multiplier {args.depth_multiplier}, median of {args.repeats}\n")
    print(describe_environment() + "\n")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
