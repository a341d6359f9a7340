"""Tracing with torch.fx, and what a traced graph tells about each conv.

The graph is used for two things: to find convs whose parameters are read
directly (``F.conv2d(x, self.conv.weight)``), which must not be replaced, and to
return a rewritten ``GraphModule`` when the caller asks for one. Convs that the
graph never calls (a branch that only runs in train mode, a conv inside a leaf
module) are still found from the module tree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx
from torch import nn

from .layers import DepthwiseSeparableConvNd

__all__ = ["ConvTracer", "GraphUsage", "TraceSettings", "trace_model", "find_graph_usage"]

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

    def __init__(self, settings: TraceSettings | None = None) -> None:
        # The default lets torch.fx re-create the tracer with no arguments when it unpickles a GraphModule.
        settings = settings or TraceSettings()
        super().__init__(autowrap_functions=tuple(settings.autowrap_functions))
        self.leaf_types = tuple(leaf for leaf in settings.leaf_modules if isinstance(leaf, type))
        self.leaf_names = {leaf for leaf in settings.leaf_modules if isinstance(leaf, str)}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, DepthwiseSeparableConvNd):
            return True
        if qualified_name in self.leaf_names or (self.leaf_types and isinstance(module, self.leaf_types)):
            return True
        return super().is_leaf_module(module, qualified_name)


def trace_model(model: nn.Module, settings: TraceSettings) -> torch.fx.Graph:
    """Trace ``model`` symbolically; raises whatever the tracer raises."""
    tracer = ConvTracer(settings)
    concrete_args = dict(settings.concrete_args) if settings.concrete_args is not None else None
    return tracer.trace(model, concrete_args=concrete_args)


@dataclass
class GraphUsage:
    """How a traced graph uses each module and parameter.

    ``called``: qualified module name -> number of ``call_module`` nodes.
    ``attribute_reads``: qualified attribute name (``conv.weight``) -> names of the
    ``get_attr`` nodes that read it.
    """

    called: dict[str, int] = field(default_factory=dict)
    attribute_reads: dict[str, list[str]] = field(default_factory=dict)

    def reads_under(self, module_names: Iterable[str]) -> list[str]:
        """Return the attributes read directly from any of these modules, sorted."""
        prefixes = tuple(f"{name}." for name in module_names)
        return sorted(target for target in self.attribute_reads if target.startswith(prefixes))


def find_graph_usage(graph: torch.fx.Graph) -> GraphUsage:
    """Count module calls and direct attribute reads in ``graph``."""
    usage = GraphUsage()
    for node in graph.nodes:
        if node.op == "call_module":
            usage.called[node.target] = usage.called.get(node.target, 0) + 1
        elif node.op == "get_attr":
            usage.attribute_reads.setdefault(node.target, []).append(node.name)
    return usage
