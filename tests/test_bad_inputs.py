"""A table of bad inputs run through the real CLI: each gives its message and exit code and writes nothing."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from model_files import INPUT_SHAPE_TEXT, snapshot
from safetensors.torch import save as safetensors_save

SIDE_EFFECT = "created_by_pickle.txt"


class CreatesFile:
    """Unpickling this object calls ``open(path, "w")``, which creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@dataclass
class Case:
    """One bad input: ``build`` writes the files into the folder and returns the CLI arguments."""

    name: str
    build: Callable[[Path, object], list[str]]
    exit_code: int
    message: str


def tiny_weights(models) -> dict[str, torch.Tensor]:
    return models.tiny_net().state_dict()


def convert(source: Path | str, folder: Path, *extra: str) -> list[str]:
    return ["convert", str(source), "-o", str(folder / "converted.pt"), "--input-shape", INPUT_SHAPE_TEXT, "--no-latency", *extra]


def with_arch(source: Path, folder: Path, *extra: str) -> list[str]:
    return convert(source, folder, "--arch", "dsconv_test_models:tiny_net", *extra)


def state_dict_file(folder: Path, models) -> Path:
    path = folder / "weights.pt"
    torch.save(tiny_weights(models), path)
    return path


def empty_file(folder: Path, models) -> list[str]:
    (folder / "empty.pt").write_bytes(b"")
    return with_arch(folder / "empty.pt", folder)


def truncated_file(folder: Path, models) -> list[str]:
    buffer = io.BytesIO()
    torch.save(tiny_weights(models), buffer)
    (folder / "truncated.pt").write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    return with_arch(folder / "truncated.pt", folder)


def random_bytes(folder: Path, models) -> list[str]:
    (folder / "random.bin").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    return with_arch(folder / "random.bin", folder)


def json_file(folder: Path, models) -> list[str]:
    (folder / "config.json").write_text(json.dumps({"lr": 0.1, "epochs": 90}))
    return with_arch(folder / "config.json", folder)


def plan_as_input(folder: Path, models) -> list[str]:
    (folder / "model.plan.json").write_text(json.dumps({"format": "dsconv-plan", "version": 1, "layers": []}))
    return with_arch(folder / "model.plan.json", folder)


def directory(folder: Path, models) -> list[str]:
    (folder / "checkpoints").mkdir()
    return with_arch(folder / "checkpoints", folder)


def missing_path(folder: Path, models) -> list[str]:
    return with_arch(folder / "no_such_file.pt", folder)


def unwritable_folder(folder: Path, models) -> list[str]:
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    source = state_dict_file(folder, models)
    return ["convert", str(source), "-o", str(locked / "converted.pt"), "--arch", "dsconv_test_models:tiny_net", "--input-shape", INPUT_SHAPE_TEXT]


def missing_output_folder(folder: Path, models) -> list[str]:
    source = state_dict_file(folder, models)
    return ["convert", str(source), "-o", str(folder / "missing" / "converted.pt"), "--arch", "dsconv_test_models:tiny_net"]


def output_equals_input(folder: Path, models) -> list[str]:
    source = state_dict_file(folder, models)
    return ["convert", str(source), "-o", str(source), "--arch", "dsconv_test_models:tiny_net", "--force"]


def output_exists(folder: Path, models) -> list[str]:
    source = state_dict_file(folder, models)
    (folder / "converted.pt").write_bytes(b"an earlier result")
    return with_arch(source, folder)


def report_equals_output(folder: Path, models) -> list[str]:
    source = state_dict_file(folder, models)
    return with_arch(source, folder, "--report", str(folder / "converted.pt"))


def report_over_input(folder: Path, models) -> list[str]:
    source = state_dict_file(folder, models)
    return with_arch(source, folder, "--report", str(source), "--force")


def pickle_creating_file(folder: Path, models) -> list[str]:
    torch.save(CreatesFile(folder / SIDE_EFFECT), folder / "model.pt")
    return convert(folder / "model.pt", folder)


def raw_pickle_creating_file(folder: Path, models) -> list[str]:
    (folder / "model.pkl").write_bytes(pickle.dumps(CreatesFile(folder / SIDE_EFFECT)))
    return convert(folder / "model.pkl", folder)


def pickle_creating_file_with_arch(folder: Path, models) -> list[str]:
    torch.save({"state_dict": tiny_weights(models), "hook": CreatesFile(folder / SIDE_EFFECT)}, folder / "model.pt")
    return with_arch(folder / "model.pt", folder)


def wrong_arch(folder: Path, models) -> list[str]:
    return convert(state_dict_file(folder, models), folder, "--arch", "dsconv_test_models:renamed_net")


def arch_not_importable(folder: Path, models) -> list[str]:
    return convert(state_dict_file(folder, models), folder, "--arch", "no_such_package.models:net")


def arch_without_colon(folder: Path, models) -> list[str]:
    return convert(state_dict_file(folder, models), folder, "--arch", "dsconv_test_models.tiny_net")


def arch_factory_fails(folder: Path, models) -> list[str]:
    return convert(state_dict_file(folder, models), folder, "--arch", "dsconv_test_models:failing_net")


def bad_arch_argument(folder: Path, models) -> list[str]:
    return with_arch(state_dict_file(folder, models), folder, "--arch-arg", "num_classes")


def mismatched_state_dict(folder: Path, models) -> list[str]:
    torch.save(models.tiny_net(num_classes=5).state_dict(), folder / "five_classes.pt")
    return with_arch(folder / "five_classes.pt", folder)


def state_dict_without_arch(folder: Path, models) -> list[str]:
    return convert(state_dict_file(folder, models), folder)


def ambiguous_entries(folder: Path, models) -> list[str]:
    torch.save({"model": tiny_weights(models), "model_ema": tiny_weights(models), "epoch": 2}, folder / "checkpoint.pt")
    return with_arch(folder / "checkpoint.pt", folder)


def missing_key(folder: Path, models) -> list[str]:
    torch.save({"model": tiny_weights(models)}, folder / "checkpoint.pt")
    return with_arch(folder / "checkpoint.pt", folder, "--key", "ema")


def torchscript_archive(folder: Path, models) -> list[str]:
    torch.jit.script(models.tiny_net().eval()).save(str(folder / "scripted.pt"))
    return convert(folder / "scripted.pt", folder)


def export_program(folder: Path, models) -> list[str]:
    program = torch.export.export(models.tiny_net().eval(), (torch.randn(1, 3, 16, 16),))
    torch.export.save(program, str(folder / "exported.pt2"))
    return convert(folder / "exported.pt2", folder)


def truncated_safetensors(folder: Path, models) -> list[str]:
    data = safetensors_save(tiny_weights(models))
    (folder / "weights.safetensors").write_bytes(data[: len(data) // 2])
    return with_arch(folder / "weights.safetensors", folder)


def bad_input_shape(folder: Path, models) -> list[str]:
    source = state_dict_file(folder, models)
    return ["convert", str(source), "-o", str(folder / "converted.pt"), "--arch", "dsconv_test_models:tiny_net", "--input-shape", "1,3,x"]


def input_shape_wrong_for_model(folder: Path, models) -> list[str]:
    source = state_dict_file(folder, models)
    return ["convert", str(source), "-o", str(folder / "converted.pt"), "--arch", "dsconv_test_models:tiny_net", "--input-shape", "1,1,16,16", "--no-latency"]


def multiplier(value: str) -> Callable[[Path, object], list[str]]:
    def build(folder: Path, models) -> list[str]:
        return with_arch(state_dict_file(folder, models), folder, "--depth-multiplier", value)

    return build


def nothing_to_convert(folder: Path, models) -> list[str]:
    torch.save(models.linear_net().state_dict(), folder / "linear.pt")
    return convert(folder / "linear.pt", folder, "--arch", "dsconv_test_models:linear_net")


def nan_weights(folder: Path, models) -> list[str]:
    weights = tiny_weights(models)
    weights["features.3.weight"][0, 0, 0, 0] = float("nan")
    torch.save(weights, folder / "nan.pt")
    return with_arch(folder / "nan.pt", folder)


def check_fails(folder: Path, models) -> list[str]:
    return with_arch(state_dict_file(folder, models), folder, "--check", "2")


def negative_tolerance(folder: Path, models) -> list[str]:
    return with_arch(state_dict_file(folder, models), folder, "--check", "2", "--rtol", "-1")


def graph_module_without_trace(folder: Path, models) -> list[str]:
    return with_arch(state_dict_file(folder, models), folder, "--save-as", "graph-module", "--tracing", "swap")


def plan_for_other_model(folder: Path, models) -> list[str]:
    plan = {
        "format": "dsconv-plan", "version": 1, "model": "Other",
        "layers": [{"name": "stem", "conv_type": "Conv2d", "module": "DepthwiseSeparableConv2d", "in_channels": 3,
                    "out_channels": 16, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                    "groups": 1, "bias": True, "padding_mode": "zeros", "depth_multiplier": 1}],
    }
    (folder / "other.plan.json").write_text(json.dumps(plan))
    return with_arch(state_dict_file(folder, models), folder, "--plan", str(folder / "other.plan.json"))


def densify_dense_model(folder: Path, models) -> list[str]:
    source = state_dict_file(folder, models)
    return ["densify", str(source), "-o", str(folder / "dense.pt"), "--arch", "dsconv_test_models:tiny_net"]


ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

CASES = [
    Case("empty file", empty_file, 2, "empty.pt is empty"),
    Case("truncated file", truncated_file, 2, "is a zip archive, as torch.save writes, but it is truncated or damaged"),
    Case("random bytes", random_bytes, 2, "random.bin is not a readable PyTorch checkpoint"),
    Case("JSON file", json_file, 2, "config.json is a JSON file, not a model checkpoint"),
    Case("plan given as input", plan_as_input, 2, "is a dsconv conversion plan, not a checkpoint"),
    Case("directory", directory, 2, "checkpoints is a directory"),
    Case("missing path", missing_path, 2, "no_such_file.pt not found"),
    pytest.param(
        Case("unwritable output folder", unwritable_folder, 2, "locked is not writable"),
        marks=pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders"),
    ),
    Case("missing output folder", missing_output_folder, 2, "output folder"),
    Case("output equal to input", output_equals_input, 2, "is the input file; choose another output path"),
    Case("output exists", output_exists, 2, "converted.pt already exists; pass --force to replace it"),
    Case("report equal to output", report_equals_output, 2, "two outputs would both be written to"),
    Case("report over input", report_over_input, 2, "is the input file"),
    Case("pickle that creates a file", pickle_creating_file, 2, "weights_only=True rejected io.open"),
    Case("raw pickle that creates a file", raw_pickle_creating_file, 2, "model.pkl is not a readable PyTorch checkpoint"),
    Case("pickle next to weights", pickle_creating_file_with_arch, 2, "weights_only=True rejected io.open"),
    Case("wrong --arch", wrong_arch, 2, "do not fit dsconv_test_models:renamed_net: missing: stem.weight"),
    Case("--arch not importable", arch_not_importable, 2, "cannot import module 'no_such_package.models'"),
    Case("--arch without colon", arch_without_colon, 2, "is not of the form module.path:factory"),
    Case("--arch factory fails", arch_factory_fails, 2, "the factory cannot build this model"),
    Case("--arch-arg without value", bad_arch_argument, 2, "--arch-arg 'num_classes' is not of the form NAME=VALUE"),
    Case("mismatched state dict", mismatched_state_dict, 2, "shape mismatch (file vs model): head.weight (5, 32) vs (10, 32)"),
    Case("state dict without --arch", state_dict_without_arch, 2, "contains a state dict (a mapping of weights), not a model: pass --arch"),
    Case("ambiguous entries", ambiguous_entries, 2, "pass --key with the one to convert"),
    Case("missing --key entry", missing_key, 2, "--key 'ema'"),
    Case("TorchScript archive", torchscript_archive, 2, "is a TorchScript archive"),
    Case("torch.export program", export_program, 2, "is a torch.export program"),
    Case("truncated safetensors", truncated_safetensors, 2, "is not a readable safetensors file"),
    Case("bad --input-shape", bad_input_shape, 2, "'1,3,x' is not a comma-separated list of integers"),
    Case("--input-shape wrong for the model", input_shape_wrong_for_model, 2, "Set --input-shape to the shape the model expects"),
    Case("depth multiplier 0", multiplier("0"), 2, "0 is less than 1"),
    Case("negative depth multiplier", multiplier("-2"), 2, "-2 is less than 1"),
    Case("depth multiplier not a number", multiplier("two"), 2, "'two' is not an integer"),
    Case("nothing to convert", nothing_to_convert, 1, "has no nn.Conv1d/2d/3d layer, so there is nothing to convert"),
    Case("NaN weights", nan_weights, 1, "parameter 'features.3.weight' contains NaN or infinite values"),
    Case("--check fails", check_fails, 1, "--check failed"),
    Case("negative tolerance", negative_tolerance, 2, "-1 must be a finite number >= 0"),
    Case("graph-module without tracing", graph_module_without_trace, 2, "--save-as graph-module needs a traced graph"),
    Case("plan for another model", plan_for_other_model, 2, "layer 'stem' of the plan is not in TinyNet"),
    Case("densify a dense model", densify_dense_model, 1, "has no depthwise-separable layer to merge"),
]


def case_id(case: object) -> str:
    return case.name if isinstance(case, Case) else str(case)


def test_table_has_twenty_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input(case: Case, project: Path, models, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    arguments = case.build(work, models)
    before = snapshot(work)

    result = run_cli(*arguments, cwd=project)

    assert result.returncode == case.exit_code, result.stderr
    assert case.message in result.stderr
    assert result.stderr.count(": error: ") == 1
    assert "Traceback" not in result.stderr
    assert snapshot(work) == before
    assert not (work / SIDE_EFFECT).exists()


def test_trusted_pickle_runs_its_code(project: Path, models, tmp_path: Path) -> None:
    """The malicious-pickle case only stays harmless because of the missing trust flag."""
    arguments = pickle_creating_file(tmp_path, models)

    result = run_cli(*arguments, "--trust-pickle", cwd=project)

    assert result.returncode == 2
    assert "contains a TextIOWrapper, not an nn.Module" in result.stderr
    assert (tmp_path / SIDE_EFFECT).exists()
    assert not (tmp_path / "converted.pt").exists()
