"""Measurements of a model: parameters, MACs, checkpoint size, latency, output difference."""

from __future__ import annotations

import io
import math
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "LatencyStats",
    "OutputDifference",
    "count_parameters",
    "count_macs",
    "checkpoint_size",
    "run_with_hooks",
    "measure_latency",
    "compare_outputs",
]

log = logging.getLogger(__name__)


def run_with_hooks(
    model: nn.Module,
    example_input: torch.Tensor,
    modules: Iterable[nn.Module],
    hook: Callable[..., None],
    *,
    pre: bool = False,
) -> None:
    """Run ``model`` once without gradients, with ``hook`` on each distinct module (a pre-hook if ``pre``)."""
    distinct = {id(module): module for module in modules}.values()
    register = (lambda module: module.register_forward_pre_hook(hook)) if pre else (lambda module: module.register_forward_hook(hook))
    handles = [register(module) for module in distinct]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()


def count_parameters(model: nn.Module) -> int:
    """Count parameter elements; ``parameters()`` yields a shared tensor once."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Count multiply-accumulates of one forward pass on ``example_input``.

    ``FlopCounterMode`` counts 2 FLOPs per multiply-add, so every figure here is its
    FLOP count halved. Returns the total and a per-module breakdown keyed by
    qualified name (``""`` for the whole model); a module called several times
    accumulates all of its calls.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, counts in counter.get_flop_counts().items():
        if key == "Global":
            continue
        if key.startswith(f"{root}."):
            name = key[len(root) + 1 :]
        elif key == root:
            name = ""
        else:
            name = key
        per_module[name] = sum(counts.values()) // 2
    return counter.get_total_flops() // 2, per_module


def checkpoint_size(model: nn.Module) -> int:
    """Return the size in bytes of the model's state dict saved with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def import_benchmark() -> Any:
    """Import ``torch.utils.benchmark``, hiding the CUDA_HOME warning its import logs on CPU-only machines.

    The import loads ``torch.utils.cpp_extension``, which is slow and warns about
    compiling extensions, which dsconv never does; so it is imported on first use.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(previous)
    return benchmark


@dataclass
class LatencyStats:
    """Forward-pass latency from ``torch.utils.benchmark``: median and interquartile range."""

    median_ms: float
    iqr_ms: float
    runs: int
    device: str
    dtype: str
    input_shape: tuple[int, ...]
    threads: int


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    min_run_time: float = 1.0,
    threads: int | None = None,
) -> LatencyStats:
    """Time ``model(example_input)`` under ``inference_mode``, after a warm-up.

    ``Timer.blocked_autorange`` synchronizes CUDA around each block, so GPU times are
    real; the model and input must already be on the device to measure.
    """
    benchmark = import_benchmark()

    threads = threads or torch.get_num_threads()
    with torch.inference_mode():
        for _ in range(3):  # warm-up: allocator, lazy initialization, cuDNN algorithm choice
            model(example_input)
        timer = benchmark.Timer(
            stmt="model(example_input)",
            globals={"model": model, "example_input": example_input},
            num_threads=threads,
        )
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return LatencyStats(
        median_ms=measurement.median * 1e3,
        iqr_ms=measurement.iqr * 1e3,
        runs=len(measurement.times) * measurement.number_per_run,
        device=str(example_input.device),
        dtype=str(example_input.dtype).removeprefix("torch."),
        input_shape=tuple(example_input.shape),
        threads=threads,
    )


@dataclass
class OutputDifference:
    """How far the converted model's outputs moved, over all output tensors.

    ``max_relative`` is the max absolute difference divided by the max absolute
    value of the original output, so it does not blow up near zero entries. Both
    are NaN when an output contains NaN, and the ``*_finite`` flags tell which output.
    """

    max_absolute: float
    max_relative: float
    tensors: int
    original_finite: bool = True
    converted_finite: bool = True


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Yield the tensors in a nested output (tensors, tuples, lists, dicts, named tuples)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_tensors(item)


def compare_outputs(original: Any, converted: Any) -> OutputDifference:
    """Compare two model outputs of the same structure, tensor by tensor."""
    originals = list(iter_tensors(original))
    converteds = list(iter_tensors(converted))
    if len(originals) != len(converteds):
        raise ValueError(f"the outputs hold {len(originals)} and {len(converteds)} tensors, so they cannot be compared")
    max_absolute = 0.0
    max_reference = 0.0
    original_finite = converted_finite = True
    for before, after in zip(originals, converteds):
        if before.shape != after.shape:
            raise ValueError(f"output shapes differ: {tuple(before.shape)} against {tuple(after.shape)}")
        if before.numel() == 0 or not before.is_floating_point():
            continue
        before, after = before.detach().double(), after.detach().double()
        original_finite = original_finite and bool(torch.isfinite(before).all())
        converted_finite = converted_finite and bool(torch.isfinite(after).all())
        # torch.max propagates NaN, where Python's max() would silently drop it
        max_absolute = float(torch.tensor(max_absolute).maximum((before - after).abs().max()))
        max_reference = float(torch.tensor(max_reference).maximum(before.abs().max()))
    if max_reference > 0 or math.isnan(max_absolute):
        max_relative = max_absolute / max_reference if max_reference > 0 else max_absolute
    elif max_absolute == 0:
        max_relative = 0.0
    else:
        max_relative = float("inf")
    return OutputDifference(max_absolute, max_relative, len(originals), original_finite, converted_finite)
