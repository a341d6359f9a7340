"""The JSON conversion plan: recording a converted model and rebuilding it from the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from convert import DepthwiseSeparableConv2d, apply_plan, build_plan, convert_model, load_plan
from convert.plan import ConversionPlan

# Same weights, same kernels: a rebuilt model computes exactly what the converted one does.
EXACT = {"rtol": 0.0, "atol": 0.0}


class SharedConv(nn.Module):
    """One conv registered under two names and called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.again = self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(torch.relu(self.conv(x)))


def fine_tune(model: nn.Module) -> None:
    """Stand in for training: move every floating-point tensor a little."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)


def test_plan_records_layers() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    converted = convert_model(model, depth_multiplier=2)

    plan = build_plan(converted)

    assert plan.model == "ResNet"
    assert plan.layers[0].name == "conv1"
    assert plan.layers[0].depth_multiplier == 2
    assert plan.layers[0].module == "DepthwiseSeparableConv2d"
    assert plan.layers[0].conv_type == "Conv2d"
    assert plan.layers[0].stride == (2, 2)
    assert plan.layers[0].padding == (3, 3)
    assert plan.layers[0].bias is False
    assert len(plan.layers) == sum(isinstance(module, DepthwiseSeparableConv2d) for module in converted.modules())


def test_fine_tuned_state_dict_loads_into_rebuilt_model(tmp_path: Path) -> None:
    original = torchvision.models.resnet18(num_classes=10).eval()
    converted = convert_model(original, depth_multiplier=3)
    fine_tune(converted)
    (tmp_path / "plan.json").write_text(build_plan(converted).to_json())
    torch.save(converted.state_dict(), tmp_path / "weights.pt")

    rebuilt = apply_plan(torchvision.models.resnet18(num_classes=10), tmp_path / "plan.json")
    rebuilt.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))

    example = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(example), converted(example), **EXACT)


def test_plan_json_round_trip() -> None:
    converted = convert_model(torchvision.models.resnet18(num_classes=10).eval(), depth_multiplier=2)
    plan = build_plan(converted)

    parsed = ConversionPlan.from_dict(json.loads(plan.to_json()))

    assert parsed == plan


def test_apply_plan_twice_changes_nothing() -> None:
    original = torchvision.models.resnet18(num_classes=10)
    plan = build_plan(convert_model(original.eval()))
    rebuilt = apply_plan(original, plan)
    layer = rebuilt.layer1[0].conv1

    again = apply_plan(rebuilt, plan, inplace=True)

    assert again is rebuilt
    assert again.layer1[0].conv1 is layer


def test_apply_plan_does_not_change_original() -> None:
    original = torchvision.models.resnet18(num_classes=10)
    plan = build_plan(convert_model(original.eval()))

    apply_plan(original, plan)

    assert type(original.conv1) is nn.Conv2d


def test_shared_conv_stays_shared() -> None:
    model = SharedConv().eval()
    converted = convert_model(model, depth_multiplier=2)
    plan = build_plan(converted)

    rebuilt = apply_plan(SharedConv(), plan)
    rebuilt.load_state_dict(converted.state_dict())

    assert plan.layers[0].aliases == ("again",)
    assert rebuilt.conv is rebuilt.again
    example = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(example), converted(example), **EXACT)


def test_root_conv_is_replaced() -> None:
    conv = nn.Conv2d(4, 8, 3)
    plan = build_plan(convert_model(conv, depth_multiplier=2))

    rebuilt = apply_plan(nn.Conv2d(4, 8, 3), plan)

    assert isinstance(rebuilt, DepthwiseSeparableConv2d)
    assert rebuilt.depth_multiplier == 2


def test_apply_plan_keeps_dtype_and_mode() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU())
    plan = build_plan(convert_model(model.eval()))

    rebuilt = apply_plan(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU()).double().train(), plan)

    assert rebuilt[0].conv_dw.weight.dtype == torch.float64
    assert rebuilt[0].training


@pytest.mark.parametrize("dimensions", [1, 3])
def test_plan_for_conv1d_and_conv3d(dimensions: int) -> None:
    conv_type = {1: nn.Conv1d, 3: nn.Conv3d}[dimensions]
    model = nn.Sequential(conv_type(4, 8, 3, padding=1, dilation=1, padding_mode="reflect"))
    converted = convert_model(model.eval(), depth_multiplier=2)

    rebuilt = apply_plan(nn.Sequential(conv_type(4, 8, 3, padding=1, padding_mode="reflect")), build_plan(converted))
    rebuilt.load_state_dict(converted.state_dict())

    example = torch.randn(1, 4, *([5] * dimensions))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(example), converted(example), **EXACT)


def test_geometry_mismatch_names_layer_and_field() -> None:
    plan = build_plan(convert_model(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2)).eval()))

    with pytest.raises(ValueError, match=r"layer '0' does not match the plan: stride=\(1, 1\) \(plan: \(2, 2\)\)"):
        apply_plan(nn.Sequential(nn.Conv2d(4, 8, 3)), plan)


def test_missing_layer_is_reported() -> None:
    plan = build_plan(convert_model(nn.Sequential(nn.Conv2d(4, 8, 3)).eval()))

    with pytest.raises(ValueError, match="layer '0' of the plan is not in Module"):
        apply_plan(nn.Module(), plan)


def test_other_conv_type_is_reported() -> None:
    plan = build_plan(convert_model(nn.Sequential(nn.Conv2d(4, 8, 3)).eval()))

    with pytest.raises(ValueError, match="layer '0' is a Linear in this model, but the plan converted a Conv2d"):
        apply_plan(nn.Sequential(nn.Linear(4, 8)), plan)


def test_alias_mismatch_is_reported() -> None:
    plan = build_plan(convert_model(SharedConv().eval()))
    unshared = SharedConv()
    unshared.again = nn.Conv2d(8, 8, 3, padding=1)

    with pytest.raises(ValueError, match="lists 'again' as another name of it"):
        apply_plan(unshared, plan)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "something-else"}, "not a dsconv conversion plan"),
        ({"version": 99}, "plan version 99 is not supported"),
        ({"layers": "conv1"}, "the plan has no list of layers"),
        ({"layers": [{"name": "conv1"}]}, "layer 'conv1': field 'conv_type' is missing"),
        ({"layers": [{"name": "a", "conv_type": "Conv4d"}]}, "conv_type='Conv4d' is not one of"),
    ],
)
def test_malformed_plan_is_rejected(change: dict, message: str) -> None:
    data = json.loads(build_plan(convert_model(nn.Sequential(nn.Conv2d(4, 8, 3)).eval())).to_json())
    data.update(change)

    with pytest.raises(ValueError, match=message):
        ConversionPlan.from_dict(data)


def test_zero_depth_multiplier_is_rejected() -> None:
    data = json.loads(build_plan(convert_model(nn.Sequential(nn.Conv2d(4, 8, 3)).eval())).to_json())
    data["layers"][0]["depth_multiplier"] = 0

    with pytest.raises(ValueError, match="depth_multiplier=0: must be >= 1"):
        ConversionPlan.from_dict(data)


def test_load_plan_reports_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("{not json")

    with pytest.raises(ValueError, match=f"plan file {path} is not valid JSON"):
        load_plan(path)
