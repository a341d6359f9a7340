"""CPU latency under several memory allocators: glibc default and tuned, tcmalloc, jemalloc.

glibc returns large freed blocks to the system (blocks above its mmap threshold,
which adapts up to 32 MiB by default), so a model whose activations are larger
than that page-faults on every call. The same work is timed in a fresh process
per allocator setting, with the minor page faults per call.

    python benchmarks/allocator.py
    apt-get install libjemalloc2 libtcmalloc-minimal4   # to include those two

Allocator libraries are looked up under /usr/lib/x86_64-linux-gnu; a missing
one is reported as not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from common import REPO_ROOT, TUNED_GLIBC, describe_environment, markdown_table

LIBRARY_FOLDER = Path("/usr/lib/x86_64-linux-gnu")
SETTINGS = {
    "glibc, default": {},
    "glibc, MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ = 16 GiB": TUNED_GLIBC,
    "tcmalloc (LD_PRELOAD libtcmalloc_minimal.so.4)": {"LD_PRELOAD": str(LIBRARY_FOLDER / "libtcmalloc_minimal.so.4")},
    "jemalloc (LD_PRELOAD libjemalloc.so.2), default MALLOC_CONF": {"LD_PRELOAD": str(LIBRARY_FOLDER / "libjemalloc.so.2")},
}


def workloads() -> dict[str, object]:
    """Build the timed calls: two pointwise convs and resnet50 before and after conversion."""
    import torch
    import torchvision
    from torch import nn

    from convert import convert_model

    torch.manual_seed(0)
    calls = {}
    for channels, size in ((64, 56), (64, 112)):
        conv = nn.Conv2d(channels, 4 * channels, 1).eval()
        x = torch.randn(8, channels, size, size)
        output_mib = 8 * 4 * channels * size * size * 4 / 2**20
        calls[f"1x1 conv {channels}->{4 * channels} on 8x{channels}x{size}x{size} (output {output_mib:.0f} MiB)"] = (conv, x)
    original = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224).to(memory_format=torch.channels_last)
    calls["resnet50 original, batch 8, channels_last"] = (original, x)
    calls["resnet50 K=1, batch 8, channels_last"] = (convert_model(original), x)
    return calls


def measure_child(min_run_time: float) -> dict[str, list[float]]:
    """Time every workload in this process; returns median ms, IQR ms and page faults per call."""
    import torch
    from torch.utils import benchmark

    results = {}
    with torch.inference_mode():
        for name, (module, x) in workloads().items():
            for _ in range(3):
                module(x)
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            measurement = benchmark.Timer("module(x)", globals={"module": module, "x": x}).blocked_autorange(min_run_time=min_run_time)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
            calls = len(measurement.times) * measurement.number_per_run
            results[name] = [measurement.median * 1e3, measurement.iqr * 1e3, faults / calls]
    return results


def run_setting(environment_changes: dict[str, str], min_run_time: float) -> dict[str, list[float]] | str:
    """Run :func:`measure_child` under one allocator setting; returns its results or why it could not run."""
    preload = environment_changes.get("LD_PRELOAD")
    if preload and not Path(preload).exists():
        return f"not installed ({preload} not found)"
    environment = dict(os.environ)
    for name in ("LD_PRELOAD", *TUNED_GLIBC):
        environment.pop(name, None)
    environment.update(environment_changes)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--child", str(min_run_time)]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure_child(float(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description="Time CPU inference under several memory allocators.")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per workload (default: 2)")
    args = parser.parse_args()

    rows = []
    for setting, changes in SETTINGS.items():
        results = run_setting(changes, args.min_run_time)
        if isinstance(results, str):
            rows.append([setting, results, "-", "-"])
            continue
        for name, (median, iqr, faults) in results.items():
            rows.append([setting, name, f"{median:.1f} ± {iqr:.1f}", f"{faults:,.0f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    print("### Memory allocator and CPU latency\n")
    print(describe_environment() + "\n")
    print("The allocator line above is this driver's own; each row names the setting its process ran with.\n")
    print(markdown_table(["allocator", "workload", "latency ms (median ± IQR)", "page faults per call"], rows))


if __name__ == "__main__":
    main()
