"""The conversion pass: find convs, decide, factor, swap.

The pass traces the model with torch.fx to learn which convs are safe to replace,
then swaps modules on a copy of the model itself, so the result keeps the caller's
class, methods, attributes and train/eval behaviour. When tracing fails, the same
layers are found from the module tree and swapped by qualified name.
"""

from __future__ import annotations

import copy
import logging
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from torch import nn

from .config import LayerConfig
from .effective import EffectiveConv, use_same_padding
from .errors import ConversionError
from .factorize import INIT_METHODS, factorize_weight
from .layers import DepthwiseSeparableConvNd, check_positive_int, separable_type_for
from .selection import ConvSite, LayerPlan, SelectionOptions, find_convs, plan_layer
from .tracing import TraceSettings, trace_model, trace_usage

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
    back to swapping modules by name; ``trace_error`` gives in one line why tracing
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


@dataclass
class Planning:
    """Everything the pass learned about a model before changing it."""

    sites: list[ConvSite]
    plans: list[LayerPlan]
    effective: dict[str, EffectiveConv]
    graph: torch.fx.Graph | None
    trace_error: str | None


def plan_model(
    model: nn.Module,
    config: LayerConfig,
    depth_multiplier: int,
    options: SelectionOptions,
    settings: TraceSettings,
    tracing: str,
) -> Planning:
    """Trace ``model`` (as ``tracing`` allows) and plan every conv in it, changing nothing."""
    if isinstance(model, nn.modules.conv._ConvNd):
        tracing = "swap"  # the whole model is one module: there is no graph around it to read
    graph, trace_error = trace_if_possible(model, settings, tracing)
    usage = trace_usage(model, settings, graph) if tracing != "swap" else None

    sites = find_convs(model)
    config.check_names(name for site in sites for name in site.names)
    plans: list[LayerPlan] = []
    effective: dict[str, EffectiveConv] = {}
    for site in sites:
        setting, source = config.resolve(site.names, site.module, depth_multiplier)
        plan, captured = plan_layer(site, setting, usage, options, source)
        plans.append(plan)
        if captured is not None:
            effective[site.name] = captured
    return Planning(sites, plans, effective, graph, trace_error)


def run_conversion(
    model: nn.Module,
    *,
    depth_multiplier: int = 1,
    config: LayerConfig | None = None,
    init: str = "svd",
    allow_larger: bool = False,
    convert_parametrized: bool = False,
    convert_subclasses: bool = False,
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
    check_arguments(depth_multiplier, init, tracing)
    if graph_module and tracing == "swap":
        raise ValueError("graph_module=True needs a traced graph, so it cannot be combined with tracing='swap'")
    settings = TraceSettings(tuple(leaf_modules), tuple(autowrap_functions), concrete_args)
    options = SelectionOptions(allow_larger, convert_parametrized, convert_subclasses)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    copied = model if inplace else copy_model(model)
    wrapper, target = unwrap_parallel(copied)
    if graph_module and (wrapper is not None or isinstance(target, nn.modules.conv._ConvNd)):
        raise ValueError("graph_module=True needs a model with a graph: pass the module inside the wrapper, or drop graph_module")
    seconds["copy"] = time.perf_counter() - started

    started = time.perf_counter()
    planning = plan_model(target, config or LayerConfig(), depth_multiplier, options, settings, tracing)
    if graph_module and planning.graph is None:
        raise ConversionError(f"graph_module=True needs a traced graph, but tracing failed: {planning.trace_error}")
    seconds["trace"] = time.perf_counter() - started

    started = time.perf_counter()
    results = [LayerResult(plan) for plan in planning.plans]
    replacements: dict[str, nn.Module] = {}
    for site, result in zip(planning.sites, results):
        if not result.plan.converted:
            continue
        layer, result.relative_error = build_replacement(site.module, result.plan, init, planning.effective.get(site.name))
        for name in site.names:
            replacements[name] = layer
    seconds["factorize"] = time.perf_counter() - started

    started = time.perf_counter()
    target = swap_modules(target, replacements)
    if graph_module:
        target = build_graph_module(target, planning.graph)
    if wrapper is not None:
        wrapper.module = target
        target = wrapper
    seconds["swap"] = time.perf_counter() - started

    path = "fx" if planning.graph is not None else "swap"
    result = ConversionResult(target, results, path, planning.trace_error, seconds)
    log.info(
        "converted %d of %d convs (path %s) in %.3f s",
        len(result.converted),
        len(results),
        path,
        sum(seconds.values()),
    )
    return result


def check_arguments(depth_multiplier: int, init: str, tracing: str) -> None:
    check_positive_int("depth_multiplier", depth_multiplier)
    if init not in INIT_METHODS:
        raise ValueError(f"init={init!r} is not supported: choose one of {', '.join(INIT_METHODS)}")
    if tracing not in TRACING_MODES:
        raise ValueError(f"tracing={tracing!r} is not supported: choose one of {', '.join(TRACING_MODES)}")


def copy_model(model: nn.Module) -> nn.Module:
    """Deep-copy a model, including tensors that ``deepcopy`` rejects.

    The hook-based ``torch.nn.utils.weight_norm`` and ``spectral_norm`` store the
    computed weight as a plain attribute with autograd history, and ``deepcopy``
    raises on such tensors. They are recomputed before every forward, so a detached
    copy is equivalent.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except (RuntimeError, TypeError, pickle.PicklingError) as error:
        raise ConversionError(
            f"{type(model).__name__} cannot be copied ({one_line(error)}); pass inplace=True to convert it in place"
        ) from error


def unwrap_parallel(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """Split ``nn.DataParallel``/``DistributedDataParallel`` into the wrapper and the module inside."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model, model.module
    return None, model


def convert_model(
    model: nn.Module,
    *,
    depth_multiplier: int = 1,
    config: LayerConfig | None = None,
    init: str = "svd",
    allow_larger: bool = False,
    convert_parametrized: bool = False,
    convert_subclasses: bool = False,
    inplace: bool = False,
    graph_module: bool = False,
    tracing: Tracing = "auto",
    leaf_modules: tuple[type[nn.Module] | str, ...] = (),
    autowrap_functions: tuple[Callable[..., Any], ...] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replace each eligible conv of ``model`` with a depthwise-separable pair.

    Args:
        model: the model to convert. It is copied first unless ``inplace=True``. A
            model wrapped in ``nn.DataParallel`` or ``DistributedDataParallel`` is
            converted inside its wrapper, and layer names omit the ``module.`` prefix.
        depth_multiplier: filters per input channel in the depthwise half (``K``).
            A value above a layer's full rank ``min(C_out / groups, prod(kernel))``
            is lowered to it, since it would add parameters without reducing error.
        config: a :class:`~convert.config.LayerConfig` with per-layer multipliers,
            or ``None`` to leave a layer alone, resolved global < module type < name
            pattern < exact name. ``depth_multiplier`` is its global setting unless
            the config sets one.
        init: ``"svd"`` factors the trained weights (exact at full rank);
            ``"random"`` keeps PyTorch's default initialization, for training from scratch.
        allow_larger: also convert layers whose separable form has more parameters
            than the dense conv (skipped by default).
        convert_parametrized: convert convs whose weight is reparametrized
            (``weight_norm``, ``spectral_norm``, old or new API) from their current
            effective weight; the replacement is a plain separable layer.
        convert_subclasses: convert subclasses of ``nn.Conv*d`` whose output, in eval
            mode, is that of a single conv with a fixed weight, with or without
            dynamic "same" padding (weight standardization, timm's ``Conv2dSame``).
            Each one is checked on random inputs and skipped with the reason if it fails.
        inplace: modify and return ``model`` itself.
        graph_module: return the traced, rewritten :class:`torch.fx.GraphModule`
            instead of the model's own class. The graph is traced in the model's
            current mode, so it keeps only the control flow of that mode and drops
            methods and attributes that ``forward`` does not use.
        tracing: ``"auto"`` traces with torch.fx and falls back to swapping modules by
            name when tracing fails; ``"fx"`` raises if tracing fails; ``"swap"``
            does not trace. In the fallback, each submodule is traced on its own so
            direct parameter reads are still found where possible.
        leaf_modules, autowrap_functions, concrete_args: passed to the torch.fx tracer
            (module types or qualified names kept as single calls, functions recorded
            as calls, fixed values for ``forward`` arguments).

    Returns:
        The converted model. Use :func:`run_conversion` to also get the per-layer record.
    """
    return run_conversion(
        model,
        depth_multiplier=depth_multiplier,
        config=config,
        init=init,
        allow_larger=allow_larger,
        convert_parametrized=convert_parametrized,
        convert_subclasses=convert_subclasses,
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
    config: LayerConfig | None = None,
    allow_larger: bool = False,
    convert_parametrized: bool = False,
    convert_subclasses: bool = False,
    tracing: Tracing = "auto",
    leaf_modules: tuple[type[nn.Module] | str, ...] = (),
    autowrap_functions: tuple[Callable[..., Any], ...] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> tuple[list[LayerPlan], str | None]:
    """Plan the conversion without changing anything: one :class:`LayerPlan` per conv.

    Takes the arguments of :func:`convert_model` that affect the plan. Returns the
    plans and the one-line tracing error (``None`` if tracing worked or was not tried).
    """
    check_arguments(depth_multiplier, "svd", tracing)
    settings = TraceSettings(tuple(leaf_modules), tuple(autowrap_functions), concrete_args)
    options = SelectionOptions(allow_larger, convert_parametrized, convert_subclasses)
    _, target = unwrap_parallel(model)
    planning = plan_model(target, config or LayerConfig(), depth_multiplier, options, settings, tracing)
    return planning.plans, planning.trace_error


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
    conv: nn.modules.conv._ConvNd, plan: LayerPlan, init: str, effective: EffectiveConv | None = None
) -> tuple[DepthwiseSeparableConvNd, float | None]:
    """Build the separable layer for one planned conv; returns it and its relative weight error.

    ``effective`` replaces ``conv`` as the source of weight and geometry for
    reparametrized convs and conv subclasses.
    """
    assert plan.depth_multiplier is not None, "only planned layers are built"
    source = effective.conv if effective is not None else conv
    layer_type = separable_type_for(source)
    if init == "random":
        layer, error = layer_type.from_conv(source, plan.depth_multiplier, init="random"), None
    else:
        try:
            factors = factorize_weight(source.weight, plan.depth_multiplier, groups=source.groups)
        except (ValueError, RuntimeError) as failure:
            raise ConversionError(f"layer {plan.name!r}: factorization failed: {one_line(failure)}") from failure
        layer, error = layer_type.from_factors(source, factors), factors.relative_error
    if effective is not None and effective.same_padding:
        use_same_padding(layer)
    layer.train(conv.training)
    return layer, error


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Set each qualified name in ``model`` to its replacement; returns the new root.

    The empty name is ``model`` itself, which is then replaced as a whole.
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
