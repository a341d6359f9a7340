"""Data-aware initialization: output errors, the guarantee against weight SVD, streaming, inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import convert
from convert.calibration import load_calibration_batches
from convert.errors import CheckpointError, UsageError


def correlated_images(count: int, channels: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Spatially smooth noise with mixed channels: neighbouring pixels and channels are correlated."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, channels, size, size, generator=generator)
    smooth = F.avg_pool2d(noise, 5, stride=1, padding=2)
    mixing = torch.eye(channels) + 0.3 * torch.randn(channels, channels, generator=generator)
    return torch.einsum("dc,nchw->ndhw", mixing, smooth)


def three_convs(channels: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
    )


def output_errors_by_hand(original: nn.Module, converted: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, float]:
    """Relative error of each layer's output in ``converted`` against the same layer's output in ``original``."""
    errors = {}
    for name in names:
        captured: dict[str, list[torch.Tensor]] = {"original": [], "converted": []}
        handles = [
            original.get_submodule(name).register_forward_hook(lambda m, i, o: captured["original"].append(o)),
            converted.get_submodule(name).register_forward_hook(lambda m, i, o: captured["converted"].append(o)),
        ]
        with torch.no_grad():
            for batch in batches:
                original(batch)
                converted(batch)
        for handle in handles:
            handle.remove()
        expected = torch.cat(captured["original"]).double()
        produced = torch.cat(captured["converted"]).double()
        errors[name] = float((produced - expected).norm() / expected.norm())
    return errors


# --- the guarantee against weight SVD -------------------------------------------------


@pytest.mark.parametrize("multiplier", [1, 2, 4])
def test_data_init_beats_svd_on_correlated_input(multiplier: int) -> None:
    model = three_convs()
    batches = list(correlated_images(64).split(16))

    svd = convert.run_conversion(model, depth_multiplier=multiplier, init="svd", calibration_data=batches)
    data = convert.run_conversion(model, depth_multiplier=multiplier, init="data", calibration_data=batches)

    for svd_layer, data_layer in zip(svd.layers, data.layers):
        assert data_layer.init == "data"
        assert data_layer.output_error <= data_layer.svd_output_error
        # clearly lower: at most three quarters of the weight-SVD error of the svd-converted model
        assert data_layer.output_error <= 0.75 * svd_layer.output_error, data_layer.name

    # the first layer gets the same input in both runs, so the svd figures agree exactly
    torch.testing.assert_close(data.layers[0].svd_output_error, svd.layers[0].output_error, rtol=1e-6, atol=0)


def test_data_init_not_worse_on_white_noise() -> None:
    model = three_convs()
    batches = list(torch.randn(64, 8, 16, 16).split(16))

    svd = convert.run_conversion(model, depth_multiplier=2, init="svd", calibration_data=batches)
    data = convert.run_conversion(model, depth_multiplier=2, init="data", calibration_data=batches)

    for svd_layer, data_layer in zip(svd.layers, data.layers):
        assert data_layer.output_error <= data_layer.svd_output_error
        assert data_layer.output_error <= svd_layer.output_error + 1e-6, data_layer.name


def test_reported_errors_match_hand_computation() -> None:
    model = three_convs()
    batches = list(correlated_images(32).split(8))
    names = ["0", "2", "4"]

    data = convert.run_conversion(model, depth_multiplier=2, init="data", calibration_data=batches)
    svd = convert.run_conversion(model, depth_multiplier=2, init="svd", calibration_data=batches)

    # the fit computes its error from float64 moments, the hand check from the layers' float32 outputs
    for result in (data, svd):
        by_hand = output_errors_by_hand(model, result.model, names, batches)
        for layer in result.layers:
            torch.testing.assert_close(layer.output_error, by_hand[layer.name], rtol=1e-4, atol=1e-6)


def test_full_rank_data_init_is_exact() -> None:
    model = three_convs()
    batches = list(correlated_images(16).split(8))
    data = convert.run_conversion(model, depth_multiplier=9, init="data", calibration_data=batches, allow_larger=True)

    for layer in data.layers:
        assert layer.output_error < 1e-3, layer.name
    with torch.no_grad():
        torch.testing.assert_close(data.model(batches[0]), model(batches[0]), rtol=1e-3, atol=1e-3)


def test_svd_kept_when_it_is_better(monkeypatch: pytest.MonkeyPatch) -> None:
    import convert.calibration as calibration

    def zero_pointwise(moments: calibration.PointwiseMoments) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        # a fitted layer that outputs zeros: its squared error is the whole output energy
        weights = torch.zeros_like(moments.cross[..., : moments.cross.shape[-1] - int(moments.bias)])
        bias = torch.zeros(moments.cross.shape[0] * moments.cross.shape[1], dtype=torch.float64) if moments.bias else None
        return weights, bias, moments.target_energy

    monkeypatch.setattr(calibration, "fit_pointwise", zero_pointwise)
    model = three_convs()
    batches = list(correlated_images(16).split(8))
    data = convert.run_conversion(model, depth_multiplier=2, init="data", calibration_data=batches)
    svd = convert.run_conversion(model, depth_multiplier=2, init="svd")

    for layer in data.layers:
        assert layer.init == "svd"
        assert layer.output_error == layer.svd_output_error
        assert "weight SVD had the lower output error" in layer.note
        torch.testing.assert_close(data.model.get_submodule(layer.name).conv_pw.weight, svd.model.get_submodule(layer.name).conv_pw.weight)
        torch.testing.assert_close(data.model.get_submodule(layer.name).conv_dw.weight, svd.model.get_submodule(layer.name).conv_dw.weight)


# --- layer shapes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conv", "input_shape"),
    [
        (nn.Conv2d(8, 16, 3, stride=2, padding=1), (4, 8, 15, 15)),
        (nn.Conv2d(8, 16, 3, dilation=2, padding=2, bias=False), (4, 8, 12, 12)),
        (nn.Conv2d(8, 16, 3, groups=4, padding=1), (4, 8, 12, 12)),
        (nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), (4, 8, 12, 12)),
        (nn.Conv2d(8, 16, 3, padding=1, padding_mode="circular"), (4, 8, 12, 12)),
        (nn.Conv2d(8, 16, (3, 5), padding="same"), (4, 8, 12, 12)),
        (nn.Conv1d(6, 12, 5, padding=2), (4, 6, 40)),
        (nn.Conv3d(4, 8, 3, padding=1), (2, 4, 6, 6, 6)),
    ],
    ids=["stride", "dilation-nobias", "groups", "reflect", "circular", "same-3x5", "conv1d", "conv3d"],
)
def test_data_init_on_conv_variants(conv: nn.modules.conv._ConvNd, input_shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(1)
    raw = torch.randn(input_shape, generator=generator)
    # correlate neighbouring positions along the last axis
    inputs = raw + torch.roll(raw, 1, dims=-1) + torch.roll(raw, 2, dims=-1)
    batches = list(inputs.split(2))

    data = convert.run_conversion(conv, depth_multiplier=2, init="data", calibration_data=batches)
    svd = convert.run_conversion(conv, depth_multiplier=2, init="svd", calibration_data=batches)

    layer = data.layers[0]
    assert layer.plan.converted
    assert layer.output_error <= layer.svd_output_error
    assert layer.output_error < svd.layers[0].output_error
    by_hand = output_errors_by_hand(conv, data.model, [""], batches)
    torch.testing.assert_close(layer.output_error, by_hand[""], rtol=1e-4, atol=1e-6)
    assert data.model.conv_pw.groups == conv.groups
    assert (data.model.bias is None) == (conv.bias is None)


class SharedConv(nn.Module):
    """One conv applied twice, a conv in a branch that never runs, and a batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.never = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.stem(x)))
        return self.shared(torch.relu(self.shared(x)))


def test_shared_and_unused_convs() -> None:
    model = SharedConv()
    batches = list(correlated_images(16, channels=4).split(8))

    with pytest.warns(UserWarning, match="1 planned conv.* never ran on the calibration data.*: never"):
        data = convert.run_conversion(model, depth_multiplier=2, init="data", calibration_data=batches)
    layers = {layer.name: layer for layer in data.layers}

    assert layers["shared"].init == "data"
    assert layers["shared"].output_error <= layers["shared"].svd_output_error
    assert layers["never"].init == "svd"
    assert layers["never"].output_error is None
    assert "not called on the calibration data" in layers["never"].note
    assert isinstance(data.model.never, convert.DepthwiseSeparableConv2d)


def test_modes_and_original_are_untouched() -> None:
    model = SharedConv()
    model.train()
    model.norm.eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    batches = list(correlated_images(16, channels=4).split(8))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = convert.run_conversion(model, depth_multiplier=2, init="data", calibration_data=batches)

    # the caller's model: same weights, same running statistics, same modes
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert model.training and not model.norm.eval().training
    assert model.stem.training
    # the converted model keeps the modes of the layers it replaced
    assert data.model.training
    assert not data.model.norm.training
    assert data.model.stem.training and data.model.stem.conv_dw.training


def test_inplace_data_init() -> None:
    model = three_convs()
    batches = list(correlated_images(16).split(8))
    expected = convert.run_conversion(model, depth_multiplier=2, init="data", calibration_data=batches)

    converted = convert.convert_model(model, depth_multiplier=2, init="data", calibration_data=batches, inplace=True)

    assert converted is model
    for name in ("0", "2", "4"):
        torch.testing.assert_close(
            converted.get_submodule(name).conv_pw.weight, expected.model.get_submodule(name).conv_pw.weight, rtol=1e-5, atol=1e-6
        )


def test_graph_module_with_data_init() -> None:
    model = three_convs()
    batches = list(correlated_images(16).split(8))
    module = convert.convert_model(model, depth_multiplier=2, init="data", calibration_data=batches, graph_module=True)

    assert isinstance(module, torch.fx.GraphModule)
    reference = convert.convert_model(model, depth_multiplier=2, init="data", calibration_data=batches)
    with torch.no_grad():
        torch.testing.assert_close(module(batches[0]), reference(batches[0]))


def test_torchvision_resnet_data_init() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    model.layer3 = nn.Identity()
    model.layer4 = nn.Identity()
    model.fc = nn.Linear(128, 10)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]

    data = convert.run_conversion(model, rank="budget", budget=0.4, init="data", calibration_data=batches)

    assert len(data.converted) >= 5
    for layer in data.converted:
        assert layer.output_error is not None
        assert layer.output_error <= layer.svd_output_error, layer.name
    with torch.no_grad():
        assert torch.isfinite(data.model(batches[0])).all()


# --- streaming and input forms ----------------------------------------------------------


def test_batching_does_not_change_fit() -> None:
    model = three_convs()
    images = correlated_images(32)

    one_batch = convert.run_conversion(model, depth_multiplier=2, init="data", calibration_data=images)
    loader = DataLoader(TensorDataset(images, torch.zeros(32)), batch_size=4)
    many_batches = convert.run_conversion(model, depth_multiplier=2, init="data", calibration_data=loader)

    # the statistics are sums over batches, so only float rounding can differ
    for name in ("0", "2", "4"):
        first, second = one_batch.model.get_submodule(name), many_batches.model.get_submodule(name)
        torch.testing.assert_close(first.conv_dw.weight, second.conv_dw.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first.conv_pw.weight, second.conv_pw.weight, rtol=1e-4, atol=1e-5)


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    batches = list(correlated_images(8).split(4))
    convert.run_conversion(three_convs(), init="data", calibration_data=batches, show_progress=True)
    assert "calibrating" in capsys.readouterr().err

    convert.run_conversion(three_convs(), init="data", calibration_data=batches, show_progress=False)
    assert "calibrating" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("calibration_data", "error", "message"),
    [
        ((batch for batch in [torch.randn(2, 8, 8, 8)]), TypeError, "one-shot iterator"),
        ([], UsageError, "calibration_data contains no batches"),
        ([{"image": torch.randn(2, 8, 8, 8)}], TypeError, "calibration batch 0 is a dict"),
        ({"image": torch.randn(2, 8, 8, 8)}, TypeError, "calibration_data of type dict is not supported"),
        ([torch.randn(2, 3, 8, 8)], convert.ConversionError, r"the model failed on a calibration batch of shape \(2, 3, 8, 8\)"),
    ],
    ids=["generator", "empty", "dict-batch", "dict", "wrong-shape"],
)
def test_invalid_calibration_data(calibration_data: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        convert.run_conversion(three_convs(), init="data", calibration_data=calibration_data)


def test_data_init_needs_calibration() -> None:
    with pytest.raises(UsageError, match="init='data' needs calibration_data="):
        convert.run_conversion(three_convs(), init="data")


def test_calibration_with_svd_reports_errors_only() -> None:
    model = three_convs()
    batches = list(correlated_images(16).split(8))
    plain = convert.run_conversion(model, depth_multiplier=2)
    measured = convert.run_conversion(model, depth_multiplier=2, calibration_data=batches)

    for first, second in zip(plain.layers, measured.layers):
        assert first.output_error is None
        assert second.output_error is not None and second.output_error > 0
        assert second.svd_output_error is None
        torch.testing.assert_close(
            plain.model.get_submodule(first.name).conv_pw.weight, measured.model.get_submodule(first.name).conv_pw.weight
        )


def test_budget_uses_output_error_with_calibration() -> None:
    model = three_convs()
    batches = list(correlated_images(32).split(8))
    weights_only, _ = convert.inspect_model(model, rank="budget", budget=0.4)
    result = convert.run_conversion(model, rank="budget", budget=0.4, init="data", calibration_data=batches)

    assert all(plan.rank_rule.endswith("weight error") for plan in weights_only)
    assert all(layer.plan.rank_rule.endswith("output error") for layer in result.layers)


# --- calibration files ------------------------------------------------------------------


def test_load_calibration_batches(tmp_path) -> None:
    single = tmp_path / "single.pt"
    several = tmp_path / "several.pt"
    torch.save(torch.ones(2, 3), single)
    torch.save((torch.ones(2, 3), torch.zeros(1, 3)), several)

    assert [batch.shape for batch in load_calibration_batches(single)] == [(2, 3)]
    assert [batch.shape for batch in load_calibration_batches(several)] == [(2, 3), (1, 3)]


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"x": torch.ones(1)}, r"contains a mapping \(dict\), such as a state dict"),
        ([], "contains an empty list"),
        ([torch.ones(1), 3], "item 1 is of type int, not a tensor"),
        (NotATensor(), "contains pickled Python objects"),
    ],
    ids=["dict", "empty", "int-item", "pickled-object"],
)
def test_invalid_calibration_files(tmp_path, content: object, message: str) -> None:
    path = tmp_path / "calibration.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_calibration_batches(path)


def test_missing_calibration_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_calibration_batches(tmp_path / "missing.pt")


def test_too_few_calibration_positions_warn() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3)).eval()
    few = torch.randn(2, 16, 5, 5)  # first conv: 50 positions for 33 weights; last: 2 x 3 x 3 = 18 for 65
    with pytest.warns(UserWarning, match=r"fewer calibration positions than pointwise weights per output \(2\)"):
        result = convert.run_conversion(model, init="data", calibration_data=few, depth_multiplier=2)
    notes = {layer.name: layer.note for layer in result.converted}
    assert notes["0"] is None
    assert notes["2"].startswith("underdetermined fit: 18 calibration positions for 65 pointwise weights per output")
