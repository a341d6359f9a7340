"""Models that do not trace, convs that need care, and per-layer configuration."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrizations

from convert import DepthwiseSeparableConv1d, DepthwiseSeparableConv2d, DepthwiseSeparableConv3d, DepthwiseSeparableConvNd, UsageError, convert_model, inspect_model, run_conversion
from convert.config import LayerConfig, load_config
from convert.effective import SamePadConv2d
from convert.forms import set_depthwise_form
from convert.measure import count_parameters

EXACT = {"rtol": 1e-4, "atol": 1e-5}
FULL = {"depth_multiplier": 10_000, "allow_larger": True}


def conv_stack() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


def converted_names(result) -> list[str]:
    return [layer.name for layer in result.converted]


# --- models that do not trace -------------------------------------------------------------


class UnpacksShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, *rest = x.shape  # a variable number of names
        return self.body(x).reshape(batch, -1)


class LoopsOverTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.body(sample[None])[0] for sample in x])


class AssertsOnShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3, "expects RGB"
        return self.body(x)


class CallsInt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = int(x.shape[-1])
        return F.interpolate(self.body(x), size=size * 2)


class VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_stack()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return sum(self.body(x) for x in args)


class BuildsLayerInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = conv_stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = nn.Identity()  # a module created during forward is not a registered submodule
        return head(self.body(x))


UNTRACEABLE = [UnpacksShape, LoopsOverTensor, AssertsOnShape, CallsInt, VarArgs, BuildsLayerInForward]


@pytest.mark.parametrize("model_type", UNTRACEABLE, ids=lambda t: t.__name__)
def test_untraceable_model_falls_back_to_swap(model_type):
    model = model_type().eval()
    traced_reference = run_conversion(model.body)
    result = run_conversion(model)
    if result.path == "fx":
        pytest.fail(f"{model_type.__name__} was expected not to trace")
    assert result.trace_error is not None
    assert "\n" not in result.trace_error
    assert converted_names(result) == [f"body.{name}" for name in converted_names(traced_reference)]
    # the root's own forward could read a conv's weight directly, and that cannot be checked
    notes = {layer.plan.note for layer in result.converted}
    assert notes == {"direct reads of its parameters were not checked because the model's forward could not be traced"}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert result.model(x).shape == model(x).shape


def test_fallback_converts_same_layers_as_fx():
    model = AssertsOnShape().eval()
    forced_swap = run_conversion(model, tracing="swap")
    assert forced_swap.path == "swap"
    assert forced_swap.trace_error is None
    assert converted_names(forced_swap) == converted_names(run_conversion(model))


def test_fallback_flags_unchecked_reads():
    class DirectRead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not traceable
                return self.conv(x)
            return F.conv2d(x, self.conv.weight, padding=1)

    result = run_conversion(DirectRead())
    assert result.path == "swap"
    assert result.layers[0].plan.note == "direct reads of its parameters were not checked because the model's forward could not be traced"


def scale_if_wide(x: torch.Tensor) -> torch.Tensor:
    """Branches on a shape, so the tracer must record it as a call (autowrap_functions)."""
    return x * 2 if x.shape[-1] > 1 else x


def test_leaf_module_and_wrapped_function_make_model_trace():
    class UsesHelper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = AssertsOnShape()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(scale_if_wide(self.block(x)))

    model = UsesHelper().eval()
    assert run_conversion(model).path == "swap"
    result = run_conversion(model, leaf_modules=(AssertsOnShape,), autowrap_functions=(scale_if_wide,))
    assert result.path == "fx", result.trace_error
    assert converted_names(result) == ["block.body.0", "block.body.2", "conv"]
    by_name = run_conversion(model, leaf_modules=("block",), autowrap_functions=(scale_if_wide,))
    assert by_name.path == "fx", by_name.trace_error


def test_concrete_args_make_model_trace():
    class Flag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x, flip: bool = False):
            return self.conv(x.flip(-1) if flip else x)

    assert run_conversion(Flag()).path == "swap"
    assert run_conversion(Flag(), concrete_args={"flip": False}).path == "fx"


def test_data_parallel_names_without_prefix():
    model = nn.DataParallel(conv_stack())
    result = run_conversion(model)
    assert converted_names(result) == ["0", "2"]
    assert isinstance(result.model, nn.DataParallel)
    assert isinstance(result.model.module[0], DepthwiseSeparableConv2d)
    plans, _ = inspect_model(model)
    assert [plan.name for plan in plans] == ["0", "2"]


def test_bare_conv_as_model():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    result = run_conversion(conv, **FULL)
    assert isinstance(result.model, DepthwiseSeparableConv2d)
    assert converted_names(result) == [""]
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(result.model(x), conv(x), **EXACT)
    assert type(conv) is nn.Conv2d


def test_model_with_nothing_to_convert():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Linear(8, 2))
    result = run_conversion(model)
    assert result.converted == []
    assert result.skipped[0].plan.reason == "kernel is 1x1: already a pointwise conv"
    x = torch.randn(1, 8, 3, 3).permute(0, 2, 3, 1)
    torch.testing.assert_close(result.model[2](x), model[2](x), rtol=0, atol=0)
    from convert.report import build_report, render_report

    report = build_report(model[:2], run_conversion(model[:2]), torch.randn(1, 3, 4, 4), latency=False)
    assert "nothing was converted: the model is returned unchanged" in render_report(report)


# --- keep the model what it was ------------------------------------------------------------


def test_inception_aux_branch_converted_in_train_mode():
    model = torchvision.models.inception_v3(init_weights=False, aux_logits=True).eval()
    result = run_conversion(model)
    names = converted_names(result)
    assert any(name.startswith("AuxLogits.") for name in names), "the auxiliary branch only runs in train mode"
    converted = result.model
    assert isinstance(converted.AuxLogits.conv0.conv, DepthwiseSeparableConvNd) or isinstance(converted.AuxLogits.conv1.conv, DepthwiseSeparableConvNd)
    converted.train()
    output = converted(torch.randn(2, 3, 299, 299))  # the auxiliary head needs the full input size
    assert output.logits.shape == (2, 1000)
    assert output.aux_logits.shape == (2, 1000)
    converted.eval()
    assert converted(torch.randn(1, 3, 80, 80)).shape == (1, 1000)


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "regnetx_002"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_timm_model_keeps_methods_and_attributes(name, mode, tmp_path):
    model = timm.create_model(name, pretrained=False, num_classes=7)
    model.train(mode == "train")
    result = run_conversion(model)
    converted = result.model
    assert result.converted
    assert type(converted) is type(model)
    assert converted.training == (mode == "train")
    assert converted.num_classes == 7
    assert converted.pretrained_cfg == model.pretrained_cfg
    x = torch.randn(2, 3, 64, 64)
    assert converted.forward_features(x).shape == model.forward_features(x).shape
    converted.reset_classifier(3)
    assert converted(x).shape == (2, 3)

    # fine-tuning step: every converted parameter gets a gradient
    converted.train()
    converted(x).sum().backward()
    separable = [module for module in converted.modules() if isinstance(module, DepthwiseSeparableConvNd)]
    assert all(module.conv_dw.weight.grad is not None for module in separable)

    path = tmp_path / "model.pt"
    torch.save(converted, path)
    restored = torch.load(path, weights_only=False)
    assert type(restored) is type(model)
    restored.eval()
    converted.eval()
    torch.testing.assert_close(restored(x), converted(x))


def test_timm_leaf_module_convs_found():
    # timm registers BatchNormAct2d and others as not traceable; convs inside user leaf modules
    # must still be found from the module tree.
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x).relu()

    timm.layers.register_notrace_module(Block)
    model = nn.Sequential(Block(), nn.Conv2d(8, 8, 3))
    result = run_conversion(model)
    assert result.path == "fx"
    assert converted_names(result) == ["0.conv", "1"]
    graph_module = convert_model(model, graph_module=True)
    assert "0" in {node.target for node in graph_module.graph.nodes if node.op == "call_module"}


def test_user_leaf_module_with_direct_read_is_checked():
    class ReadsInside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + F.conv2d(x, self.conv.weight, padding=1)

    model = nn.Sequential(ReadsInside())
    result = run_conversion(model, leaf_modules=(ReadsInside,))
    assert result.layers[0].plan.reason == "its parameters are read directly by the forward (0.conv.weight), so the module cannot be swapped"


# --- convs that need care ------------------------------------------------------------------


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.again = self.conv

    def forward(self, x):
        return self.again(self.conv(self.conv(x)))


def test_shared_conv_converted_once_everywhere():
    model = CalledTwice().eval()
    result = run_conversion(model, **FULL)
    assert len(result.layers) == 1
    assert result.model.conv is result.model.again
    assert count_parameters(result.model) == result.layers[0].plan.params_after
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(result.model(x), model(x), **EXACT)
    graph_module = convert_model(model, graph_module=True, **FULL)
    calls = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
    assert len(calls) == 3
    assert all(isinstance(graph_module.get_submodule(target), DepthwiseSeparableConv2d) for target in calls)


def test_weight_read_leaves_no_dangling_reference():
    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + F.conv2d(x, self.conv.weight, padding=1)

    model = Reads().eval()
    graph_module = convert_model(model, graph_module=True, **FULL)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(graph_module(x), model(x))
    assert type(graph_module.conv) is nn.Conv2d


class StdConv(nn.Conv2d):
    """Weight standardization, as in BiT and timm's StdConv2d."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DoubleConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + super().forward(x.flip(-1))


def test_conv_subclass_skipped_by_default():
    result = run_conversion(nn.Sequential(StdConv(3, 8, 3)))
    assert result.layers[0].plan.reason.startswith("StdConv subclasses Conv2d and may override forward")


@pytest.mark.parametrize(
    "conv",
    [
        StdConv(3, 8, 3, padding=1),
        timm.layers.StdConv2d(3, 8, 3, stride=2, padding=1),
        timm.layers.ScaledStdConv2d(3, 8, 3, padding=1),
        timm.layers.Conv2dSame(3, 8, 3, stride=2),
        timm.layers.StdConv2dSame(3, 8, 5, stride=2),
    ],
    ids=["std", "timm-std", "timm-scaled-std", "timm-same", "timm-std-same"],
)
def test_conv_subclass_converted_exactly_on_request(conv):
    model = nn.Sequential(conv).eval()
    result = run_conversion(model, convert_subclasses=True, **FULL)
    plan = result.layers[0].plan
    assert plan.converted, plan.reason
    assert plan.effective.startswith(f"effective weight of {type(conv).__name__}")
    for form in ("grouped", "repeat", "auto"):  # every depthwise form must keep the dynamic padding
        set_depthwise_form(result.model, form)
        for size in (9, 12):  # odd and even sizes exercise the dynamic padding
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(result.model(x), model(x), **EXACT)
    if "Same" in type(conv).__name__:
        assert isinstance(result.model[0].conv_dw, SamePadConv2d)
        assert plan.effective.endswith("with dynamic 'same' padding")


def test_conv_subclass_that_is_not_one_conv_stays():
    result = run_conversion(nn.Sequential(DoubleConv(3, 8, 3)), convert_subclasses=True)
    assert result.layers[0].plan.reason == "DoubleConv cannot be converted exactly: its forward makes 2 conv calls per input instead of one"


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_exact_at_full_rank(groups):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, groups=groups, padding=1)).eval()
    result = run_conversion(model, **FULL)
    layer = result.model[0]
    assert layer.conv_dw.groups == 8
    assert layer.conv_pw.groups == groups
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(result.model(x), model(x), **EXACT)


def test_depthwise_conv_with_multiplier_skipped():
    result = run_conversion(nn.Sequential(nn.Conv2d(8, 16, 3, groups=8)))
    assert result.layers[0].plan.reason == "already depthwise (groups == in_channels)"


PARAMETRIZATIONS = {
    "weight_norm": lambda conv: parametrizations.weight_norm(conv),
    "spectral_norm": lambda conv: parametrizations.spectral_norm(conv),
    "old_weight_norm": lambda conv: torch.nn.utils.weight_norm(conv),
    "old_spectral_norm": lambda conv: torch.nn.utils.spectral_norm(conv),
}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", PARAMETRIZATIONS)
def test_parametrized_weight_skipped_then_converted(kind):
    model = nn.Sequential(PARAMETRIZATIONS[kind](nn.Conv2d(4, 8, 3, padding=1))).eval()
    skipped = run_conversion(model)
    reason = skipped.layers[0].plan.reason
    assert reason.startswith("its weight is reparametrized (")
    assert "pass convert_parametrized=True (--convert-parametrized)" in reason
    converted = run_conversion(model, convert_parametrized=True, **FULL)
    assert converted.layers[0].plan.converted, converted.layers[0].plan.reason
    assert type(converted.model[0]) is DepthwiseSeparableConv2d
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted.model(x), model(x), **EXACT)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_old_weight_norm_model_copies_without_crash():
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(4, 8, 3)))
    model(torch.randn(1, 4, 5, 5)).sum().backward()  # the computed weight now has autograd history
    result = run_conversion(model)
    assert result.layers[0].plan.reason.startswith("its weight is reparametrized (weight_norm)")


def test_conv_with_forward_hook_left_alone():
    model = conv_stack()
    model[0].register_forward_hook(lambda module, inputs, output: None)
    result = run_conversion(model)
    assert result.layers[0].plan.reason == "it has 1 forward hook(s), which a replacement module would drop"
    assert result.layers[1].plan.converted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_converts_on_cpu(dtype):
    model = conv_stack().eval()
    low = copy.deepcopy(model).to(dtype)
    result = run_conversion(low, **FULL)
    for module in result.model.modules():
        if isinstance(module, DepthwiseSeparableConv2d):
            assert module.conv_dw.weight.dtype == dtype
            assert module.conv_pw.weight.dtype == dtype
    x = torch.randn(1, 3, 6, 6)
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(result.model(x.to(dtype)).float(), model(x), rtol=tolerance, atol=tolerance)


def test_channels_last_model_keeps_layout():
    model = conv_stack().to(memory_format=torch.channels_last)
    result = run_conversion(model)
    assert result.model[0].conv_dw.weight.is_contiguous(memory_format=torch.channels_last)


def test_conv1d_and_conv3d_models():
    model1d = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3)).eval()
    result1d = run_conversion(model1d, **FULL)
    assert isinstance(result1d.model[0], DepthwiseSeparableConv1d)
    x = torch.randn(2, 4, 20)
    torch.testing.assert_close(result1d.model(x), model1d(x), **EXACT)

    video = torchvision.models.video.r2plus1d_18().eval()
    result3d = run_conversion(video)
    assert any(isinstance(module, DepthwiseSeparableConv3d) for module in result3d.model.modules())
    assert result3d.model(torch.randn(1, 3, 4, 32, 32)).shape == (1, 400)


# --- per-layer configuration ---------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
        self.layer2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
        self.audio = nn.Conv1d(4, 8, 5)

    def forward(self, x, y):
        return self.layer2(self.layer1(self.stem(x))), self.audio(y)


def multipliers(result) -> dict[str, int | None]:
    return {layer.name: layer.plan.depth_multiplier for layer in result.layers}


def test_config_priority_order():
    config = (
        LayerConfig()
        .set_global(2)
        .set_module_type(nn.Conv1d, None)
        .set_name_pattern(r"layer2\..*", 3)
        .set_name("layer2.1", 1)
        .set_name("stem", None)
    )
    result = run_conversion(Mixed(), config=config)
    assert multipliers(result) == {"stem": None, "layer1.0": 2, "layer1.1": 2, "layer2.0": 3, "layer2.1": 1, "audio": None}
    sources = {layer.name: layer.plan.setting_source for layer in result.layers}
    assert sources == {
        "stem": "name 'stem'",
        "layer1.0": "global",
        "layer1.1": "global",
        "layer2.0": r"name pattern 'layer2\\..*'",
        "layer2.1": "name 'layer2.1'",
        "audio": "module type Conv1d",
    }
    reasons = {layer.name: layer.plan.reason for layer in result.skipped}
    assert reasons == {"stem": "left alone by the config (name 'stem')", "audio": "left alone by the config (module type Conv1d)"}


def test_config_without_global_uses_depth_multiplier():
    result = run_conversion(Mixed(), depth_multiplier=2, config=LayerConfig().set_name("stem", 1))
    assert multipliers(result)["layer1.0"] == 2
    assert multipliers(result)["stem"] == 1


def test_config_module_type_is_exact():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 8, 3), nn.Conv2d(8, 8, 3))
    result = run_conversion(model, config=LayerConfig().set_module_type(nn.Conv2d, None))
    assert result.layers[0].plan.reason.startswith("MyConv subclasses Conv2d")
    assert result.layers[1].plan.reason == "left alone by the config (module type Conv2d)"


def test_config_unknown_name_points_to_listing():
    with pytest.raises(UsageError, match=r"not convs of this model: layer9; list the convs and their names with `dsconv inspect INPUT`"):
        run_conversion(Mixed(), config=LayerConfig().set_name("layer9", 2))
    with pytest.raises(UsageError, match=r"name patterns match no conv of this model: head\\..\*"):
        run_conversion(Mixed(), config=LayerConfig().set_name_pattern(r"head\..*", 2))


@pytest.mark.parametrize(
    "data,message",
    [
        ({"global": 0}, "config entry 'global': depth_multiplier=0: must be >= 1, or null to leave the layer alone"),
        ({"name": {"stem": "two"}}, "config entry 'stem': depth_multiplier='two': must be an int"),
        ({"name_pattern": {"(": 1}}, "name pattern '(' is not a valid regular expression"),
        ({"module_type": {"torch.nn.NoSuchConv": 1}}, "config module type 'torch.nn.NoSuchConv' cannot be imported"),
        ({"module_type": {"json.dumps": 1}}, "config module type 'json.dumps' is not an nn.Module class"),
        ({"layers": {}}, "unknown config keys: layers; use global, module_type, name_pattern, name"),
        ({"name": ["stem"]}, "config key 'name' must map names to depth multipliers or null, not list"),
    ],
)
def test_config_rejects_bad_values(data, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        LayerConfig.from_dict(data)


def test_config_file_round_trip(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"global": 2, "module_type": {"torch.nn.Conv1d": None}, "name_pattern": {"layer2\\..*": 3}, "name": {"stem": None}}))
    result = run_conversion(Mixed(), config=load_config(path))
    assert multipliers(result) == {"stem": None, "layer1.0": 2, "layer1.1": 2, "layer2.0": 3, "layer2.1": 3, "audio": None}


def test_config_file_errors(tmp_path):
    with pytest.raises(UsageError, match="config file .* not found"):
        load_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UsageError, match="is not valid JSON"):
        load_config(broken)


def test_converted_model_pickles_with_parametrized_and_hooks_removed():
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(4, 8, 3)))
    converted = convert_model(model, convert_parametrized=True)
    restored = pickle.loads(pickle.dumps(converted))
    assert isinstance(restored[0], DepthwiseSeparableConv2d)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_converts_on_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = conv_stack().eval()
    low = copy.deepcopy(model).to(device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    result = run_conversion(low, **FULL)
    layer = result.model[0]
    assert layer.conv_dw.weight.is_cuda
    assert layer.conv_dw.weight.dtype == dtype
    assert layer.conv_dw.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 6, 6)
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    actual = result.model(x.to(device="cuda", dtype=dtype)).float().cpu()
    torch.testing.assert_close(actual, model(x), rtol=tolerance, atol=tolerance)


def test_plan_rebuilds_converted_subclasses():
    from convert import apply_plan, build_plan

    def fresh() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(timm.layers.Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), parametrizations.weight_norm(nn.Conv2d(8, 8, 3))).eval()

    converted = convert_model(fresh(), convert_subclasses=True, convert_parametrized=True, depth_multiplier=2)
    plan = build_plan(converted)
    assert [layer.same_padding for layer in plan.layers] == [True, False]

    rebuilt = apply_plan(fresh(), json.loads(plan.to_json()))
    assert isinstance(rebuilt[0].conv_dw, SamePadConv2d)
    rebuilt.load_state_dict(converted.state_dict())
    x = torch.randn(1, 3, 11, 11)
    torch.testing.assert_close(rebuilt(x), converted(x))


def test_energy_rank_uses_effective_weight():
    from convert.factorize import channel_spectra

    def energy_rank(weight: torch.Tensor) -> int:
        energies = channel_spectra(weight).pow(2)
        shares = energies.cumsum(1) / energies.sum(1, keepdim=True)
        return int((shares < 0.9 - 1e-9).sum(1).max()) + 1  # smallest K meeting 0.9 in every channel

    # weight standardization rescales each output row, so the spectrum of the effective weight differs
    conv = StdConv(4, 64, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-2, 2, 64).reshape(64, 1, 1, 1))
    effective_weight = F.batch_norm(conv.weight.reshape(1, 64, -1), None, None, training=True, momentum=0.0, eps=1e-6).reshape_as(conv.weight)
    expected = energy_rank(effective_weight.detach())
    assert expected != energy_rank(conv.weight.detach()), "the test needs spectra that differ"

    result = run_conversion(nn.Sequential(conv).eval(), convert_subclasses=True, rank="energy", energy=0.9, allow_larger=True)
    assert result.layers[0].plan.depth_multiplier == expected
