"""Which convs to convert and at which depth multiplier.

Every conv found in the module tree gets a :class:`LayerPlan`. A plan either has a
depth multiplier or a ``reason`` that says, in words a user can act on, why the
layer stays as it is. Nothing is dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .factorize import full_rank
from .layers import SEPARABLE_BY_DENSE, check_positive_int
from .tracing import GraphUsage

__all__ = [
    "ConvSite",
    "LayerPlan",
    "find_convs",
    "dense_parameters",
    "separable_parameters",
    "plan_layer",
]


@dataclass
class ConvSite:
    """A conv module in the tree: its first qualified name and every other name it has."""

    name: str
    module: nn.Module
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass
class LayerPlan:
    """The decision for one conv, before any weight is factored.

    ``depth_multiplier`` is the multiplier that will be used (already lowered to the
    full rank), ``requested_multiplier`` the one asked for, and ``reason`` is set
    exactly when the layer is skipped. ``factorable`` is true when nothing but size
    stands in the way, so costs at other multipliers can still be shown.
    ``rank_rule`` names the rule that chose the multiplier (see :mod:`convert.ranks`);
    ``dense_ms`` and ``separable_ms`` are the per-layer forward times when
    latency-aware selection timed the layer.
    """

    name: str
    aliases: tuple[str, ...]
    type_name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    bias: bool
    full_rank: int
    requested_multiplier: int
    depth_multiplier: int | None
    params_before: int
    params_after: int | None
    reason: str | None = None
    factorable: bool = True
    rank_rule: str = "fixed"
    dense_ms: float | None = None
    separable_ms: float | None = None

    @property
    def converted(self) -> bool:
        return self.reason is None


def find_convs(model: nn.Module) -> list[ConvSite]:
    """List every conv module (any ``nn.Conv*d`` subclass) once, with all of its names.

    A module registered under several names (or reached through several parents)
    appears once, under the first name in ``named_modules`` order.
    """
    sites: dict[int, ConvSite] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        site = sites.get(id(module))
        if site is None:
            sites[id(module)] = ConvSite(name, module)
        elif name != site.name and name not in site.aliases:
            site.aliases = (*site.aliases, name)
    return list(sites.values())


def dense_parameters(conv: nn.modules.conv._ConvNd) -> int:
    """Count the weight and bias elements of a conv."""
    return conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)


def separable_parameters(conv: nn.modules.conv._ConvNd, depth_multiplier: int) -> int:
    """Count the parameters of the separable replacement of ``conv`` at ``depth_multiplier``."""
    hidden = conv.in_channels * depth_multiplier
    depthwise = hidden * math.prod(conv.kernel_size)
    pointwise = conv.out_channels * hidden // conv.groups
    bias = conv.out_channels if conv.bias is not None else 0
    return depthwise + pointwise + bias


def skip_reason(site: ConvSite, usage: GraphUsage | None) -> str | None:
    """Return why this conv cannot be converted at all, or ``None`` if it can."""
    conv = site.module
    kind = type(conv)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return f"{kind.__name__} is a transposed conv, which has no depthwise-separable form here"
    if kind not in SEPARABLE_BY_DENSE:
        return (
            f"{kind.__name__} subclasses a conv and may override forward; "
            "only modules whose type is exactly nn.Conv1d, nn.Conv2d or nn.Conv3d are converted"
        )
    if conv.groups == conv.in_channels and conv.groups > 1:
        return "already depthwise (groups == in_channels)"
    if math.prod(conv.kernel_size) == 1:
        return "kernel is 1x1: already a pointwise conv"
    if usage is not None:
        reads = usage.reads_under(site.names)
        if reads:
            return f"its parameters are read directly by the forward ({', '.join(reads)}), so the module cannot be swapped"
    return None


def plan_layer(
    site: ConvSite,
    depth_multiplier: int,
    usage: GraphUsage | None,
    allow_larger: bool = False,
) -> LayerPlan:
    """Decide whether and at which multiplier to convert one conv."""
    check_positive_int("depth_multiplier", depth_multiplier)
    conv = site.module
    rank = full_rank(conv.out_channels, conv.kernel_size, conv.groups)
    multiplier = min(depth_multiplier, rank)
    before = dense_parameters(conv)
    after = separable_parameters(conv, multiplier)

    reason = skip_reason(site, usage)
    factorable = reason is None
    if factorable and after > before and not allow_larger:
        reason = (
            f"at depth multiplier {multiplier} the separable form has {after:,} parameters, "
            f"more than the dense conv's {before:,}; pass allow_larger=True (--allow-larger) to convert anyway"
        )
    converted = reason is None
    return LayerPlan(
        name=site.name,
        aliases=site.aliases,
        type_name=type(conv).__name__,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        groups=conv.groups,
        bias=conv.bias is not None,
        full_rank=rank,
        requested_multiplier=depth_multiplier,
        depth_multiplier=multiplier if converted else None,
        params_before=before,
        params_after=after if converted else None,
        reason=reason,
        factorable=factorable,
    )


def iter_converted(plans: list[LayerPlan]) -> Iterator[LayerPlan]:
    """Yield the plans of the layers that will be converted."""
    return (plan for plan in plans if plan.converted)
