"""Layer selection: the convs to convert and the depth multiplier of each.

Every conv found in the module tree gets a :class:`LayerPlan`. A plan either has a
depth multiplier or a ``reason`` that explains, in words a user can act on, why the
layer stays as it is. Nothing is dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from .config import LayerSetting
from .effective import EffectiveConv, capture_effective_conv, dense_base_type, other_hooks, weight_hooks
from .factorize import full_rank
from .layers import SEPARABLE_BY_DENSE
from .tracing import GraphUsage

__all__ = [
    "ConvSite",
    "LayerPlan",
    "find_convs",
    "dense_parameters",
    "separable_parameters",
    "plan_layer",
    "SelectionOptions",
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
    full rank), ``requested_multiplier`` the one requested (``None`` when the config
    leaves the layer alone), and ``reason`` is set exactly when the layer is skipped.
    ``factorable`` is true when nothing but size or the config blocks the conversion,
    so costs at other multipliers can still be shown. ``setting_source`` names the
    config rule that set the multiplier, ``effective`` describes what was factored
    when it is not the module's own weight, and ``note`` flags a check that could not
    be made. ``rank_rule`` names the rule that chose the multiplier (see
    :mod:`convert.ranks`). ``dense_ms`` and ``separable_ms`` are the per-layer forward
    times when latency-aware selection timed the layer.
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
    requested_multiplier: int | None
    depth_multiplier: int | None
    params_before: int
    params_after: int | None
    reason: str | None = None
    factorable: bool = True
    setting_source: str = "global"
    effective: str | None = None
    note: str | None = None
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


@dataclass
class SelectionOptions:
    """Switches that widen the set of convs the pass converts."""

    allow_larger: bool = False
    convert_parametrized: bool = False
    convert_subclasses: bool = False


def reparametrizations(conv: nn.Module) -> list[str]:
    """Name the weight reparametrizations of ``conv``: new-style parametrizations and old hooks."""
    names = weight_hooks(conv)
    if parametrize.is_parametrized(conv, "weight"):
        names += [type(item).__name__.lstrip("_") for item in conv.parametrizations["weight"]]
    return names


def structural_reason(
    site: ConvSite, usage: GraphUsage | None, options: SelectionOptions
) -> tuple[str | None, EffectiveConv | None]:
    """Return why this conv cannot be converted at all (or ``None``), and its effective plain conv.

    The effective conv is only set for reparametrized convs and subclasses that the
    options let through; for plain convs the module itself is used.
    """
    conv = site.module
    kind = type(conv)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return f"{kind.__name__} is a transposed conv, which has no depthwise-separable form here", None

    effective = None
    reparametrized = reparametrizations(conv)
    if reparametrized:
        methods = ", ".join(reparametrized)
        if not options.convert_parametrized:
            return (
                f"its weight is reparametrized ({methods}); pass convert_parametrized=True "
                "(--convert-parametrized) to convert its current effective weight"
            ), None
        effective, failure = capture_effective_conv(conv)
        if effective is None:
            return f"its weight is reparametrized ({methods}) and {failure}", None
    elif dense_base_type(conv) is None:
        parent = next((base.__name__ for base in kind.__mro__ if base in SEPARABLE_BY_DENSE), "a conv")
        if not options.convert_subclasses:
            return (
                f"{kind.__name__} subclasses {parent} and may override forward; pass convert_subclasses=True "
                "(--convert-subclasses) to convert it when its output is that of a single conv"
            ), None
        effective, failure = capture_effective_conv(conv)
        if effective is None:
            return f"{kind.__name__} cannot be converted exactly: {failure}", None

    hooks = other_hooks(conv)
    if hooks:
        return f"it has {hooks} forward hook(s), which a replacement module would drop", None
    geometry = effective.conv if effective is not None else conv
    if geometry.groups == geometry.in_channels and geometry.groups > 1:
        return "already depthwise (groups == in_channels)", None
    if math.prod(geometry.kernel_size) == 1:
        return "kernel is 1x1: already a pointwise conv", None
    if usage is not None:
        reads = usage.reads_under(site.names)
        if reads:
            return f"its parameters are read directly by the forward ({', '.join(reads)}), so the module cannot be swapped", None
    return None, effective


def plan_layer(
    site: ConvSite,
    setting: LayerSetting,
    usage: GraphUsage | None,
    options: SelectionOptions | None = None,
    setting_source: str = "global",
) -> tuple[LayerPlan, EffectiveConv | None]:
    """Decide whether and at which multiplier to convert one conv.

    ``setting`` is the depth multiplier from the config, or ``None`` to leave the
    layer alone; ``setting_source`` names the config rule it came from.
    """
    options = options or SelectionOptions()
    conv = site.module
    reason, effective = structural_reason(site, usage, options)
    geometry = effective.conv if effective is not None else conv
    rank = full_rank(geometry.out_channels, geometry.kernel_size, geometry.groups)
    multiplier = min(setting, rank) if setting is not None else 0
    before = dense_parameters(geometry)
    after = separable_parameters(geometry, multiplier)

    factorable = reason is None
    if setting is None:
        reason = f"left alone by the config ({setting_source})"
    elif factorable and after > before and not options.allow_larger:
        reason = (
            f"at depth multiplier {multiplier} the separable form has {after:,} parameters, "
            f"more than the dense conv's {before:,}; pass allow_larger=True (--allow-larger) to convert anyway"
        )
    converted = reason is None

    note = None
    if usage is not None:
        untraced = usage.unchecked_by(site.names)
        if untraced is not None:
            where = f"module {untraced!r}" if untraced else "the model's forward"
            note = f"direct reads of its parameters were not checked because {where} could not be traced"
    plan = LayerPlan(
        name=site.name,
        aliases=site.aliases,
        type_name=type(conv).__name__,
        in_channels=geometry.in_channels,
        out_channels=geometry.out_channels,
        kernel_size=tuple(geometry.kernel_size),
        stride=tuple(geometry.stride),
        groups=geometry.groups,
        bias=geometry.bias is not None,
        full_rank=rank,
        requested_multiplier=setting,
        depth_multiplier=multiplier if converted else None,
        params_before=before,
        params_after=after if converted else None,
        reason=reason,
        factorable=factorable,
        setting_source=setting_source,
        effective=describe_effective(conv, effective),
        note=note,
    )
    return plan, effective if converted else None


def describe_effective(conv: nn.Module, effective: EffectiveConv | None) -> str | None:
    """Say what was converted in place of the module's own weight, for the report."""
    if effective is None:
        return None
    text = f"effective weight of {type(conv).__name__}"
    if reparametrizations(conv):
        text += f" ({', '.join(reparametrizations(conv))})"
    if effective.same_padding:
        text += ", with dynamic 'same' padding"
    return text
