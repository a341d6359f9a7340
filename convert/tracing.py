"""Tracing with torch.fx, and what a traced graph reveals about each conv.

The graph is used for two things: to find convs whose parameters are read
directly (``F.conv2d(x, self.conv.weight)``), which must not be replaced, and to
return a rewritten ``GraphModule`` when the caller asks for one. Convs that the
graph never calls (a branch that only runs in train mode, a conv inside a leaf
module) are still found from the module tree.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx
from torch import nn

from .layers import DepthwiseSeparableConvNd

__all__ = ["ConvTracer", "GraphUsage", "TraceSettings", "trace_model", "trace_usage", "find_graph_usage"]

log = logging.getLogger(__name__)


@dataclass
class TraceSettings:
    """The tracer's escape hatches, passed through to :class:`torch.fx.Tracer`.

    ``leaf_modules``: module types or qualified names to keep as single calls.
    ``autowrap_functions``: free functions to record as calls instead of tracing into.
    ``concrete_args``: values for ``forward`` arguments that must be fixed to trace
    (see :func:`torch.fx.symbolic_trace`).
    """

    leaf_modules: tuple[type[nn.Module] | str, ...] = ()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    concrete_args: Mapping[str, Any] | None = None


class ConvTracer(torch.fx.Tracer):
    """An FX tracer that also treats separable layers and user-chosen modules as leaves."""

    def __init__(self, settings: TraceSettings | None = None, prefix: str = "") -> None:
        # The default lets torch.fx re-create the tracer with no arguments when it unpickles a GraphModule.
        settings = settings or TraceSettings()
        library_modules, library_functions = library_leaves()
        super().__init__(autowrap_functions=(*settings.autowrap_functions, *library_functions))
        self.leaf_types = (*library_modules, *(leaf for leaf in settings.leaf_modules if isinstance(leaf, type)))
        self.leaf_names = {leaf for leaf in settings.leaf_modules if isinstance(leaf, str)}
        self.prefix = prefix  # qualified name of the traced module within the whole model

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        # Every conv is a leaf, subclasses too: reads of a conv's weight inside its own
        # forward are not reads "from elsewhere", and a conv call must stay one node.
        if isinstance(module, (DepthwiseSeparableConvNd, nn.modules.conv._ConvNd)):
            return True
        if join_name(self.prefix, qualified_name) in self.leaf_names:
            return True
        if self.leaf_types and isinstance(module, self.leaf_types):
            return True
        return super().is_leaf_module(module, qualified_name)


def library_leaves() -> tuple[tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]]:
    """Return the modules and functions that timm marks as not traceable, if timm is loaded.

    timm registers them for its own FX feature extraction; using the same lists
    lets timm models trace here too. timm is never imported by dsconv itself.
    """
    timm_layers = sys.modules.get("timm.layers")
    if timm_layers is None or not hasattr(timm_layers, "get_notrace_modules"):
        return (), ()
    return tuple(timm_layers.get_notrace_modules()), tuple(timm_layers.get_notrace_functions())


def trace_model(model: nn.Module, settings: TraceSettings) -> torch.fx.Graph:
    """Trace ``model`` symbolically; raises whatever the tracer raises."""
    tracer = ConvTracer(settings)
    concrete_args = dict(settings.concrete_args) if settings.concrete_args is not None else None
    return tracer.trace(model, concrete_args=concrete_args)


@dataclass
class GraphUsage:
    """Module calls and direct parameter reads found in traced graphs.

    ``called``: qualified module name -> number of ``call_module`` nodes.
    ``attribute_reads``: qualified attribute name (``conv.weight``) -> names of the
    ``get_attr`` nodes that read it.
    ``opaque``: qualified names of modules whose forward could not be traced, so
    parameters read directly inside them cannot be seen (``""`` is the model itself).
    """

    called: dict[str, int] = field(default_factory=dict)
    attribute_reads: dict[str, list[str]] = field(default_factory=dict)
    opaque: dict[str, str] = field(default_factory=dict)

    def reads_under(self, module_names: Iterable[str]) -> list[str]:
        """Return the attributes read directly from any of these modules, sorted."""
        prefixes = tuple(f"{name}." for name in module_names)
        return sorted(target for target in self.attribute_reads if target.startswith(prefixes))

    def unchecked_by(self, module_names: Iterable[str]) -> str | None:
        """Return the closest untraced ancestor of a module, if any ("" is the model)."""
        for name in module_names:
            parts = name.split(".")
            for depth in range(len(parts) - 1, -1, -1):
                ancestor = ".".join(parts[:depth])
                if ancestor in self.opaque:
                    return ancestor
        return None

    def merge(self, other: "GraphUsage", prefix: str) -> None:
        """Add the usage of a submodule traced on its own, whose names are relative to ``prefix``."""
        for name, count in other.called.items():
            key = join_name(prefix, name)
            self.called[key] = self.called.get(key, 0) + count
        for target, nodes in other.attribute_reads.items():
            self.attribute_reads.setdefault(join_name(prefix, target), []).extend(nodes)
        for name, reason in other.opaque.items():
            self.opaque[join_name(prefix, name)] = reason


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def find_graph_usage(graph: torch.fx.Graph) -> GraphUsage:
    """Count module calls and direct attribute reads in ``graph``."""
    usage = GraphUsage()
    for node in graph.nodes:
        if node.op == "call_module":
            usage.called[node.target] = usage.called.get(node.target, 0) + 1
        elif node.op == "get_attr":
            usage.attribute_reads.setdefault(node.target, []).append(node.name)
    return usage


def contains_conv(module: nn.Module) -> bool:
    return any(isinstance(child, nn.modules.conv._ConvNd) for child in module.modules())


def trace_usage(model: nn.Module, settings: TraceSettings, graph: torch.fx.Graph | None, prefix: str = "") -> GraphUsage:
    """Collect usage from the model's graph, and from each leaf or untraceable submodule with convs.

    A module the tracer kept as a leaf, or the model itself when its trace failed
    (``graph is None``), is opened up by tracing its children on their own; whatever
    still cannot be traced is recorded as opaque.
    """
    if graph is not None:
        usage = find_graph_usage(graph)
        modules = dict(model.named_modules())
        for target in list(usage.called):
            module = modules.get(target)
            if module is None or isinstance(module, (nn.modules.conv._ConvNd, DepthwiseSeparableConvNd)):
                continue
            if contains_conv(module):
                usage.merge(trace_submodule(module, settings, join_name(prefix, target)), target)
        return usage
    return open_children(model, settings, "tracing failed", prefix)


def trace_submodule(module: nn.Module, settings: TraceSettings, prefix: str) -> GraphUsage:
    """Trace one submodule on its own; on failure, open its children instead."""
    try:
        graph = ConvTracer(settings, prefix).trace(module)
    except Exception as error:  # the tracer can raise almost anything that forward raises
        return open_children(module, settings, f"{type(error).__name__}: {first_line(error)}", prefix)
    return trace_usage(module, settings, graph, prefix)


def open_children(module: nn.Module, settings: TraceSettings, reason: str, prefix: str) -> GraphUsage:
    """Record ``module`` as opaque and trace each child that contains convs."""
    usage = GraphUsage(opaque={"": reason})
    for name, child in module.named_children():
        if isinstance(child, nn.modules.conv._ConvNd) or not contains_conv(child):
            continue
        usage.merge(trace_submodule(child, settings, join_name(prefix, name)), name)
    return usage


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
