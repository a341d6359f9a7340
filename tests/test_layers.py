"""DepthwiseSeparableConv*d: exactness at full rank, copied attributes, dtype, layout."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from convert import DepthwiseSeparableConv1d, DepthwiseSeparableConv2d, DepthwiseSeparableConv3d, full_rank
from convert.layers import DepthwiseSeparableConvNd

# float32 round-off over a sum of a few hundred products: well below any real approximation error.
EXACT = {"rtol": 1e-4, "atol": 1e-5}


def full_rank_of(conv: nn.modules.conv._ConvNd) -> int:
    return full_rank(conv.out_channels, conv.kernel_size, conv.groups)


def check_exact(conv: nn.modules.conv._ConvNd, size: int = 11) -> DepthwiseSeparableConvNd:
    layer = DepthwiseSeparableConvNd.from_conv(conv, full_rank_of(conv))
    x = torch.randn(2, conv.in_channels, *([size] * (conv.weight.dim() - 2)))
    torch.testing.assert_close(layer(x), conv(x), **EXACT)
    return layer


KERNELS = [1, 2, 3, 4, 5, 6, 7, (1, 3), (3, 1), (2, 5), (7, 3)]


@pytest.mark.parametrize("kernel_size", KERNELS, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_exact_at_full_rank_per_kernel(kernel_size, bias):
    check_exact(nn.Conv2d(6, 10, kernel_size, bias=bias))


GEOMETRIES = [
    {"stride": 2},
    {"stride": (1, 3)},
    {"dilation": 2},
    {"dilation": (2, 1), "padding": (2, 1)},
    {"padding": 1},
    {"padding": (0, 2)},
    {"padding": "same"},
    {"padding": "same", "dilation": 2},
    {"padding": "valid"},
    {"stride": 2, "padding": 3, "dilation": 3},
]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("kernel_size", [3, (3, 5)], ids=str)
def test_exact_at_full_rank_per_geometry(geometry, padding_mode, kernel_size):
    conv = nn.Conv2d(4, 8, kernel_size, padding_mode=padding_mode, **geometry)
    layer = check_exact(conv, size=13)
    assert layer.conv_dw.padding_mode == padding_mode
    assert layer.conv_dw.padding == conv.padding
    assert layer.conv_dw.stride == conv.stride
    assert layer.conv_dw.dilation == conv.dilation


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 5, padding=2, padding_mode="reflect"),
        nn.Conv3d(3, 5, (3, 3, 2), stride=(1, 2, 1)),
        nn.Conv2d(8, 12, 3, groups=4, padding=1),
        nn.Conv2d(6, 6, 3, groups=2, bias=False, padding_mode="circular", padding=1),
    ],
    ids=["conv1d", "conv3d", "groups4", "groups2_circular"],
)
def test_exact_for_other_dims_and_groups(conv):
    layer = check_exact(conv, size=9)
    assert layer.groups == conv.groups
    assert layer.conv_dw.groups == conv.in_channels


def test_from_conv_picks_type_by_dimension():
    assert type(DepthwiseSeparableConvNd.from_conv(nn.Conv1d(2, 4, 3))) is DepthwiseSeparableConv1d
    assert type(DepthwiseSeparableConvNd.from_conv(nn.Conv2d(2, 4, 3))) is DepthwiseSeparableConv2d
    assert type(DepthwiseSeparableConvNd.from_conv(nn.Conv3d(2, 4, 3))) is DepthwiseSeparableConv3d


def test_from_conv_rejects_other_dimension():
    with pytest.raises(TypeError, match="DepthwiseSeparableConv2d replaces Conv2d, not Conv1d"):
        DepthwiseSeparableConv2d.from_conv(nn.Conv1d(2, 4, 3))


def test_layer_shapes_and_properties():
    conv = nn.Conv2d(16, 32, (3, 5), stride=2, padding=(1, 2), dilation=1)
    layer = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=3)
    assert layer.in_channels == 16
    assert layer.out_channels == 32
    assert layer.depth_multiplier == 3
    assert layer.kernel_size == (3, 5)
    assert layer.stride == (2, 2)
    assert layer.padding == (1, 2)
    assert layer.conv_dw.weight.shape == (48, 1, 3, 5)
    assert layer.conv_pw.weight.shape == (32, 48, 1, 1)
    assert layer.conv_dw.bias is None
    torch.testing.assert_close(layer.conv_pw.bias, conv.bias)
    assert sorted(layer.state_dict()) == ["conv_dw.weight", "conv_pw.bias", "conv_pw.weight"]


def test_repr_names_geometry():
    layer = DepthwiseSeparableConv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect", bias=False, depth_multiplier=2)
    text = repr(layer)
    assert text.startswith(
        "DepthwiseSeparableConv2d(\n  8, 16, kernel_size=(3, 3), stride=(2, 2), depth_multiplier=2, "
        "padding=(1, 1), padding_mode='reflect', bias=False"
    )
    assert "(conv_dw): Conv2d(8, 16, kernel_size=(3, 3)" in text
    assert "(conv_pw): Conv2d(16, 16, kernel_size=(1, 1)" in text


def test_multiplier_above_full_rank_is_lowered():
    conv = nn.Conv2d(4, 5, 3)  # full rank min(5, 9) = 5
    layer = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=50)
    assert layer.depth_multiplier == 5


@pytest.mark.parametrize("value", [0, -1])
def test_invalid_multiplier_raises_value_error(value):
    with pytest.raises(ValueError, match=f"depth_multiplier={value}: must be >= 1"):
        DepthwiseSeparableConv2d.from_conv(nn.Conv2d(2, 4, 3), depth_multiplier=value)


def test_non_int_multiplier_raises_type_error():
    with pytest.raises(TypeError, match="depth_multiplier=1.5: must be an int"):
        DepthwiseSeparableConv2d(2, 4, 3, depth_multiplier=1.5)


def test_invalid_init_raises():
    with pytest.raises(ValueError, match="init='pca' is not supported"):
        DepthwiseSeparableConv2d.from_conv(nn.Conv2d(2, 4, 3), init="pca")


def test_random_init_does_not_copy_weights():
    conv = nn.Conv2d(4, 8, 3)
    layer = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=8, init="random")
    svd_layer = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=8, init="svd")
    assert not torch.allclose(layer.dense_weight(), conv.weight, atol=1e-3)
    torch.testing.assert_close(svd_layer.dense_weight(), conv.weight, **EXACT)


def test_dense_weight_matches_composition():
    layer = DepthwiseSeparableConv2d(6, 9, (3, 2), groups=3, depth_multiplier=2, padding=1)
    dense = nn.Conv2d(6, 9, (3, 2), groups=3, padding=1, bias=True)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.conv_pw.bias)
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(layer(x), dense(x), **EXACT)


def test_train_mode_follows_original():
    conv = nn.Conv2d(2, 4, 3).eval()
    assert not DepthwiseSeparableConv2d.from_conv(conv).training
    assert DepthwiseSeparableConv2d.from_conv(conv.train()).training


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_kept_and_factored_in_float32(dtype):
    conv = nn.Conv2d(4, 8, 3, padding=1)
    reference = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=2).dense_weight()
    low_precision = DepthwiseSeparableConv2d.from_conv(conv.to(dtype), depth_multiplier=2)
    assert low_precision.conv_dw.weight.dtype == dtype
    assert low_precision.conv_pw.weight.dtype == dtype
    assert low_precision.conv_pw.bias.dtype == dtype
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(low_precision.dense_weight().float(), reference, rtol=tolerance, atol=tolerance)


def test_channels_last_kept():
    conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    layer = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=2)
    assert layer.conv_dw.weight.is_contiguous(memory_format=torch.channels_last)
    assert layer.conv_pw.weight.is_contiguous(memory_format=torch.channels_last)


def test_contiguous_layout_kept():
    layer = DepthwiseSeparableConv2d.from_conv(nn.Conv2d(4, 8, 3), depth_multiplier=2)
    assert layer.conv_dw.weight.is_contiguous()


def test_constructor_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="must both be divisible by groups=3"):
        DepthwiseSeparableConv2d(4, 6, 3, groups=3)


def test_every_multiplier_trains():
    layer = DepthwiseSeparableConv2d.from_conv(nn.Conv2d(3, 4, 3), depth_multiplier=2)
    loss = layer(torch.randn(1, 3, 5, 5)).square().sum()
    loss.backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name


@pytest.mark.parametrize("kernel_size,out_channels", list(itertools.product([3, 5], [2, 30])))
def test_full_rank_formula(kernel_size, out_channels):
    conv = nn.Conv2d(3, out_channels, kernel_size)
    assert full_rank_of(conv) == min(out_channels, kernel_size * kernel_size)
