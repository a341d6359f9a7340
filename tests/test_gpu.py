"""Conversion and measurement of models that live on a CUDA device (skipped without one).

Run them, with the GPU benchmarks, through ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from convert import convert_model, run_conversion
from convert import forms
from convert.forms import clear_form_cache, pin_depthwise_forms, separable_layers, set_depthwise_form
from convert.layers import DepthwiseSeparableConv2d
from convert.measure import measure_latency

from conftest import requires_cuda, run_cli

pytestmark = [requires_cuda, pytest.mark.cuda]

# CUDA convolutions may use TF32 or other algorithms than the CPU, so float32
# results of the two devices agree to about 1e-3 relative.
DEVICE_TOLERANCE = {"rtol": 2e-3, "atol": 2e-3}


@pytest.fixture(autouse=True)
def empty_form_cache():
    clear_form_cache()
    yield
    clear_form_cache()


def test_cuda_model_stays_on_cuda():
    original = torchvision.models.resnet18().eval()
    on_cpu = convert_model(original, depth_multiplier=2)
    model = convert_model(original.cuda(), depth_multiplier=2)

    assert {parameter.device.type for parameter in model.parameters()} == {"cuda"}
    assert {buffer.device.type for buffer in model.buffers()} == {"cuda"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x.cuda()).cpu(), on_cpu(x), **DEVICE_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_converts(dtype):
    original = torchvision.models.resnet18().eval().cuda()
    reference = convert_model(original, depth_multiplier=2)
    model = convert_model(original.to(dtype), depth_multiplier=2)

    assert {parameter.dtype for parameter in model.parameters()} == {dtype}
    assert {parameter.device.type for parameter in model.parameters()} == {"cuda"}
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        output = model(x.to(dtype))
        expected = reference(x)
    assert output.dtype == dtype
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output.float(), expected, rtol=0.1, atol=0.1 * float(expected.abs().max()))


def test_cuda_forms_match():
    layer = DepthwiseSeparableConv2d(32, 64, 3, padding=1, depth_multiplier=4).cuda()
    x = torch.randn(4, 32, 20, 20, device="cuda")
    outputs = {}
    with torch.no_grad():
        for form in ("grouped", "repeat"):
            layer.depthwise_form = form
            outputs[form] = layer(x)
    torch.testing.assert_close(outputs["repeat"], outputs["grouped"], **DEVICE_TOLERANCE)


def test_cuda_auto_measures_on_device():
    model = convert_model(torchvision.models.resnet18().eval().cuda(), depth_multiplier=2)
    pinned = pin_depthwise_forms(model, torch.randn(2, 3, 64, 64, device="cuda"))
    assert set(pinned.values()) <= {"grouped", "repeat"}
    assert forms.FORM_CACHE
    assert all(key[0].startswith("cuda") for key in forms.FORM_CACHE)
    assert all(layer.depthwise_form in ("grouped", "repeat") for layer in separable_layers(model).values())


def test_cuda_latency_synchronizes(monkeypatch):
    model = convert_model(torchvision.models.resnet18().eval().cuda(), depth_multiplier=2)
    set_depthwise_form(model, "repeat")
    synchronize = torch.accelerator.synchronize
    calls = []

    def counting_synchronize(*args, **kwargs):
        calls.append(args)
        return synchronize(*args, **kwargs)

    monkeypatch.setattr(torch.accelerator, "synchronize", counting_synchronize)
    stats = measure_latency(model, torch.randn(1, 3, 64, 64, device="cuda"), min_run_time=0.05)

    assert stats.device.startswith("cuda")
    assert stats.median_ms > 0
    assert len(calls) >= 2  # the timer waits for the device before reading the clock


def test_cuda_conversion_timings_recorded():
    result = run_conversion(torchvision.models.resnet50().cuda())
    assert set(result.seconds) >= {"copy", "trace", "factorize", "swap"}
    assert all(layer.relative_error is not None for layer in result.converted)


def test_cli_convert_on_cuda(tmp_path):
    checkpoint = tmp_path / "resnet18.pt"
    output = tmp_path / "resnet18_ds.pt"
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)

    completed = run_cli(
        "convert", str(checkpoint), "--arch", "torchvision.models:resnet18",
        "-o", str(output), "--device", "cuda", "--input-shape", "2,3,64,64", "--latency-time", "0.1",
    )

    assert completed.returncode == 0, completed.stderr
    assert "on cuda" in completed.stdout
    assert output.exists()
