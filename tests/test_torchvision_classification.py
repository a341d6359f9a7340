"""Torchvision classifiers converted at full multiplier match the original.

The conversion sweep over every torchvision model is in test_torchvision_sweep.py.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convert import run_conversion
from convert.measure import compare_outputs

from conftest import requires_cuda

CLASSIFICATION = torchvision.models.list_models(module=torchvision.models)

# Models that need more than the default 64x64 input, or constructor arguments for a small one.
INPUT_SIZE = {"inception_v3": 80, "maxvit_t": 224}
FACTORY_ARGUMENTS = {name: {"image_size": 64} for name in CLASSIFICATION if name.startswith("vit_") and "_14" not in name}
FACTORY_ARGUMENTS.update({name: {"image_size": 56} for name in CLASSIFICATION if name.startswith("vit_") and "_14" in name})
# GoogLeNet and Inception v3 warn that their default init will change; pass it explicitly.
FACTORY_ARGUMENTS.update({"googlenet": {"init_weights": False}, "inception_v3": {"init_weights": False}})


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    arguments = FACTORY_ARGUMENTS.get(name, {})
    model = torchvision.models.get_model(name, **arguments).eval()
    size = arguments.get("image_size", INPUT_SIZE.get(name, 64))
    return model, torch.randn(1, 3, size, size)


def outputs(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(example_input)


EXACT_MODELS = ["resnet18", "mobilenet_v2", "vgg11_bn", "regnet_x_400mf", "densenet121", "convnext_tiny", "efficientnet_b0"]


@pytest.mark.parametrize("name", EXACT_MODELS)
def test_full_multiplier_matches_original(name):
    model, example_input = build(name)
    result = run_conversion(model, depth_multiplier=10_000, allow_larger=True)
    difference = compare_outputs(outputs(model, example_input), outputs(result.model, example_input))
    assert difference.max_relative < 1e-4, difference


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "convnext_tiny", "regnet_y_400mf"])
def test_classification_model_converts_on_cuda(name):
    model, example_input = build(name)
    model, example_input = model.cuda(), example_input.cuda()
    result = run_conversion(model, depth_multiplier=10_000, allow_larger=True)
    assert all(parameter.is_cuda for parameter in result.model.parameters())
    difference = compare_outputs(outputs(model, example_input), outputs(result.model, example_input))
    assert difference.max_relative < 1e-3, difference  # TF32 and cuDNN algorithm choice loosen float32 round-off
