"""The conversion plan: which convs became which separable layers, as JSON.

A plan lets a state dict of a converted (and possibly fine-tuned) model load
without pickling any code: build the original architecture, call
:func:`apply_plan` to put separable layers of the recorded geometry and depth
multiplier in place of the recorded convs, then ``load_state_dict``. Nothing is
factorized; the new layers get PyTorch's default initialization until the
weights are loaded.

Example plan::

    {"format": "dsconv-plan", "version": 1, "dsconv_version": "0.1.0", "model": "ResNet",
     "layers": [{"name": "conv1", "aliases": [], "conv_type": "Conv2d",
                 "module": "DepthwiseSeparableConv2d", "in_channels": 3, "out_channels": 64,
                 "kernel_size": [7, 7], "stride": [2, 2], "padding": [3, 3], "dilation": [1, 1],
                 "groups": 1, "bias": false, "padding_mode": "zeros", "depth_multiplier": 3}]}
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .effective import SamePadMixin, use_same_padding
from .layers import SEPARABLE_BY_DENSE, DepthwiseSeparableConvNd, check_positive_int, layer_arguments

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "ConversionPlan",
    "PlannedLayer",
    "apply_plan",
    "build_plan",
    "load_plan",
]

PLAN_FORMAT = "dsconv-plan"
PLAN_VERSION = 1

# The conv attributes a planned layer must match, in the order errors list them.
GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias", "padding_mode")

SEPARABLE_BY_NAME = {separable.__name__: separable for separable in SEPARABLE_BY_DENSE.values()}
DENSE_BY_NAME = {dense.__name__: dense for dense in SEPARABLE_BY_DENSE}


@dataclass
class PlannedLayer:
    """One converted layer: the conv it replaces (type and geometry) and its depth multiplier.

    ``padding`` is a tuple of ints or a string (``"same"``/``"valid"``), as the conv
    constructor takes it, and ``bias`` is true when the conv has a bias.
    ``same_padding`` is true when the depthwise half pads each input dynamically,
    as a converted conv subclass with TensorFlow-style "same" padding does.
    """

    name: str
    conv_type: str
    module: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    depth_multiplier: int
    aliases: tuple[str, ...] = ()
    same_padding: bool = False

    def geometry(self) -> dict[str, Any]:
        return {attribute: getattr(self, attribute) for attribute in GEOMETRY}


@dataclass
class ConversionPlan:
    """Every separable layer of a converted model, keyed by qualified name."""

    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION
    dsconv_version: str = ""
    model: str = ""
    layers: list[PlannedLayer] = field(default_factory=list)

    def to_json(self) -> str:
        """Return the plan as indented JSON (tuples become lists)."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConversionPlan:
        """Parse a plan decoded from JSON; raises ``ValueError`` naming the first invalid field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a conversion plan is a JSON object, not {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"format={data.get('format')!r}: not a dsconv conversion plan (expected {PLAN_FORMAT!r})")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')!r} is not supported: this dsconv reads version {PLAN_VERSION}")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise ValueError("the plan has no list of layers")
        return cls(
            model=str(data.get("model", "")),
            layers=[parse_layer(entry, index) for index, entry in enumerate(layers)],
            dsconv_version=str(data.get("dsconv_version", "")),
        )


def parse_layer(entry: Any, index: int) -> PlannedLayer:
    """Build a :class:`PlannedLayer` from one JSON entry, checking every field's type."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"layer {index} of the plan is not a JSON object")
    label = repr(entry.get("name", f"#{index}"))

    def required(name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in entry:
            raise ValueError(f"layer {label}: field {name!r} is missing")
        value = entry[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"layer {label}: field {name}={value!r} has the wrong type")
        return value

    def int_tuple(name: str) -> tuple[int, ...]:
        values = required(name, list)
        if not values or not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
            raise ValueError(f"layer {label}: field {name}={values!r} must be a list of integers")
        return tuple(values)

    name = required("name", str)
    conv_type = required("conv_type", str)
    if conv_type not in DENSE_BY_NAME:
        raise ValueError(f"layer {label}: conv_type={conv_type!r} is not one of {', '.join(DENSE_BY_NAME)}")
    module = required("module", str)
    replacement = SEPARABLE_BY_DENSE[DENSE_BY_NAME[conv_type]].__name__
    if module != replacement:
        raise ValueError(f"layer {label}: module={module!r} does not replace a {conv_type}; expected {replacement!r}")
    depth_multiplier = required("depth_multiplier", int)
    if depth_multiplier < 1:
        raise ValueError(f"layer {label}: depth_multiplier={depth_multiplier}: must be >= 1")
    padding = entry.get("padding")
    parsed_padding: tuple[int, ...] | str = padding if isinstance(padding, str) else int_tuple("padding")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(alias, str) for alias in aliases):
        raise ValueError(f"layer {label}: field aliases={aliases!r} must be a list of names")
    same_padding = entry.get("same_padding", False)
    if not isinstance(same_padding, bool):
        raise ValueError(f"layer {label}: field same_padding={same_padding!r} must be true or false")
    return PlannedLayer(
        name=name,
        conv_type=conv_type,
        module=module,
        in_channels=required("in_channels", int),
        out_channels=required("out_channels", int),
        kernel_size=int_tuple("kernel_size"),
        stride=int_tuple("stride"),
        padding=parsed_padding,
        dilation=int_tuple("dilation"),
        groups=required("groups", int),
        bias=required("bias", bool),
        padding_mode=required("padding_mode", str),
        depth_multiplier=depth_multiplier,
        aliases=tuple(aliases),
        same_padding=same_padding,
    )


def build_plan(model: nn.Module) -> ConversionPlan:
    """Record every :class:`DepthwiseSeparableConvNd` of a converted model, with all of its names."""
    from . import __version__

    layers: dict[int, PlannedLayer] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, DepthwiseSeparableConvNd):
            continue
        planned = layers.get(id(module))
        if planned is not None:
            if name not in (planned.name, *planned.aliases):
                planned.aliases = (*planned.aliases, name)
            continue
        layers[id(module)] = PlannedLayer(
            name=name,
            conv_type=module._conv_type.__name__,
            module=type(module).__name__,
            depth_multiplier=module.depth_multiplier,
            same_padding=isinstance(module.conv_dw, SamePadMixin),
            **geometry_of(module),
        )
    return ConversionPlan(model=type(model).__name__, layers=list(layers.values()), dsconv_version=__version__)


def load_plan(path: str | os.PathLike[str]) -> ConversionPlan:
    """Read a plan file; raises ``ValueError`` naming the file and the invalid field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"plan file {path} not found") from None
    except IsADirectoryError:
        raise ValueError(f"plan {path} is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"plan file {path} is not valid JSON ({error})") from error
    try:
        return ConversionPlan.from_dict(data)
    except ValueError as error:
        raise ValueError(f"plan file {path}: {error}") from error


def apply_plan(
    model: nn.Module,
    plan: ConversionPlan | Mapping[str, Any] | str | os.PathLike[str],
    *,
    inplace: bool = False,
) -> nn.Module:
    """Rebuild the converted architecture from the original one, without factorizing anything.

    Each planned conv (under its name and every alias) is replaced by one
    separable layer of the recorded depth multiplier, on the conv's device and
    dtype, in its train/eval mode. A name that already refers to the planned separable
    layer is left as it is, so applying a plan twice changes nothing. ``plan`` is a
    :class:`ConversionPlan`, its JSON as a dict, or the path of a plan file.

    Raises ``ValueError`` naming the layer when a planned name is missing or refers to
    a module of another type or geometry.
    """
    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(plan)
    elif not isinstance(plan, ConversionPlan):
        plan = ConversionPlan.from_dict(plan)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules(remove_duplicate=False))

    replacements: dict[str, nn.Module] = {}
    for layer in plan.layers:
        names = (layer.name, *layer.aliases)
        current = planned_module(modules, layer, type(model).__name__)
        if is_planned_layer(current, layer):
            continue
        check_conv_fits(current, layer)
        assert isinstance(current, nn.modules.conv._ConvNd), "check_conv_fits accepts only conv types"
        check_positive_int("depth_multiplier", layer.depth_multiplier)
        separable = SEPARABLE_BY_NAME[layer.module](**layer_arguments(current, layer.depth_multiplier))
        if layer.same_padding:
            use_same_padding(separable)
        separable.copy_mode_and_layout(current)
        for name in names:
            replacements[name] = separable

    if "" in replacements:
        return replacements[""]
    for name, module in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, module)
    return target


def planned_module(modules: Mapping[str, nn.Module], layer: PlannedLayer, model_name: str) -> nn.Module:
    """Return the module under the layer's name; raise ``ValueError`` if it is missing or its aliases differ."""
    current = modules.get(layer.name)
    if current is None:
        raise ValueError(f"layer {layer.name!r} of the plan is not in {model_name}; was the plan written for another model?")
    for alias in layer.aliases:
        if modules.get(alias) is not current:
            raise ValueError(f"layer {layer.name!r}: the plan lists {alias!r} as another name of it, but the model does not")
    return current


def is_planned_layer(module: nn.Module, layer: PlannedLayer) -> bool:
    """Return whether ``module`` already is the separable layer that ``layer`` describes."""
    if type(module).__name__ != layer.module or not isinstance(module, DepthwiseSeparableConvNd):
        return False
    return geometry_of(module) == layer.geometry() and module.depth_multiplier == layer.depth_multiplier


def check_conv_fits(module: nn.Module, layer: PlannedLayer) -> None:
    """Raise ``ValueError`` unless ``module`` is the conv type (or a subclass of it) and geometry the plan recorded.

    Subclasses and reparametrized convs are accepted because the pass converts them
    on request; the plan then records the geometry of their effective conv.
    """
    conv_type = DENSE_BY_NAME[layer.conv_type]
    if not isinstance(module, conv_type):
        raise ValueError(f"layer {layer.name!r} is a {type(module).__name__} in this model, but the plan converted a {layer.conv_type}")
    actual = geometry_of(module)
    expected = layer.geometry()
    differences = [f"{key}={actual[key]!r} (plan: {expected[key]!r})" for key in GEOMETRY if actual[key] != expected[key]]
    if differences:
        raise ValueError(f"layer {layer.name!r} does not match the plan: {', '.join(differences)}")


def geometry_of(module: Any) -> dict[str, Any]:
    """Read :data:`GEOMETRY` from a dense conv or a separable layer (both expose the same attributes)."""
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": tuple(module.kernel_size),
        "stride": tuple(module.stride),
        "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
        "dilation": tuple(module.dilation),
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
    }
