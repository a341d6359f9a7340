"""How the depthwise half of a separable layer runs when its depth multiplier is above 1.

A depthwise conv with depth multiplier ``K > 1`` can run in two exact forms that
share one weight tensor of shape ``(C_in * K, 1, *kernel)``:

- ``"grouped"``: one conv with ``groups=C_in`` and ``C_in * K`` outputs, the
  textbook form (``nn.Conv2d(C_in, C_in * K, k, groups=C_in)``).
- ``"repeat"``: each input channel repeated ``K`` times in place
  (``c0, c0, c1, c1, ...``), then a plain depthwise conv with ``groups=C_in * K``.
  Output channel ``c * K + j`` reads input channel ``c`` with filter ``c * K + j``
  in both forms, so the outputs match up to float rounding.

Many CPU kernels only have a fast path for one filter per group, so the grouped
form can be several times slower there (see ``docs/benchmarks.md``). Which one is
faster depends on the device, dtype, shape and memory format, so ``"auto"`` (the
default) times both forms the first time a layer receives a new input shape and
caches the winner. Use :func:`pin_depthwise_forms` before exporting or scripting
to freeze the measured choice into each layer, or :func:`set_depthwise_form` to
force one form everywhere.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

if TYPE_CHECKING:
    from .layers import DepthwiseSeparableConvNd

__all__ = [
    "DEPTHWISE_FORMS",
    "check_form",
    "choose_form",
    "clear_form_cache",
    "default_form",
    "measure_forms",
    "pin_depthwise_forms",
    "set_depthwise_form",
]

log = logging.getLogger(__name__)

DEPTHWISE_FORMS = ("auto", "grouped", "repeat")

# Timed calls per form; the forms alternate so that drift in machine load hits both alike.
TIMED_CALLS = 5

# "repeat" must beat "grouped" by this share to be chosen, because it allocates a
# K-times larger copy of the input and a near tie is within timing noise.
REPEAT_MARGIN = 0.05

# Measured winners, keyed by device, dtype, input shape, memory format and layer geometry.
# NOTE: each new input shape costs one timing run per layer and one entry here, so a
# model fed many image sizes should use pin_depthwise_forms or set_depthwise_form.
FormKey = tuple[Any, ...]
FORM_CACHE: dict[FormKey, str] = {}


def check_form(form: object) -> str:
    """Return ``form`` if it names a depthwise form, else raise ``ValueError``."""
    if form not in DEPTHWISE_FORMS:
        raise ValueError(f"depthwise_form={form!r} is not supported: choose one of {', '.join(DEPTHWISE_FORMS)}")
    return form  # type: ignore[return-value]


def default_form(device_type: str) -> str:
    """Return the form used when nothing was measured: while tracing, exporting or scripting.

    On CPU the repeat form was faster for most shapes timed in ``benchmarks/layer_speed.py``,
    and never much slower. NOTE: the choice for other devices was not measured on a GPU;
    ``benchmarks/gpu_check.sh`` prints the timings that would settle it.
    """
    return "repeat" if device_type == "cpu" else "grouped"


def form_key(layer: "DepthwiseSeparableConvNd", x: torch.Tensor) -> FormKey:
    """Return the cache key of one layer geometry on one input."""
    conv = layer.conv_dw
    return (
        str(x.device),
        x.dtype,
        tuple(x.shape),
        memory_layout(x),
        layer.depth_multiplier,
        tuple(conv.kernel_size),
        tuple(conv.stride),
        conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        tuple(conv.dilation),
        conv.padding_mode,
    )


def memory_layout(x: torch.Tensor) -> str:
    """Return ``"channels_last"`` for a channels-last tensor that is not also contiguous, else ``"contiguous"``."""
    if x.is_contiguous():
        return "contiguous"
    memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if memory_format is not None and x.is_contiguous(memory_format=memory_format):
        return "channels_last"
    return "strided"


def can_measure(x: torch.Tensor) -> bool:
    """Return False while a compiler, tracer or dispatch mode would record the timing runs."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if is_in_torch_dispatch_mode():  # FlopCounterMode, FakeTensorMode, ...
        return False
    return not isinstance(x, torch._subclasses.FakeTensor)


def choose_form(layer: "DepthwiseSeparableConvNd", x: torch.Tensor) -> str:
    """Return the faster exact form of ``layer``'s depthwise half for input ``x``.

    The first call for a new key times both forms (a few calls each); later calls
    read the cache. While compiling, exporting, tracing or under a dispatch mode
    nothing can be timed, so the layer's last measured form is used, or
    :func:`default_form` if it never ran eagerly.
    """
    if layer.depth_multiplier == 1:
        return "grouped"
    if not can_measure(x):
        return layer.measured_form or default_form(x.device.type)
    key = form_key(layer, x)
    form = FORM_CACHE.get(key)
    if form is None:
        timings = measure_forms(layer, x)
        form = "repeat" if timings["repeat"] < timings["grouped"] * (1 - REPEAT_MARGIN) else "grouped"
        FORM_CACHE[key] = form
        log.debug(
            "depthwise form for %s: %s (grouped %.3f ms, repeat %.3f ms)",
            key,
            form,
            timings["grouped"] * 1e3,
            timings["repeat"] * 1e3,
        )
    return form


def measure_forms(layer: "DepthwiseSeparableConvNd", x: torch.Tensor, calls: int = TIMED_CALLS) -> dict[str, float]:
    """Time both depthwise forms of ``layer`` on ``x``; returns the median seconds per call of each."""
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "grouped": layer.conv_dw,
        "repeat": layer.depthwise_repeated,
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    x = x.detach()
    with torch.no_grad():
        for run in runs.values():  # warm-up: allocator, lazy initialization, algorithm choice
            run(x)
        for _ in range(calls):
            for name, run in runs.items():
                synchronize(x.device)
                started = time.perf_counter()
                run(x)
                synchronize(x.device)
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device``; CPU work is already finished when a call returns."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def clear_form_cache() -> None:
    """Forget every measured choice, for example after moving to other hardware."""
    FORM_CACHE.clear()


def separable_layers(model: nn.Module) -> dict[str, "DepthwiseSeparableConvNd"]:
    """Return the separable layers of ``model`` by qualified name (each module once)."""
    from .layers import DepthwiseSeparableConvNd

    return {name: module for name, module in model.named_modules() if isinstance(module, DepthwiseSeparableConvNd)}


def set_depthwise_form(model: nn.Module, form: str) -> int:
    """Set the depthwise form of every separable layer in ``model``; returns how many were set.

    ``form`` is ``"auto"`` (measure and cache), ``"grouped"`` or ``"repeat"``. The
    forms compute the same outputs, so this only changes speed and memory use.
    """
    check_form(form)
    layers = separable_layers(model)
    for layer in layers.values():
        layer.depthwise_form = form
    return len(layers)


def pin_depthwise_forms(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> dict[str, str]:
    """Run ``model`` once, then fix each ``"auto"`` layer to the form measured for it.

    Call this on the device, dtype, batch size and memory format you deploy with,
    before ``torch.export``, ONNX export, ``torch.compile`` or ``torch.jit.script``:
    those cannot time anything, so unpinned layers would use :func:`default_form`.
    Returns the form of every separable layer by name. Layers that the forward did
    not call keep ``"auto"``, and a layer called with several input shapes keeps the
    form measured for the last one.
    """
    layers = separable_layers(model)
    for layer in layers.values():
        layer.measured_form = ""
    with torch.no_grad():
        model(*example_inputs, **example_kwargs)
    pinned: dict[str, str] = {}
    for name, layer in layers.items():
        if layer.depthwise_form == "auto" and layer.measured_form:
            layer.depthwise_form = layer.measured_form
        pinned[name] = layer.depthwise_form
    log.info("pinned depthwise forms: %s", pinned)
    return pinned
