"""The two exact forms of the depthwise half, and how "auto" picks between them."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torchvision
from torch import nn

from convert import DepthwiseSeparableConv1d, DepthwiseSeparableConv2d, DepthwiseSeparableConv3d, convert_model, full_rank
from convert import forms
from convert.forms import clear_form_cache, pin_depthwise_forms, set_depthwise_form
from convert.layers import repeat_channels
from convert.measure import count_macs

# Both forms sum the same products per output element; only the order of float32
# additions may differ, so 1e-5 relative is ample.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def empty_form_cache():
    clear_form_cache()
    yield
    clear_form_cache()


def run_form(layer: nn.Module, x: torch.Tensor, form: str) -> torch.Tensor:
    layer.depthwise_form = form
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("multiplier", [2, 3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_repeat_channels_matches_repeat_interleave(multiplier, channels_last):
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    repeated = repeat_channels(x, multiplier)
    assert torch.equal(repeated, x.repeat_interleave(multiplier, dim=1))
    assert repeated.is_contiguous(memory_format=torch.channels_last) == channels_last


CONV2D_CASES = {
    "plain": dict(kernel_size=3, padding=1),
    "stride": dict(kernel_size=3, stride=2, padding=1),
    "non-square": dict(kernel_size=(3, 5), padding=(1, 2)),
    "dilation": dict(kernel_size=3, dilation=2, padding=2),
    "same": dict(kernel_size=(3, 4), padding="same"),
    "valid": dict(kernel_size=3, padding="valid"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="circular"),
    "replicate-stride": dict(kernel_size=3, padding=2, stride=2, padding_mode="replicate"),
    "groups": dict(kernel_size=3, padding=1, groups=2),
    "no-bias": dict(kernel_size=3, padding=1, bias=False),
}


@pytest.mark.parametrize("case", CONV2D_CASES, ids=list(CONV2D_CASES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_forms_match_conv2d(case, channels_last):
    conv = nn.Conv2d(8, 12, **CONV2D_CASES[case])
    # At the full rank the pair equals the dense conv, so both forms can be checked against it.
    layer = DepthwiseSeparableConv2d.from_conv(conv, depth_multiplier=100)
    assert layer.depth_multiplier == full_rank(conv.out_channels, conv.kernel_size, conv.groups) > 1
    x = torch.randn(2, 8, 11, 13)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    grouped = run_form(layer, x, "grouped")
    repeated = run_form(layer, x, "repeat")

    torch.testing.assert_close(repeated, grouped, **TOLERANCE)
    torch.testing.assert_close(grouped, conv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("layer_type", "shape"),
    [(DepthwiseSeparableConv1d, (2, 6, 17)), (DepthwiseSeparableConv3d, (2, 6, 5, 6, 7))],
)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_forms_match_conv1d_conv3d(layer_type, shape, padding_mode):
    layer = layer_type(6, 10, 3, padding=1, padding_mode=padding_mode, depth_multiplier=3)
    x = torch.randn(shape)

    grouped = run_form(layer, x, "grouped")
    repeated = run_form(layer, x, "repeat")

    torch.testing.assert_close(repeated, grouped, **TOLERANCE)


def test_forms_match_channels_last_3d():
    layer = DepthwiseSeparableConv3d(4, 8, 3, padding=1, depth_multiplier=2)
    x = torch.randn(2, 4, 5, 6, 7).to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(run_form(layer, x, "repeat"), run_form(layer, x, "grouped"), **TOLERANCE)


def test_forms_share_state_dict():
    layer = DepthwiseSeparableConv2d(8, 16, 3, padding=1, depth_multiplier=2)
    keys = set(layer.state_dict())
    shapes = {key: tuple(value.shape) for key, value in layer.state_dict().items()}
    parameters = sum(parameter.numel() for parameter in layer.parameters())

    layer.depthwise_form = "repeat"
    x = torch.randn(1, 8, 9, 9)
    layer(x)

    assert set(layer.state_dict()) == keys == {"conv_dw.weight", "conv_pw.weight", "conv_pw.bias"}
    assert {key: tuple(value.shape) for key, value in layer.state_dict().items()} == shapes
    assert shapes["conv_dw.weight"] == (16, 1, 3, 3)
    assert sum(parameter.numel() for parameter in layer.parameters()) == parameters

    other = DepthwiseSeparableConv2d(8, 16, 3, padding=1, depth_multiplier=2, depthwise_form="grouped")
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), layer(x), **TOLERANCE)


def test_forms_give_same_gradients():
    layer = DepthwiseSeparableConv2d(4, 6, 3, padding=1, depth_multiplier=3)
    x = torch.randn(2, 4, 8, 8)
    gradients = {}
    for form in ("grouped", "repeat"):
        layer.zero_grad()
        layer.depthwise_form = form
        layer(x).square().sum().backward()
        gradients[form] = layer.conv_dw.weight.grad.clone()
    torch.testing.assert_close(gradients["repeat"], gradients["grouped"], rtol=1e-4, atol=1e-5)


def test_invalid_form_rejected():
    with pytest.raises(ValueError, match="depthwise_form='fast'"):
        DepthwiseSeparableConv2d(4, 8, 3, depth_multiplier=2, depthwise_form="fast")
    layer = DepthwiseSeparableConv2d(4, 8, 3, depth_multiplier=2)
    with pytest.raises(ValueError, match="depthwise_form='fast'"):
        set_depthwise_form(layer, "fast")
    layer.depthwise_form = "fast"
    with pytest.raises(ValueError, match="depthwise_form=fast is not supported"):
        layer(torch.randn(1, 4, 6, 6))


def test_auto_uses_measured_winner(monkeypatch):
    layer = DepthwiseSeparableConv2d(4, 8, 3, padding=1, depth_multiplier=2)
    x = torch.randn(1, 4, 6, 6)
    calls = []

    def fake_timings(measured_layer, measured_input):
        calls.append(tuple(measured_input.shape))
        return {"grouped": 2.0, "repeat": 1.0}

    monkeypatch.setattr(forms, "measure_forms", fake_timings)
    layer(x)
    layer(x)
    assert calls == [(1, 4, 6, 6)]  # the second call reads the cache
    assert layer.measured_form == "repeat"

    layer(torch.randn(3, 4, 6, 6))  # a new shape is measured again
    assert calls == [(1, 4, 6, 6), (3, 4, 6, 6)]


def test_auto_keeps_grouped_on_near_tie(monkeypatch):
    layer = DepthwiseSeparableConv2d(4, 8, 3, padding=1, depth_multiplier=2)
    monkeypatch.setattr(forms, "measure_forms", lambda *args: {"grouped": 1.0, "repeat": 0.98})
    layer(torch.randn(1, 4, 6, 6))
    assert layer.measured_form == "grouped"


def test_auto_skips_measuring_multiplier_one(monkeypatch):
    layer = DepthwiseSeparableConv2d(4, 8, 3, padding=1, depth_multiplier=1)

    def fail(*args):
        raise AssertionError("a depth multiplier of 1 has one form and needs no timing")

    monkeypatch.setattr(forms, "measure_forms", fail)
    layer(torch.randn(1, 4, 6, 6))
    assert forms.FORM_CACHE == {}


def test_measure_forms_returns_both_timings():
    layer = DepthwiseSeparableConv2d(4, 8, 3, padding=1, depth_multiplier=2)
    timings = forms.measure_forms(layer, torch.randn(1, 4, 6, 6), calls=2)
    assert set(timings) == {"grouped", "repeat"}
    assert all(seconds > 0 for seconds in timings.values())


def test_flop_counter_does_not_trigger_timing():
    layer = DepthwiseSeparableConv2d(8, 16, 3, padding=1, depth_multiplier=2, bias=False)
    x = torch.randn(1, 8, 10, 10)
    macs, _ = count_macs(layer, x)
    assert forms.FORM_CACHE == {}
    # depthwise 16 filters * 9 taps * 100 positions, pointwise 16 * 16 * 100
    assert macs == 16 * 9 * 100 + 16 * 16 * 100
    layer.depthwise_form = "grouped"
    assert count_macs(layer, x)[0] == macs


def test_pin_sets_concrete_forms(monkeypatch):
    model = convert_model(torchvision.models.resnet18().eval(), depth_multiplier=2)
    monkeypatch.setattr(forms, "measure_forms", lambda *args: {"grouped": 2.0, "repeat": 1.0})
    pinned = pin_depthwise_forms(model, torch.randn(1, 3, 64, 64))

    layers = forms.separable_layers(model)
    assert set(pinned) == set(layers)
    assert len(layers) == 17  # resnet18: the stem and 16 block convs
    assert set(pinned.values()) == {"repeat"}
    assert all(layer.depthwise_form == "repeat" for layer in layers.values())


def test_set_depthwise_form_counts_layers():
    model = convert_model(torchvision.models.resnet18(), depth_multiplier=2)
    assert set_depthwise_form(model, "grouped") == 17
    assert {layer.depthwise_form for layer in forms.separable_layers(model).values()} == {"grouped"}


def test_tracing_uses_default_form():
    assert forms.default_form("cpu") == "repeat"
    layer = DepthwiseSeparableConv2d(4, 8, 3, depth_multiplier=2)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)  # the check would run it eagerly

    assert forms.FORM_CACHE == {}  # nothing was timed while tracing
    assert layer.measured_form == ""
    kinds = [node.kind() for node in traced.graph.nodes()]
    assert "aten::expand" in kinds  # the channel repetition of the repeat form
    torch.testing.assert_close(traced(x), run_form(layer, x, "grouped"), **TOLERANCE)


def test_old_pickle_without_form_loads():
    layer = DepthwiseSeparableConv2d(4, 8, 3, padding=1, depth_multiplier=2)
    x = torch.randn(1, 4, 6, 6)
    expected = run_form(layer, x, "grouped")
    del layer.__dict__["depthwise_form"]
    del layer.__dict__["measured_form"]

    buffer = io.BytesIO()
    torch.save(layer, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    assert loaded.depthwise_form == "auto"
    torch.testing.assert_close(loaded(x), expected, **TOLERANCE)


def test_pickle_drops_measured_form():
    layer = DepthwiseSeparableConv2d(4, 8, 3, padding=1, depth_multiplier=2, depthwise_form="repeat")
    layer.measured_form = "grouped"

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    assert loaded.measured_form == ""
    assert loaded.depthwise_form == "repeat"  # a pinned or forced form is kept
    assert layer.measured_form == "grouped"
