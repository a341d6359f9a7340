"""Reports: hand-derived counts, the three formats, and the measurements behind them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from convert import inspect_model, run_conversion
from convert.measure import checkpoint_size, compare_outputs, count_macs, count_parameters, measure_latency
from convert.report import build_report, render_plans, render_report


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_macs_match_hand_count():
    model = tiny()
    total, per_module = count_macs(model, torch.randn(1, 3, 8, 8))
    # 8x8 outputs; conv 0: 8 channels x 27 taps; conv 2: 4 channels x 8 inputs
    assert per_module["0"] == 64 * 8 * 27
    assert per_module["2"] == 64 * 4 * 8
    assert total == 64 * 8 * 27 + 64 * 4 * 8


def test_parameters_count_shared_once():
    conv = nn.Conv2d(2, 2, 3)
    model = nn.Sequential(conv, conv)
    assert count_parameters(model) == 2 * 2 * 9 + 2


def test_report_counts_for_tiny_model():
    model = tiny()
    result = run_conversion(model)
    report = build_report(model, result, torch.randn(1, 3, 8, 8), latency=False)
    converted = report.layers[0]
    assert converted.params_before == 216
    assert converted.params_after == 3 * 9 + 8 * 3
    assert converted.macs_before == 64 * 8 * 27
    assert converted.macs_after == 64 * 3 * 9 + 64 * 8 * 3
    assert report.before.parameters == 216 + 4 * 8 + 4
    assert report.after.parameters == 51 + 4 * 8 + 4
    assert report.skipped[0].reason == "kernel is 1x1: already a pointwise conv"
    assert report.before.latency is None


def test_report_output_difference_zero_at_full_rank():
    model = tiny()
    result = run_conversion(model, depth_multiplier=9, allow_larger=True)
    report = build_report(model, result, torch.randn(2, 3, 8, 8), latency=False)
    assert report.output_difference.max_relative < 1e-5


def test_render_table_has_sections():
    model = tiny()
    report = build_report(model, run_conversion(model), torch.randn(1, 3, 8, 8), latency=False)
    text = render_report(report, "table")
    assert "Whole model" in text
    assert "Converted layers (1)" in text
    assert "Skipped layers (1)" in text
    assert "MACs: multiply-accumulates, FlopCounterMode FLOPs / 2" in text
    assert "input: 1,3,8,8 float32 on cpu" in text


def test_render_markdown_is_github_table():
    model = tiny()
    report = build_report(model, run_conversion(model), torch.randn(1, 3, 8, 8), latency=False)
    text = render_report(report, "markdown")
    assert "## Whole model" in text
    assert "| parameters " in text
    assert "|---" in text


def test_render_json_round_trips():
    model = tiny()
    report = build_report(model, run_conversion(model), torch.randn(1, 3, 8, 8), latency=False)
    data = json.loads(render_report(report, "json"))
    assert data["path"] == "fx"
    assert data["layers"][0]["macs_after"] == 64 * 3 * 9 + 64 * 8 * 3
    assert data["before"]["parameters"] == 252


def test_render_rejects_unknown_format():
    model = tiny()
    report = build_report(model, run_conversion(model), torch.randn(1, 3, 8, 8), latency=False)
    with pytest.raises(ValueError, match="format 'html' is not supported: choose one of table, markdown, json"):
        render_report(report, "html")


def test_latency_measured_with_stated_setup():
    model = tiny()
    stats = measure_latency(model, torch.randn(2, 3, 8, 8), min_run_time=0.05)
    assert stats.median_ms > 0
    assert stats.iqr_ms >= 0
    assert stats.input_shape == (2, 3, 8, 8)
    assert stats.device == "cpu"
    assert stats.dtype == "float32"
    assert stats.runs >= 1


def test_report_with_latency_shows_rows():
    model = tiny()
    report = build_report(model, run_conversion(model), torch.randn(1, 3, 8, 8), min_run_time=0.05)
    assert "latency ms (median ± IQR)" in render_report(report, "table")


def test_checkpoint_size_tracks_parameters():
    small = checkpoint_size(nn.Linear(10, 10))
    large = checkpoint_size(nn.Linear(100, 100))
    assert large - small == pytest.approx((10_100 - 110) * 4, rel=0.01)  # float32 bytes, plus zip alignment


def test_compare_outputs_nested_structures():
    before = {"out": torch.ones(2), "aux": [torch.zeros(3), (torch.full((1,), 2.0),)]}
    after = {"out": torch.ones(2) * 1.5, "aux": [torch.zeros(3), (torch.full((1,), 2.0),)]}
    difference = compare_outputs(before, after)
    assert difference.tensors == 3
    assert difference.max_absolute == pytest.approx(0.5)
    assert difference.max_relative == pytest.approx(0.25)


def test_compare_outputs_rejects_shape_change():
    with pytest.raises(ValueError, match=r"output shapes differ: \(2,\) against \(3,\)"):
        compare_outputs(torch.ones(2), torch.ones(3))


def test_render_plans_prices_each_multiplier():
    model = tiny()
    plans, trace_error = inspect_model(model)
    text = render_plans(model, plans, (1, 2), "table", trace_error)
    assert "K=1 params (error)" in text
    assert "51 (" in text  # 3*9 + 8*3 parameters at K=1
    assert "102 (" in text
    assert "kernel is 1x1: already a pointwise conv" in text
    data = json.loads(render_plans(model, plans, (1, 2), "json"))
    assert data["layers"][0]["costs"]["K=2"]["params"] == 102
    assert data["layers"][1]["costs"]["K=1"]["relative_error"] is None


def test_compare_outputs_keeps_nan_visible():
    before = torch.tensor([1.0, float("nan")])
    difference = compare_outputs(before, torch.tensor([1.0, 2.0]))
    assert difference.original_finite is False
    assert difference.converted_finite is True
    assert difference.max_absolute != difference.max_absolute  # NaN, not silently 0
