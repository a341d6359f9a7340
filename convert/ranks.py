"""Choosing the depth multiplier K of each eligible conv.

Selection runs after planning (:func:`convert.selection.plan_layer`) and only
touches layers that planning left eligible. Three rules choose K:

``fixed``
    one multiplier for every layer, lowered per layer to its full rank.
``energy``
    per layer, the smallest K at which every input channel keeps at least a given
    share of its squared singular values (its energy).
``budget``
    a target share of the eligible convs' parameters or MACs, spent where it removes
    the most relative squared error per unit of cost. Singular values give the
    error of every choice up front, so nothing is trained. By default they are the
    weight's, so the error is the weight error. With calibration data they are
    output-weighted (:func:`convert.calibration.output_spectra`), so the error
    estimates the output error.

In every rule a layer whose separable form would have more parameters than the
dense conv stays dense unless ``allow_larger`` is set. Latency-aware selection
(:mod:`convert.layer_timing`) runs after these rules and can only keep more
layers dense.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError
from .factorize import channel_spectra
from .layers import check_positive_int
from .measure import run_with_hooks
from .selection import LayerPlan, dense_parameters, separable_parameters

__all__ = [
    "BUDGET_TARGETS",
    "RANK_MODES",
    "LayerOptions",
    "RankSettings",
    "TradeoffPoint",
    "budget_frontier",
    "count_output_positions",
    "energy_multiplier",
    "layer_options",
    "select_ranks",
    "uniform_points",
]

RANK_MODES = ("fixed", "energy", "budget")
BUDGET_TARGETS = ("params", "macs")

# Shares of energy are compared with this relative slack, so that rounding in the
# cumulative sum cannot push K one step past a threshold that is met exactly.
ENERGY_TOLERANCE = 1e-9


@dataclass(frozen=True)
class RankSettings:
    """How to choose K: the rule and its value, validated on construction.

    ``energy`` is used only by ``mode="energy"`` and ``budget``/``budget_on`` only
    by ``mode="budget"``. Passing them with another mode raises, so that no value
    is accepted and then ignored.
    """

    mode: str = "fixed"
    depth_multiplier: int = 1
    energy: float | None = None
    budget: float | None = None
    budget_on: str = "params"
    allow_larger: bool = False

    def __post_init__(self) -> None:
        check_positive_int("depth_multiplier", self.depth_multiplier)
        if self.mode not in RANK_MODES:
            raise UsageError(f"rank={self.mode!r} is not supported: choose one of {', '.join(RANK_MODES)}")
        if self.budget_on not in BUDGET_TARGETS:
            raise UsageError(f"budget_on={self.budget_on!r} is not supported: choose one of {', '.join(BUDGET_TARGETS)}")
        if self.mode != "fixed" and self.depth_multiplier != 1:
            raise UsageError(
                f"depth_multiplier={self.depth_multiplier} is only used with rank='fixed'; rank={self.mode!r} chooses K itself"
            )
        check_share("energy", self.energy, needed=self.mode == "energy", mode="energy")
        check_share("budget", self.budget, needed=self.mode == "budget", mode="budget")
        if self.budget_on != "params" and self.mode != "budget":
            raise UsageError(f"budget_on={self.budget_on!r} is only used with rank='budget'; pass rank='budget' and budget= (--rank budget --budget SHARE)")

    def planning_multiplier(self) -> int:
        """Return the K to plan with: the fixed multiplier, or 1 for the other rules.

        Planning at K=1 marks a layer eligible when some separable form has no more
        parameters than the dense conv. The rule then picks K among those forms.
        """
        return self.depth_multiplier if self.mode == "fixed" else 1

    def describe(self) -> str:
        """Return the rule in a few words, as the report shows it."""
        if self.mode == "energy":
            return f"energy {self.energy:g}"
        if self.mode == "budget":
            return f"budget {self.budget:g} of {self.budget_on}"
        return "fixed"


def check_share(name: str, value: object, *, needed: bool, mode: str) -> None:
    """Validate a share in (0, 1] that the given rank mode needs and no other mode takes."""
    if value is None:
        if needed:
            raise UsageError(f"rank={mode!r} needs {name}= (--{name}), a share in (0, 1] such as 0.9")
        return
    if not needed:
        raise UsageError(f"{name}={value!r} is only used with rank={mode!r}; pass rank={mode!r} (--rank {mode}) as well")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}: must be a number in (0, 1]")
    if not 0 < value <= 1:
        raise UsageError(f"{name}={value}: must be in (0, 1]")


@dataclass
class LayerOptions:
    """The multipliers one eligible layer may get, with the cost and error of each.

    ``multipliers`` runs from 1 to the largest allowed K: the full rank, lowered to
    the largest K whose separable form has no more parameters than the dense conv
    unless larger forms are allowed. ``squared_errors[i]`` is the relative squared
    error of ``multipliers[i]`` from the spectrum the options were priced with:
    ``||W - W_K||^2 / ||W||^2`` for the weight's. MAC figures are ``None`` when no
    example input was given.
    """

    name: str
    multipliers: list[int]
    params: list[int]
    squared_errors: list[float]
    dense_params: int
    macs: list[int] | None = None
    dense_macs: int | None = None

    def costs(self, budget_on: str) -> list[int]:
        values = self.params if budget_on == "params" else self.macs
        assert values is not None, "MAC options are only built with an example input"
        return values

    def dense_cost(self, budget_on: str) -> int:
        value = self.dense_params if budget_on == "params" else self.dense_macs
        assert value is not None, "MAC options are only built with an example input"
        return value


def largest_allowed_multiplier(conv: nn.modules.conv._ConvNd, full_rank: int, allow_larger: bool) -> int:
    """Return the largest K to consider: the full rank, or the largest K with no more parameters than dense.

    Returns 0 when even K=1 has more parameters than the dense conv.
    """
    if allow_larger:
        return full_rank
    dense = dense_parameters(conv)
    allowed = 0
    for multiplier in range(1, full_rank + 1):
        if separable_parameters(conv, multiplier) > dense:
            break
        allowed = multiplier
    return allowed


def separable_macs_per_position(conv: nn.modules.conv._ConvNd, multiplier: int) -> int:
    """Count the multiply-accumulates of the separable pair per output position (bias adds excluded)."""
    hidden = conv.in_channels * multiplier
    return hidden * math.prod(conv.kernel_size) + conv.out_channels * hidden // conv.groups


def dense_macs_per_position(conv: nn.modules.conv._ConvNd) -> int:
    return conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)


def layer_options(
    plan: LayerPlan,
    conv: nn.modules.conv._ConvNd,
    allow_larger: bool,
    positions: int | None = None,
    spectrum: torch.Tensor | None = None,
) -> LayerOptions:
    """Price every allowed multiplier of one layer from its singular values.

    ``positions`` is the number of output positions per forward pass (batch
    included); with it, MACs are priced too. ``spectrum`` defaults to the weight's
    per-channel singular values.
    """
    if spectrum is None:
        spectrum = channel_spectra(conv.weight, conv.groups)
    energy = spectrum.double().pow(2)
    total = float(energy.sum())
    limit = largest_allowed_multiplier(conv, plan.full_rank, allow_larger)
    multipliers = list(range(1, limit + 1))
    squared_errors = [float(energy[:, k:].sum()) / total if total > 0 else 0.0 for k in multipliers]
    options = LayerOptions(
        name=plan.name,
        multipliers=multipliers,
        params=[separable_parameters(conv, k) for k in multipliers],
        squared_errors=squared_errors,
        dense_params=dense_parameters(conv),
    )
    if positions is not None:
        options.macs = [positions * separable_macs_per_position(conv, k) for k in multipliers]
        options.dense_macs = positions * dense_macs_per_position(conv)
    return options


def energy_multiplier(spectrum: torch.Tensor, energy: float) -> int:
    """Return the smallest K at which every input channel keeps at least ``energy`` of its squared singular values.

    ``spectrum`` has shape ``(C_in, rank)`` with each row sorted in decreasing
    order. The result is at most ``rank``, where every channel keeps all of it.
    """
    squared = spectrum.double().pow(2)
    totals = squared.sum(dim=1, keepdim=True)
    cumulative = squared.cumsum(dim=1)
    met = (cumulative >= energy * totals * (1 - ENERGY_TOLERANCE)).all(dim=0)
    rank = spectrum.shape[1]
    hits = torch.nonzero(met)
    return int(hits[0]) + 1 if len(hits) else rank


def count_output_positions(model: nn.Module, example_input: torch.Tensor, convs: Mapping[str, nn.Module]) -> dict[str, int]:
    """Run ``model`` once and count each conv's output positions (batch included), summed over its calls.

    A conv that the forward does not call gets 0.
    """
    positions = {name: 0 for name in convs}
    by_module = {id(module): name for name, module in convs.items()}

    def record(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        name = by_module[id(module)]
        positions[name] += output.numel() // module.out_channels  # also right for unbatched inputs

    run_with_hooks(model, example_input, convs.values(), record)
    return positions


def select_ranks(
    plans: Sequence[LayerPlan],
    convs: Mapping[str, nn.modules.conv._ConvNd],
    settings: RankSettings,
    positions: Mapping[str, int] | None = None,
    spectra: Mapping[str, torch.Tensor] | None = None,
) -> list[LayerPlan]:
    """Choose K for each eligible plan; returns new plans, skipped ones unchanged.

    ``convs`` maps each plan's name to its conv. ``positions`` (output positions per
    forward, from :func:`count_output_positions`) is needed for ``budget_on="macs"``.
    ``spectra`` replaces the weight's singular values in the budget rule for the
    layers it contains, for example with output-weighted ones from
    :func:`convert.calibration.output_spectra`. Each chosen plan records the rule
    in ``rank_rule``, including which error a budget measured for that layer. The
    fixed rule keeps the plans as planning made them.
    """
    if settings.mode == "fixed":
        return [dataclasses.replace(plan, rank_rule="fixed") if plan.converted else plan for plan in plans]
    if settings.mode == "budget" and settings.budget_on == "macs" and positions is None:
        raise UsageError("budget_on='macs' needs example_input= to count each layer's MACs")

    eligible = [plan for plan in plans if plan.converted]
    if settings.mode == "energy":
        choices = {plan.name: choose_by_energy(plan, convs[plan.name], settings) for plan in eligible}
    else:
        options = [
            layer_options(
                plan,
                convs[plan.name],
                settings.allow_larger,
                positions=positions.get(plan.name, 0) if positions is not None else None,
                spectrum=spectra.get(plan.name) if spectra is not None else None,
            )
            for plan in eligible
        ]
        choices = choose_by_budget(options, settings)
    chosen = []
    for plan in plans:
        if not plan.converted:
            chosen.append(plan)
            continue
        rule = settings.describe()
        if settings.mode == "budget":
            # a layer that never ran on the calibration data has no output spectrum
            rule += ", output error" if spectra is not None and plan.name in spectra else ", weight error"
        multiplier, reason = choices[plan.name]
        chosen.append(apply_choice(plan, convs[plan.name], multiplier, reason, rule))
    return chosen


def apply_choice(
    plan: LayerPlan, conv: nn.modules.conv._ConvNd, multiplier: int | None, reason: str | None, rule: str
) -> LayerPlan:
    """Return ``plan`` with the chosen multiplier, or marked dense with ``reason``."""
    if multiplier is None:
        return dataclasses.replace(plan, depth_multiplier=None, params_after=None, reason=reason, rank_rule=rule)
    return dataclasses.replace(
        plan,
        requested_multiplier=multiplier,
        depth_multiplier=multiplier,
        params_after=separable_parameters(conv, multiplier),
        rank_rule=rule,
    )


def choose_by_energy(plan: LayerPlan, conv: nn.modules.conv._ConvNd, settings: RankSettings) -> tuple[int | None, str | None]:
    """Return the energy rule's K for one layer, or ``None`` and why it stays dense."""
    assert settings.energy is not None, "RankSettings requires energy in energy mode"
    multiplier = energy_multiplier(channel_spectra(conv.weight, conv.groups), settings.energy)
    limit = largest_allowed_multiplier(conv, plan.full_rank, settings.allow_larger)
    if multiplier <= limit:
        return multiplier, None
    after = separable_parameters(conv, multiplier)
    return None, (
        f"energy {settings.energy:g} needs depth multiplier {multiplier}, where the separable form has "
        f"{after:,} parameters, more than the dense conv's {plan.params_before:,}; lower energy= or pass "
        "allow_larger=True (--allow-larger)"
    )


@dataclass(frozen=True)
class Option:
    """One choice for a layer: a multiplier (``None`` for the dense conv), its cost and relative squared error."""

    multiplier: int | None
    cost: int
    error: float


@dataclass
class Step:
    """One move of a layer along its lower convex hull, from option ``start`` to option ``stop``."""

    layer: int
    start: int
    stop: int
    cost: int
    error_drop: float

    @property
    def efficiency(self) -> float:
        return self.error_drop / self.cost if self.cost > 0 else math.inf


def option_table(options: LayerOptions, budget_on: str) -> list[Option]:
    """Return every allowed K and the dense conv (error 0) as options, cheapest first.

    Among options of equal cost the one with the lower error comes first, so option
    0 is where the budget walk starts.
    """
    table = [Option(k, cost, error) for k, cost, error in zip(options.multipliers, options.costs(budget_on), options.squared_errors)]
    table.append(Option(None, options.dense_cost(budget_on), 0.0))
    return sorted(table, key=lambda option: (option.cost, option.error))


def hull_steps(layer: int, table: list[Option]) -> list[Step]:
    """Return the steps along the lower convex hull of (cost, error), starting at option 0.

    An option that costs at least as much as another without a lower error is never
    on the hull. The steps come out with decreasing error drop per unit of cost,
    which lets a greedy walk over all layers take them in order.
    """
    hull: list[int] = [0]
    for index in range(1, len(table)):
        if table[index].error >= table[hull[-1]].error:
            continue
        while len(hull) >= 2 and not lies_below(table[hull[-2]], table[hull[-1]], table[index]):
            hull.pop()
        hull.append(index)
    return [
        Step(layer, start, stop, table[stop].cost - table[start].cost, table[start].error - table[stop].error)
        for start, stop in zip(hull, hull[1:])
    ]


def lies_below(first: Option, middle: Option, last: Option) -> bool:
    """Return whether ``middle`` lies strictly below the segment from ``first`` to ``last``."""
    cross = (middle.cost - first.cost) * (last.error - first.error) - (middle.error - first.error) * (last.cost - first.cost)
    return cross > 0


def choose_by_budget(options: list[LayerOptions], settings: RankSettings) -> dict[str, tuple[int | None, str | None]]:
    """Spend the budget across layers and return each layer's K, or ``None`` and why it stays dense."""
    assert settings.budget is not None, "RankSettings requires budget in budget mode"
    budget_on = settings.budget_on
    tables = [option_table(layer, budget_on) for layer in options]
    total_dense = sum(layer.dense_cost(budget_on) for layer in options)
    if total_dense == 0:
        raise UsageError(f"budget on {budget_on}: no eligible conv has any {budget_on} on example_input, so there is nothing to budget")
    target = settings.budget * total_dense
    minimum = sum(table[0].cost for table in tables)
    if minimum > target:
        raise UsageError(
            f"budget={settings.budget:g}: the smallest separable forms (K=1 everywhere) already use "
            f"{minimum / total_dense:.3f} of the eligible convs' {budget_on}; choose budget >= {minimum / total_dense:.3f}"
        )

    selected = spend_budget(tables, target)
    return {
        layer.name: describe_budget_choice(layer, table[index], settings)
        for layer, table, index in zip(options, tables, selected)
    }


def spend_budget(tables: list[list[Option]], target: float) -> list[int]:
    """Return the option index per layer: start at the cheapest and buy hull steps by efficiency.

    A step that does not fit blocks the rest of its layer's hull. When no hull step
    fits, single moves to any option with a lower error (also off the hull) are
    bought while they fit, best error drop per unit of cost first. At the end no
    layer can move to a more accurate option without going over ``target``.
    """
    selected = [0] * len(tables)
    spent = sum(table[0].cost for table in tables)
    queue = [
        (-step.efficiency, step.layer, position, step)
        for layer, table in enumerate(tables)
        for position, step in enumerate(hull_steps(layer, table))
    ]
    heapq.heapify(queue)
    blocked: set[int] = set()
    while queue:
        *_, step = heapq.heappop(queue)
        if step.layer in blocked:
            continue
        if spent + step.cost > target:
            blocked.add(step.layer)
            continue
        selected[step.layer] = step.stop
        spent += step.cost

    while (move := best_fitting_move(tables, selected, target - spent)) is not None:
        layer, index = move
        spent += tables[layer][index].cost - tables[layer][selected[layer]].cost
        selected[layer] = index
    return selected


def best_fitting_move(tables: list[list[Option]], selected: list[int], room: float) -> tuple[int, int] | None:
    """Return the (layer, option) move with a lower error that fits in ``room``, best error drop per unit of cost."""
    best: tuple[float, int, int] | None = None
    for layer, table in enumerate(tables):
        current = table[selected[layer]]
        for index, option in enumerate(table):
            extra = option.cost - current.cost
            drop = current.error - option.error
            if drop <= 0 or extra < 0 or extra > room:
                continue
            efficiency = drop / extra if extra > 0 else math.inf
            if best is None or efficiency > best[0]:
                best = (efficiency, layer, index)
    return None if best is None else (best[1], best[2])


def describe_budget_choice(layer: LayerOptions, option: Option, settings: RankSettings) -> tuple[int | None, str | None]:
    """Return the chosen K, or ``None`` and the reason the budget keeps the layer dense."""
    if option.multiplier is not None:
        return option.multiplier, None
    if option.cost == 0:
        return None, "not called on the example input, so it costs no MACs: the MAC budget keeps it dense"
    return None, (
        f"the budget ({settings.budget:g} of {settings.budget_on}) keeps this layer dense, because its exact "
        "weights remove more error per unit of cost than the other layers' next multipliers"
    )


@dataclass
class TradeoffPoint:
    """Whole-model cost and error of one choice of K per layer.

    ``share`` is the cost as a share of the eligible convs' dense cost; ``error`` is
    the root mean of the layers' relative squared weight errors.
    """

    share: float
    error: float
    label: str = ""


def budget_frontier(options: Sequence[LayerOptions], budget_on: str = "params") -> list[TradeoffPoint]:
    """Return the whole-model cost and error after each hull step that a growing budget buys, cheapest first."""
    tables = [option_table(layer, budget_on) for layer in options]
    total_dense = sum(layer.dense_cost(budget_on) for layer in options)
    if not tables or total_dense == 0:
        return []
    selected = [0] * len(tables)
    steps = sorted(
        (step for layer, table in enumerate(tables) for step in hull_steps(layer, table)),
        key=lambda step: -step.efficiency,
    )
    points = [frontier_point(tables, selected, total_dense)]
    for step in steps:
        selected[step.layer] = step.stop
        points.append(frontier_point(tables, selected, total_dense))
    return points


def frontier_point(tables: list[list[Option]], selected: list[int], total_dense: int) -> TradeoffPoint:
    cost = sum(table[index].cost for table, index in zip(tables, selected))
    error = sum(table[index].error for table, index in zip(tables, selected))
    return TradeoffPoint(cost / total_dense, math.sqrt(error / len(tables)))


def uniform_points(options: Sequence[LayerOptions], budget_on: str = "params") -> list[TradeoffPoint]:
    """Return the whole-model cost and error of one fixed multiplier everywhere, for K = 1, 2, ...

    A layer whose allowed multipliers end below K uses its largest one, as the fixed
    rule does when it lowers K to the full rank.
    """
    total_dense = sum(layer.dense_cost(budget_on) for layer in options)
    if not options or total_dense == 0:
        return []
    points = []
    for multiplier in range(1, max(len(layer.multipliers) for layer in options) + 1):
        cost = 0
        error = 0.0
        for layer in options:
            index = min(multiplier, len(layer.multipliers)) - 1
            cost += layer.costs(budget_on)[index]
            error += layer.squared_errors[index]
        points.append(TradeoffPoint(cost / total_dense, math.sqrt(error / len(options)), f"K={multiplier}"))
    return points
