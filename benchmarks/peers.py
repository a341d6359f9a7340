"""dsconv next to its closest peers on the same layers.

- tensorly-torch (``tltorch.FactorizedConv.from_conv``) with CP and Tucker
  factorizations, at the parameter count of dsconv's layer at depth multiplier 1:
  conversion time, output error and latency (``implementation="factorized"``,
  the form that runs the factors instead of rebuilding the dense weight).
- bsconv's ``BSConvU_Replacer`` on a whole resnet50: it swaps each 3x3 conv for a
  pointwise-then-depthwise pair with fresh weights, so its output error shows
  what no initialization from the trained weights costs.

The peers are installed only to run this script, never as dsconv dependencies:

    pip install tensorly tensorly-torch bsconv
    python benchmarks/peers.py

All weights are torchvision's random initialization (no pretrained weights can be
downloaded here). Random weights have a flat singular spectrum, so every low-rank
method shows a large error on them; trained weights compress better.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torchvision
from torch import nn

from common import describe_environment, markdown_table, time_call
from convert import run_conversion
from convert.layers import DepthwiseSeparableConv2d

LAYER_SHAPES = [(64, 56), (128, 28), (256, 14)]  # (channels, input size) of resnet 3x3 convs


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def layer_rows(batch: int, min_run_time: float) -> list[list[object]]:
    """Compare dsconv with tensorly-torch CP and Tucker on resnet-like 3x3 layers."""
    import tltorch

    rows = []
    for channels, size in LAYER_SHAPES:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        x = torch.randn(batch, channels, size, size)
        with torch.no_grad():
            reference = conv(x)
        dense_time = time_call(lambda: conv(x), min_run_time)
        rows.append([f"{channels}->{channels} 3x3 @{size}", "dense conv", f"{count_parameters(conv):,}", "-", "0", dense_time.text()])

        started = time.perf_counter()
        ours = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=1).eval()
        seconds = time.perf_counter() - started
        budget = count_parameters(ours)
        with torch.no_grad():
            error = relative_error(ours(x), reference)
        timing = time_call(lambda: ours(x), min_run_time)
        rows.append(["", "dsconv K=1 (SVD)", f"{budget:,}", f"{seconds * 1e3:.0f}", f"{error:.3f}", timing.text()])

        for factorization in ("cp", "tucker"):
            started = time.perf_counter()
            peer = tltorch.FactorizedConv.from_conv(
                copy.deepcopy(conv),
                rank=budget / count_parameters(conv),  # a float rank is a share of the dense parameter count
                factorization=factorization,
                implementation="factorized",
                decompose_weights=True,
            ).eval()
            seconds = time.perf_counter() - started
            with torch.no_grad():
                error = relative_error(peer(x), reference)
            timing = time_call(lambda: peer(x), min_run_time)
            rows.append(["", f"tensorly-torch {factorization.upper()}", f"{count_parameters(peer):,}", f"{seconds * 1e3:.0f}", f"{error:.3f}", timing.text()])
        print(rows[-4:], file=sys.stderr, flush=True)
    return rows


def replacer_rows(min_run_time: float) -> list[list[object]]:
    """Compare dsconv's conversion of resnet50 with bsconv's replacer on parameters, error and latency."""
    import bsconv.pytorch

    original = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = original(x)
    rows = [["original", f"{count_parameters(original):,}", "-", "0", time_call(lambda: original(x), min_run_time).text()]]

    # K=9 is the full rank of every 3x3 conv (exact, slightly more parameters for these
    # layers); the stem's 7x7 conv has rank 49 > 9 and stays approximate.
    for label, keywords in (("dsconv K=1 (SVD init)", {}), ("dsconv K=9 (SVD init, full rank for 3x3)", {"depth_multiplier": 9, "allow_larger": True})):
        started = time.perf_counter()
        ours = run_conversion(original, **keywords).model.eval()
        seconds = time.perf_counter() - started
        with torch.no_grad():
            error = relative_error(ours(x), reference)
        rows.append([label, f"{count_parameters(ours):,}", f"{seconds * 1e3:.0f}", f"{error:.3f}", time_call(lambda: ours(x), min_run_time).text()])

    started = time.perf_counter()
    peer = bsconv.pytorch.BSConvU_Replacer(with_bn=False).apply(copy.deepcopy(original)).eval()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        error = relative_error(peer(x), reference)
    rows.append(["bsconv BSConvU_Replacer (fresh weights)", f"{count_parameters(peer):,}", f"{seconds * 1e3:.0f}", f"{error:.3f}", time_call(lambda: peer(x), min_run_time).text()])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare dsconv with tensorly-torch and bsconv.")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the per-layer comparison (default: 8)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement (default: 0.5)")
    args = parser.parse_args()
    torch.manual_seed(0)

    print("### Peers on the same layers\n")
    print(describe_environment() + "\n")
    try:
        rows = layer_rows(args.batch, args.min_run_time)
    except ImportError as error:
        print(f"tensorly-torch could not be imported: {error}\n")
    else:
        print(f"Per layer, batch {args.batch}; output error = ||f(x) - conv(x)|| / ||conv(x)|| on a random input.\n")
        print(markdown_table(["layer", "method", "parameters", "conversion ms", "output rel. error", "latency ms"], rows))
    try:
        rows = replacer_rows(args.min_run_time)
    except ImportError as error:
        print(f"\nbsconv could not be imported: {error}")
    else:
        print("\nWhole resnet50, batch 1; output error on the logits of a random input.\n")
        print(markdown_table(["model", "parameters", "conversion ms", "output rel. error", "latency ms"], rows))


if __name__ == "__main__":
    main()
