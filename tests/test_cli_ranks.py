"""The rank, calibration and plot flags of the real CLI, run in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHAPE = "1,4,12,12"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A small pickled model, calibration batches, and a file that is not calibration data."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
    )
    paths = {
        "model": tmp_path / "model.pt",
        "calibration": tmp_path / "calibration.pt",
        "not_calibration": tmp_path / "state.pt",
        "output": tmp_path / "converted.pt",
    }
    torch.save(model, paths["model"])
    torch.save([torch.randn(8, 4, 12, 12) for _ in range(3)], paths["calibration"])
    torch.save(model.state_dict(), paths["not_calibration"])
    return paths


def convert_arguments(files: dict[str, Path], *extra: str) -> list[str]:
    return ["convert", str(files["model"]), "-o", str(files["output"]), "--trust-pickle", "--input-shape", SHAPE, "--no-latency", *extra]


def test_budget_data_init_with_plot(files: dict[str, Path], tmp_path: Path) -> None:
    plot = tmp_path / "tradeoff.png"
    report = tmp_path / "report.json"
    completed = run_cli(
        *convert_arguments(files, "--rank", "budget", "--budget", "0.4", "--init", "data"),
        "--calibration-data", str(files["calibration"]),
        "--plot", str(plot),
        "--format", "json",
        "--report", str(report),
    )

    assert completed.returncode == 0, completed.stderr
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    converted = torch.load(files["output"], weights_only=False)
    content = json.loads(report.read_text())
    rows = [row for row in content["layers"] if row["reason"] is None]
    assert rows
    for row in rows:
        assert row["rank_rule"] == "budget 0.4 of params, output error"
        assert row["output_error"] <= row["svd_output_error"]
        assert row["init_used"] in ("data", "svd")
        assert converted.get_submodule(row["name"]).depth_multiplier == row["depth_multiplier"]
    assert content["after"]["parameters"] < 0.5 * content["before"]["parameters"]


def test_table_shows_output_errors(files: dict[str, Path]) -> None:
    completed = run_cli(*convert_arguments(files, "-k", "2", "--calibration-data", str(files["calibration"])))

    assert completed.returncode == 0, completed.stderr
    assert "output rel. error" in completed.stdout
    assert "on the calibration data" in completed.stdout


def test_report_with_energy(files: dict[str, Path]) -> None:
    completed = run_cli(
        "report", str(files["model"]), "--trust-pickle", "--input-shape", SHAPE, "--no-latency",
        "--rank", "energy", "--energy", "0.3", "--format", "json",
    )

    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)["layers"]
    assert {row["rank_rule"] for row in rows} == {"energy 0.3"}
    assert not files["output"].exists()


def test_latency_aware_reports_timings(files: dict[str, Path]) -> None:
    # `report` rather than `convert`: on a slow or busy machine every layer may stay dense,
    # which `convert` treats as a failure (nothing to write) and `report` does not.
    completed = run_cli(
        "report", str(files["model"]), "--trust-pickle", "--input-shape", SHAPE, "--no-latency",
        "-k", "2", "--latency-aware", "--layer-latency-time", "0.01", "--format", "json",
    )

    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)["layers"]
    for row in rows:
        assert row["dense_ms"] > 0
        assert row["separable_ms"] > 0
        assert (row["reason"] is None) == (row["separable_ms"] < row["dense_ms"])


def test_budget_on_macs(files: dict[str, Path]) -> None:
    completed = run_cli(*convert_arguments(files, "--rank", "budget", "--budget", "0.5", "--budget-on", "macs", "--format", "json"))

    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)["layers"]
    assert {row["rank_rule"] for row in rows} == {"budget 0.5 of macs, weight error"}
    spent = sum(row["macs_after"] if row["reason"] is None else row["macs_before"] for row in rows)
    assert spent <= 0.5 * sum(row["macs_before"] for row in rows)


def test_inspect_plot(files: dict[str, Path], tmp_path: Path) -> None:
    plot = tmp_path / "inspect.svg"
    completed = run_cli("inspect", str(files["model"]), "--trust-pickle", "--plot", str(plot))

    assert completed.returncode == 0, completed.stderr
    assert plot.read_text().lstrip().startswith("<?xml")

    again = run_cli("inspect", str(files["model"]), "--trust-pickle", "--plot", str(plot))
    assert again.returncode == 2
    assert "already exists; pass --force" in again.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank", "energy", "--energy", "1.5"], "argument --energy: 1.5 is not in (0, 1]"),
        (["--rank", "budget", "--budget", "zero"], "argument --budget: 'zero' is not a number"),
        (["--rank", "fast"], "argument --rank: invalid choice: 'fast'"),
        (["--energy", "0.9"], "energy=0.9 is only used with rank='energy'; pass rank='energy' (--rank energy)"),
        (["--rank", "energy"], "rank='energy' needs energy= (--energy)"),
        (["--budget-on", "macs"], "budget_on='macs' is only used with rank='budget'"),
        (["--rank", "budget", "--budget", "0.01"], "budget=0.01: the smallest separable forms"),
        (["--rank", "budget", "--budget", "0.5", "-k", "2"], "--depth-multiplier is only used with --rank fixed"),
        (["--init", "data"], "--init data needs --calibration-data FILE"),
        (["--layer-latency-time", "0.5"], "(--layer-latency-time) is only used with latency_aware=True (--latency-aware)"),
        (["--plot", "tradeoff.txt"], "the suffix 'txt' is not an image format"),
    ],
    ids=["energy-range", "budget-text", "rank-choice", "energy-without-rank", "rank-without-energy", "budget-on", "budget-small", "multiplier-with-budget", "data-without-file", "latency-time", "plot-suffix"],
)
def test_bad_values_exit_2(files: dict[str, Path], tmp_path: Path, extra: list[str], message: str) -> None:
    extra = [str(tmp_path / part) if part.endswith(".txt") else part for part in extra]
    completed = run_cli(*convert_arguments(files, *extra))

    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith(("dsconv: error:", "dsconv convert: error:"))
    assert not files["output"].exists()


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ("not_calibration", "contains a mapping (OrderedDict), such as a state dict"),
        ("missing", "not found"),
    ],
)
def test_bad_calibration_file(files: dict[str, Path], tmp_path: Path, calibration: str, message: str) -> None:
    path = files.get(calibration, tmp_path / "missing.pt")
    completed = run_cli(*convert_arguments(files, "--init", "data", "--calibration-data", str(path)))

    assert completed.returncode == 2
    assert message in completed.stderr
    assert str(path) in completed.stderr
    assert not files["output"].exists()


def test_calibration_batches_of_wrong_shape(files: dict[str, Path], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.randn(2, 3, 12, 12), wrong)
    completed = run_cli(*convert_arguments(files, "--init", "data", "--calibration-data", str(wrong)))

    assert completed.returncode == 1
    assert "the model failed on a calibration batch of shape (2, 3, 12, 12)" in completed.stderr
    assert not files["output"].exists()


def test_plot_without_matplotlib(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("matplotlib is blocked for this test")\n')
    monkeypatch.setenv("PYTHONPATH", str(blocker.parent))

    completed = run_cli(*convert_arguments(files, "--plot", str(tmp_path / "plot.png")))

    assert completed.returncode == 2
    assert "plotting needs matplotlib, which is not installed: pip install matplotlib (or the project's [plot] extra)" in completed.stderr
    assert not files["output"].exists()
