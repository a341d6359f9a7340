"""Per-layer timing: a dense conv against its depthwise-separable replacement.

For common conv shapes, times the dense conv and the separable pair at depth
multipliers 1, 2 and 4, with the depthwise half in both forms (``grouped``:
one conv with groups=C_in; ``repeat``: channels repeated, then one filter per
group). Speedup is dense time / separable time. The MAC ratio (dense MACs /
separable MACs) is the limit a speedup could reach if time followed MACs.
With ``--onnxruntime`` the same layers also run through onnxruntime.

    python benchmarks/layer_speed.py                       # CPU, batch 1 and 8, both layouts
    python benchmarks/layer_speed.py --device cuda --min-run-time 0.5
    python benchmarks/layer_speed.py --onnxruntime --batches 8 --layouts contiguous
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

from common import Timing, describe_environment, markdown_table, parse_list, time_call
from convert.layers import DepthwiseSeparableConv2d


@dataclass(frozen=True)
class Shape:
    """One conv layer: channels, kernel, stride and input size, as in a well-known model."""

    label: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    size: int

    def dense(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel, self.stride, self.kernel // 2, bias=False)

    def separable(self, multiplier: int, form: str) -> DepthwiseSeparableConv2d:
        return DepthwiseSeparableConv2d(
            self.in_channels,
            self.out_channels,
            self.kernel,
            self.stride,
            self.kernel // 2,
            bias=False,
            depth_multiplier=multiplier,
            depthwise_form=form,
        )

    def mac_ratio(self, multiplier: int) -> float:
        """Dense MACs / separable MACs (the output size cancels out)."""
        dense = self.in_channels * self.out_channels * self.kernel**2
        separable = self.in_channels * multiplier * (self.kernel**2 + self.out_channels)
        return dense / separable


SHAPES = [
    Shape("resnet layer1 3x3", 64, 64, 3, 1, 56),
    Shape("resnet layer2 3x3", 128, 128, 3, 1, 28),
    Shape("resnet layer3 3x3", 256, 256, 3, 1, 14),
    Shape("resnet layer4 3x3", 512, 512, 3, 1, 7),
    Shape("resnet stem 7x7/2", 3, 64, 7, 2, 224),
    Shape("7x7 at 512 channels", 512, 512, 7, 1, 7),
]

VARIANTS = [(1, "grouped"), (2, "grouped"), (2, "repeat"), (4, "grouped"), (4, "repeat")]


def prepare(module: nn.Module, x: torch.Tensor, layout: str) -> tuple[nn.Module, torch.Tensor]:
    """Put the module and input into eval mode and the requested memory format."""
    module = module.to(device=x.device).eval()
    if layout == "channels_last":
        return module.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return module, x


def time_layers(shape: Shape, batch: int, layout: str, device: str, min_run_time: float) -> list[object]:
    """Return one table row: dense time, then each separable variant's time and speedup."""
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device=device)
    dense, dense_input = prepare(shape.dense(), x, layout)
    dense_time = time_call(lambda: dense(dense_input), min_run_time, device)
    row: list[object] = [shape.label, f"{shape.in_channels}->{shape.out_channels} @{shape.size}", batch, layout, dense_time.text()]
    for multiplier, form in VARIANTS:
        layer, layer_input = prepare(shape.separable(multiplier, form), x, layout)
        timing = time_call(lambda: layer(layer_input), min_run_time, device)
        row.append(f"{timing.text()} ({dense_time.median_ms / timing.median_ms:.2f}x)")
    row.append(" / ".join(f"{shape.mac_ratio(multiplier):.1f}" for multiplier in (1, 2, 4)))
    return row


def onnxruntime_row(shape: Shape, batch: int, min_run_time: float) -> list[object]:
    """Time the dense conv and the K=2 pair in both forms under onnxruntime's CPU provider."""
    import onnxruntime

    x = torch.randn(batch, shape.in_channels, shape.size, shape.size)
    modules = {"dense": shape.dense().eval(), "K=2 grouped": shape.separable(2, "grouped").eval(), "K=2 repeat": shape.separable(2, "repeat").eval()}
    timings: dict[str, Timing] = {}
    for name, module in modules.items():
        with contextlib.redirect_stdout(sys.stderr):  # the exporter prints its progress
            program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
        session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        timings[name] = time_call(lambda: session.run(None, feed), min_run_time)
    dense = timings["dense"].median_ms
    return [shape.label, batch, timings["dense"].text()] + [
        f"{timings[name].text()} ({dense / timings[name].median_ms:.2f}x)" for name in ("K=2 grouped", "K=2 repeat")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Time dense convs against their separable replacements.")
    parser.add_argument("--device", default="cpu", help="torch device to time on (default: cpu)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--layouts", default="contiguous,channels_last", help="memory formats to time (default: both)")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per measurement (default: 0.3)")
    parser.add_argument("--onnxruntime", action="store_true", help="also time the layers under onnxruntime (CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)

    rows = []
    for shape in SHAPES:
        for batch in (int(text) for text in parse_list(args.batches)):
            for layout in parse_list(args.layouts):
                rows.append(time_layers(shape, batch, layout, args.device, args.min_run_time))
                print(rows[-1], flush=True, file=sys.stderr)  # progress
    headers = ["layer", "shape", "batch", "layout", "dense ms"] + [f"K={k} ms (speedup)" if k == 1 else f"K={k} {form} ms (speedup)" for k, form in VARIANTS] + ["MAC ratio K=1/2/4"]
    print(f"### Per-layer timing on {args.device}\n")
    print(describe_environment(args.device) + "\n")
    print(markdown_table(headers, rows))

    if args.onnxruntime:
        ort_rows = [onnxruntime_row(shape, batch, args.min_run_time) for shape in SHAPES for batch in (int(text) for text in parse_list(args.batches))]
        print("\n### The same layers under onnxruntime (CPUExecutionProvider)\n")
        print(markdown_table(["layer", "batch", "dense ms", "K=2 grouped ms (speedup)", "K=2 repeat ms (speedup)"], ort_rows))


if __name__ == "__main__":
    main()
