"""Every input form the CLI accepts, written with torch.save or safetensors and run through the real CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from model_files import INPUT_SHAPE, INPUT_SHAPE_TEXT, digest
from safetensors.torch import save_file
from torch import nn

from convert import convert_model
from convert.checkpoint import detect_format
from convert.errors import CheckpointError
from convert.state_dicts import select_entry, strip_prefixes

# Outputs of the same float32 model converted in two processes: the SVDs agree to rounding.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def weights(models) -> dict[str, torch.Tensor]:
    model = models.tiny_net()
    with torch.no_grad():  # non-default BatchNorm statistics, so that loading them matters
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def convert_args(source: Path, output: Path, *extra: str) -> list[str]:
    return ["convert", str(source), "-o", str(output), "--input-shape", INPUT_SHAPE_TEXT, "--no-latency", *extra]


def expected_outputs(models, state_dict: dict[str, torch.Tensor], example: torch.Tensor) -> torch.Tensor:
    """Convert the same weights in this process (default depth multiplier 1) and run ``example``."""
    model = models.tiny_net()
    model.load_state_dict(state_dict)
    converted = convert_model(model.eval())
    with torch.no_grad():
        return converted(example)


def outputs_of_saved(path: Path, example: torch.Tensor) -> torch.Tensor:
    model = torch.load(path, weights_only=False)
    with torch.no_grad():
        return model.eval()(example)


def assert_converted_from(output: Path, models, state_dict: dict[str, torch.Tensor]) -> None:
    example = torch.randn(INPUT_SHAPE)
    torch.testing.assert_close(outputs_of_saved(output, example), expected_outputs(models, state_dict, example), **TOLERANCE)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


def test_plain_state_dict(project: Path, models, weights, tmp_path: Path) -> None:
    source = tmp_path / "weights.pt"
    torch.save(weights, source)
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net"), cwd=project)

    assert_ok(result)
    assert_converted_from(output, models, weights)


def test_legacy_format_state_dict(project: Path, models, weights, tmp_path: Path) -> None:
    source = tmp_path / "legacy.pt"
    torch.save(weights, source, _use_new_zipfile_serialization=False)
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net"), cwd=project)

    assert_ok(result)
    assert_converted_from(output, models, weights)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "ema", "model_ema"])
def test_wrapped_state_dict(project: Path, models, weights, tmp_path: Path, key: str) -> None:
    model = models.tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(INPUT_SHAPE)).sum().backward()
    optimizer.step()
    checkpoint = {
        key: weights,
        "optimizer": optimizer.state_dict(),
        "epoch": 12,
        "best_accuracy": 0.71,
        "args": argparse.Namespace(lr=0.1, arch="tiny_net", milestones=[30, 60]),
    }
    source = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, source)
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net"), cwd=project)

    assert_ok(result)
    assert f"weights read from the checkpoint's entry {key!r}" in result.stdout
    assert_converted_from(output, models, weights)


def test_several_entries_need_key(project: Path, models, weights, tmp_path: Path) -> None:
    averaged = {name: tensor + 0.05 if tensor.is_floating_point() else tensor for name, tensor in weights.items()}
    source = tmp_path / "checkpoint.pt"
    torch.save({"model": weights, "model_ema": averaged, "epoch": 3}, source)
    output = tmp_path / "converted.pt"

    rejected = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net"), cwd=project)
    chosen = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net", "--key", "model_ema"), cwd=project)

    assert rejected.returncode == 2
    assert "several different sets of weights" in rejected.stderr
    assert "'model', 'model_ema'" in rejected.stderr
    assert "--key" in rejected.stderr
    assert_ok(chosen)
    assert_converted_from(output, models, averaged)
    example = torch.randn(INPUT_SHAPE)
    assert not torch.allclose(outputs_of_saved(output, example), expected_outputs(models, weights, example), **TOLERANCE)


def test_identical_entries_count_once(project: Path, models, weights, tmp_path: Path) -> None:
    copy = {name: tensor.clone() for name, tensor in weights.items()}
    source = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": weights, "model_state_dict": copy}, source)
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net"), cwd=project)

    assert_ok(result)
    assert "hold the same weights" in result.stdout
    assert_converted_from(output, models, weights)


def test_nested_key(project: Path, models, weights, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.pt"
    torch.save({"ema": {"module": weights, "decay": 0.999}, "epoch": 1}, source)
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net", "--key", "ema/module"), cwd=project)

    assert_ok(result)
    assert_converted_from(output, models, weights)


@pytest.mark.parametrize(
    ("prefix", "origin"),
    [
        ("module.", "DataParallel/DistributedDataParallel"),
        ("_orig_mod.", "torch.compile"),
        ("module._orig_mod.", "DataParallel/DistributedDataParallel, then torch.compile"),
        ("_orig_mod.module.", "torch.compile, then DataParallel/DistributedDataParallel"),
    ],
)
def test_prefixed_keys_are_stripped(project: Path, models, weights, tmp_path: Path, prefix: str, origin: str) -> None:
    source = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {prefix + name: tensor for name, tensor in weights.items()}}, source)
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net"), cwd=project)

    assert_ok(result)
    assert f"stripped the key prefix {prefix!r}" in result.stdout
    assert origin in result.stdout
    assert_converted_from(output, models, weights)


def test_prefix_on_some_keys_is_kept(project: Path, weights, tmp_path: Path) -> None:
    names = list(weights)
    mixed = {("module." + name if index % 2 else name): tensor for index, (name, tensor) in enumerate(weights.items())}
    source = tmp_path / "mixed.pt"
    torch.save(mixed, source)

    result = run_cli(*convert_args(source, tmp_path / "out.pt", "--arch", "dsconv_test_models:tiny_net"), cwd=project)

    assert result.returncode == 2
    assert f"unexpected: module.{names[1]}" in result.stderr
    assert f"missing: {names[1]}" in result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_prefix_kept_when_model_has_it(models) -> None:
    holder = models.holder()
    state_dict = holder.state_dict()

    stripped, prefixes = strip_prefixes(state_dict, set(state_dict))

    assert prefixes == []
    assert stripped.keys() == state_dict.keys()


def test_module_child_named_module_loads(project: Path, models, tmp_path: Path) -> None:
    holder = models.holder()
    source = tmp_path / "holder.pt"
    torch.save(holder.state_dict(), source)
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:holder"), cwd=project)

    assert_ok(result)
    assert "stripped" not in result.stdout
    example = torch.randn(INPUT_SHAPE)
    with torch.no_grad():
        expected = convert_model(holder.eval())(example)
    torch.testing.assert_close(outputs_of_saved(output, example), expected, **TOLERANCE)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_safetensors_state_dict(project: Path, models, weights, tmp_path: Path, prefix: str) -> None:
    source = tmp_path / "weights.safetensors"
    save_file({prefix + name: tensor.contiguous() for name, tensor in weights.items()}, str(source))
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net"), cwd=project)

    assert_ok(result)
    assert_converted_from(output, models, weights)


def test_safetensors_without_arch(project: Path, weights, tmp_path: Path) -> None:
    source = tmp_path / "weights.safetensors"
    save_file(dict(weights), str(source))

    result = run_cli(*convert_args(source, tmp_path / "out.pt"), cwd=project)

    assert result.returncode == 2
    assert "contains a state dict (it is a safetensors file)" in result.stderr
    assert "--arch" in result.stderr


def test_full_module_needs_trust(project: Path, models, weights, tmp_path: Path) -> None:
    model = models.tiny_net(num_classes=7)
    source = tmp_path / "model.pt"
    torch.save(model, source)
    output = tmp_path / "converted.pt"

    rejected = run_cli(*convert_args(source, output), cwd=project)
    trusted = run_cli(*convert_args(source, output, "--trust-pickle"), cwd=project)

    assert rejected.returncode == 2
    assert "weights_only=True rejected" in rejected.stderr
    assert "dsconv_test_models.TinyNet" in rejected.stderr
    assert "--trust-pickle" in rejected.stderr
    assert_ok(trusted)
    loaded = torch.load(output, weights_only=False)
    assert type(loaded).__name__ == "TinyNet"
    assert loaded.num_classes == 7
    assert loaded.config == {"width": 16, "tags": ["test"]}
    example = torch.randn(INPUT_SHAPE)
    with torch.no_grad():
        expected = convert_model(model.eval())(example)
    torch.testing.assert_close(outputs_of_saved(output, example), expected, **TOLERANCE)


def test_module_wrapped_in_training_dict(project: Path, models, tmp_path: Path) -> None:
    model = models.tiny_net()
    source = tmp_path / "checkpoint.pt"
    torch.save({"model": model, "epoch": 4, "optimizer": None}, source)
    output = tmp_path / "converted.pt"

    result = run_cli(*convert_args(source, output, "--trust-pickle"), cwd=project)

    assert_ok(result)
    assert "model read from the checkpoint's entry 'model'" in result.stdout
    assert type(torch.load(output, weights_only=False)).__name__ == "TinyNet"


TRAINING_SCRIPT = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.save(Net(), "main_model.pt")
"""


def test_class_from_main_needs_import(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAINING_SCRIPT)
    (tmp_path / "netdefs.py").write_text(TRAINING_SCRIPT.split("\n\nif __name__")[0] + "\n")
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True)
    source = tmp_path / "main_model.pt"
    output = tmp_path / "converted.pt"

    untrusted = run_cli(*convert_args(source, output), cwd=tmp_path)
    without_import = run_cli(*convert_args(source, output, "--trust-pickle"), cwd=tmp_path)
    written_without_import = output.exists()
    imported = run_cli(*convert_args(source, output, "--trust-pickle", "--import", "netdefs"), cwd=tmp_path)

    assert untrusted.returncode == 2
    assert "__main__.Net" in untrusted.stderr
    assert "--import MODULE" in untrusted.stderr
    assert without_import.returncode == 2
    assert "class Net, which was defined in the __main__" in without_import.stderr
    assert "--import MODULE" in without_import.stderr
    assert not written_without_import
    assert_ok(imported)
    check = "import torch; model = torch.load('converted.pt', weights_only=False); print(type(model).__module__, type(model).__name__)"
    loaded = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["netdefs", "Net"]


def test_torchscript_archive(project: Path, models, tmp_path: Path) -> None:
    source = tmp_path / "scripted.pt"
    model = models.tiny_net().eval()
    torch.jit.script(model).save(str(source))
    output = tmp_path / "converted.pt"

    alone = run_cli(*convert_args(source, output), cwd=project)
    untrusted = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net"), cwd=project)
    trusted = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net", "--trust-pickle"), cwd=project)

    assert alone.returncode == 2
    assert "is a TorchScript archive, which has no Python modules left to convert" in alone.stderr
    assert "torch.save(model)" in alone.stderr
    assert "--arch" in alone.stderr
    assert untrusted.returncode == 2
    assert "--trust-pickle" in untrusted.stderr
    assert_ok(trusted)
    assert "weights read from the TorchScript archive" in trusted.stdout
    assert_converted_from(output, models, model.state_dict())


def test_torch_export_program(project: Path, models, tmp_path: Path) -> None:
    source = tmp_path / "exported.pt2"
    model = models.tiny_net().eval()
    torch.export.save(torch.export.export(model, (torch.randn(INPUT_SHAPE),)), str(source))
    output = tmp_path / "converted.pt"

    alone = run_cli(*convert_args(source, output), cwd=project)
    trusted = run_cli(*convert_args(source, output, "--arch", "dsconv_test_models:tiny_net", "--trust-pickle"), cwd=project)

    assert alone.returncode == 2
    assert "is a torch.export program, which has no Python modules left to convert" in alone.stderr
    assert "state dict with --arch" in alone.stderr
    assert_ok(trusted)
    assert "weights read from the torch.export program" in trusted.stdout
    assert_converted_from(output, models, model.state_dict())


def test_input_is_never_modified(project: Path, weights, tmp_path: Path) -> None:
    source = tmp_path / "weights.pt"
    torch.save({"model": {"module." + name: tensor for name, tensor in weights.items()}}, source)
    source.chmod(0o444)
    before = (digest(source), source.stat().st_mtime_ns)

    result = run_cli(*convert_args(source, tmp_path / "out.pt", "--arch", "dsconv_test_models:tiny_net"), cwd=project)

    assert_ok(result)
    assert (digest(source), source.stat().st_mtime_ns) == before


@pytest.mark.parametrize(
    ("writer", "kind"),
    [
        (lambda path: torch.save({"w": torch.ones(2)}, path), "torch"),
        (lambda path: torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False), "torch"),
        (lambda path: save_file({"w": torch.ones(2)}, str(path)), "safetensors"),
        (lambda path: path.write_text('{"format": "dsconv-plan"}'), "json"),
        (lambda path: torch.jit.script(nn.Conv2d(1, 1, 1)).save(str(path)), "torchscript"),
        (lambda path: torch.export.save(torch.export.export(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 2, 2),)), str(path)), "torch-export"),
        (lambda path: path.write_bytes(b"PK\x03\x04" + bytes(64)), "damaged-zip"),
        (lambda path: path.write_bytes(b"hello, not a model\n"), "unknown"),
    ],
    ids=["zip", "legacy", "safetensors", "json", "torchscript", "export", "damaged-zip", "text"],
)
def test_detect_format(tmp_path: Path, writer, kind: str) -> None:
    path = tmp_path / "file"
    writer(path)

    assert detect_format(path) == kind


def test_select_entry_rejects_missing_key(tmp_path: Path) -> None:
    content = {"model": {"w": torch.ones(1)}, "epoch": 3}

    with pytest.raises(CheckpointError, match="has no entry 'ema'; its entries are 'model', 'epoch'"):
        select_entry(content, tmp_path / "x.pt", key="ema")


def test_select_entry_lists_other_state_dicts(tmp_path: Path) -> None:
    content = {"weights": {"w": torch.ones(1)}, "epoch": 3}

    with pytest.raises(CheckpointError, match="entries that contain a state dict: weights"):
        select_entry(content, tmp_path / "x.pt")


def test_select_entry_finds_module(tmp_path: Path) -> None:
    module = nn.Conv2d(1, 1, 1)

    selected, notes = select_entry({"net": module, "epoch": 1}, tmp_path / "x.pt", want="module")

    assert selected is module
    assert notes == ["model read from the checkpoint's entry 'net'"]


def test_strip_prefixes_reports_each_prefix() -> None:
    state_dict = {"module._orig_mod.conv.weight": torch.ones(1), "module._orig_mod.conv.bias": torch.ones(1)}

    stripped, prefixes = strip_prefixes(state_dict, {"conv.weight", "conv.bias"})

    assert prefixes == ["module.", "_orig_mod."]
    assert set(stripped) == {"conv.weight", "conv.bias"}

