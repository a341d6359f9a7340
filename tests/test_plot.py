"""The size/error trade-off: the numbers behind the picture, and the picture file."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torchvision

import convert
from convert.checkpoint import CheckpointError
from convert.errors import UsageError
from convert.plot import compute_tradeoff, plot_tradeoff, require_matplotlib, save_tradeoff_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18()


def test_frontier_runs_from_k1_to_dense(resnet: torch.nn.Module) -> None:
    plans, _ = convert.inspect_model(resnet, rank="budget", budget=0.3)
    tradeoff = compute_tradeoff(resnet, plans)

    shares = [point.share for point in tradeoff.frontier]
    errors = [point.error for point in tradeoff.frontier]
    assert shares == sorted(shares)
    assert errors == sorted(errors, reverse=True)
    assert shares[-1] == pytest.approx(1.0)
    assert errors[-1] == 0.0
    # the cheapest point is K=1 everywhere, the first uniform point
    assert tradeoff.uniform[0].label == "K=1"
    assert shares[0] == pytest.approx(tradeoff.uniform[0].share)
    assert errors[0] == pytest.approx(tradeoff.uniform[0].error)
    assert tradeoff.error_basis == "weight"


def test_chosen_point_matches_plans(resnet: torch.nn.Module) -> None:
    plans, _ = convert.inspect_model(resnet, rank="budget", budget=0.3)
    tradeoff = compute_tradeoff(resnet, plans)
    budgeted = [plan for plan in plans if plan.rank_rule.startswith("budget")]

    spent = sum(plan.params_after if plan.converted else plan.params_before for plan in budgeted)
    total = sum(plan.params_before for plan in budgeted)
    assert tradeoff.chosen is not None
    assert tradeoff.chosen.share == pytest.approx(spent / total)
    assert tradeoff.chosen.share <= 0.3

    curves = {curve.name: curve for curve in tradeoff.layers}
    squared = []
    for plan in budgeted:
        curve = curves[plan.name]
        assert curve.chosen == plan.depth_multiplier
        squared.append(0.0 if plan.depth_multiplier is None else curve.errors[curve.multipliers.index(plan.depth_multiplier)] ** 2)
    assert tradeoff.chosen.error == pytest.approx(math.sqrt(sum(squared) / len(squared)))


def test_layer_curves_cover_full_rank(resnet: torch.nn.Module) -> None:
    plans, _ = convert.inspect_model(resnet)
    tradeoff = compute_tradeoff(resnet, plans)
    stem = next(curve for curve in tradeoff.layers if curve.name == "conv1")

    assert stem.multipliers == list(range(1, 50))  # 7x7 kernel, 64 outputs: full rank 49
    assert stem.errors[-1] == pytest.approx(0.0, abs=1e-6)
    assert all(earlier >= later for earlier, later in zip(stem.errors, stem.errors[1:]))


def test_listing_marks_nothing(resnet: torch.nn.Module) -> None:
    plans, _ = convert.inspect_model(resnet)
    tradeoff = compute_tradeoff(resnet, plans, mark_chosen=False)

    assert tradeoff.chosen is None
    assert all(curve.chosen is None for curve in tradeoff.layers)
    assert tradeoff.frontier


def test_output_basis_with_calibration() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    plans, _ = convert.inspect_model(model)
    tradeoff = compute_tradeoff(model, plans, calibration_data=[torch.randn(4, 3, 12, 12)])

    assert tradeoff.error_basis == "output"


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plot_file_is_written(resnet: torch.nn.Module, tmp_path, suffix: str) -> None:
    plans, _ = convert.inspect_model(resnet, rank="budget", budget=0.3)
    path = tmp_path / f"tradeoff.{suffix}"
    save_tradeoff_plot(resnet, plans, path)

    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) if suffix == "png" else b"<svg" in content
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        save_tradeoff_plot(resnet, plans, path)
    save_tradeoff_plot(resnet, plans, path, force=True)


def test_unknown_suffix_is_rejected_before_work(resnet: torch.nn.Module, tmp_path) -> None:
    plans, _ = convert.inspect_model(resnet)
    with pytest.raises(UsageError, match="the suffix 'bmpx' is not an image format"):
        plot_tradeoff(compute_tradeoff(resnet, plans), tmp_path / "tradeoff.bmpx")
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" raise ImportError
    with pytest.raises(UsageError, match=r"pip install matplotlib \(or the project's \[plot\] extra\)"):
        require_matplotlib()
