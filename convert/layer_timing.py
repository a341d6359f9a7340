"""Latency-aware selection: time each planned layer dense and separable, keep the faster form.

Depthwise convs often run slower per FLOP than dense ones, and a large depth
multiplier can make the separable pair slower than the conv it replaces even
with fewer MACs. This step runs after K has been chosen. It captures each planned
conv's input on an example input and times the dense conv and its separable
replacement on the requested device. The layer stays dense unless the separable
form has the lower median time. It can only keep more layers dense, so
under a budget it can raise the parameter count above the target.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import UsageError
from .layers import separable_type_for
from .measure import measure_latency, run_with_hooks
from .selection import LayerPlan

__all__ = ["LayerTimer", "capture_layer_inputs", "keep_faster_layers", "resolve_timing_device", "time_layer"]

log = logging.getLogger(__name__)

# (conv, depth multiplier, layer input, device, min run time in seconds) -> (dense ms, separable ms)
LayerTimer = Callable[[nn.modules.conv._ConvNd, int, torch.Tensor, torch.device, float], tuple[float, float]]


def resolve_timing_device(device: str | torch.device | None, example_input: torch.Tensor) -> torch.device:
    """Return the device to time on: ``device``, or the example input's device when it is ``None``."""
    if device is None:
        return example_input.device
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UsageError(f"latency_device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"latency_device={device!r}: no CUDA device is available; use 'cpu'")
    return resolved


def capture_layer_inputs(
    model: nn.Module, example_input: torch.Tensor, convs: Mapping[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """Run ``model`` once and return the input of each conv's first call; convs never called are absent."""
    captured: dict[str, torch.Tensor] = {}
    names_by_module: dict[int, list[str]] = {}
    for name, module in convs.items():
        names_by_module.setdefault(id(module), []).append(name)

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        for name in names_by_module[id(module)]:
            captured.setdefault(name, inputs[0].detach())

    run_with_hooks(model, example_input, convs.values(), record, pre=True)
    return captured


def time_layer(
    conv: nn.modules.conv._ConvNd,
    depth_multiplier: int,
    layer_input: torch.Tensor,
    device: torch.device,
    min_run_time: float,
) -> tuple[float, float]:
    """Return the median forward time in ms of ``conv`` and of its separable form at ``depth_multiplier``.

    Both run on copies moved to ``device`` in eval mode. The separable form keeps
    PyTorch's default initialization, because the weights' values do not change
    the time.
    """
    dense = copy.deepcopy(conv).to(device).eval()
    separable = separable_type_for(conv).from_conv(dense, depth_multiplier, init="random").eval()
    layer_input = layer_input.to(device)
    dense_ms = measure_latency(dense, layer_input, min_run_time=min_run_time).median_ms
    separable_ms = measure_latency(separable, layer_input, min_run_time=min_run_time).median_ms
    return dense_ms, separable_ms


def keep_faster_layers(
    plans: Sequence[LayerPlan],
    convs: Mapping[str, nn.modules.conv._ConvNd],
    model: nn.Module,
    example_input: torch.Tensor,
    device: str | torch.device | None = None,
    min_run_time: float = 0.1,
    timer: LayerTimer = time_layer,
) -> list[LayerPlan]:
    """Time every planned layer and keep dense those where the separable form is not faster.

    ``convs`` maps each plan's name to its conv in ``model``. Timed plans carry
    ``dense_ms`` and ``separable_ms``; a layer that the forward on
    ``example_input`` never calls cannot be timed, so it stays dense with that
    reason. ``timer`` measures one layer; the default uses ``torch.utils.benchmark``.
    """
    if not min_run_time > 0:
        raise UsageError(f"latency_time={min_run_time}: must be greater than 0 seconds")
    timing_device = resolve_timing_device(device, example_input)
    planned = {plan.name: convs[plan.name] for plan in plans if plan.converted}
    inputs = capture_layer_inputs(model, example_input, planned)

    timed = []
    for plan in plans:
        if not plan.converted:
            timed.append(plan)
            continue
        assert plan.depth_multiplier is not None, "converted plans have a multiplier"
        if plan.name not in inputs:
            timed.append(
                dataclasses.replace(
                    plan,
                    depth_multiplier=None,
                    params_after=None,
                    reason="latency-aware: not called on the example input, so it could not be timed; kept dense",
                )
            )
            continue
        dense_ms, separable_ms = timer(planned[plan.name], plan.depth_multiplier, inputs[plan.name], timing_device, min_run_time)
        log.info("%s: dense %.4f ms, separable %.4f ms at K=%d on %s", plan.name, dense_ms, separable_ms, plan.depth_multiplier, timing_device)
        timed.append(apply_timing(plan, dense_ms, separable_ms, timing_device))
    return timed


def apply_timing(plan: LayerPlan, dense_ms: float, separable_ms: float, device: torch.device) -> LayerPlan:
    """Return ``plan`` with its timings, marked dense when the separable form is not faster."""
    plan = dataclasses.replace(plan, dense_ms=dense_ms, separable_ms=separable_ms)
    if separable_ms < dense_ms:
        return plan
    return dataclasses.replace(
        plan,
        depth_multiplier=None,
        params_after=None,
        reason=(
            f"latency-aware: the separable form at K={plan.depth_multiplier} took {separable_ms:.4f} ms against "
            f"{dense_ms:.4f} ms dense on {device}; kept dense"
        ),
    )
