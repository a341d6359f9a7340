"""Shared fixtures and helpers for the dsconv tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m convert ARGS`` in a subprocess and capture its output."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "convert", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder holding the test models module; CLI runs start from it, as from a user's project."""
    from model_files import write_models_module

    folder = tmp_path_factory.mktemp("project")
    write_models_module(folder)
    return folder


@pytest.fixture(scope="module")
def models(project: Path):
    """The test models module, imported from the project folder."""
    from model_files import import_models

    return import_models(project)
