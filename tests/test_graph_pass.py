"""The conversion pass on small models: what is converted, what is skipped and why, what is kept."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from convert import (
    ConversionError,
    DepthwiseSeparableConv2d,
    convert_model,
    inspect_model,
    run_conversion,
)


class SmallNet(nn.Module):
    """Covers each skip rule once, plus a method and attributes forward does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1))
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv2d(32, 32, 1)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(32, 10)
        self.num_classes = 10
        self.config = {"width": 16}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(self.body(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x).mean((2, 3))))

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(32, num_classes)
        self.num_classes = num_classes


class ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.other = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.other(self.conv(x))
        return y + F.conv2d(x, self.conv.weight, padding=1)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias(self.conv(x))


class StdConv2d(nn.Conv2d):
    """Weight standardization: a conv subclass whose forward differs from nn.Conv2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


def reasons(result) -> dict[str, str | None]:
    return {layer.name: layer.plan.reason for layer in result.layers}


def test_converts_eligible_and_keeps_class():
    model = SmallNet().eval()
    converted = convert_model(model)
    assert type(converted) is SmallNet
    assert isinstance(converted.stem, DepthwiseSeparableConv2d)
    assert isinstance(converted.body[2], DepthwiseSeparableConv2d)
    assert type(converted.depthwise) is nn.Conv2d
    assert type(converted.pointwise) is nn.Conv2d


def test_original_untouched_by_default():
    model = SmallNet()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    convert_model(model)
    assert type(model.stem) is nn.Conv2d
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_inplace_modifies_and_returns_model():
    model = SmallNet()
    converted = convert_model(model, inplace=True)
    assert converted is model
    assert isinstance(model.stem, DepthwiseSeparableConv2d)


def test_skip_reasons_are_specific():
    result = run_conversion(SmallNet())
    found = reasons(result)
    assert found["stem"] is None
    assert found["body.2"] is None
    assert found["depthwise"] == "already depthwise (groups == in_channels)"
    assert found["pointwise"] == "kernel is 1x1: already a pointwise conv"


def test_larger_layer_skipped_unless_allowed():
    model = nn.Sequential(nn.Conv2d(64, 64, 3))
    result = run_conversion(model, depth_multiplier=9)
    assert result.layers[0].plan.reason == (
        "at depth multiplier 9 the separable form has 42,112 parameters, more than the dense conv's 36,928; "
        "pass allow_larger=True (--allow-larger) to convert anyway"
    )
    allowed = run_conversion(model, depth_multiplier=9, allow_larger=True)
    assert allowed.layers[0].plan.converted
    assert allowed.layers[0].plan.params_after == 64 * 9 * 9 + 64 * 64 * 9 + 64


def test_full_multiplier_reproduces_model():
    model = SmallNet().eval()
    converted = convert_model(model, depth_multiplier=9, allow_larger=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


def test_multiplier_lowered_and_reported():
    result = run_conversion(SmallNet(), depth_multiplier=100, allow_larger=True)
    stem = next(layer for layer in result.layers if layer.name == "stem")
    assert stem.plan.requested_multiplier == 100
    assert stem.plan.depth_multiplier == 9


def test_weight_read_directly_is_left_alone():
    model = ReadsWeight().eval()
    result = run_conversion(model, depth_multiplier=9, allow_larger=True)
    found = reasons(result)
    assert found["conv"] == "its parameters are read directly by the forward (conv.weight), so the module cannot be swapped"
    assert found["other"] is None
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_shared_conv_converted_once():
    model = Shared().eval()
    result = run_conversion(model, depth_multiplier=9, allow_larger=True)
    assert len(result.layers) == 1
    assert result.layers[0].plan.aliases == ("alias",)
    assert result.model.conv is result.model.alias
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_subclass_skipped_with_reason():
    model = nn.Sequential(StdConv2d(4, 8, 3))
    result = run_conversion(model)
    assert result.layers[0].plan.reason == (
        "StdConv2d subclasses Conv2d and may override forward; pass convert_subclasses=True "
        "(--convert-subclasses) to convert it when its output is that of a single conv"
    )
    assert type(result.model[0]) is StdConv2d


def test_transposed_conv_skipped_with_reason():
    result = run_conversion(nn.Sequential(nn.ConvTranspose2d(4, 8, 3)))
    assert result.layers[0].plan.reason == "ConvTranspose2d is a transposed conv, which has no depthwise-separable form here"


def test_methods_attributes_and_modes_kept():
    model = SmallNet()
    converted = convert_model(model)
    assert converted.num_classes == 10
    assert converted.config == {"width": 16}
    assert converted.forward_features(torch.randn(1, 3, 8, 8)).shape == (1, 32, 4, 4)
    converted.reset_classifier(5)
    assert converted(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert converted.training
    converted.eval()
    assert not converted.stem.training


def test_train_mode_dropout_still_active():
    converted = convert_model(SmallNet().train())
    x = torch.randn(4, 3, 8, 8)
    assert not torch.equal(converted(x), converted(x))  # dropout draws a new mask each call
    converted.eval()
    torch.testing.assert_close(converted(x), converted(x))


def test_converted_model_pickles_as_own_class():
    converted = convert_model(SmallNet().eval())
    restored = pickle.loads(pickle.dumps(converted))
    assert type(restored) is SmallNet
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(restored(x), converted(x))


def test_graph_module_option():
    model = SmallNet().eval()
    graph_module = convert_model(model, depth_multiplier=9, allow_larger=True, graph_module=True)
    assert isinstance(graph_module, torch.fx.GraphModule)
    assert isinstance(graph_module.get_submodule("stem"), DepthwiseSeparableConv2d)
    assert not graph_module.training
    assert "config" not in vars(graph_module)  # attributes that forward does not use are dropped
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(graph_module(x), model(x), rtol=1e-4, atol=1e-5)
    targets = {node.target for node in graph_module.graph.nodes if node.op == "call_module"}
    assert "stem" in targets


def test_graph_module_with_swap_rejected():
    with pytest.raises(ValueError, match="graph_module=True needs a traced graph"):
        convert_model(SmallNet(), graph_module=True, tracing="swap")


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="depth_multiplier=0: must be >= 1"):
        convert_model(SmallNet(), depth_multiplier=0)
    with pytest.raises(ValueError, match="init='pca' is not supported"):
        convert_model(SmallNet(), init="pca")
    with pytest.raises(ValueError, match="tracing='jit' is not supported"):
        convert_model(SmallNet(), tracing="jit")


def test_random_init_converts_same_layers():
    result = run_conversion(SmallNet(), init="random")
    assert [layer.name for layer in result.converted] == ["stem", "body.2"]
    assert all(layer.relative_error is None for layer in result.converted)


def test_nan_weight_names_the_layer():
    model = SmallNet()
    with torch.no_grad():
        model.body[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConversionError, match="layer 'body.2': factorization failed: ValueError: the weight contains NaN"):
        convert_model(model)


def test_inspect_lists_every_conv_without_changing():
    model = SmallNet()
    plans, trace_error = inspect_model(model, depth_multiplier=2)
    assert trace_error is None
    assert [plan.name for plan in plans] == ["stem", "body.2", "depthwise", "pointwise"]
    assert [plan.converted for plan in plans] == [True, True, False, False]
    assert plans[0].params_after == 3 * 2 * 9 + 16 * 3 * 2 + 16
    assert type(model.stem) is nn.Conv2d


def test_tracing_fx_mode_raises_on_untraceable():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return self.conv(-x)

    with pytest.raises(ConversionError, match="torch.fx could not trace Untraceable"):
        convert_model(Untraceable(), tracing="fx")
    result = run_conversion(Untraceable())
    assert result.path == "swap"
    assert "TraceError" in result.trace_error
    assert isinstance(result.model.conv, DepthwiseSeparableConv2d)


def test_timings_recorded():
    result = run_conversion(SmallNet())
    assert set(result.seconds) == {"copy", "trace", "select", "factorize", "swap"}
