"""The conversion pass: find convs, decide, factor, swap.

The pass traces the model with torch.fx to learn which convs are safe to replace,
then swaps modules on a copy of the model itself, so the result keeps the caller's
class, methods, attributes and train/eval behaviour. When tracing fails, the same
layers are found from the module tree and swapped by qualified name.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.fx
from torch import nn

from .errors import ConversionError
from .factorize import INIT_METHODS, factorize_weight
from .layers import DepthwiseSeparableConvNd, check_positive_int, separable_type_for
from .selection import LayerPlan, find_convs, plan_layer
from .tracing import GraphUsage, TraceSettings, find_graph_usage, trace_model

__all__ = [
    "ConversionResult",
    "LayerResult",
    "convert_model",
    "inspect_model",
    "run_conversion",
]

log = logging.getLogger(__name__)

Tracing = Literal["auto", "fx", "swap"]
TRACING_MODES = ("auto", "fx", "swap")


@dataclass
class LayerResult:
    """A layer plan together with what the conversion produced for it."""

    plan: LayerPlan
    relative_error: float | None = None

    @property
    def name(self) -> str:
        return self.plan.name


@dataclass
class ConversionResult:
    """The converted model and a record of every conv the pass looked at.

    ``path`` is ``"fx"`` when the graph was traced and ``"swap"`` when the pass fell
    back to swapping modules by name; ``trace_error`` says in one line why tracing
    failed (``None`` when it did not fail or was not tried).
    """

    model: nn.Module
    layers: list[LayerResult]
    path: str
    trace_error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def converted(self) -> list[LayerResult]:
        return [layer for layer in self.layers if layer.plan.converted]

    @property
    def skipped(self) -> list[LayerResult]:
        return [layer for layer in self.layers if not layer.plan.converted]


def run_conversion(
    model: nn.Module,
    *,
    depth_multiplier: int = 1,
    init: str = "svd",
    allow_larger: bool = False,
    inplace: bool = False,
    graph_module: bool = False,
    tracing: Tracing = "auto",
    leaf_modules: tuple[type[nn.Module] | str, ...] = (),
    autowrap_functions: tuple[Callable[..., Any], ...] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> ConversionResult:
    """Convert every eligible conv of ``model`` and return the model with a per-layer record.

    See :func:`convert_model` for the arguments.
    """
    check_positive_int("depth_multiplier", depth_multiplier)
    if init not in INIT_METHODS:
        raise ValueError(f"init={init!r} is not supported: choose one of {', '.join(INIT_METHODS)}")
    if tracing not in TRACING_MODES:
        raise ValueError(f"tracing={tracing!r} is not supported: choose one of {', '.join(TRACING_MODES)}")
    if graph_module and tracing == "swap":
        raise ValueError("graph_module=True needs a traced graph, so it cannot be combined with tracing='swap'")
    settings = TraceSettings(tuple(leaf_modules), tuple(autowrap_functions), concrete_args)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    target = model if inplace else copy.deepcopy(model)
    seconds["copy"] = time.perf_counter() - started

    if isinstance(target, nn.modules.conv._ConvNd):
        if graph_module:
            raise ValueError("the model is a single conv, which has no graph to return: drop graph_module=True")
        tracing = "swap"  # the whole model is one module: there is no graph around it to read

    started = time.perf_counter()
    graph, trace_error = trace_if_possible(target, settings, tracing)
    usage = find_graph_usage(graph) if graph is not None else None
    seconds["trace"] = time.perf_counter() - started

    sites = find_convs(target)
    plans = [plan_layer(site, depth_multiplier, usage, allow_larger) for site in sites]
    results = [LayerResult(plan) for plan in plans]

    # Each dense conv is swapped out as soon as its replacement exists, and its site is
    # dropped, so the copy never contains both forms of every layer. Peak memory then stays
    # near two copies of the weights (original and copy) instead of growing by the new layers.
    seconds["factorize"] = seconds["swap"] = 0.0
    pending = deque(zip(sites, results))
    del sites
    while pending:
        site, result = pending.popleft()
        if not result.plan.converted:
            continue
        started = time.perf_counter()
        layer, result.relative_error = build_replacement(site.module, result.plan, init)
        seconds["factorize"] += time.perf_counter() - started

        started = time.perf_counter()
        target = swap_modules(target, {name: layer for name in site.names})
        seconds["swap"] += time.perf_counter() - started
        del site, layer

    started = time.perf_counter()
    path = "fx" if graph is not None else "swap"
    if graph_module:
        target = build_graph_module(target, graph)
    seconds["swap"] += time.perf_counter() - started

    result = ConversionResult(target, results, path, trace_error, seconds)
    log.info(
        "converted %d of %d convs (path %s) in %.3f s",
        len(result.converted),
        len(results),
        path,
        sum(seconds.values()),
    )
    return result


def convert_model(
    model: nn.Module,
    *,
    depth_multiplier: int = 1,
    init: str = "svd",
    allow_larger: bool = False,
    inplace: bool = False,
    graph_module: bool = False,
    tracing: Tracing = "auto",
    leaf_modules: tuple[type[nn.Module] | str, ...] = (),
    autowrap_functions: tuple[Callable[..., Any], ...] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replace each eligible conv of ``model`` with a depthwise-separable pair.

    Args:
        model: the model to convert. It is copied first unless ``inplace=True``.
        depth_multiplier: filters per input channel in the depthwise half (``K``).
            A value above a layer's full rank ``min(C_out / groups, prod(kernel))``
            is lowered to it, since it would add parameters without reducing error.
        init: ``"svd"`` factors the trained weights (exact at full rank);
            ``"random"`` keeps PyTorch's default initialization, for training from scratch.
        allow_larger: also convert layers whose separable form has more parameters
            than the dense conv (skipped by default).
        inplace: modify and return ``model`` itself.
        graph_module: return the traced, rewritten :class:`torch.fx.GraphModule`
            instead of the model's own class. The graph is traced in the model's
            current mode, so it keeps only the control flow of that mode and drops
            methods and attributes that ``forward`` does not use.
        tracing: ``"auto"`` traces with torch.fx and falls back to swapping modules by
            name when tracing fails; ``"fx"`` raises if tracing fails; ``"swap"``
            does not trace. Both paths convert the same layers, except that the swap
            path cannot see parameters that ``forward`` reads directly.
        leaf_modules, autowrap_functions, concrete_args: passed to the torch.fx tracer
            (module types or qualified names kept as single calls, functions recorded
            as calls, fixed values for ``forward`` arguments).

    Returns:
        The converted model. Use :func:`run_conversion` to also get the per-layer record.
    """
    return run_conversion(
        model,
        depth_multiplier=depth_multiplier,
        init=init,
        allow_larger=allow_larger,
        inplace=inplace,
        graph_module=graph_module,
        tracing=tracing,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
        concrete_args=concrete_args,
    ).model


def inspect_model(
    model: nn.Module,
    *,
    depth_multiplier: int = 1,
    allow_larger: bool = False,
    tracing: Tracing = "auto",
    leaf_modules: tuple[type[nn.Module] | str, ...] = (),
    autowrap_functions: tuple[Callable[..., Any], ...] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> tuple[list[LayerPlan], str | None]:
    """Plan the conversion without changing anything: one :class:`LayerPlan` per conv.

    Returns the plans and the one-line tracing error (``None`` if tracing worked or
    was not tried).
    """
    settings = TraceSettings(tuple(leaf_modules), tuple(autowrap_functions), concrete_args)
    graph, trace_error = trace_if_possible(model, settings, tracing)
    usage = find_graph_usage(graph) if graph is not None else None
    plans = [plan_layer(site, depth_multiplier, usage, allow_larger) for site in find_convs(model)]
    return plans, trace_error


def trace_if_possible(
    model: nn.Module, settings: TraceSettings, tracing: str
) -> tuple[torch.fx.Graph | None, str | None]:
    """Trace unless ``tracing == "swap"``; in ``"auto"`` mode a failure returns its one-line reason."""
    if tracing == "swap":
        return None, None
    try:
        return trace_model(model, settings), None
    except Exception as error:  # the tracer can raise almost anything that forward raises
        reason = one_line(error)
        if tracing == "fx":
            raise ConversionError(
                f"torch.fx could not trace {type(model).__name__}: {reason}. "
                "Pass leaf_modules/autowrap_functions/concrete_args, or use tracing='swap'"
            ) from error
        log.info("tracing %s failed, swapping modules by name instead: %s", type(model).__name__, reason)
        return None, reason


def one_line(error: BaseException) -> str:
    """Return the exception's type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def build_replacement(
    conv: nn.modules.conv._ConvNd, plan: LayerPlan, init: str
) -> tuple[DepthwiseSeparableConvNd, float | None]:
    """Build the separable layer for one planned conv; returns it and its relative weight error."""
    assert plan.depth_multiplier is not None, "only planned layers are built"
    layer_type = separable_type_for(conv)
    if init == "random":
        return layer_type.from_conv(conv, plan.depth_multiplier, init="random"), None
    try:
        factors = factorize_weight(conv.weight, plan.depth_multiplier, groups=conv.groups)
    except (ValueError, RuntimeError) as error:
        raise ConversionError(f"layer {plan.name!r}: factorization failed: {one_line(error)}") from error
    return layer_type.from_factors(conv, factors), factors.relative_error


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Set each qualified name in ``model`` to its replacement; returns the new root.

    The empty name stands for ``model`` itself, which is then replaced as a whole.
    """
    for name, module in replacements.items():
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    return replacements.get("", model)


def build_graph_module(model: nn.Module, graph: torch.fx.Graph | None) -> torch.fx.GraphModule:
    """Wrap the converted model's modules in a GraphModule of the traced graph."""
    assert graph is not None, "graph_module=True is only reached with a traced graph"
    module = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    module.graph.lint()
    module.graph.eliminate_dead_code()
    module.recompile()
    module.train(model.training)
    return module
