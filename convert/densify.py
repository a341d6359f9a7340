"""Merging depthwise-separable pairs back into dense convs.

A depthwise conv followed by a pointwise conv is itself a dense conv whose weight
is the product of the two (:meth:`DepthwiseSeparableConvNd.dense_weight`). Both
halves are linear, the depthwise half carries all of the spatial geometry, and
the pointwise half only mixes channels. After fine-tuning a low-rank model, merging
gives a model with the original architecture that computes the same function,
for hardware where dense convs run faster than separable ones.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field

import torch
from tabulate import tabulate
from torch import nn

from .layers import DepthwiseSeparableConvNd
from .progress import progress

__all__ = ["DensifiedLayer", "DensifyResult", "densify_layer", "densify_model", "run_densify", "render_densify_report"]

log = logging.getLogger(__name__)

# Dtypes whose products are accumulated in float32 before rounding back.
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class DensifiedLayer:
    """One separable layer that was merged, with its parameter counts before and after."""

    name: str
    type_name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    depth_multiplier: int
    params_before: int
    params_after: int
    aliases: tuple[str, ...] = ()


@dataclass
class DensifyResult:
    """The merged model and a record of every layer that was merged."""

    model: nn.Module
    layers: list[DensifiedLayer] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)


def densify_layer(layer: DepthwiseSeparableConvNd) -> nn.modules.conv._ConvNd:
    """Return the dense conv that computes what ``layer`` computes, on its device and dtype, in its mode.

    The weight is the product of the two halves; float16 and bfloat16 products are
    summed in float32 and rounded once. The conv uses the default memory format,
    because the depthwise and pointwise weights have a dimension of size 1 and so
    their strides do not show whether the model was channels-last. Call
    ``.to(memory_format=...)`` on the result to choose.
    """
    dtype = layer.conv_dw.weight.dtype
    conv = nn.utils.skip_init(
        layer._conv_type,
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        device=layer.conv_dw.weight.device,
        dtype=dtype,
    )
    with torch.no_grad():
        if dtype in LOW_PRECISION:
            weight = copy.deepcopy(layer).float().dense_weight()
        else:
            weight = layer.dense_weight()
        conv.weight.copy_(weight)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    conv.train(layer.training)
    return conv


def run_densify(model: nn.Module, *, inplace: bool = False) -> DensifyResult:
    """Replace every :class:`DepthwiseSeparableConvNd` of ``model`` by its dense conv; returns a record.

    A layer registered under several names is merged once and the dense conv takes
    all of its names, so sharing is kept. The model is copied unless ``inplace``.
    """
    target = model if inplace else copy.deepcopy(model)
    names_by_layer: dict[int, list[str]] = {}
    layers: dict[int, DepthwiseSeparableConvNd] = {}
    for name, module in target.named_modules(remove_duplicate=False):
        if isinstance(module, DepthwiseSeparableConvNd):
            names_by_layer.setdefault(id(module), []).append(name)
            layers[id(module)] = module

    records = []
    replacements: dict[str, nn.Module] = {}
    for key in progress(list(layers), description="densify"):
        layer = layers[key]
        names = names_by_layer[key]
        conv = densify_layer(layer)
        for name in names:
            replacements[name] = conv
        records.append(
            DensifiedLayer(
                name=names[0],
                type_name=type(layer).__name__,
                in_channels=layer.in_channels,
                out_channels=layer.out_channels,
                kernel_size=tuple(layer.kernel_size),
                depth_multiplier=layer.depth_multiplier,
                params_before=sum(parameter.numel() for parameter in layer.parameters()),
                params_after=sum(parameter.numel() for parameter in conv.parameters()),
                aliases=tuple(names[1:]),
            )
        )

    if "" in replacements:
        target = replacements[""]
    else:
        for name, module in replacements.items():
            parent_name, _, child = name.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            setattr(parent, child, module)
    log.info("merged %d separable layers into dense convs", len(records))
    return DensifyResult(target, records)


def densify_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Merge every depthwise-separable pair of ``model`` back into one dense conv.

    The result computes the same function up to floating-point rounding: the dense
    weight is the exact product of the two halves. It has the original
    architecture, so its state dict loads into the unconverted model. The model is
    copied unless ``inplace``. Use :func:`run_densify` to also get a per-layer record.
    """
    return run_densify(model, inplace=inplace).model


def render_densify_report(result: DensifyResult, fmt: str = "table") -> str:
    """Render the merged layers as a terminal table, GitHub Markdown or JSON."""
    from .report import TABLE_FORMATS, check_format, heading

    check_format(fmt)
    if fmt == "json":
        return json.dumps({"layers": [asdict(layer) for layer in result.layers], "params_before": result.params_before, "params_after": result.params_after}, indent=2) + "\n"
    rows = [
        [layer.name, layer.type_name, f"{layer.in_channels}->{layer.out_channels}", "x".join(map(str, layer.kernel_size)), layer.depth_multiplier, f"{layer.params_before:,}", f"{layer.params_after:,}"]
        for layer in result.layers
    ]
    table = tabulate(rows, headers=["layer", "type", "in->out", "kernel", "K", "params before", "params after"], tablefmt=TABLE_FORMATS[fmt], disable_numparse=True)
    summary = f"merged {len(result.layers)} layers: {result.params_before:,} parameters in separable form, {result.params_after:,} as dense convs"
    return "\n\n".join([heading(f"dsconv densify: {type(result.model).__name__}", fmt), table, summary]) + "\n"
