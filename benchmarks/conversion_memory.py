"""Peak memory of converting a large torchvision model, in copies of its weights.

Each measurement runs in a fresh child process, so earlier runs cannot leave
memory behind. The child records its resident set size (RSS) before building
the model, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, Linux
only) after building it, converts, and reads the peak (``VmHWM``). The figure
reported is ``(peak RSS - RSS before the model) / weight bytes``: how many copies
of the weights the process held at the worst moment, the original included.
RSS counts memory the allocator has freed but not returned to the system, so the
figure is an upper bound.

    python benchmarks/conversion_memory.py                      # convnext_large and regnet_y_16gf
    python benchmarks/conversion_memory.py --models resnet50 --depth-multipliers 1,4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, describe_environment


def read_status_kib(field: str) -> int:
    """Return a ``/proc/self/status`` field such as ``VmRSS`` in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} not found in /proc/self/status")


def measure_child(model_name: str, depth_multiplier: int, inplace: bool) -> dict[str, object]:
    """Build one model, convert it, and return the memory figures (runs inside the child)."""
    import torch
    import torchvision

    from convert import run_conversion

    torch.set_grad_enabled(False)
    before_model = read_status_kib("VmRSS") * 1024
    model = torchvision.models.get_model(model_name).eval()
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    after_model = read_status_kib("VmRSS") * 1024

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    result = run_conversion(model, depth_multiplier=depth_multiplier, inplace=inplace)
    seconds = time.perf_counter() - started
    peak = read_status_kib("VmHWM") * 1024
    converted_bytes = sum(tensor.numel() * tensor.element_size() for tensor in result.model.state_dict().values())
    return {
        "model": model_name,
        "depth_multiplier": depth_multiplier,
        "inplace": inplace,
        "weight_mb": weight_bytes / 2**20,
        "converted_weight_mb": converted_bytes / 2**20,
        "rss_before_model_mb": before_model / 2**20,
        "rss_after_model_mb": after_model / 2**20,
        "peak_rss_mb": peak / 2**20,
        "copies_at_peak": (peak - before_model) / weight_bytes,
        "seconds": seconds,
        "converted_layers": len(result.converted),
    }


def run_child(model_name: str, depth_multiplier: int, inplace: bool) -> dict[str, object]:
    """Run :func:`measure_child` in a new interpreter and return its JSON output."""
    command = [sys.executable, __file__, "--child", model_name, str(depth_multiplier), str(int(inplace))]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def render(rows: list[dict[str, object]]) -> str:
    """Render the results as a Markdown table."""
    lines = [
        "| model | K | inplace | weights MB | converted MB | peak RSS above start MB | copies of the weights at peak | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['depth_multiplier']} | {'yes' if row['inplace'] else 'no'} | "
            f"{row['weight_mb']:.0f} | {row['converted_weight_mb']:.0f} | "
            f"{row['peak_rss_mb'] - row['rss_before_model_mb']:.0f} | {row['copies_at_peak']:.2f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, multiplier, inplace = sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4]))
        print(json.dumps(measure_child(name, multiplier, inplace)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="convnext_large,regnet_y_16gf", help="comma-separated torchvision model names")
    parser.add_argument("--depth-multipliers", default="1,4", help="comma-separated depth multipliers")
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    args = parser.parse_args()

    rows = []
    for name in args.models.split(","):
        for multiplier in (int(text) for text in args.depth_multipliers.split(",")):
            for inplace in (False, True):
                row = run_child(name, multiplier, inplace)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    print("### Peak memory of conversion\n")
    print(describe_environment() + "\n")
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
