"""Helpers shared by the benchmark scripts: the run's environment, timing and tables.

Each script prints a Markdown section that names the machine, the library
versions, the thread count, the memory allocator and the command, so a result
pasted into ``docs/benchmarks.md`` records how it was made. Set ``DSCONV_BENCH_NOTE`` to add a
line about the conditions, such as other jobs sharing the machine.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

# Environment settings that make glibc keep freed memory for reuse instead of
# returning it to the system, which otherwise costs page faults on every call
# for activations above its mmap threshold (32 MiB at most by default).
TUNED_GLIBC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


# One-minute load average when the script started; with the one at the end it shows
# whether other jobs shared the machine during the run.
LOAD_AT_START = os.getloadavg()[0]


def cpu_model() -> str:
    """Return the CPU model name from ``/proc/cpuinfo``, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def allocator_setting() -> str:
    """Describe the memory allocator this process runs with."""
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return f"jemalloc (LD_PRELOAD={preload}, MALLOC_CONF={os.environ.get('MALLOC_CONF', 'unset')})"
    if "tcmalloc" in preload:
        return f"tcmalloc (LD_PRELOAD={preload})"
    tunables = {name: os.environ[name] for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES") if name in os.environ}
    if not tunables:
        return "glibc malloc, default settings"
    return "glibc malloc, " + ", ".join(f"{name}={value}" for name, value in tunables.items())


def library_versions() -> str:
    """Return the versions of Python, torch, torchvision and of optional packages that are present."""
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for module_name in ("torchvision", "onnxruntime", "tltorch", "bsconv"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        versions.append(f"{module_name} {getattr(module, '__version__', '?')}")
    return ", ".join(versions)


def describe_environment(device: str = "cpu") -> str:
    """Return Markdown lines that describe where and how a benchmark ran."""
    lines = [
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads",
        f"- libraries: {library_versions()}",
        f"- memory allocator: {allocator_setting()}",
        f"- command: `{command_line()}`",
        f"- load average (1 min): {LOAD_AT_START:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        lines.insert(1, f"- GPU: {torch.cuda.get_device_name(torch.device(device))}")
    note = os.environ.get("DSCONV_BENCH_NOTE")
    if note:
        lines.append(f"- note: {note}")
    return "\n".join(lines)


def command_line() -> str:
    """Return the command that reruns this script from the repository root, allocator variables included."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    variables = [f"{name}={os.environ[name]}" for name in ("LD_PRELOAD", *TUNED_GLIBC) if name in os.environ]
    return " ".join([*variables, "python", shlex.quote(script.as_posix()), *(shlex.quote(argument) for argument in sys.argv[1:])])


@dataclass
class Timing:
    """Median and interquartile range of one timed call, in milliseconds."""

    median_ms: float
    iqr_ms: float

    def text(self) -> str:
        return f"{self.median_ms:.2f} ± {self.iqr_ms:.2f}"


def time_call(function: Callable[[], object], min_run_time: float, device: str = "cpu") -> Timing:
    """Time ``function()`` with ``torch.utils.benchmark`` under ``inference_mode`` after a warm-up.

    The default timer of ``torch.utils.benchmark`` synchronizes an accelerator
    before each reading, so GPU timings include the kernels' run time.
    """
    from torch.utils import benchmark

    with torch.inference_mode():
        for _ in range(3):
            function()
        measurement = benchmark.Timer(stmt="function()", globals={"function": function}).blocked_autorange(
            min_run_time=min_run_time
        )
    return Timing(measurement.median * 1e3, measurement.iqr * 1e3)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_list(text: str) -> list[str]:
    """Split a comma-separated command-line value."""
    return [part.strip() for part in text.split(",") if part.strip()]
