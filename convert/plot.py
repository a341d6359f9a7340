"""Pictures of the size/error trade-off: per layer, and for the whole model.

The left panel draws, for every factorable conv, the relative error at each
depth multiplier against the separable layer's share of the dense parameters,
with the chosen K marked. The right panel draws the whole model: the budget
frontier (each step a growing budget buys), one fixed multiplier everywhere
(K=1, 2, ...), and the chosen conversion. Errors come from singular values, so
nothing is converted or run to draw them. With calibration data they are the
output-weighted ones that the budget rule uses.

matplotlib is an optional dependency (the project's ``plot`` extra).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .calibration import CalibrationData, model_device, output_spectra
from .checkpoint import atomic_write, check_writable_target
from .errors import UsageError
from .factorize import channel_spectra
from .ranks import LayerOptions, TradeoffPoint, budget_frontier, layer_options, uniform_points
from .selection import LayerPlan

__all__ = [
    "LayerCurve",
    "Tradeoff",
    "check_plot_path",
    "compute_tradeoff",
    "plot_tradeoff",
    "require_matplotlib",
    "save_tradeoff_plot",
]

INSTALL_HINT = "pip install matplotlib (or the project's [plot] extra)"


def require_matplotlib() -> Any:
    """Import matplotlib with the file-only Agg backend; raises ``UsageError`` naming the extra if it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def check_plot_path(path: str | os.PathLike[str], *, force: bool = False, protect: tuple[Path, ...] = ()) -> None:
    """Raise before any work if the plot cannot be written: no matplotlib, unknown image suffix, or an unwritable target."""
    pyplot = require_matplotlib()
    suffix = Path(path).suffix.lstrip(".").lower()
    figure = pyplot.figure()
    supported = figure.canvas.get_supported_filetypes()
    pyplot.close(figure)
    if suffix not in supported:
        raise UsageError(f"plot file {path}: the suffix {suffix or '(none)'!r} is not an image format matplotlib writes; use .png, .svg or .pdf")
    check_writable_target(Path(path), force, protect)


@dataclass
class LayerCurve:
    """Relative error against the parameter share ``params(K) / dense params`` for one conv."""

    name: str
    multipliers: list[int]
    shares: list[float]
    errors: list[float]
    chosen: int | None


@dataclass
class Tradeoff:
    """Everything the picture shows; ``error_basis`` is ``"weight"`` or ``"output"``."""

    layers: list[LayerCurve]
    frontier: list[TradeoffPoint]
    uniform: list[TradeoffPoint]
    chosen: TradeoffPoint | None
    error_basis: str


def compute_tradeoff(
    model: nn.Module,
    plans: Sequence[LayerPlan],
    calibration_data: object = None,
    mark_chosen: bool = True,
) -> Tradeoff:
    """Price every multiplier of every factorable conv in ``model`` (unconverted) and the whole-model curves.

    ``plans`` are the conversion's plans. With ``mark_chosen`` their K are marked,
    which is off for a listing that has not chosen anything. The whole-model curves
    cover the layers that can shrink: some K has no more parameters than dense.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    factorable = [plan for plan in plans if plan.factorable]
    convs = {plan.name: modules[plan.name] for plan in factorable}
    spectra: dict[str, torch.Tensor] = {}
    if calibration_data is not None:
        spectra = output_spectra(model, convs, CalibrationData(calibration_data, model_device(model)))

    curves = []
    budget_options: list[LayerOptions] = []
    chosen_cost = 0
    chosen_error = 0.0
    for plan in factorable:
        conv = convs[plan.name]
        spectrum = spectra.get(plan.name, channel_spectra(conv.weight, conv.groups))
        every = layer_options(plan, conv, allow_larger=True, spectrum=spectrum)
        curves.append(
            LayerCurve(
                plan.name,
                every.multipliers,
                [params / every.dense_params for params in every.params],
                [math.sqrt(error) for error in every.squared_errors],
                plan.depth_multiplier if mark_chosen else None,
            )
        )
        shrinkable = layer_options(plan, conv, allow_larger=False, spectrum=spectrum)
        if not shrinkable.multipliers:
            continue
        budget_options.append(shrinkable)
        if plan.depth_multiplier is None:
            chosen_cost += every.dense_params
        else:
            index = every.multipliers.index(plan.depth_multiplier)
            chosen_cost += every.params[index]
            chosen_error += every.squared_errors[index]

    total = sum(options.dense_params for options in budget_options)
    chosen = None
    if mark_chosen and total:
        chosen = TradeoffPoint(chosen_cost / total, math.sqrt(chosen_error / len(budget_options)), "chosen")
    return Tradeoff(
        layers=curves,
        frontier=budget_frontier(budget_options),
        uniform=uniform_points(budget_options),
        chosen=chosen,
        error_basis="output" if spectra else "weight",
    )


def plot_tradeoff(tradeoff: Tradeoff, path: str | os.PathLike[str], *, force: bool = False, protect: tuple[Path, ...] = ()) -> None:
    """Draw ``tradeoff`` into an image file (format from the suffix: .png, .svg, .pdf), written atomically."""
    check_plot_path(path, force=force, protect=protect)
    with atomic_write(path, force=force, protect=protect) as handle:
        tradeoff_writer(tradeoff, path)(handle)


def tradeoff_writer(tradeoff: Tradeoff, path: str | os.PathLike[str]) -> Callable[[IO[bytes]], None]:
    """Return a function that draws ``tradeoff`` into an open file, in the format of ``path``'s suffix."""
    image_format = Path(path).suffix.lstrip(".").lower()

    def write(handle: IO[bytes]) -> None:
        pyplot = require_matplotlib()
        figure = draw_tradeoff(tradeoff, pyplot)
        try:
            figure.savefig(handle, format=image_format)
        finally:
            pyplot.close(figure)

    return write


def draw_tradeoff(tradeoff: Tradeoff, pyplot: Any) -> Any:
    """Draw the per-layer and whole-model panels; returns the matplotlib figure."""
    figure, (per_layer, whole) = pyplot.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    error_label = "relative output error (estimate)" if tradeoff.error_basis == "output" else "relative weight error"

    for curve in tradeoff.layers:
        (line,) = per_layer.plot(curve.shares, curve.errors, marker=".", linewidth=1, label=curve.name or "(root)")
        if curve.chosen is not None and curve.chosen in curve.multipliers:
            index = curve.multipliers.index(curve.chosen)
            per_layer.plot(curve.shares[index], curve.errors[index], marker="o", markersize=9, color=line.get_color(), fillstyle="none")
    per_layer.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    per_layer.set_xlabel("parameters / dense parameters (right of the dotted line: larger than dense)")
    per_layer.set_ylabel(error_label)
    per_layer.set_title("per layer, K = 1 .. full rank (circle: chosen K)")
    if len(tradeoff.layers) <= 12:
        per_layer.legend(fontsize="small")

    if tradeoff.frontier:
        whole.plot([p.share for p in tradeoff.frontier], [p.error for p in tradeoff.frontier], marker=".", linewidth=1, label="budget steps (lower convex hull)")
    if tradeoff.uniform:
        whole.plot([p.share for p in tradeoff.uniform], [p.error for p in tradeoff.uniform], "s", label="same K everywhere")
        for point in tradeoff.uniform:
            whole.annotate(point.label, (point.share, point.error), textcoords="offset points", xytext=(4, 4), fontsize="small")
    if tradeoff.chosen is not None:
        whole.plot([tradeoff.chosen.share], [tradeoff.chosen.error], "*", markersize=14, label="this conversion")
    whole.set_xlabel("parameters / dense parameters of the convs that can shrink")
    whole.set_ylabel(f"root mean square of the layers' {error_label}")
    whole.set_title("whole model")
    whole.legend(fontsize="small")

    return figure


def save_tradeoff_plot(
    model: nn.Module,
    plans: Sequence[LayerPlan],
    path: str | os.PathLike[str],
    *,
    calibration_data: object = None,
    mark_chosen: bool = True,
    force: bool = False,
    protect: tuple[Path, ...] = (),
) -> Tradeoff:
    """Compute the trade-off of ``model`` (unconverted), draw it to ``path``, and return it.

    See :func:`compute_tradeoff` for ``calibration_data`` and ``mark_chosen``.
    """
    check_plot_path(path, force=force, protect=protect)
    tradeoff = compute_tradeoff(model, plans, calibration_data, mark_chosen)
    plot_tradeoff(tradeoff, path, force=force, protect=protect)
    return tradeoff
