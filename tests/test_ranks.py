"""Rank selection: fixed, energy threshold, whole-model budget, latency-aware filter."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import convert
from convert.errors import UsageError
from convert.layer_timing import keep_faster_layers
from convert.measure import count_macs
from convert.ranks import (
    Option,
    RankSettings,
    count_output_positions,
    dense_macs_per_position,
    energy_multiplier,
    hull_steps,
    separable_macs_per_position,
)
from convert.selection import dense_parameters, separable_parameters


def conv_with_spectrum(in_channels: int, out_channels: int, singular_values: list[float]) -> nn.Conv2d:
    """Build a 3x3 conv whose every input-channel slice has exactly these singular values."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    rank = len(singular_values)
    weight = torch.empty(out_channels, in_channels, 9)
    for channel in range(in_channels):
        left, _ = torch.linalg.qr(torch.randn(out_channels, rank))
        right, _ = torch.linalg.qr(torch.randn(9, rank))
        weight[:, channel] = left @ torch.diag(torch.tensor(singular_values)) @ right.T
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(conv.weight.shape))
    return conv


def brute_force_energy_k(conv: nn.modules.conv._ConvNd, energy: float) -> int:
    """Smallest K at which every input channel keeps ``energy`` of its squared singular values, by enumeration."""
    out_per_group = conv.out_channels // conv.groups
    in_per_group = conv.in_channels // conv.groups
    weight = conv.weight.detach().double()
    spectra = []
    for channel in range(conv.in_channels):
        group, local = divmod(channel, in_per_group)
        block = weight[group * out_per_group : (group + 1) * out_per_group, local]
        spectra.append(torch.linalg.svdvals(block.reshape(out_per_group, -1)).tolist())
    rank = min(out_per_group, math.prod(conv.kernel_size))
    for k in range(1, rank + 1):
        kept = [sum(value**2 for value in values[:k]) for values in spectra]
        totals = [sum(value**2 for value in values) for values in spectra]
        if all(part >= energy * total * (1 - 1e-9) for part, total in zip(kept, totals)):
            return k
    return rank


# --- energy -------------------------------------------------------------------------


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9, 0.99, 1.0])
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 32, 3),
        nn.Conv2d(8, 16, 5, groups=2),
        nn.Conv1d(4, 12, 7),
        nn.Conv3d(3, 6, 3),
    ],
    ids=["conv2d", "grouped-5x5", "conv1d", "conv3d"],
)
def test_energy_matches_brute_force(conv: nn.modules.conv._ConvNd, energy: float) -> None:
    from convert.factorize import channel_spectra

    expected = brute_force_energy_k(conv, energy)
    assert energy_multiplier(channel_spectra(conv.weight, conv.groups), energy) == expected


def test_energy_picks_smallest_k_per_layer() -> None:
    torch.manual_seed(1)
    fast = conv_with_spectrum(16, 32, [10.0, 1.0, 0.5, 0.1, 0.05, 0.01, 0.01, 0.01, 0.01])
    slow = conv_with_spectrum(16, 32, [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6])
    model = nn.Sequential(fast, nn.ReLU(), slow)

    plans, _ = convert.inspect_model(model, rank="energy", energy=0.95, allow_larger=True)
    chosen = {plan.name: plan.depth_multiplier for plan in plans}

    assert chosen["0"] == brute_force_energy_k(fast, 0.95)
    assert chosen["2"] == brute_force_energy_k(slow, 0.95)
    assert chosen["0"] == 1  # 100 of 101.4 squared units is above 95%
    assert chosen["2"] > chosen["0"]
    assert all(plan.rank_rule == "energy 0.95" for plan in plans)


def test_energy_keeps_dense_when_k_grows_layer() -> None:
    torch.manual_seed(2)
    flat = conv_with_spectrum(16, 16, [1.0] * 9)  # K=9 needed; the separable form is larger there
    plans, _ = convert.inspect_model(nn.Sequential(flat), rank="energy", energy=0.99)

    assert plans[0].depth_multiplier is None
    assert "energy 0.99 needs depth multiplier 9" in plans[0].reason
    assert "allow_larger" in plans[0].reason

    plans, _ = convert.inspect_model(nn.Sequential(flat), rank="energy", energy=0.99, allow_larger=True)
    assert plans[0].depth_multiplier == 9


def test_energy_on_resnet18_matches_brute_force() -> None:
    model = torchvision.models.resnet18()
    plans, _ = convert.inspect_model(model, rank="energy", energy=0.5)

    chosen = [plan for plan in plans if plan.converted]
    assert len(chosen) == 17  # the 7x7 stem and the 16 3x3 convs; the 1x1 downsamples are skipped
    for plan in chosen:
        assert plan.depth_multiplier == brute_force_energy_k(model.get_submodule(plan.name), 0.5), plan.name


def test_energy_conversion_uses_chosen_k() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        conv_with_spectrum(8, 16, [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.01, 0.01, 0.01]),
        nn.ReLU(),
        conv_with_spectrum(16, 32, [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
    )
    result = convert.run_conversion(model, rank="energy", energy=0.9)

    assert [layer.plan.depth_multiplier for layer in result.layers] == [2, 3]
    for layer in result.layers:
        assert result.model.get_submodule(layer.name).depth_multiplier == layer.plan.depth_multiplier


# --- budget -------------------------------------------------------------------------


def budget_layers(plans: list[convert.LayerPlan]) -> list[convert.LayerPlan]:
    return [plan for plan in plans if plan.rank_rule.startswith("budget")]


def option_costs(conv: nn.modules.conv._ConvNd, full_rank: int, positions: int | None) -> list[int]:
    """Cost of K = 1.. up to the size limit, then of the dense conv, in parameters or (with positions) MACs."""
    dense = dense_parameters(conv)
    costs = []
    for k in range(1, full_rank + 1):
        if separable_parameters(conv, k) > dense:
            break
        costs.append(separable_parameters(conv, k) if positions is None else positions * separable_macs_per_position(conv, k))
    costs.append(dense if positions is None else positions * dense_macs_per_position(conv))
    return costs


@pytest.mark.parametrize("budget", [0.2, 0.35, 0.6])
@pytest.mark.parametrize("budget_on", ["params", "macs"])
def test_budget_meets_target_within_one_step(budget: float, budget_on: str) -> None:
    model = torchvision.models.resnet18()
    example = torch.randn(1, 3, 64, 64)
    keywords = {"example_input": example} if budget_on == "macs" else {}
    plans, _ = convert.inspect_model(model, rank="budget", budget=budget, budget_on=budget_on, **keywords)
    layers = budget_layers(plans)
    positions = count_output_positions(model, example, {plan.name: model.get_submodule(plan.name) for plan in layers}) if budget_on == "macs" else {}

    spent = 0
    total = 0
    next_steps = []
    for plan in layers:
        conv = model.get_submodule(plan.name)
        costs = option_costs(conv, plan.full_rank, positions.get(plan.name))
        index = len(costs) - 1 if plan.depth_multiplier is None else plan.depth_multiplier - 1
        spent += costs[index]
        total += costs[-1]
        if index + 1 < len(costs):
            next_steps.append(costs[index + 1] - costs[index])

    target = budget * total
    assert len(layers) == 17  # the 7x7 stem and the 16 3x3 convs of resnet18; the 1x1 downsamples are skipped
    assert spent <= target
    # within one layer's granularity: no layer can take its next option without passing the target
    assert all(spent + step > target for step in next_steps)


def test_budget_spends_on_slow_spectrum() -> None:
    torch.manual_seed(3)
    low_rank = conv_with_spectrum(16, 16, [1.0, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02])
    flat = conv_with_spectrum(16, 16, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    model = nn.Sequential(low_rank, nn.ReLU(), flat)

    plans, _ = convert.inspect_model(model, rank="budget", budget=0.5)
    chosen = {plan.name: plan.depth_multiplier for plan in plans}

    assert chosen["0"] == 1
    assert chosen["2"] is not None and chosen["2"] > 2


def test_budget_below_minimum_raises() -> None:
    with pytest.raises(UsageError, match=r"budget=0\.01: the smallest separable forms .* choose budget >= 0\.1"):
        convert.inspect_model(torchvision.models.resnet18(), rank="budget", budget=0.01)


def test_budget_on_macs_counts_like_flop_counter() -> None:
    model = torchvision.models.resnet18()
    example = torch.randn(2, 3, 32, 32)
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    positions = count_output_positions(model, example, convs)
    _, per_module = count_macs(model, example)

    for name, conv in convs.items():
        assert positions[name] * dense_macs_per_position(conv) == per_module[name], name

    result = convert.run_conversion(model, rank="budget", budget=0.4, budget_on="macs", example_input=example)
    _, converted_macs = count_macs(result.model, example)
    for layer in result.converted:
        expected = positions[layer.name] * separable_macs_per_position(model.get_submodule(layer.name), layer.plan.depth_multiplier)
        assert converted_macs[layer.name] == expected, layer.name


def test_hull_steps_skip_points_above_hull() -> None:
    table = [Option(1, 10, 1.0), Option(2, 20, 0.9), Option(3, 30, 0.2), Option(None, 40, 0.0)]
    steps = hull_steps(0, table)

    assert [(step.start, step.stop) for step in steps] == [(0, 2), (2, 3)]
    assert steps[0].efficiency == pytest.approx(0.8 / 20)
    assert steps[1].efficiency == pytest.approx(0.2 / 10)


def test_budget_result_matches_inspect() -> None:
    model = torchvision.models.resnet18()
    plans, _ = convert.inspect_model(model, rank="budget", budget=0.3)
    result = convert.run_conversion(model, rank="budget", budget=0.3)

    assert [plan.depth_multiplier for plan in plans] == [layer.plan.depth_multiplier for layer in result.layers]
    for layer in result.converted:
        assert result.model.get_submodule(layer.name).depth_multiplier == layer.plan.depth_multiplier


def test_fixed_rule_is_unchanged() -> None:
    model = torchvision.models.resnet18()
    plans, _ = convert.inspect_model(model, depth_multiplier=2)

    converted = [plan for plan in plans if plan.converted]
    assert converted
    assert all(plan.depth_multiplier == 2 and plan.rank_rule == "fixed" for plan in converted)


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"rank": "energy", "energy": 1.5}, r"energy=1\.5: must be in \(0, 1\]"),
        ({"rank": "energy", "energy": 0}, r"energy=0: must be in \(0, 1\]"),
        ({"rank": "energy"}, r"rank='energy' needs energy="),
        ({"rank": "budget", "budget": -0.2}, r"budget=-0\.2: must be in \(0, 1\]"),
        ({"rank": "budget"}, r"rank='budget' needs budget="),
        ({"rank": "svd"}, r"rank='svd' is not supported: choose one of fixed, energy, budget"),
        ({"energy": 0.9}, r"energy=0\.9 is only used with rank='energy'"),
        ({"budget": 0.5}, r"budget=0\.5 is only used with rank='budget'"),
        ({"rank": "budget", "budget": 0.5, "budget_on": "flops"}, r"budget_on='flops' is not supported"),
        ({"budget_on": "macs"}, r"budget_on='macs' is only used with rank='budget'"),
        ({"rank": "budget", "budget": 0.5, "depth_multiplier": 3}, r"depth_multiplier=3 is only used with rank='fixed'"),
        ({"rank": "budget", "budget": 0.5, "budget_on": "macs"}, r"budget_on='macs' needs example_input="),
        ({"example_input": torch.randn(1, 3, 8, 8)}, r"example_input= is only used by"),
        ({"latency_aware": True}, r"latency_aware=True needs example_input="),
        ({"latency_time": 0.5}, r"latency_time=0\.5 .* is only used with latency_aware=True"),
        ({"latency_device": "cpu"}, r"latency_device='cpu' is only used with latency_aware=True"),
        (
            {"latency_aware": True, "latency_time": 0, "example_input": torch.randn(1, 3, 8, 8)},
            r"latency_time=0: must be a number of seconds greater than 0",
        ),
    ],
)
def test_invalid_rank_arguments(keywords: dict[str, object], message: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3))
    with pytest.raises(UsageError, match=message):
        convert.run_conversion(model, **keywords)


def test_energy_type_is_checked() -> None:
    with pytest.raises(TypeError, match="energy='0.9': must be a number"):
        RankSettings("energy", energy="0.9")  # type: ignore[arg-type]


def test_latency_device_is_checked() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3))
    with pytest.raises(UsageError, match="latency_device='gpu0' is not a device"):
        convert.run_conversion(model, latency_aware=True, latency_device="gpu0", example_input=torch.randn(1, 3, 8, 8))


# --- latency-aware ------------------------------------------------------------------


class Branches(nn.Module):
    """Three convs; ``unused`` never runs in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = nn.Conv2d(8, 16, 3, padding=1)
        self.slow = nn.Conv2d(16, 16, 3, padding=1)
        self.unused = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slow(self.fast(x))


def test_latency_keeps_slower_layers_dense() -> None:
    model = Branches()
    plans, _ = convert.inspect_model(model, depth_multiplier=2)
    convs = {plan.name: model.get_submodule(plan.name) for plan in plans}
    seen_inputs = {}

    def fake_timer(conv, multiplier, layer_input, device, min_run_time):
        name = next(name for name, module in convs.items() if module is conv)
        seen_inputs[name] = tuple(layer_input.shape)
        return (2.0, 1.0) if name == "fast" else (1.0, 3.0)

    timed = {plan.name: plan for plan in keep_faster_layers(plans, convs, model, torch.randn(1, 8, 12, 12), timer=fake_timer)}

    assert seen_inputs == {"fast": (1, 8, 12, 12), "slow": (1, 16, 12, 12)}
    assert timed["fast"].converted
    assert (timed["fast"].dense_ms, timed["fast"].separable_ms) == (2.0, 1.0)
    assert not timed["slow"].converted
    assert "took 3.0000 ms against 1.0000 ms dense on cpu" in timed["slow"].reason
    assert not timed["unused"].converted
    assert "not called on the example input" in timed["unused"].reason


def test_latency_aware_conversion_records_timings() -> None:
    model = Branches()
    example = torch.randn(1, 8, 12, 12)
    result = convert.run_conversion(model, depth_multiplier=2, latency_aware=True, example_input=example, latency_time=0.01)

    for name in ("fast", "slow"):
        plan = next(layer.plan for layer in result.layers if layer.name == name)
        assert plan.dense_ms is not None and plan.dense_ms > 0
        assert plan.separable_ms is not None and plan.separable_ms > 0
        assert plan.converted == (plan.separable_ms < plan.dense_ms)
        swapped = isinstance(result.model.get_submodule(name), convert.DepthwiseSeparableConvNd)
        assert swapped == plan.converted
