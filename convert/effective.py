"""What a non-plain conv really computes, so it can be converted exactly on request.

Some convs are not plain ``nn.Conv*d`` modules: their weight is reparametrized
(``torch.nn.utils.parametrizations.weight_norm``/``spectral_norm``, the older
hook-based ``torch.nn.utils.weight_norm``/``spectral_norm``), or a subclass
changes ``forward`` (weight standardization as in timm's ``StdConv2d``, dynamic
"same" padding as in timm's ``Conv2dSame``). Such a conv is skipped by default.

On request, :func:`capture_effective_conv` runs the module in eval mode on two
random inputs of different sizes, records the one conv call its forward makes
(weight, bias, stride, padding, dilation, groups), and accepts the result only if
a plain conv with those values, with or without TensorFlow-style dynamic "same"
padding, reproduces the module's outputs on both inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

__all__ = [
    "EffectiveConv",
    "SamePadConv1d",
    "SamePadConv2d",
    "SamePadConv3d",
    "capture_effective_conv",
    "use_same_padding",
    "weight_hooks",
    "other_hooks",
    "dense_base_type",
]

CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
DENSE_TYPES: dict[int, type[nn.modules.conv._ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def dense_base_type(conv: nn.Module) -> type[nn.modules.conv._ConvNd] | None:
    """Return nn.Conv1d/2d/3d if ``conv`` is exactly one of them or a parametrized one, else None.

    ``torch.nn.utils.parametrize`` swaps a module's class for a generated subclass
    (``ParametrizedConv2d``) whose only base is the original class.
    """
    kind = type(conv)
    if parametrize.is_parametrized(conv):
        kind = kind.__bases__[0]
    return kind if kind in DENSE_TYPES.values() else None


def weight_hooks(conv: nn.Module) -> list[str]:
    """Name the hook-based reparametrizations on ``conv`` (old ``weight_norm``/``spectral_norm``)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    names = []
    for hook in conv._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            names.append("weight_norm")
        elif isinstance(hook, SpectralNorm):
            names.append("spectral_norm")
    return names


def other_hooks(conv: nn.Module) -> int:
    """Count forward hooks and pre-hooks that are not weight reparametrizations.

    Replacing the module would drop them, so a conv that has any is left alone.
    """
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    pre_hooks = [hook for hook in conv._forward_pre_hooks.values() if not isinstance(hook, (WeightNorm, SpectralNorm))]
    return len(pre_hooks) + len(conv._forward_hooks)


class SamePadMixin:
    """TensorFlow-style "same" padding computed from each input's size, as timm's ``Conv2dSame`` does.

    For each spatial dimension: ``out = ceil(in / stride)`` and the total padding is
    ``max((out - 1) * stride + (kernel - 1) * dilation + 1 - in, 0)``, split with the
    extra pixel at the end.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, self.dilation))  # type: ignore[misc]


class SamePadConv1d(SamePadMixin, nn.Conv1d):
    """Conv1d with dynamic TensorFlow-style "same" padding."""


class SamePadConv2d(SamePadMixin, nn.Conv2d):
    """Conv2d with dynamic TensorFlow-style "same" padding."""


class SamePadConv3d(SamePadMixin, nn.Conv3d):
    """Conv3d with dynamic TensorFlow-style "same" padding."""


SAME_PAD_TYPES: dict[int, type[nn.modules.conv._ConvNd]] = {1: SamePadConv1d, 2: SamePadConv2d, 3: SamePadConv3d}


def pad_same(x: torch.Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the spatial dimensions of ``x`` for TensorFlow-style "same" output size."""
    padding: list[int] = []
    # F.pad takes (last_before, last_after, second_last_before, ...): walk the dimensions backwards.
    for size, kernel, step, spacing in reversed(list(zip(x.shape[2:], kernel_size, stride, dilation))):
        total = max((math.ceil(size / step) - 1) * step + (kernel - 1) * spacing + 1 - size, 0)
        padding += [total // 2, total - total // 2]
    return F.pad(x, padding) if any(padding) else x


@dataclass
class EffectiveConv:
    """A plain conv that computes what the original module computes, and how to rebuild it.

    ``conv`` carries the effective weight and geometry. ``same_padding`` is true when
    the module pads each input dynamically; the depthwise half must then do the same.
    """

    conv: nn.modules.conv._ConvNd
    same_padding: bool = False


class ConvCallRecorder(TorchFunctionMode):
    """Record every conv call made while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_FUNCTIONS:
            self.calls.append((CONV_FUNCTIONS[func], args, kwargs))
        return func(*args, **kwargs)


CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def call_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    values = dict(zip(CONV_ARGUMENTS, args))
    values.update(kwargs)
    return values


def capture_effective_conv(module: nn.modules.conv._ConvNd) -> tuple[EffectiveConv | None, str | None]:
    """Find a plain conv equal to ``module`` in eval mode; returns it, or ``None`` and the reason.

    The module runs in eval mode (and is put back in its mode afterwards) so that
    weight standardization and spectral norm use their inference values.
    """
    dims = module.weight.dim() - 2
    reach = max((k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation))
    sizes = (reach + 5, reach + 8)
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    inputs = [torch.randn(2, module.in_channels, *([size] * dims), **factory) for size in sizes]

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            recorder = ConvCallRecorder()
            with recorder:
                outputs = [module(x) for x in inputs]
    finally:
        module.train(was_training)

    if len(recorder.calls) != len(inputs):
        return None, f"its forward makes {len(recorder.calls) // len(inputs) or 'no'} conv calls per input instead of one"
    dims_called, args, kwargs = recorder.calls[0]
    values = call_arguments(args, kwargs)
    plain = build_plain_conv(module, dims_called, values)

    for same_padding in (False, True):
        candidate = EffectiveConv(plain, same_padding)
        if all(reproduces(candidate, x, y) for x, y in zip(inputs, outputs)):
            return candidate, None
    return None, "its output is not that of a single conv with a fixed weight, with or without dynamic 'same' padding"


def build_plain_conv(module: nn.modules.conv._ConvNd, dims: int, values: dict[str, Any]) -> nn.modules.conv._ConvNd:
    """Build a plain conv from recorded call arguments."""
    weight = values["weight"].detach()
    bias = values.get("bias")
    padding = values.get("padding", 0)
    conv = DENSE_TYPES[dims](
        in_channels=weight.shape[1] * values.get("groups", 1),
        out_channels=weight.shape[0],
        kernel_size=tuple(weight.shape[2:]),
        stride=values.get("stride", 1),
        padding=padding,
        dilation=values.get("dilation", 1),
        groups=values.get("groups", 1),
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias.detach())
    conv.train(module.training)
    return conv


def reproduces(candidate: EffectiveConv, x: torch.Tensor, expected: torch.Tensor) -> bool:
    conv = candidate.conv
    with torch.no_grad():
        if candidate.same_padding:
            if not has_no_padding(conv):
                return False
            x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
        try:
            actual = conv(x)
        except RuntimeError:
            return False
    if actual.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) or 1.0
    tolerance = 1e-3 if expected.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return bool((actual - expected).abs().max() <= tolerance * scale)


def has_no_padding(conv: nn.modules.conv._ConvNd) -> bool:
    return conv.padding == "valid" or (isinstance(conv.padding, tuple) and not any(conv.padding))


def use_same_padding(layer: nn.Module) -> None:
    """Swap a separable layer's depthwise half for one that pads each input dynamically."""
    old = layer.conv_dw
    new = SAME_PAD_TYPES[old.weight.dim() - 2](
        old.in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=0,
        dilation=old.dilation,
        groups=old.groups,
        bias=False,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    new.weight = old.weight
    new.train(old.training)
    layer.conv_dw = new
    layer.dynamic_padding = True
