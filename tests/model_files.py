"""Test models written as a real module file, and helpers to compare folders before and after a run.

The CLI imports ``--arch`` factories and pickled classes by module name, as it
would in a user's project folder, so the models live in a file that the tests
write into a folder and run the CLI from.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from types import ModuleType

MODULE_NAME = "dsconv_test_models"

# The sample input every model below accepts.
INPUT_SHAPE = (1, 3, 16, 16)
INPUT_SHAPE_TEXT = "1,3,16,16"

MODELS_SOURCE = '''\
"""Small models for the dsconv checkpoint and CLI tests."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.config = {"width": width, "tags": ["test"]}
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def tiny_net(num_classes: int = 10, width: int = 16) -> TinyNet:
    return TinyNet(num_classes, width)


class RenamedNet(nn.Module):
    """The shapes of TinyNet under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.body = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.stem(x)))
        return self.classifier(torch.relu(self.body(x)).mean((2, 3)))


def renamed_net() -> RenamedNet:
    return RenamedNet()


class Holder(nn.Module):
    """A model whose only child is named ``module``, like a DataParallel wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.module = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def holder() -> Holder:
    return Holder()


def linear_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))


def failing_net() -> nn.Module:
    raise RuntimeError("the factory cannot build this model")
'''


def write_models_module(folder: Path) -> Path:
    """Write the models module into ``folder`` and return its path."""
    path = folder / f"{MODULE_NAME}.py"
    path.write_text(MODELS_SOURCE)
    return path


def import_models(folder: Path) -> ModuleType:
    """Import the models module from ``folder`` into this process (same source in every folder)."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(MODULE_NAME)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Map every file under ``folder`` (hidden ones included) to its SHA-256."""
    return {str(path.relative_to(folder)): digest(path) for path in sorted(folder.rglob("*")) if path.is_file()}
