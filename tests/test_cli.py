"""The dsconv CLI end to end, in a subprocess, on files written with torch.save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from convert import DepthwiseSeparableConv2d

from conftest import run_cli

FAST = ["--input-shape", "1,3,64,64", "--no-latency"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    paths = {"module": folder / "resnet18_module.pt", "state_dict": folder / "resnet18_state.pt"}
    torch.save(model, paths["module"])
    torch.save(model.state_dict(), paths["state_dict"])
    return paths


def assert_no_new_files(folder: Path, before: set[Path]) -> None:
    assert set(folder.iterdir()) == before


def test_convert_pickled_module_with_trust_flag(checkpoints, tmp_path):
    output = tmp_path / "converted.pt"
    completed = run_cli("convert", str(checkpoints["module"]), "-o", str(output), "--trust-pickle", *FAST)
    assert completed.returncode == 0, completed.stderr
    assert "Converted layers (17)" in completed.stdout
    model = torch.load(output, weights_only=False)
    assert type(model) is torchvision.models.ResNet
    assert isinstance(model.layer1[0].conv1, DepthwiseSeparableConv2d)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_convert_state_dict_with_arch(checkpoints, tmp_path):
    output = tmp_path / "converted.pt"
    report = tmp_path / "report.json"
    completed = run_cli(
        "convert", str(checkpoints["state_dict"]),
        "--arch", "torchvision.models:resnet18", "--arch-arg", "num_classes=10",
        "-o", str(output), "--depth-multiplier", "2", "--format", "json", "--report", str(report), *FAST,
    )
    assert completed.returncode == 0, completed.stderr
    data = json.loads(report.read_text())
    assert completed.stdout == ""  # --report sends the report to the file instead of stdout
    assert {row["depth_multiplier"] for row in data["layers"] if row["reason"] is None} == {2}
    assert data["input_shape"] == [1, 3, 64, 64]
    model = torch.load(output, weights_only=False).eval()
    original = torchvision.models.resnet18(num_classes=10).eval()
    original.load_state_dict(torch.load(checkpoints["state_dict"]))
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == original(x).shape


def test_full_multiplier_through_cli_is_exact(checkpoints, tmp_path):
    output = tmp_path / "exact.pt"
    completed = run_cli(
        "convert", str(checkpoints["state_dict"]), "--arch", "torchvision.models:resnet18", "--arch-arg", "num_classes=10",
        "-o", str(output), "--depth-multiplier", "49", "--allow-larger", "--format", "json", *FAST,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["output_difference"]["max_relative"] < 1e-4


def test_report_writes_no_model(checkpoints, tmp_path):
    completed = run_cli("report", str(checkpoints["module"]), "--trust-pickle", "--format", "markdown", *FAST, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "## Whole model" in completed.stdout
    assert list(tmp_path.iterdir()) == []


def test_inspect_lists_convs(checkpoints):
    completed = run_cli("inspect", str(checkpoints["state_dict"]), "--arch", "torchvision.models:resnet18", "--arch-arg", "num_classes=10", "--multipliers", "1,3")
    assert completed.returncode == 0, completed.stderr
    assert "K=3 params (error)" in completed.stdout
    assert "layer4.0.downsample.0" in completed.stdout
    assert "kernel is 1x1: already a pointwise conv" in completed.stdout


def test_existing_output_needs_force(checkpoints, tmp_path):
    output = tmp_path / "taken.pt"
    output.write_bytes(b"keep me")
    completed = run_cli("convert", str(checkpoints["module"]), "-o", str(output), "--trust-pickle", *FAST)
    assert completed.returncode == 2
    assert f"output {output} already exists; pass --force to replace it" in completed.stderr
    assert output.read_bytes() == b"keep me"
    forced = run_cli("convert", str(checkpoints["module"]), "-o", str(output), "--trust-pickle", "--force", *FAST)
    assert forced.returncode == 0, forced.stderr
    assert isinstance(torch.load(output, weights_only=False), torchvision.models.ResNet)


def test_output_equal_to_input_rejected(checkpoints, tmp_path):
    source = tmp_path / "model.pt"
    source.write_bytes(checkpoints["module"].read_bytes())
    completed = run_cli("convert", str(source), "-o", str(source), "--trust-pickle", "--force", *FAST)
    assert completed.returncode == 2
    assert "is the input file; choose another output path" in completed.stderr
    assert source.read_bytes() == checkpoints["module"].read_bytes()


def write_garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 this is not a checkpoint \xff" * 10)


ERROR_CASES = [
    pytest.param(lambda tmp: [str(tmp / "missing.pt")], "not found", id="missing-file"),
    pytest.param(lambda tmp: (write_garbage(tmp / "junk.pt"), [str(tmp / "junk.pt")])[1], "is not a readable PyTorch checkpoint", id="not-a-checkpoint"),
    pytest.param(lambda tmp: [str(tmp)], "is a directory", id="directory"),
]


@pytest.mark.parametrize("make_arguments,message", ERROR_CASES)
def test_bad_input_file(make_arguments, message, tmp_path):
    arguments = make_arguments(tmp_path)
    before = set(tmp_path.iterdir())
    completed = run_cli("convert", *arguments, "-o", str(tmp_path / "out.pt"), *FAST)
    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert_no_new_files(tmp_path, before)


def test_pickle_without_trust_flag(checkpoints, tmp_path):
    completed = run_cli("convert", str(checkpoints["module"]), "-o", str(tmp_path / "out.pt"), *FAST)
    assert completed.returncode == 2
    assert "contains pickled Python objects (weights_only=True rejected " in completed.stderr
    assert "torchvision.models.resnet.ResNet" in completed.stderr
    assert "pass --trust-pickle" in completed.stderr
    assert list(tmp_path.iterdir()) == []


def test_state_dict_without_arch(checkpoints, tmp_path):
    completed = run_cli("convert", str(checkpoints["state_dict"]), "-o", str(tmp_path / "out.pt"), *FAST)
    assert completed.returncode == 2
    assert "contains a state dict" in completed.stderr
    assert "--arch module.path:factory" in completed.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arch,message",
    [
        ("torchvision.models:resnet1000", "'torchvision.models' has no attribute 'resnet1000'"),
        ("no_such_package.models:net", "cannot import module 'no_such_package.models'"),
        ("resnet18", "is not of the form module.path:factory"),
    ],
)
def test_unknown_arch(checkpoints, tmp_path, arch, message):
    completed = run_cli("convert", str(checkpoints["state_dict"]), "--arch", arch, "-o", str(tmp_path / "out.pt"), *FAST)
    assert completed.returncode == 2
    assert message in completed.stderr
    assert list(tmp_path.iterdir()) == []


def test_mismatched_arch_lists_keys(checkpoints, tmp_path):
    completed = run_cli("convert", str(checkpoints["state_dict"]), "--arch", "torchvision.models:resnet18", "-o", str(tmp_path / "out.pt"), *FAST)
    assert completed.returncode == 2
    assert "shape mismatch (file vs model): fc.weight (10, 512) vs (1000, 512)" in completed.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--input-shape", "1,3,abc"], "is not a comma-separated list of integers"),
        (["--input-shape", "0,3,64,64"], "all sizes >= 1"),
        (["--depth-multiplier", "0"], "0 is less than 1; use a positive integer"),
        (["--depth-multiplier", "-2"], "-2 is less than 1; use a positive integer"),
        (["--depth-multiplier", "two"], "'two' is not an integer"),
        (["--init", "pca"], "invalid choice: 'pca'"),
    ],
    ids=["shape-letters", "shape-zero", "multiplier-zero", "multiplier-negative", "multiplier-word", "init"],
)
def test_bad_argument_values(checkpoints, tmp_path, arguments, message):
    completed = run_cli("convert", str(checkpoints["module"]), "--trust-pickle", "-o", str(tmp_path / "out.pt"), *arguments)
    assert completed.returncode == 2
    assert message in completed.stderr
    assert list(tmp_path.iterdir()) == []


def test_input_shape_the_model_cannot_take(checkpoints, tmp_path):
    completed = run_cli("convert", str(checkpoints["module"]), "--trust-pickle", "-o", str(tmp_path / "out.pt"), "--input-shape", "1,5,64,64", "--no-latency")
    assert completed.returncode == 2
    assert "the model failed on a random input of shape 1,5,64,64" in completed.stderr
    assert "Set --input-shape" in completed.stderr
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_device(checkpoints, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    completed = run_cli("convert", str(checkpoints["module"]), "--trust-pickle", "-o", str(tmp_path / "out.pt"), "--device", "cuda", *FAST)
    assert completed.returncode == 2
    assert "no CUDA device is available; use --device cpu" in completed.stderr


def test_help_lists_exit_codes():
    completed = run_cli("--help")
    assert completed.returncode == 0
    assert "exit codes:" in completed.stdout
    assert "dsconv" in completed.stdout


def test_demo_runs(tmp_path):
    completed = run_cli("demo", "--workdir", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    assert "Converted layers (17)" in completed.stdout
    assert (tmp_path / "resnet18_dsconv.pt").exists()


def test_config_file_and_selection_flags(checkpoints, tmp_path):
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"global": 2, "name_pattern": {"layer4\\..*": None}, "name": {"conv1": 4}}))
    completed = run_cli(
        "report", str(checkpoints["state_dict"]), "--arch", "torchvision.models:resnet18", "--arch-arg", "num_classes=10",
        "--config", str(config), "--format", "json", "--leaf-type", "torchvision.models.resnet:BasicBlock", *FAST,
    )
    assert completed.returncode == 0, completed.stderr
    layers = {row["name"]: row for row in json.loads(completed.stdout)["layers"]}
    assert layers["conv1"]["depth_multiplier"] == 4
    assert layers["conv1"]["setting_source"] == "name 'conv1'"
    assert layers["layer1.0.conv1"]["depth_multiplier"] == 2
    assert layers["layer4.0.conv1"]["reason"] == "left alone by the config (name pattern 'layer4\\\\..*')"


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--config", "{missing}"], "config file {missing} not found"),
        (["--config", "{bad}"], "config entry 'conv1': depth_multiplier=0: must be >= 1"),
        (["--config", "{unknown}"], "the config names layers that are not convs of this model: conv9; list the convs"),
        (["--leaf-type", "torchvision.models.resnet:nothing"], "--leaf-type 'torchvision.models.resnet:nothing' cannot be imported"),
        (["--leaf-type", "torchvision.models:resnet18"], "--leaf-type 'torchvision.models:resnet18' is not an nn.Module class"),
        (["--autowrap", "math"], "--autowrap 'math' is not of the form module.path:name"),
    ],
    ids=["config-missing", "config-bad-value", "config-unknown-layer", "leaf-type-missing", "leaf-type-function", "autowrap-form"],
)
def test_bad_selection_flags(checkpoints, tmp_path, arguments, message):
    files = {"missing": tmp_path / "missing.json", "bad": tmp_path / "bad.json", "unknown": tmp_path / "unknown.json"}
    files["bad"].write_text(json.dumps({"name": {"conv1": 0}}))
    files["unknown"].write_text(json.dumps({"name": {"conv9": 1}}))
    arguments = [argument.format(**files) for argument in arguments]
    output = tmp_path / "out.pt"
    completed = run_cli("convert", str(checkpoints["module"]), "--trust-pickle", "-o", str(output), *arguments, *FAST)
    assert completed.returncode == 2, completed.stderr
    assert message.format(**files) in completed.stderr
    assert not output.exists()


def test_non_finite_output_fails_conversion(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1e30)  # finite weights whose activations overflow, as after a diverged step
    source = tmp_path / "diverged.pt"
    torch.save(model.state_dict(), source)
    output = tmp_path / "out.pt"
    completed = run_cli("convert", str(source), "--arch", "torchvision.models:resnet18", "--arch-arg", "num_classes=10", "-o", str(output), *FAST)
    assert completed.returncode == 1, completed.stderr
    assert "the original model's output on a random input of shape 1,3,64,64 contains NaN or inf" in completed.stderr
    assert not output.exists()


def test_argument_errors_are_one_line(checkpoints):
    completed = run_cli("convert", str(checkpoints["module"]), "-o", "out.pt", "--rank", "budgte")
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "dsconv convert: error: argument --rank: invalid choice: 'budgte' (choose from 'fixed', 'energy', 'budget'); see dsconv convert --help"
    ]


def test_inspect_names_rank_rule(checkpoints):
    completed = run_cli("inspect", str(checkpoints["state_dict"]), "--arch", "torchvision.models:resnet18", "--arch-arg", "num_classes=10", "--rank", "energy", "--energy", "0.5")
    assert completed.returncode == 0, completed.stderr
    assert "(energy 0.5)" in completed.stdout
    assert "(depth_multiplier)" not in completed.stdout
