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
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from torch import nn

from .calibration import CalibrationData, PlannedLayer, fit_layers, measure_output_errors, model_device, output_spectra
from .config import LayerConfig
from .effective import EffectiveConv, use_same_padding
from .errors import ConversionError, UsageError
from .factorize import INIT_METHODS, factorize_weight
from .layer_timing import keep_faster_layers
from .layers import DepthwiseSeparableConvNd, check_positive_int, separable_type_for
from .progress import progress
from .ranks import RankSettings, count_output_positions, select_ranks
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

# Initializations of the whole pass: the layer's own ("svd", "random") plus "data",
# which needs calibration batches and so only exists here.
PASS_INIT_METHODS = (*INIT_METHODS, "data")


@dataclass
class LayerResult:
    """A layer plan together with what the conversion produced for it.

    ``relative_error`` is the weight error ``||W - W_new||_F / ||W||_F``. With
    calibration data, ``output_error`` is the relative output error on it (see
    :class:`convert.calibration.LayerFit`). With ``init="data"``,
    ``svd_output_error`` is the weight-SVD layer's error on the same inputs and
    ``init`` names the one of the two that was kept. ``note`` explains an unusual outcome.
    """

    plan: LayerPlan
    relative_error: float | None = None
    output_error: float | None = None
    svd_output_error: float | None = None
    init: str | None = None
    note: str | None = None

    @property
    def name(self) -> str:
        return self.plan.name


@dataclass
class ConversionResult:
    """The converted model and a record of every conv the pass looked at.

    ``path`` is ``"fx"`` when the graph was traced and ``"swap"`` when the pass fell
    back to swapping modules by name. ``trace_error`` gives in one line why tracing
    failed, and is ``None`` when it did not fail or was not tried.
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
    rank: str = "fixed",
    energy: float | None = None,
    budget: float | None = None,
    budget_on: str = "params",
    example_input: torch.Tensor | None = None,
    latency_aware: bool = False,
    latency_device: str | torch.device | None = None,
    latency_time: float | None = None,
    calibration_data: object = None,
    show_progress: bool | None = None,
) -> ConversionResult:
    """Convert every eligible conv of ``model`` and return the model with a per-layer record.

    See :func:`convert_model` for the arguments.
    """
    check_arguments(depth_multiplier, init, tracing)
    if init == "data" and calibration_data is None:
        raise UsageError("init='data' needs calibration_data=: a tensor, or a list or DataLoader of input batches")
    rank_settings = RankSettings(rank, depth_multiplier, energy, budget, budget_on, allow_larger)
    latency = LatencySettings.checked(latency_aware, latency_device, latency_time)
    check_example_input(example_input, rank_settings, latency)
    if graph_module and tracing == "swap":
        raise ValueError("graph_module=True needs a traced graph, so it cannot be combined with tracing='swap'")
    calibration = CalibrationData(calibration_data, model_device(model)) if calibration_data is not None else None
    settings = TraceSettings(tuple(leaf_modules), tuple(autowrap_functions), concrete_args)
    options = SelectionOptions(allow_larger, convert_parametrized, convert_subclasses)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    copied = model if inplace else copy_model(model)
    wrapper, target = unwrap_parallel(copied)
    if graph_module and (wrapper is not None or isinstance(target, nn.modules.conv._ConvNd)):
        raise ValueError("graph_module=True needs a model with a graph: pass the module inside the wrapper, or drop graph_module")
    # calibration compares against the unconverted model, which in place needs its own copy
    reference = None
    if calibration is not None:
        reference = unwrap_parallel(copy_model(model) if inplace else model)[1]
    seconds["copy"] = time.perf_counter() - started

    started = time.perf_counter()
    planning = plan_model(target, config or LayerConfig(), rank_settings.planning_multiplier(), options, settings, tracing)
    if graph_module and planning.graph is None:
        raise ConversionError(f"graph_module=True needs a traced graph, but tracing failed: {planning.trace_error}")
    seconds["trace"] = time.perf_counter() - started

    started = time.perf_counter()
    # NOTE: the energy and budget rules choose K for every eligible plan, so they replace
    # any multiplier that the config set for a single layer (layers it leaves alone stay).
    plans = choose_ranks(target, planning.sites, planning.plans, rank_settings, latency, example_input, calibration, planning.effective)
    results = [LayerResult(plan) for plan in plans]
    seconds["select"] = time.perf_counter() - started

    if init == "data":
        check_data_init_supported(results, planning.effective)
        started = time.perf_counter()
        # fitting swaps each layer in as soon as it is fitted, because later layers are fitted on its outputs
        assert calibration is not None and reference is not None, "checked above"
        target = fit_to_data(reference, target, planning.sites, results, calibration, show_progress)
        seconds["calibrate"] = time.perf_counter() - started
    else:
        target = replace_layers(target, planning, results, init, seconds)
    if calibration is not None and init != "data":
        assert reference is not None, "set with calibration"
        started = time.perf_counter()
        record_output_errors(reference, target, results, calibration)
        seconds["measure"] = time.perf_counter() - started

    started = time.perf_counter()
    if graph_module:
        target = build_graph_module(target, planning.graph)
    if wrapper is not None:
        wrapper.module = target
        target = wrapper
    seconds["swap"] = seconds.get("swap", 0.0) + time.perf_counter() - started

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
    if init not in PASS_INIT_METHODS:
        raise ValueError(f"init={init!r} is not supported: choose one of {', '.join(PASS_INIT_METHODS)}")
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


def check_data_init_supported(results: list[LayerResult], effective: dict[str, EffectiveConv]) -> None:
    """Reject init="data" for layers converted from an effective weight, which the fit does not handle."""
    names = [result.name for result in results if result.plan.converted and result.name in effective]
    if names:
        raise UsageError(
            f"init='data' cannot yet fit layers converted from an effective weight ({', '.join(names)}); "
            "use init='svd', or leave out convert_parametrized/convert_subclasses"
        )


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
    rank: str = "fixed",
    energy: float | None = None,
    budget: float | None = None,
    budget_on: str = "params",
    example_input: torch.Tensor | None = None,
    latency_aware: bool = False,
    latency_device: str | torch.device | None = None,
    latency_time: float | None = None,
    calibration_data: object = None,
    show_progress: bool | None = None,
) -> nn.Module:
    """Replace each eligible conv of ``model`` with a depthwise-separable pair.

    The steps run in this order:

    1. plan every conv, skipping for example 1x1 kernels, convs whose
       parameters ``forward`` reads directly and layers the ``config`` leaves alone;
    2. choose K for the eligible ones (``rank``), keeping dense any layer whose
       separable form would be larger, unless ``allow_larger``;
    3. keep dense any layer that is not faster (``latency_aware``);
    4. build the layers (``init``) and swap them in.

    Args:
        model: the model to convert. It is copied first unless ``inplace=True``. A
            model wrapped in ``nn.DataParallel`` or ``DistributedDataParallel`` is
            converted inside its wrapper, and layer names omit the ``module.`` prefix.
        depth_multiplier: filters per input channel in the depthwise half (``K``)
            for ``rank="fixed"``. A value above a layer's full rank
            ``min(C_out / groups, prod(kernel))`` is lowered to it, since it would
            add parameters without reducing error.
        config: a :class:`~convert.config.LayerConfig` with per-layer multipliers,
            or ``None`` to leave a layer alone, resolved global < module type < name
            pattern < exact name. ``depth_multiplier`` is its global setting unless
            the config sets one.
        init: ``"svd"`` factors the trained weights (exact at full rank);
            ``"random"`` keeps PyTorch's default initialization, for training from
            scratch. ``"data"`` fits each layer to the original layer's outputs on
            ``calibration_data`` (see :mod:`convert.calibration`). On that data no
            layer ends up with a higher output error than ``"svd"`` gives it.
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
        rank: how K is chosen per layer (see :mod:`convert.ranks`): ``"fixed"``
            uses ``depth_multiplier``; ``"energy"`` takes the smallest K at which
            every input channel keeps ``energy`` of its squared singular values;
            ``"budget"`` spends ``budget`` (a share of the eligible convs'
            ``budget_on``, ``"params"`` or ``"macs"``) where it removes the most
            relative squared weight error per unit of cost, and may keep a layer dense.
        energy: share in (0, 1] for ``rank="energy"``.
        budget: share in (0, 1] for ``rank="budget"``. The result never goes over
            it, and no layer could move to a more accurate option without going
            over. A ``ValueError`` (``UsageError``) names the smallest workable
            budget when K=1 everywhere already costs more.
        budget_on: ``"params"`` or ``"macs"``; MACs need ``example_input``.
        example_input: a tensor shaped like the model's input, run once to count
            each layer's MACs (``budget_on="macs"``) and to time layers
            (``latency_aware``). Passing it for anything else raises.
        latency_aware: time every planned layer dense and separable on
            ``latency_device`` (default: ``example_input``'s device) with at least
            ``latency_time`` seconds per measurement (default 0.1), and keep dense
            those where the separable form is not faster. Runs after K is chosen,
            so it can raise the parameter count above a budget.
        calibration_data: a tensor (one batch), or a re-iterable collection of
            batches such as a list or a ``DataLoader``, where a batch is a tensor
            or a tuple whose first item is the input. Needed by ``init="data"``;
            with another init it is used to measure each layer's output error.
            Batches are moved to the model's device. The model runs in eval mode
            on them and gets its modes back afterwards.
        show_progress: show a progress bar during calibration; ``None`` shows
            it only when stderr is a terminal.

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
        rank=rank,
        energy=energy,
        budget=budget,
        budget_on=budget_on,
        example_input=example_input,
        latency_aware=latency_aware,
        latency_device=latency_device,
        latency_time=latency_time,
        calibration_data=calibration_data,
        show_progress=show_progress,
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
    rank: str = "fixed",
    energy: float | None = None,
    budget: float | None = None,
    budget_on: str = "params",
    example_input: torch.Tensor | None = None,
    latency_aware: bool = False,
    latency_device: str | torch.device | None = None,
    latency_time: float | None = None,
) -> tuple[list[LayerPlan], str | None]:
    """Plan the conversion without changing anything: one :class:`LayerPlan` per conv.

    The rank keywords work as in :func:`convert_model`, so the plans show the K
    each rule would choose (and the timings, with ``latency_aware``). Returns the
    plans and the one-line tracing error (``None`` if tracing worked or was not
    tried).
    """
    check_arguments(depth_multiplier, "svd", tracing)
    rank_settings = RankSettings(rank, depth_multiplier, energy, budget, budget_on, allow_larger)
    latency = LatencySettings.checked(latency_aware, latency_device, latency_time)
    check_example_input(example_input, rank_settings, latency)
    settings = TraceSettings(tuple(leaf_modules), tuple(autowrap_functions), concrete_args)
    options = SelectionOptions(allow_larger, convert_parametrized, convert_subclasses)
    _, target = unwrap_parallel(model)
    planning = plan_model(target, config or LayerConfig(), rank_settings.planning_multiplier(), options, settings, tracing)
    plans = choose_ranks(target, planning.sites, planning.plans, rank_settings, latency, example_input, effective=planning.effective)
    return plans, planning.trace_error


@dataclass(frozen=True)
class LatencySettings:
    """Latency-aware selection: whether it runs, where it times, and the minimum time per measurement."""

    enabled: bool = False
    device: str | torch.device | None = None
    min_run_time: float = 0.1

    @classmethod
    def checked(cls, enabled: bool, device: str | torch.device | None, min_run_time: float | None) -> "LatencySettings":
        """Validate the latency keywords; ``device`` and ``min_run_time`` are only taken with ``enabled``."""
        if not isinstance(enabled, bool):
            raise TypeError(f"latency_aware={enabled!r}: must be True or False")
        if not enabled:
            if device is not None:
                raise UsageError(f"latency_device={device!r} is only used with latency_aware=True (--latency-aware)")
            if min_run_time is not None:
                raise UsageError(f"latency_time={min_run_time!r} (--layer-latency-time) is only used with latency_aware=True (--latency-aware)")
            return cls()
        if min_run_time is None:
            return cls(True, device)
        if isinstance(min_run_time, bool) or not isinstance(min_run_time, (int, float)) or not min_run_time > 0:
            raise UsageError(f"latency_time={min_run_time!r}: must be a number of seconds greater than 0")
        return cls(True, device, float(min_run_time))


def check_example_input(example_input: torch.Tensor | None, ranks: RankSettings, latency: LatencySettings) -> None:
    """Require ``example_input`` exactly when MACs per layer or latency are needed."""
    needed = (ranks.mode == "budget" and ranks.budget_on == "macs") or latency.enabled
    if example_input is None:
        if needed:
            what = "latency_aware=True" if latency.enabled else "budget_on='macs'"
            raise UsageError(f"{what} needs example_input=, a tensor shaped like the model's input")
        return
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input is a {type(example_input).__name__}: pass a tensor shaped like the model's input")
    if not needed:
        raise UsageError("example_input= is only used by rank='budget' with budget_on='macs' and by latency_aware=True")


def choose_ranks(
    model: nn.Module,
    sites: list[ConvSite],
    plans: list[LayerPlan],
    ranks: RankSettings,
    latency: LatencySettings,
    example_input: torch.Tensor | None,
    calibration: CalibrationData | None = None,
    effective: Mapping[str, EffectiveConv] | None = None,
) -> list[LayerPlan]:
    """Choose K for the eligible plans, then keep dense the layers that latency-aware timing finds slower.

    ``model`` is still unconverted; it runs on ``example_input`` when MACs or
    latency are needed. With calibration data the budget rule measures each
    choice by its estimated output error on that data instead of its weight error.
    ``effective`` gives the plain conv whose weight is factored for reparametrized
    convs and conv subclasses, so their ranks are priced from that weight.
    """
    convs = {site.name: site.module for site in sites}
    weights = {name: effective[name].conv if effective and name in effective else module for name, module in convs.items()}
    positions = None
    if ranks.mode == "budget" and ranks.budget_on == "macs":
        assert example_input is not None, "checked by check_example_input"
        positions = run_model_step("counting MACs", lambda: count_output_positions(model, example_input, convs))
    spectra = None
    if ranks.mode == "budget" and calibration is not None:
        eligible = {plan.name: convs[plan.name] for plan in plans if plan.converted}
        # NOTE: a layer that never runs on the calibration data gets no output spectrum, so the
        # budget prices it by relative weight error, which is not on the same scale.
        spectra = output_spectra(model, eligible, calibration)
    plans = select_ranks(plans, weights, ranks, positions, spectra)
    if latency.enabled:
        assert example_input is not None, "checked by check_example_input"
        plans = run_model_step(
            "timing layers",
            lambda: keep_faster_layers(plans, convs, model, example_input, latency.device, latency.min_run_time),
        )
    return plans


def run_model_step(step: str, action: Callable[[], Any]) -> Any:
    """Run a step that calls the model on ``example_input``, turning a model failure into a ConversionError."""
    try:
        return action()
    except (RuntimeError, TypeError, IndexError) as error:
        raise ConversionError(
            f"{step}: the model failed on example_input: {one_line(error)}. Pass a tensor shaped like the model's input"
        ) from error


def fit_to_data(
    reference: nn.Module,
    target: nn.Module,
    sites: list[ConvSite],
    results: list[LayerResult],
    calibration: CalibrationData,
    show_progress: bool | None,
) -> nn.Module:
    """Fit the planned layers of ``target`` on calibration data and fill their results; returns the converted model."""
    originals = dict(reference.named_modules(remove_duplicate=False))
    planned = [
        PlannedLayer(site, result.plan, originals[site.name])
        for site, result in zip(sites, results)
        if result.plan.converted
    ]
    target, fits = fit_layers(reference, target, planned, calibration, swap_modules, show_progress)
    for result in results:
        fit = fits.get(result.name)
        if fit is None:
            continue
        result.relative_error = fit.relative_error
        result.output_error = fit.output_error
        result.svd_output_error = fit.svd_output_error
        result.init = fit.init
        result.note = fit.note
    return target


def record_output_errors(reference: nn.Module, converted: nn.Module, results: list[LayerResult], calibration: CalibrationData) -> None:
    """Measure each converted layer's output error on the calibration data and store it in its result."""
    originals = dict(reference.named_modules(remove_duplicate=False))
    modules = dict(converted.named_modules(remove_duplicate=False))
    layers = [(result.name, originals[result.name], modules[result.name]) for result in results if result.plan.converted]
    errors = measure_output_errors(reference, converted, layers, calibration)
    for result in results:
        if not result.plan.converted:
            continue
        result.output_error = errors.get(result.name)
        if result.output_error is None:
            result.note = "not called on the calibration data, so no output error was measured"


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


def replace_layers(
    target: nn.Module, planning: Planning, results: list[LayerResult], init: str, seconds: dict[str, float]
) -> nn.Module:
    """Build each planned layer (``init`` is "svd" or "random") and swap it in at once; returns the new root.

    Each dense conv is swapped out as soon as its replacement exists, and the pass
    drops its own references to it, so the copy never holds both forms of every
    layer. Peak memory then stays near two copies of the weights (the caller's model
    and the copy) instead of growing by the new layers.
    """
    seconds["factorize"] = seconds["swap"] = 0.0
    pending = deque(zip(planning.sites, results))
    planning.sites = []
    for _ in progress(range(len(pending)), description="factorize", total=len(pending)):
        site, result = pending.popleft()
        if not result.plan.converted:
            continue
        started = time.perf_counter()
        effective = planning.effective.pop(site.name, None)
        layer, result.relative_error = build_replacement(site.module, result.plan, init, effective)
        result.init = init
        seconds["factorize"] += time.perf_counter() - started

        started = time.perf_counter()
        target = swap_modules(target, dict.fromkeys(site.names, layer))
        seconds["swap"] += time.perf_counter() - started
        del site, layer, effective
    return target


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
