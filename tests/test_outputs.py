"""Output files: all-or-nothing publishing, and every save form reloading in a fresh process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_cli
from model_files import INPUT_SHAPE, INPUT_SHAPE_TEXT, snapshot

from convert import convert_model
from convert.errors import CheckpointError
from convert.outputs import OutputSet, check_output_targets, default_plan_path, keep_plain_attributes

# Outputs of one float32 model computed in two processes, or after a reload: same weights, same kernels.
RELOAD_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def write_bytes(data: bytes):
    def write(handle) -> None:
        handle.write(data)

    return write


def test_output_set_publishes_together(tmp_path: Path) -> None:
    first, second = tmp_path / "model.pt", tmp_path / "model.plan.json"

    with OutputSet() as outputs:
        outputs.add(first, write_bytes(b"weights"))
        outputs.add(second, write_bytes(b"{}"))
        published_early = first.exists() or second.exists()
        outputs.commit()

    assert not published_early
    assert first.read_bytes() == b"weights"
    assert second.read_bytes() == b"{}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.plan.json", "model.pt"]


def test_output_set_failure_leaves_nothing(tmp_path: Path) -> None:
    def fail(handle) -> None:
        handle.write(b"half of a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        with OutputSet() as outputs:
            outputs.add(tmp_path / "model.pt", write_bytes(b"weights"))
            outputs.add(tmp_path / "report.txt", fail)
            outputs.commit()

    assert list(tmp_path.iterdir()) == []


def test_failed_rename_restores_earlier_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "model.pt", tmp_path / "model.plan.json"
    first.write_bytes(b"old model")
    real_replace = os.replace
    calls = []

    def replace_failing_second(source, target) -> None:
        calls.append(Path(target).name)
        if Path(target) == second:
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    outputs = OutputSet(force=True)
    outputs.add(first, write_bytes(b"new model"))
    outputs.add(second, write_bytes(b"{}"))
    monkeypatch.setattr(os, "replace", replace_failing_second)
    with pytest.raises(OSError, match="No space left"):
        outputs.commit()
    monkeypatch.undo()

    assert "model.plan.json" in calls
    assert first.read_bytes() == b"old model"
    assert not second.exists()
    assert [path.name for path in tmp_path.iterdir()] == ["model.pt"]


def test_new_output_gets_umask_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with OutputSet() as outputs:
            outputs.add(tmp_path / "model.pt", write_bytes(b"x"))
            outputs.commit()
    finally:
        os.umask(umask)

    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o644


def test_output_targets_must_differ(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="two outputs would both be written"):
        check_output_targets([tmp_path / "a.pt", tmp_path / "." / "a.pt"], force=False)


def test_unwritable_folder_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))

    with pytest.raises(CheckpointError, match=f"output folder {tmp_path} is not writable"):
        check_output_targets([tmp_path / "a.pt"], force=False)


def test_default_plan_path() -> None:
    assert default_plan_path(Path("out/resnet_ds.safetensors")) == Path("out/resnet_ds.plan.json")
    assert default_plan_path(Path("model")) == Path("model.plan.json")


def test_keep_plain_attributes(models) -> None:
    original = models.tiny_net(num_classes=3)
    original.callback = print
    graph = torch.fx.symbolic_trace(original)

    dropped = keep_plain_attributes(original, graph)

    assert graph.num_classes == 3
    assert graph.config == {"width": 16, "tags": ["test"]}
    assert dropped == ["callback"]


RELOAD_SCRIPT = """\
import sys
import torch

form, output, plan, example_path, result_path = sys.argv[1:6]
example = torch.load(example_path)
if form in ("module", "graph-module"):
    model = torch.load(output, weights_only=False)
else:
    import dsconv_test_models
    from convert import apply_plan
    model = apply_plan(dsconv_test_models.tiny_net(num_classes=6), plan)
    if form == "safetensors":
        from safetensors.torch import load_file
        state_dict = load_file(output)
    else:
        state_dict = torch.load(output, weights_only=True)
    model.load_state_dict(state_dict)
model.eval()
with torch.no_grad():
    result = model(example)
attributes = {name: getattr(model, name, None) for name in ("num_classes", "config")}
torch.save({"output": result, "attributes": attributes, "class": type(model).__name__,
            "user_module_imported": "dsconv_test_models" in sys.modules}, result_path)
"""


@pytest.mark.parametrize("form", ["module", "graph-module", "state-dict", "safetensors"])
def test_save_form_reloads_in_fresh_process(project: Path, models, tmp_path: Path, form: str) -> None:
    model = models.tiny_net(num_classes=6).eval()
    source = tmp_path / "model.pt"
    torch.save(model, source)
    suffix = ".safetensors" if form == "safetensors" else ".pt"
    output = tmp_path / f"converted{suffix}"
    example = torch.randn(INPUT_SHAPE)
    torch.save(example, tmp_path / "example.pt")

    converted = run_cli(
        "convert", str(source), "-o", str(output), "--trust-pickle", "--save-as", form,
        "--input-shape", INPUT_SHAPE_TEXT, "--no-latency", "-k", "2", cwd=project,
    )
    assert converted.returncode == 0, converted.stderr

    # The graph-module form must load without the model's source, so that reload runs outside the project.
    reload_folder = tmp_path if form == "graph-module" else project
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    plan = default_plan_path(output)
    reloaded = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, form, str(output), str(plan), str(tmp_path / "example.pt"), str(tmp_path / "result.pt")],
        cwd=reload_folder, env=environment, capture_output=True, text=True,
    )
    assert reloaded.returncode == 0, reloaded.stderr
    result = torch.load(tmp_path / "result.pt", weights_only=False)

    with torch.no_grad():
        expected = convert_model(model, depth_multiplier=2)(example)
    torch.testing.assert_close(result["output"], expected, **RELOAD_TOLERANCE)
    if form in ("module", "graph-module"):
        assert result["attributes"] == {"num_classes": 6, "config": {"width": 16, "tags": ["test"]}}
        assert not plan.exists()
    else:
        assert json.loads(plan.read_text())["format"] == "dsconv-plan"
    if form == "graph-module":
        assert not result["user_module_imported"]


def test_plan_output_with_module_form(project: Path, models, tmp_path: Path) -> None:
    source = tmp_path / "weights.pt"
    torch.save(models.tiny_net().state_dict(), source)
    plan = tmp_path / "plans" / "tiny.json"
    plan.parent.mkdir()

    result = run_cli(
        "convert", str(source), "-o", str(tmp_path / "converted.pt"), "--arch", "dsconv_test_models:tiny_net",
        "--plan-output", str(plan), "--input-shape", INPUT_SHAPE_TEXT, "--no-latency", cwd=project,
    )

    assert result.returncode == 0, result.stderr
    layers = json.loads(plan.read_text())["layers"]
    assert [(layer["name"], layer["depth_multiplier"]) for layer in layers] == [("features.0", 1), ("features.3", 1)]
    assert f"conversion plan written to {plan}" in result.stdout


@pytest.mark.parametrize(("signal_number", "exit_code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_interrupted_run_writes_nothing(project: Path, models, tmp_path: Path, signal_number: int, exit_code: int, word: str) -> None:
    source = tmp_path / "weights.pt"
    torch.save(models.tiny_net().state_dict(), source)
    before = snapshot(tmp_path)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "convert", "convert", str(source), "-o", str(tmp_path / "converted.pt"),
        "--arch", "dsconv_test_models:tiny_net", "--input-shape", INPUT_SHAPE_TEXT, "--no-latency",
        "--check", "1000000", "--rtol", "1", "--report", str(tmp_path / "report.txt"), "-v",
    ]
    process = subprocess.Popen(command, cwd=project, env=environment, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        # The conversion log comes before the million-input check, so the signal lands before anything is written.
        for line in process.stderr:
            if "converted 2 of 2 convs" in line:
                break
        time.sleep(0.5)
        process.send_signal(signal_number)
        _, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == exit_code
    assert f"dsconv: {word}; nothing was written" in rest
    assert snapshot(tmp_path) == before


def test_save_model_gets_umask_permissions(tmp_path: Path) -> None:
    from convert.checkpoint import save_model

    umask = os.umask(0o022)
    try:
        save_model(torch.nn.Conv2d(1, 1, 1), tmp_path / "conv.pt")
    finally:
        os.umask(umask)

    assert (tmp_path / "conv.pt").stat().st_mode & 0o777 == 0o644
