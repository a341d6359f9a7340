"""Merging separable pairs back into dense convs: exactness, geometry, sharing, and the CLI command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import requires_cuda, run_cli
from model_files import INPUT_SHAPE, INPUT_SHAPE_TEXT, import_models
from torch import nn

from convert import (
    DepthwiseSeparableConv1d,
    DepthwiseSeparableConv2d,
    DepthwiseSeparableConv3d,
    DepthwiseSeparableConvNd,
    apply_plan,
    build_plan,
    check_outputs,
    convert_model,
    densify_model,
    run_densify,
)
from convert.densify import densify_layer

# float64 products of the same numbers in another order: only rounding differs.
FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}
# float32 network outputs after merging every layer of a deep model.
FLOAT32_MODEL = {"rtol": 1e-4, "atol": 1e-5}

GEOMETRIES = [
    pytest.param(DepthwiseSeparableConv2d, {"kernel_size": 3, "padding": 1}, id="3x3"),
    pytest.param(DepthwiseSeparableConv2d, {"kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2)}, id="strided-rectangular"),
    pytest.param(DepthwiseSeparableConv2d, {"kernel_size": 3, "dilation": 2, "padding": 2}, id="dilated"),
    pytest.param(DepthwiseSeparableConv2d, {"kernel_size": 3, "groups": 2}, id="grouped"),
    pytest.param(DepthwiseSeparableConv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, id="reflect"),
    pytest.param(DepthwiseSeparableConv2d, {"kernel_size": 3, "padding": "same", "padding_mode": "circular"}, id="same-circular"),
    pytest.param(DepthwiseSeparableConv2d, {"kernel_size": 3, "bias": False}, id="no-bias"),
    pytest.param(DepthwiseSeparableConv1d, {"kernel_size": 5, "stride": 2, "padding": 2}, id="conv1d"),
    pytest.param(DepthwiseSeparableConv3d, {"kernel_size": 3, "padding": 1}, id="conv3d"),
]


@pytest.mark.parametrize(("layer_type", "arguments"), GEOMETRIES)
@pytest.mark.parametrize("multiplier", [1, 3])
def test_dense_conv_computes_same_function(layer_type, arguments: dict, multiplier: int) -> None:
    layer = layer_type(4, 8, depth_multiplier=multiplier, dtype=torch.float64, **arguments)
    dimensions = {DepthwiseSeparableConv1d: 1, DepthwiseSeparableConv2d: 2, DepthwiseSeparableConv3d: 3}[layer_type]
    example = torch.randn(2, 4, *([9] * dimensions), dtype=torch.float64)

    dense = densify_layer(layer)

    assert type(dense) is layer._conv_type
    assert (dense.stride, dense.dilation, dense.groups, dense.padding, dense.padding_mode) == (
        layer.stride, layer.dilation, layer.groups, layer.padding, layer.padding_mode,
    )
    assert (dense.bias is None) == (layer.bias is None)
    torch.testing.assert_close(dense(example), layer(example), **FLOAT64)


def test_full_rank_round_trip_recovers_weights() -> None:
    conv = nn.Conv2d(6, 10, 3, padding=1, dtype=torch.float64)
    separable = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=9)

    dense = densify_layer(separable)

    torch.testing.assert_close(dense.weight, conv.weight, **FLOAT64)
    torch.testing.assert_close(dense.bias, conv.bias, **FLOAT64)


def test_densified_resnet_loads_into_original_architecture() -> None:
    original = torchvision.models.resnet18(num_classes=10).eval()
    converted = convert_model(original, depth_multiplier=2)

    dense = densify_model(converted)
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(dense.state_dict())

    example = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dense(example), converted(example), **FLOAT32_MODEL)
        torch.testing.assert_close(fresh.eval()(example), converted(example), **FLOAT32_MODEL)
    assert not any(isinstance(module, DepthwiseSeparableConvNd) for module in dense.modules())


def test_densify_keeps_input_and_mode() -> None:
    converted = convert_model(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU()).eval()).train()

    result = run_densify(converted)

    assert isinstance(converted[0], DepthwiseSeparableConv2d)
    assert type(result.model[0]) is nn.Conv2d
    assert result.model[0].training
    assert result.layers[0].name == "0"
    assert result.layers[0].params_after == 8 * 4 * 9 + 8


def test_shared_layer_stays_shared() -> None:
    layer = DepthwiseSeparableConv2d(8, 8, 3, padding=1)
    model = nn.Sequential(layer, nn.ReLU(), layer)

    result = run_densify(model)

    assert result.model[0] is result.model[2]
    assert len(result.layers) == 1
    assert result.layers[0].aliases == ("2",)


def test_root_layer_is_replaced() -> None:
    layer = DepthwiseSeparableConv2d(4, 8, 3)

    dense = densify_model(layer)

    assert type(dense) is nn.Conv2d


def test_bfloat16_is_rounded_once() -> None:
    layer = DepthwiseSeparableConv2d(16, 16, 3, depth_multiplier=4).to(torch.bfloat16)
    # Products and sums of a few bfloat16 numbers are exact in float64: this is the exact dense weight.
    pointwise = layer.conv_pw.weight.detach().double().reshape(1, 16, 16, 4)
    depthwise = layer.conv_dw.weight.detach().double().reshape(1, 16, 4, 9)
    exact = torch.einsum("goik,gikp->goip", pointwise, depthwise).reshape(16, 16, 3, 3)

    dense = densify_layer(layer)

    assert dense.weight.dtype == torch.bfloat16
    torch.testing.assert_close(dense.weight, exact.to(torch.bfloat16), rtol=0, atol=0)


def test_model_without_separable_layers_is_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))

    result = run_densify(model)

    assert result.layers == []
    assert type(result.model[0]) is nn.Conv2d


def test_densify_command_from_plan_and_state_dict(project: Path, tmp_path: Path) -> None:
    models = import_models(project)
    original = models.tiny_net()
    source = tmp_path / "weights.pt"
    torch.save(original.state_dict(), source)
    converted_path = tmp_path / "converted.safetensors"
    dense_path = tmp_path / "dense.pt"

    converted = run_cli(
        "convert", str(source), "-o", str(converted_path), "--arch", "dsconv_test_models:tiny_net",
        "--save-as", "safetensors", "--input-shape", INPUT_SHAPE_TEXT, "--no-latency", "-k", "2", cwd=project,
    )
    densified = run_cli(
        "densify", str(converted_path), "--arch", "dsconv_test_models:tiny_net", "--plan", str(tmp_path / "converted.plan.json"),
        "-o", str(dense_path), "--save-as", "state-dict", "--check", "3", "--input-shape", INPUT_SHAPE_TEXT, cwd=project,
    )

    assert converted.returncode == 0, converted.stderr
    assert densified.returncode == 0, densified.stderr
    assert "merged 2 layers" in densified.stdout
    assert "check on 3 random inputs of shape 1,3,16,16" in densified.stdout
    dense = models.tiny_net()
    dense.load_state_dict(torch.load(dense_path, weights_only=True))
    example = torch.randn(INPUT_SHAPE)
    with torch.no_grad():
        expected = convert_model(original.eval(), depth_multiplier=2)(example)
        torch.testing.assert_close(dense.eval()(example), expected, **FLOAT32_MODEL)


@requires_cuda
def test_densify_and_plan_keep_cuda_device() -> None:
    converted = convert_model(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU()).cuda().eval(), depth_multiplier=2)

    dense = densify_model(converted)
    rebuilt = apply_plan(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU()).cuda(), build_plan(converted))
    rebuilt.load_state_dict(converted.state_dict())

    assert dense[0].weight.device.type == "cuda"
    assert rebuilt[0].conv_dw.weight.device.type == "cuda"
    example = torch.randn(2, 4, 9, 9, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(dense(example), converted(example), **FLOAT32_MODEL)
        torch.testing.assert_close(rebuilt.eval()(example), converted(example), **FLOAT32_MODEL)
    result = check_outputs(converted, dense, (2, 4, 9, 9), 3, rtol=1e-3, atol=1e-6, device="cuda")
    assert result.passed
