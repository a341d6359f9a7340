"""Converted models through the deployment paths: export, ONNX, compile, channels-last, TorchScript."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convert import convert_model
from convert.forms import clear_form_cache, separable_layers, set_depthwise_form

# The converted model computed two ways (eager against exported, compiled or scripted):
# only the order of float32 additions differs, and resnet18's outputs are of order 1.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}

INPUT_SHAPE = (2, 3, 64, 64)


@pytest.fixture(autouse=True)
def empty_form_cache():
    clear_form_cache()
    yield
    clear_form_cache()


@pytest.fixture(scope="module")
def resnet18_k2() -> nn.Module:
    torch.manual_seed(0)
    return convert_model(torchvision.models.resnet18().eval(), depth_multiplier=2)


def depthwise_groups(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Return, per separable layer, its groups in the grouped form and in the repeat form."""
    return {
        name: (layer.conv_dw.in_channels, layer.conv_dw.out_channels)
        for name, layer in separable_layers(model).items()
    }


def exported_conv_groups(program: torch.export.ExportedProgram) -> list[int]:
    """Return the groups argument of every convolution in an exported graph."""
    groups = []
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.conv2d.default:
            groups.append(node.args[6] if len(node.args) > 6 else 1)
    return groups


@pytest.mark.parametrize("form", ["repeat", "grouped"])
def test_export_graph_uses_chosen_form(resnet18_k2, form):
    set_depthwise_form(resnet18_k2, form)
    x = torch.randn(INPUT_SHAPE)

    program = torch.export.export(resnet18_k2, (x,))

    groups = exported_conv_groups(program)
    expected = [grouped if form == "grouped" else repeated for grouped, repeated in depthwise_groups(resnet18_k2).values()]
    depthwise = [value for value in groups if value > 1]
    assert depthwise == expected
    assert len(groups) == 2 * 17 + 3  # 17 separable pairs, plus the three 1x1 downsample convs
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), resnet18_k2(x), **TOLERANCE)


def test_export_without_eager_run_uses_default(resnet18_k2):
    set_depthwise_form(resnet18_k2, "auto")
    for layer in separable_layers(resnet18_k2).values():
        layer.measured_form = ""

    program = torch.export.export(resnet18_k2, (torch.randn(INPUT_SHAPE),))

    repeated = [repeated for _, repeated in depthwise_groups(resnet18_k2).values()]
    assert [value for value in exported_conv_groups(program) if value > 1] == repeated


def test_export_follows_measured_form(resnet18_k2):
    set_depthwise_form(resnet18_k2, "auto")
    for layer in separable_layers(resnet18_k2).values():
        layer.measured_form = "grouped"  # as if timing had picked the grouped form everywhere

    program = torch.export.export(resnet18_k2, (torch.randn(INPUT_SHAPE),))

    grouped = [grouped for grouped, _ in depthwise_groups(resnet18_k2).values()]
    assert [value for value in exported_conv_groups(program) if value > 1] == grouped


def test_export_with_dynamic_batch(resnet18_k2):
    set_depthwise_form(resnet18_k2, "repeat")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(resnet18_k2, (torch.randn(INPUT_SHAPE),), dynamic_shapes=({0: batch},))
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), resnet18_k2(x), **TOLERANCE)


@pytest.mark.parametrize("form", ["repeat", "grouped"])
def test_onnx_matches_onnxruntime(resnet18_k2, form, tmp_path):
    onnx = pytest.importorskip("onnx", reason="install the export extra: pip install .[export]")
    onnxruntime = pytest.importorskip("onnxruntime", reason="install the export extra: pip install .[export]")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    set_depthwise_form(resnet18_k2, form)
    x = torch.randn(INPUT_SHAPE)
    path = tmp_path / "resnet18_k2.onnx"

    torch.onnx.export(resnet18_k2, (x,), path, dynamo=True, input_names=["image"], output_names=["logits"])

    graph = onnx.load(path).graph
    groups = [attribute.i for node in graph.node if node.op_type == "Conv" for attribute in node.attribute if attribute.name == "group"]
    expected = [grouped if form == "grouped" else repeated for grouped, repeated in depthwise_groups(resnet18_k2).values()]
    assert [value for value in groups if value > 1] == expected
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), resnet18_k2(x), **TOLERANCE)


class SmallNet(nn.Module):
    """Three 3x3 convs and a classifier: enough to compile quickly."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = convert_model(SmallNet().eval(), depth_multiplier=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)  # eager run: measures and records each layer's form
        torch._dynamo.reset()
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), expected, **TOLERANCE)
        torch.testing.assert_close(compiled(x * 2), model(x * 2), **TOLERANCE)


def test_channels_last_model_stays_channels_last():
    original = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
    model = convert_model(original, depth_multiplier=2)
    x = torch.randn(INPUT_SHAPE).to(memory_format=torch.channels_last)

    layers = separable_layers(model)
    assert all(layer.conv_dw.weight.is_contiguous(memory_format=torch.channels_last) for layer in layers.values())
    assert all(layer.conv_pw.weight.is_contiguous(memory_format=torch.channels_last) for layer in layers.values())
    with torch.no_grad():
        set_depthwise_form(model, "grouped")
        grouped = model(x)
        set_depthwise_form(model, "repeat")
        repeated = model(x)
        features = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        contiguous = model(x.contiguous())
    torch.testing.assert_close(repeated, grouped, **TOLERANCE)
    torch.testing.assert_close(contiguous, grouped, **TOLERANCE)
    assert features.is_contiguous(memory_format=torch.channels_last)


def test_torchscript_of_converted_resnet(resnet18_k2):
    original = torchvision.models.resnet18().eval()
    torch.jit.script(original)  # the precondition: the original scripts
    set_depthwise_form(resnet18_k2, "auto")
    x = torch.randn(INPUT_SHAPE)
    with torch.no_grad():
        eager = resnet18_k2(x)  # records the measured forms, which scripting then keeps

    scripted = torch.jit.script(resnet18_k2)

    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager, **TOLERANCE)
    for form in ("grouped", "repeat"):
        set_depthwise_form(resnet18_k2, form)
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(resnet18_k2)(x), eager, **TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_converts(dtype):
    original = torchvision.models.resnet18().eval()
    reference = convert_model(original, depth_multiplier=2)
    model = convert_model(original.to(dtype), depth_multiplier=2)
    x = torch.randn(1, 3, 64, 64)

    assert {parameter.dtype for parameter in model.parameters()} == {dtype}
    with torch.no_grad():
        output = model(x.to(dtype))
        expected = reference(x)
    assert output.dtype == dtype
    # Factors are computed in float32 and rounded once to dtype; the forward in dtype
    # then drifts by about 1% per layer over 18 layers.
    torch.testing.assert_close(output.float(), expected, rtol=0.1, atol=0.1 * float(expected.abs().max()))
