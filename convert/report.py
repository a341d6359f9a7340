"""Before/after reports: data classes, how to fill them, and how to render them.

Report data is plain data classes so it can go to JSON unchanged; rendering is a
separate step that returns a string (a terminal table, GitHub Markdown or JSON).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tabulate import tabulate
from torch import nn

from .factorize import channel_spectra, truncation_error
from .graph_pass import ConversionResult
from .measure import (
    LatencyStats,
    OutputDifference,
    checkpoint_size,
    compare_outputs,
    count_macs,
    count_parameters,
    measure_latency,
)
from .selection import LayerPlan, separable_parameters

__all__ = [
    "FORMATS",
    "ConversionReport",
    "LayerRow",
    "ModelSummary",
    "build_report",
    "render_report",
    "render_plans",
]

FORMATS = ("table", "markdown", "json")
TABLE_FORMATS = {"table": "simple", "markdown": "github"}
MAC_UNIT = "MACs: multiply-accumulates, FlopCounterMode FLOPs / 2"


@dataclass
class LayerRow:
    """One conv in the report. ``macs_*`` is ``None`` when the sample forward did not call it.

    The optional fields at the end are filled when they apply. ``rank_rule`` names
    the rule that chose K. ``output_error`` is the relative output error on
    calibration data, and with ``init="data"`` ``svd_output_error`` is the
    weight-SVD layer's error on the same inputs and ``init_used`` the init that was
    kept. ``dense_ms``/``separable_ms`` are latency-aware timings, and ``note``
    explains an unusual outcome.
    """

    name: str
    type_name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    requested_multiplier: int | None
    depth_multiplier: int | None
    params_before: int
    params_after: int | None
    macs_before: int | None
    macs_after: int | None
    relative_error: float | None
    reason: str | None
    aliases: tuple[str, ...] = ()
    setting_source: str = "depth_multiplier"
    effective: str | None = None
    rank_rule: str | None = None
    output_error: float | None = None
    svd_output_error: float | None = None
    init_used: str | None = None
    dense_ms: float | None = None
    separable_ms: float | None = None
    note: str | None = None


@dataclass
class ModelSummary:
    """Whole-model figures for one side of the comparison."""

    parameters: int
    macs: int
    checkpoint_bytes: int
    latency: LatencyStats | None = None


@dataclass
class ConversionReport:
    """Everything a conversion changed, per layer and for the whole model."""

    model: str
    path: str
    trace_error: str | None
    init: str
    input_shape: tuple[int, ...]
    device: str
    dtype: str
    layers: list[LayerRow]
    before: ModelSummary
    after: ModelSummary
    output_difference: OutputDifference | None
    mac_unit: str = MAC_UNIT
    notes: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerRow]:
        return [row for row in self.layers if row.reason is None]

    @property
    def skipped(self) -> list[LayerRow]:
        return [row for row in self.layers if row.reason is not None]


def summarize_model(model: nn.Module, example_input: torch.Tensor, latency: bool, min_run_time: float) -> tuple[ModelSummary, dict[str, int], object]:
    """Measure one model; returns its summary, per-module MACs and its output on ``example_input``."""
    macs, per_module = count_macs(model, example_input)
    with torch.no_grad():
        output = model(example_input)
    stats = measure_latency(model, example_input, min_run_time=min_run_time) if latency else None
    return ModelSummary(count_parameters(model), macs, checkpoint_size(model), stats), per_module, output


def build_report(
    original: nn.Module,
    result: ConversionResult,
    example_input: torch.Tensor,
    *,
    init: str = "svd",
    latency: bool = True,
    min_run_time: float = 1.0,
) -> ConversionReport:
    """Measure ``original`` and ``result.model`` on ``example_input`` and fill a report.

    Both models run in their current train/eval mode; call ``.eval()`` first for
    inference figures. Latency is skipped with ``latency=False``.
    """
    before, macs_before, output_before = summarize_model(original, example_input, latency, min_run_time)
    after, macs_after, output_after = summarize_model(result.model, example_input, latency, min_run_time)
    rows = [
        LayerRow(
            name=layer.plan.name,
            type_name=layer.plan.type_name,
            in_channels=layer.plan.in_channels,
            out_channels=layer.plan.out_channels,
            kernel_size=layer.plan.kernel_size,
            stride=layer.plan.stride,
            groups=layer.plan.groups,
            requested_multiplier=layer.plan.requested_multiplier,
            depth_multiplier=layer.plan.depth_multiplier,
            params_before=layer.plan.params_before,
            params_after=layer.plan.params_after,
            macs_before=first_known(macs_before, layer.plan),
            macs_after=first_known(macs_after, layer.plan) if layer.plan.converted else None,
            relative_error=layer.relative_error,
            reason=layer.plan.reason,
            aliases=layer.plan.aliases,
            setting_source=layer.plan.setting_source,
            effective=layer.plan.effective,
            rank_rule=layer.plan.rank_rule,
            output_error=layer.output_error,
            svd_output_error=layer.svd_output_error,
            init_used=layer.init,
            dense_ms=layer.plan.dense_ms,
            separable_ms=layer.plan.separable_ms,
            note="; ".join(note for note in (layer.plan.note, layer.note) if note) or None,
        )
        for layer in result.layers
    ]
    notes = []
    if not result.converted:
        notes.append("nothing was converted: the model is returned unchanged")
    return ConversionReport(
        model=type(original).__name__,
        path=result.path,
        trace_error=result.trace_error,
        init=init,
        input_shape=tuple(example_input.shape),
        device=str(example_input.device),
        dtype=str(example_input.dtype).removeprefix("torch."),
        layers=rows,
        before=before,
        after=after,
        output_difference=compare_outputs(output_before, output_after),
        notes=notes,
    )


def first_known(per_module: dict[str, int], plan: LayerPlan) -> int | None:
    """Return the MACs recorded under any of the layer's names (the counter uses one of them)."""
    for name in (plan.name, *plan.aliases):
        if name in per_module:
            return per_module[name]
    return None


def render_report(report: ConversionReport, fmt: str = "table") -> str:
    """Render a report as a terminal table, GitHub Markdown or JSON."""
    check_format(fmt)
    if fmt == "json":
        return json.dumps(asdict(report), indent=2)
    table_format = TABLE_FORMATS[fmt]
    sections = [
        heading(f"dsconv report: {report.model}", fmt),
        describe_run(report),
        heading("Whole model", fmt),
        tabulate(summary_rows(report), headers=["", "before", "after", "after / before"], tablefmt=table_format, disable_numparse=True),
    ]
    converted = report.converted
    if converted:
        headers, cells = converted_table(converted)
        sections += [
            heading(f"Converted layers ({len(converted)})", fmt),
            tabulate(cells, headers=headers, tablefmt=table_format, disable_numparse=True),
        ]
    skipped = report.skipped
    if skipped:
        sections += [
            heading(f"Skipped layers ({len(skipped)})", fmt),
            tabulate(
                [[row.name, row.type_name, f"{row.in_channels}->{row.out_channels}", kernel_text(row.kernel_size), row.reason] for row in skipped],
                headers=["layer", "type", "in->out", "kernel", "reason"],
                tablefmt=table_format,
            ),
        ]
    sections += layer_notes(report.layers) + report.notes
    return "\n\n".join(sections) + "\n"


def layer_notes(rows: list[LayerRow]) -> list[str]:
    """Return one line per distinct per-layer note, and per converted effective weight."""
    lines = []
    notes: dict[str, list[str]] = {}
    for row in rows:
        if row.note:
            notes.setdefault(row.note, []).append(row.name or "(model)")
    for note, names in notes.items():
        lines.append(f"note: {len(names)} layer(s) ({shorten_names(names)}): {note}")
    for row in rows:
        if row.effective and row.reason is None:
            lines.append(f"note: {row.name or '(model)'} was converted from the {row.effective}")
    return lines


def shorten_names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def heading(text: str, fmt: str) -> str:
    return f"## {text}" if fmt == "markdown" else f"{text}\n{'=' * len(text)}"


def describe_run(report: ConversionReport) -> str:
    """Return the lines that describe how the numbers were obtained."""
    path = "torch.fx trace" if report.path == "fx" else "module swap by qualified name"
    lines = [
        f"path: {path}" + (f" (tracing failed: {report.trace_error})" if report.trace_error else ""),
        f"init: {report.init}; input: {shape_text(report.input_shape)} {report.dtype} on {report.device}",
        f"{report.mac_unit}; "
        + ("latency: torch.utils.benchmark median over the runs shown, after warm-up" if report.before.latency else "latency: not measured"),
    ]
    if any(row.output_error is not None for row in report.layers):
        lines.append(
            "output rel. error: sqrt(sum ||y - y_new||^2 / sum ||y||^2) on the calibration data, y the original layer's "
            "output in the original model, y_new the converted layer's output in the converted model"
        )
    if any(row.dense_ms is not None for row in report.layers):
        lines.append("latency-aware: each layer timed dense and separable on its input from the sample; kept dense where not faster")
    if report.output_difference is not None:
        difference = report.output_difference
        lines.append(
            f"output difference on the sample input: max abs {difference.max_absolute:.3g}, "
            f"max relative {difference.max_relative:.3g} (max abs difference / max abs original output)"
        )
        if not difference.original_finite:
            lines.append("warning: the original model's output on the sample input contains NaN or inf, so the difference means nothing")
        elif not difference.converted_finite:
            lines.append("warning: the converted model's output on the sample input contains NaN or inf")
    return "\n".join(lines)


def summary_rows(report: ConversionReport) -> list[list[str]]:
    before, after = report.before, report.after
    rows = [
        ["parameters", f"{before.parameters:,}", f"{after.parameters:,}", ratio(after.parameters, before.parameters)],
        ["MACs", f"{before.macs:,}", f"{after.macs:,}", ratio(after.macs, before.macs)],
        ["checkpoint bytes", f"{before.checkpoint_bytes:,}", f"{after.checkpoint_bytes:,}", ratio(after.checkpoint_bytes, before.checkpoint_bytes)],
    ]
    if before.latency is not None and after.latency is not None:
        rows.append(["latency ms (median ± IQR)", latency_text(before.latency), latency_text(after.latency), ratio(after.latency.median_ms, before.latency.median_ms)])
        rows.append(["latency runs / threads", f"{before.latency.runs} / {before.latency.threads}", f"{after.latency.runs} / {after.latency.threads}", ""])
    return rows


def converted_table(rows: list[LayerRow]) -> tuple[list[str], list[list[str]]]:
    """Return headers and cells of the converted-layer table; optional columns appear when any row has them."""
    headers = ["layer", "in->out", "kernel", "stride", "K", "params before", "params after", "MACs before", "MACs after", "weight rel. error"]
    cells = [converted_row(row) for row in rows]
    optional = [
        ("K chosen by", lambda row: row.rank_rule or "-", any(row.rank_rule not in (None, "fixed") for row in rows)),
        ("output rel. error", lambda row: optional_error(row.output_error), any(row.output_error is not None for row in rows)),
        ("weight-SVD output error", lambda row: optional_error(row.svd_output_error), any(row.svd_output_error is not None for row in rows)),
        ("init kept", lambda row: row.init_used or "-", any(row.init_used == "data" for row in rows) or any(row.svd_output_error is not None for row in rows)),
        ("ms dense / separable", timing_text, any(row.dense_ms is not None for row in rows)),
    ]
    for header, cell, shown in optional:
        if not shown:
            continue
        headers.append(header)
        for row, line in zip(rows, cells):
            line.append(cell(row))
    return headers, cells


def optional_error(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def timing_text(row: LayerRow) -> str:
    if row.dense_ms is None or row.separable_ms is None:
        return "-"
    return f"{row.dense_ms:.4f} / {row.separable_ms:.4f}"


def converted_row(row: LayerRow) -> list[str]:
    error = "-" if row.relative_error is None else f"{row.relative_error:.4f}"
    multiplier = str(row.depth_multiplier)
    if row.requested_multiplier is not None and row.depth_multiplier != row.requested_multiplier:
        multiplier += f" (requested {row.requested_multiplier})"
    return [
        row.name,
        f"{row.in_channels}->{row.out_channels}",
        kernel_text(row.kernel_size),
        kernel_text(row.stride),
        multiplier,
        f"{row.params_before:,}",
        f"{row.params_after:,}",
        optional_count(row.macs_before),
        optional_count(row.macs_after),
        error,
    ]


def render_plans(
    model: nn.Module,
    plans: Sequence[LayerPlan],
    multipliers: Sequence[int],
    fmt: str = "table",
    trace_error: str | None = None,
) -> str:
    """Render the look-before-you-convert listing: every conv, eligibility and cost per multiplier.

    For each multiplier the cell shows the separable layer's parameters and its
    relative weight error (from the singular values, nothing is converted).
    """
    check_format(fmt)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module  # plan names omit the wrapper's "module." prefix
    modules = dict(model.named_modules(remove_duplicate=False))
    records = []
    for plan in plans:
        conv = modules[plan.name]
        costs = {}
        spectrum = channel_spectra(conv.weight, conv.groups) if plan.factorable else None
        for multiplier in multipliers:
            used = min(multiplier, plan.full_rank)
            error = truncation_error(spectrum, used) if spectrum is not None else None
            costs[f"K={multiplier}"] = {"depth_multiplier": used, "params": separable_parameters(conv, used), "relative_error": error}
        records.append({**asdict(plan), "costs": costs})
    if fmt == "json":
        return json.dumps({"trace_error": trace_error, "layers": records}, indent=2)

    rows = []
    for plan, record in zip(plans, records):
        rule = plan.rank_rule if plan.rank_rule != "fixed" else plan.setting_source
        planned = "-" if plan.depth_multiplier is None else f"{plan.depth_multiplier} ({rule})"
        cells = [plan.name, plan.type_name, f"{plan.in_channels}->{plan.out_channels}", kernel_text(plan.kernel_size), plan.groups, f"{plan.params_before:,}", plan.full_rank, planned]
        for cost in record["costs"].values():
            cells.append("-" if cost["relative_error"] is None else f"{cost['params']:,} ({cost['relative_error']:.3f})")
        cells.append("eligible" if plan.converted else plan.reason)
        rows.append(cells)
    headers = ["layer", "type", "in->out", "kernel", "groups", "params", "full rank", "planned K (rule)", *[f"K={k} params (error)" for k in multipliers], "status"]
    lines = [tabulate(rows, headers=headers, tablefmt=TABLE_FORMATS[fmt], disable_numparse=True)]
    if trace_error:
        lines.append(f"tracing failed, so parameters read directly by forward could not be checked: {trace_error}")
    return "\n\n".join(lines) + "\n"


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported: choose one of {', '.join(FORMATS)}")


def ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "-"


def latency_text(stats: LatencyStats) -> str:
    return f"{stats.median_ms:.2f} ± {stats.iqr_ms:.2f}"


def kernel_text(values: tuple[int, ...]) -> str:
    return "x".join(str(value) for value in values)


def shape_text(shape: tuple[int, ...]) -> str:
    return ",".join(str(size) for size in shape)


def optional_count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"

