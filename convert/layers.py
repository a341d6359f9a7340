"""Depthwise-separable convolution layers that replace dense convolutions.

A layer is two named halves: ``conv_dw``, a depthwise convolution with
``groups=in_channels`` and ``in_channels * depth_multiplier`` outputs, and
``conv_pw``, a pointwise (kernel size 1) convolution. The depthwise half carries
the spatial geometry of the replaced conv (kernel size, stride, padding,
dilation, padding mode); the pointwise half carries the bias and the groups.

With a depth multiplier above 1 the depthwise half runs in one of two exact
forms, chosen by timing unless fixed with ``depthwise_form`` (see :mod:`convert.forms`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .forms import can_measure, check_form, choose_form, default_form

if TYPE_CHECKING:
    from .factorize import Factors

__all__ = [
    "DepthwiseSeparableConv1d",
    "DepthwiseSeparableConv2d",
    "DepthwiseSeparableConv3d",
    "DepthwiseSeparableConvNd",
    "SEPARABLE_BY_DENSE",
]

# The spatial padding argument as nn.Conv*d takes it: an int, a tuple or "same"/"valid".
Padding = int | tuple[int, ...] | str


class DepthwiseSeparableConvNd(nn.Module):
    """Base class: a depthwise conv over every input channel, then a pointwise conv.

    ``groups`` is the group count of the dense conv being replaced. The depthwise
    half always has ``groups=in_channels``; the pointwise half keeps ``groups``, so
    each output still reads only the input channels of its own group.
    """

    _conv_type: type[nn.modules.conv._ConvNd]

    # TorchScript cannot compile these (``tuple[int, ...]`` annotations); forward does not use them.
    __jit_unused_properties__ = [
        "in_channels",
        "out_channels",
        "depth_multiplier",
        "groups",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "padding_mode",
        "bias",
    ]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: Padding = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        depth_multiplier: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        depthwise_form: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_int("depth_multiplier", depth_multiplier)
        # How the depthwise half runs when depth_multiplier > 1: "auto" (timed and
        # cached per input shape), "grouped" or "repeat"; see convert.forms.
        self.depthwise_form = check_form(depthwise_form)
        # The form "auto" chose on the last eager call ("" before any), reused while compiling or exporting.
        self.measured_form = ""
        # True when conv_dw pads each input dynamically (see convert.effective.use_same_padding).
        # The repeat form would skip that padding, so such a layer always runs grouped.
        self.dynamic_padding = False
        check_positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} "
                f"must both be divisible by groups={groups}"
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        hidden = in_channels * depth_multiplier
        self.conv_dw = self._conv_type(
            in_channels,
            hidden,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
            padding_mode=padding_mode,
            **factory,
        )
        self.conv_pw = self._conv_type(hidden, out_channels, 1, groups=groups, bias=bias, **factory)

    @classmethod
    def from_conv(
        cls,
        conv: nn.modules.conv._ConvNd,
        depth_multiplier: int = 1,
        init: str = "svd",
    ) -> "DepthwiseSeparableConvNd":
        """Build the separable replacement of ``conv`` on its device, dtype and memory format.

        ``init="svd"`` fills the weights from the truncated SVD of ``conv.weight`` and
        copies the bias (exact when ``depth_multiplier`` is the full rank
        ``min(out_channels / groups, prod(kernel_size))``; a larger multiplier is
        lowered to it). ``init="random"`` keeps PyTorch's default initialization.
        """
        from .factorize import INIT_METHODS, factorize_weight, full_rank

        check_positive_int("depth_multiplier", depth_multiplier)
        if init not in INIT_METHODS:
            raise ValueError(f"init={init!r} is not supported: choose one of {', '.join(INIT_METHODS)}")
        layer_type = cls.type_for(conv)
        depth_multiplier = min(depth_multiplier, full_rank(conv.out_channels, conv.kernel_size, conv.groups))
        if init == "random":
            layer = layer_type(**layer_arguments(conv, depth_multiplier))
            layer.copy_mode_and_layout(conv)
            return layer
        return layer_type.from_factors(conv, factorize_weight(conv.weight, depth_multiplier, groups=conv.groups))

    @classmethod
    def from_factors(cls, conv: nn.modules.conv._ConvNd, factors: "Factors") -> "DepthwiseSeparableConvNd":
        """Build the replacement of ``conv`` with weights already factored by :func:`factorize_weight`."""
        depth_multiplier = factors.depthwise.shape[0] // conv.in_channels
        layer = nn.utils.skip_init(cls.type_for(conv), **layer_arguments(conv, depth_multiplier))
        layer.load_factors(factors.depthwise, factors.pointwise)
        if conv.bias is not None:
            with torch.no_grad():
                layer.conv_pw.bias.copy_(conv.bias.detach())
        layer.copy_mode_and_layout(conv)
        return layer

    @classmethod
    def type_for(cls, conv: nn.Module) -> type["DepthwiseSeparableConvNd"]:
        """Return ``cls`` if it replaces ``conv``'s type, or the matching subclass when called on the base."""
        layer_type = cls if cls is not DepthwiseSeparableConvNd else separable_type_for(conv)
        if not isinstance(conv, layer_type._conv_type):
            raise TypeError(f"{layer_type.__name__} replaces {layer_type._conv_type.__name__}, not {type(conv).__name__}")
        return layer_type

    def copy_mode_and_layout(self, conv: nn.modules.conv._ConvNd) -> None:
        """Take the train/eval mode and the memory format of ``conv``."""
        self.train(conv.training)
        copy_memory_format(conv.weight, self)

    @torch.no_grad()
    def load_factors(self, depthwise: torch.Tensor, pointwise: torch.Tensor) -> None:
        """Copy factor weights into the two halves, casting to their dtype and device."""
        self.conv_dw.weight.copy_(depthwise.reshape(self.conv_dw.weight.shape))
        self.conv_pw.weight.copy_(pointwise.reshape(self.conv_pw.weight.shape))

    def dense_weight(self) -> torch.Tensor:
        """Return the dense conv weight that this pair computes, shape ``(out, in/groups, *kernel)``."""
        groups = self.groups
        multiplier = self.depth_multiplier
        in_per_group = self.in_channels // groups
        out_per_group = self.out_channels // groups
        kernel = self.conv_dw.weight.shape[2:]

        # depthwise (in*K, 1, *kernel) -> (groups, in/groups, K, prod(kernel))
        depthwise = self.conv_dw.weight.reshape(groups, in_per_group, multiplier, -1)
        # pointwise (out, in*K/groups, 1...) -> (groups, out/groups, in/groups, K)
        pointwise = self.conv_pw.weight.reshape(groups, out_per_group, in_per_group, multiplier)
        dense = torch.einsum("goik,gikp->goip", pointwise, depthwise)
        return dense.reshape(self.out_channels, in_per_group, *kernel)

    def __getstate__(self) -> dict[str, Any]:
        # A measured form is only valid on the hardware that timed it, so copies and
        # pickles start unmeasured; pin_depthwise_forms or set_depthwise_form persist a form.
        state = super().__getstate__()
        state["measured_form"] = ""
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Modules pickled before the depthwise forms existed lack these attributes.
        state.setdefault("depthwise_form", "auto")
        state.setdefault("measured_form", "")
        state.setdefault("dynamic_padding", False)
        super().__setstate__(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.depthwise(x))

    def depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """Run the depthwise half in the form that ``depthwise_form`` selects."""
        if self.conv_dw.out_channels == self.conv_dw.in_channels or self.dynamic_padding:
            return self.conv_dw(x)  # multiplier 1 has one form, and dynamic padding needs the grouped one
        form = self.depthwise_form
        if form == "auto":
            if torch.jit.is_scripting():
                form = self.measured_form if self.measured_form != "" else default_form(x.device.type)
            else:
                form = self.resolve_auto_form(x)
        if form == "repeat":
            return self.depthwise_repeated(x)
        if form == "grouped":
            return self.conv_dw(x)
        raise ValueError("depthwise_form=" + form + " is not supported: choose one of auto, grouped, repeat")

    @torch.jit.unused
    def resolve_auto_form(self, x: torch.Tensor) -> str:
        """Pick the faster form for ``x`` and remember it for later compiled or exported runs."""
        form = choose_form(self, x)
        if can_measure(x):  # otherwise the form is only the fallback, not a measurement
            self.measured_form = form
        return form

    def depthwise_repeated(self, x: torch.Tensor) -> torch.Tensor:
        """Run the depthwise half as channel repetition then a conv with one filter per group."""
        conv = self.conv_dw
        multiplier = conv.out_channels // conv.in_channels
        if conv.padding_mode != "zeros":
            # Pad the C_in input channels before repeating them: K times cheaper than after.
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            return self.depthwise_conv(repeat_channels(x, multiplier), padded=True)
        return self.depthwise_conv(repeat_channels(x, multiplier), padded=False)

    def depthwise_conv(self, x: torch.Tensor, padded: bool) -> torch.Tensor:
        """Apply ``conv_dw.weight`` with one filter per group to ``x`` (input already repeated).

        ``padded=True`` means ``x`` was padded by hand for a non-zero padding mode, so
        the conv adds none. Each subclass calls the functional conv of its dimension.
        """
        raise NotImplementedError

    @property
    def in_channels(self) -> int:
        return self.conv_dw.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv_pw.out_channels

    @property
    def depth_multiplier(self) -> int:
        return self.conv_dw.out_channels // self.conv_dw.in_channels

    @property
    def groups(self) -> int:
        return self.conv_pw.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.conv_dw.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.conv_dw.stride

    @property
    def padding(self) -> Padding:
        return self.conv_dw.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.conv_dw.dilation

    @property
    def padding_mode(self) -> str:
        return self.conv_dw.padding_mode

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv_pw.bias

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, depth_multiplier={self.depth_multiplier}"
        )
        if self.padding not in (0, (0,) * len(self.kernel_size)):
            text += f", padding={self.padding}"
        if self.dilation != (1,) * len(self.kernel_size):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        if self.bias is None:
            text += ", bias=False"
        return text


class DepthwiseSeparableConv1d(DepthwiseSeparableConvNd):
    """Depthwise-separable replacement of :class:`torch.nn.Conv1d`."""

    _conv_type = nn.Conv1d

    def depthwise_conv(self, x: torch.Tensor, padded: bool) -> torch.Tensor:
        conv = self.conv_dw
        if padded:
            return F.conv1d(x, conv.weight, None, conv.stride, 0, conv.dilation, conv.out_channels)
        return F.conv1d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.out_channels)


class DepthwiseSeparableConv2d(DepthwiseSeparableConvNd):
    """Depthwise-separable replacement of :class:`torch.nn.Conv2d`.

    Example::

        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> layer = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=9)
        >>> torch.allclose(layer(x), conv(x), atol=1e-5)  # exact at full rank
    """

    _conv_type = nn.Conv2d

    def depthwise_conv(self, x: torch.Tensor, padded: bool) -> torch.Tensor:
        conv = self.conv_dw
        if padded:
            return F.conv2d(x, conv.weight, None, conv.stride, 0, conv.dilation, conv.out_channels)
        return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.out_channels)


class DepthwiseSeparableConv3d(DepthwiseSeparableConvNd):
    """Depthwise-separable replacement of :class:`torch.nn.Conv3d`."""

    _conv_type = nn.Conv3d

    def depthwise_conv(self, x: torch.Tensor, padded: bool) -> torch.Tensor:
        conv = self.conv_dw
        if padded:
            return F.conv3d(x, conv.weight, None, conv.stride, 0, conv.dilation, conv.out_channels)
        return F.conv3d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.out_channels)


# Exact dense type -> separable type; subclasses of nn.Conv*d are deliberately absent.
SEPARABLE_BY_DENSE: dict[type[nn.Module], type[DepthwiseSeparableConvNd]] = {
    nn.Conv1d: DepthwiseSeparableConv1d,
    nn.Conv2d: DepthwiseSeparableConv2d,
    nn.Conv3d: DepthwiseSeparableConv3d,
}


def layer_arguments(conv: nn.modules.conv._ConvNd, depth_multiplier: int) -> dict[str, Any]:
    """Return the constructor arguments of a separable layer that replaces ``conv``."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
        "depth_multiplier": depth_multiplier,
        "device": conv.weight.device,
        "dtype": conv.weight.dtype,
    }


def separable_type_for(conv: nn.Module) -> type[DepthwiseSeparableConvNd]:
    """Return the separable layer type for a conv module of exactly Conv1d, Conv2d or Conv3d type."""
    try:
        return SEPARABLE_BY_DENSE[type(conv)]
    except KeyError:
        raise TypeError(f"no depthwise-separable form for {type(conv).__name__}") from None


def repeat_channels(x: torch.Tensor, multiplier: int) -> torch.Tensor:
    """Repeat each channel of ``x`` (dim 1) ``multiplier`` times in place: c0, c0, c1, c1, ...

    Same result as ``x.repeat_interleave(multiplier, dim=1)``, built from
    expand and flatten, which every exporter handles. A channels-last input stays
    channels-last: the copy is made along the last dimension of its memory order.
    """
    if not x.is_contiguous() and channels_last_for(x):
        # (N, *spatial, C) -> (N, *spatial, C, K) -> (N, *spatial, C*K) -> (N, C*K, *spatial)
        moved = x.movedim(1, -1)
        sizes = [-1] * moved.dim()
        sizes.append(multiplier)
        return moved.unsqueeze(-1).expand(sizes).flatten(-2, -1).movedim(-1, 1)
    # (N, C, *spatial) -> (N, C, K, *spatial) -> (N, C*K, *spatial)
    sizes = [-1, -1, multiplier]
    for _ in range(x.dim() - 2):
        sizes.append(-1)
    return x.unsqueeze(2).expand(sizes).flatten(1, 2)


def channels_last_for(x: torch.Tensor) -> bool:
    """Return whether ``x`` is 4-d channels-last or 5-d channels-last-3d in memory."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def check_positive_int(name: str, value: object) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: must be an int")
    if value < 1:
        raise ValueError(f"{name}={value}: must be >= 1")


def copy_memory_format(reference: torch.Tensor, layer: nn.Module) -> None:
    """Give ``layer`` the channels-last layout when ``reference`` has it and is not also contiguous."""
    memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(reference.dim())
    if memory_format is None or reference.is_contiguous():
        return
    if reference.is_contiguous(memory_format=memory_format):
        layer.to(memory_format=memory_format)
