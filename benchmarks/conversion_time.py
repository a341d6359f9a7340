"""Time ``run_conversion`` (copy, trace, rank selection, SVD, swap) on torchvision models; no latency measurement.

Usage:
    python benchmarks/conversion_time.py                      # resnet50, 7 repeats
    python benchmarks/conversion_time.py --models resnet18 resnet50 --repeats 11

Prints a GitHub Markdown table with the median of each phase over the repeats,
followed by the machine and library versions, ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torchvision

from convert import run_conversion

PHASES = ("copy", "trace", "select", "factorize", "swap")


def time_model(name: str, repeats: int, depth_multiplier: int) -> dict[str, float]:
    """Return the median seconds of each phase and of the whole call."""
    model = torchvision.models.get_model(name).eval()
    run_conversion(model, depth_multiplier=depth_multiplier)  # warm-up: imports, allocator, LAPACK init
    samples: dict[str, list[float]] = {phase: [] for phase in (*PHASES, "total")}
    for _ in range(repeats):
        started = time.perf_counter()
        result = run_conversion(model, depth_multiplier=depth_multiplier)
        samples["total"].append(time.perf_counter() - started)
        for phase in PHASES:
            samples[phase].append(result.seconds[phase])
    return {phase: statistics.median(values) for phase, values in samples.items()}


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"], help="torchvision model names (default: resnet50)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model (default: 7)")
    parser.add_argument("--depth-multiplier", type=int, default=1, help="depth multiplier (default: 1)")
    args = parser.parse_args()

    print("| model | copy s | trace s | select s | factorize s | swap s | total s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        medians = time_model(name, args.repeats, args.depth_multiplier)
        cells = " | ".join(f"{medians[phase]:.3f}" for phase in (*PHASES, "total"))
        print(f"| {name} | {cells} |")
    print(f"\nMedian of {args.repeats} runs after one warm-up, depth multiplier {args.depth_multiplier}, CPU.")
    print(f"Machine: {describe_machine()}")


if __name__ == "__main__":
    main()
