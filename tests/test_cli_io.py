"""CLI behaviour around inputs and outputs: exit codes, logs, reports, --check, --force, progress bars."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_cli
from model_files import INPUT_SHAPE_TEXT


@pytest.fixture
def source(models, tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save({"model": models.tiny_net().state_dict(), "epoch": 5}, path)
    return path


def convert(source: Path, output: Path, *extra: str) -> list[str]:
    return [
        "convert", str(source), "-o", str(output), "--arch", "dsconv_test_models:tiny_net",
        "--input-shape", INPUT_SHAPE_TEXT, "--no-latency", *extra,
    ]


@pytest.mark.parametrize("command", [[], ["convert"], ["densify"]])
def test_help_lists_exit_codes(command: list[str]) -> None:
    result = run_cli(*command, "--help")

    assert result.returncode == 0
    assert "exit codes:" in result.stdout
    assert "0    success" in result.stdout
    assert "1    the conversion or its verification failed" in result.stdout
    assert "2    usage error" in result.stdout


def test_debug_shows_traceback(project: Path, tmp_path: Path) -> None:
    arguments = convert(tmp_path / "missing.pt", tmp_path / "out.pt")

    plain = run_cli(*arguments, cwd=project)
    debug = run_cli(*arguments, "--debug", cwd=project)

    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert "CheckpointError" in debug.stderr


def test_logs_follow_verbosity(project: Path, source: Path, tmp_path: Path) -> None:
    quiet = run_cli(*convert(source, tmp_path / "quiet.pt", "-q"), cwd=project)
    default = run_cli(*convert(source, tmp_path / "default.pt"), cwd=project)
    verbose = run_cli(*convert(source, tmp_path / "verbose.pt", "-v"), cwd=project)

    for result in (quiet, default, verbose):
        assert result.returncode == 0, result.stderr
        assert "dsconv report: TinyNet" in result.stdout
        assert "dsconv: INFO" not in result.stdout
    assert quiet.stderr == ""
    assert "dsconv: INFO" not in default.stderr
    assert "dsconv: INFO: weights read from the checkpoint's entry 'model'" in verbose.stderr


def test_report_file_replaces_stdout(project: Path, source: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.md"

    result = run_cli(*convert(source, tmp_path / "out.pt", "--report", str(report), "--format", "markdown"), cwd=project)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert report.read_text().startswith("## dsconv report: TinyNet")


def test_report_command_writes_only_report(project: Path, source: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"

    result = run_cli(
        "report", str(source), "--arch", "dsconv_test_models:tiny_net", "--input-shape", INPUT_SHAPE_TEXT,
        "--no-latency", "--format", "json", "--report", str(report), cwd=project,
    )

    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json", "weights.pt"]
    assert '"model": "TinyNet"' in report.read_text()


def test_check_passes_at_full_rank(project: Path, source: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"

    result = run_cli(*convert(source, output, "-k", "9", "--allow-larger", "--check", "3"), cwd=project)

    assert result.returncode == 0, result.stderr
    assert "check on 3 random inputs of shape 1,3,16,16" in result.stdout
    assert "passed" in result.stdout
    assert output.exists()


def test_check_failure_can_keep_output(project: Path, source: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"

    result = run_cli(*convert(source, output, "--check", "2", "--keep-on-check-failure"), cwd=project)

    assert result.returncode == 1
    assert "--check failed" in result.stderr
    assert "the outputs were written anyway (--keep-on-check-failure)" in result.stderr
    assert "FAILED" in result.stdout
    assert type(torch.load(output, weights_only=False)).__name__ == "TinyNet"


def test_check_tolerance_is_settable(project: Path, source: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"

    result = run_cli(*convert(source, output, "--check", "2", "--rtol", "10"), cwd=project)

    assert result.returncode == 0, result.stderr
    assert "(rtol 10, atol 1e-06): passed" in result.stdout


def test_force_replaces_output(project: Path, source: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"
    output.write_bytes(b"an earlier result")

    result = run_cli(*convert(source, output, "--force"), cwd=project)

    assert result.returncode == 0, result.stderr
    assert type(torch.load(output, weights_only=False)).__name__ == "TinyNet"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.pt", "weights.pt"]


def test_inspect_reads_wrapped_checkpoint(project: Path, source: Path) -> None:
    result = run_cli("inspect", str(source), "--arch", "dsconv_test_models:tiny_net", cwd=project)

    assert result.returncode == 0, result.stderr
    assert "features.3" in result.stdout


def test_no_progress_bar_without_terminal(project: Path, source: Path, tmp_path: Path) -> None:
    result = run_cli(*convert(source, tmp_path / "out.pt", "--check", "2000", "--rtol", "10"), cwd=project)

    assert result.returncode == 0, result.stderr
    assert "check:" not in result.stderr
    assert "\r" not in result.stderr


@pytest.mark.slow
def test_progress_bar_on_terminal(project: Path, source: Path, tmp_path: Path) -> None:
    """With stderr on a terminal, the long --check loop shows a tqdm bar; the run is stopped once it appears."""
    arguments = convert(source, tmp_path / "out.pt", "--check", "1000000", "--rtol", "10", "--report", str(tmp_path / "r.txt"))
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    controller, terminal = pty.openpty()
    # A fresh pseudo-terminal is 0 columns wide, and tqdm draws nothing at width 0.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "convert", *arguments],
        cwd=project, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal,
    )
    os.close(terminal)
    captured = b""
    deadline = time.monotonic() + 300
    try:
        while b"/1000000" not in captured and time.monotonic() < deadline and process.poll() is None:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                captured += os.read(controller, 4096)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()

    assert b"check:" in captured
    assert b"/1000000" in captured
    assert process.returncode == 130
    assert not (tmp_path / "out.pt").exists()
