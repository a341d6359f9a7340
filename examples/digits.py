"""Convert a CNN trained on real handwriting, with each init at several budgets, and fine-tune it.

The data is scikit-learn's bundled digits set (1,797 scanned digits, 8x8 pixels,
16 grey levels), so nothing is downloaded. The script trains a four-conv CNN,
converts it with ``rank="budget"`` at each budget and each init (random, svd,
data), fine-tunes every converted model briefly, and prints one table of
parameters, MACs and test accuracy before and after fine-tuning.

Run from the repository root (takes well under a minute on a laptop CPU)::

    python examples/digits.py

Seeds are fixed, so a rerun on the same machine and library versions prints the
same table. Other CPUs or library versions can move an accuracy by a test image
or two.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from convert import DepthwiseSeparableConvNd, run_conversion  # noqa: E402
from convert.measure import count_macs  # noqa: E402

SEED = 0
BUDGETS = (0.25, 0.33, 0.5)
INITS = ("random", "svd", "data")
TEST_SHARE = 0.3
BATCH_SIZE = 16
TRAIN_EPOCHS = 10
TRAIN_LEARNING_RATE = 3e-3
FINETUNE_EPOCHS = 2
FINETUNE_LEARNING_RATE = 1e-3


@dataclass
class DigitsData:
    """Standardized images ``(N, 1, 8, 8)`` and labels, split into train and test sets."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits_data(seed: int = SEED) -> DigitsData:
    """Load scikit-learn's digits, split off a stratified test set and standardize with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_images, test_images, train_labels, test_labels = train_test_split(
        digits.images, digits.target, test_size=TEST_SHARE, random_state=seed, stratify=digits.target
    )
    train = torch.tensor(train_images, dtype=torch.float32).unsqueeze(1)
    test = torch.tensor(test_images, dtype=torch.float32).unsqueeze(1)
    mean, std = train.mean(), train.std()
    return DigitsData(
        (train - mean) / std,
        torch.tensor(train_labels),
        (test - mean) / std,
        torch.tensor(test_labels),
    )


class DigitsNet(nn.Module):
    """Four 3x3 convs with ReLU, two max-pools and a linear classifier, for 8x8 inputs."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Linear(2 * width * 2 * 2, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))


def train(model: nn.Module, data: DigitsData, epochs: int, max_learning_rate: float, seed: int = SEED) -> nn.Module:
    """Train with Adam, a one-cycle learning-rate schedule and cross-entropy on shuffled batches of 16.

    Returns the model in eval mode; with ``epochs=0`` it only switches to eval mode.
    """
    if epochs == 0:
        return model.eval()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=max_learning_rate)
    batches_per_epoch = math.ceil(len(data.train_labels) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_learning_rate, total_steps=epochs * batches_per_epoch)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_labels), generator=generator)
        for batch in order.split(BATCH_SIZE):
            optimizer.zero_grad()
            loss = loss_function(model(data.train_images[batch]), data.train_labels[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the share of ``images`` that ``model`` classifies correctly."""
    model.eval()
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    return float((predictions == labels).float().mean())


def conv_parameters(model: nn.Module) -> int:
    """Count the parameters of dense convs and of separable layers (the part a conversion changes)."""
    total = 0
    inside_separable: set[int] = set()
    for module in model.modules():  # a parent comes before its children
        if isinstance(module, DepthwiseSeparableConvNd):
            total += sum(parameter.numel() for parameter in module.parameters())
            inside_separable.update(id(child) for child in module.modules())
        elif type(module) is nn.Conv2d and id(module) not in inside_separable:
            total += sum(parameter.numel() for parameter in module.parameters())
    return total


@dataclass
class ResultRow:
    """One line of the table."""

    model: str
    budget: float | None
    init: str
    parameters: int
    conv_parameters: int
    macs: int
    accuracy_before: float
    accuracy_after: float | None
    multipliers: str = "-"


def run_benchmark(
    budgets: Sequence[float] = BUDGETS,
    inits: Sequence[str] = INITS,
    epochs: int = TRAIN_EPOCHS,
    finetune_epochs: int = FINETUNE_EPOCHS,
    calibration_samples: int = 512,
    seed: int = SEED,
) -> list[ResultRow]:
    """Train the original, convert it with every (budget, init) pair, fine-tune each copy; return the rows."""
    torch.manual_seed(seed)
    data = load_digits_data(seed)
    original = train(DigitsNet(), data, epochs, TRAIN_LEARNING_RATE, seed=seed)
    sample = data.test_images[:1]
    rows = [measure_row("original", None, "-", original, None, data, sample)]

    # Calibration: the first training images, in batches of 128; no test image is seen. Every
    # init gets them, so the budget picks the same K per layer for all three and only the
    # initialization differs between rows of one budget.
    calibration = data.train_images[:calibration_samples].split(128)
    for budget in budgets:
        for init in inits:
            torch.manual_seed(seed)  # the random init draws the same weights on every run
            result = run_conversion(
                original,
                rank="budget",
                budget=budget,
                init=init,
                calibration_data=calibration,
                show_progress=False,
            )
            converted = result.model
            before = accuracy(converted, data.test_images, data.test_labels)
            train(converted, data, finetune_epochs, FINETUNE_LEARNING_RATE, seed=seed)
            multipliers = "/".join(str(layer.plan.depth_multiplier or "dense") for layer in result.layers)
            rows.append(measure_row("converted", budget, init, converted, before, data, sample, multipliers))
    return rows


def measure_row(
    label: str,
    budget: float | None,
    init: str,
    model: nn.Module,
    before: float | None,
    data: DigitsData,
    sample: torch.Tensor,
    multipliers: str = "-",
) -> ResultRow:
    """Measure one model; ``before`` is its accuracy before fine-tuning (``None`` for the original)."""
    macs, _ = count_macs(model, sample)
    final = accuracy(model, data.test_images, data.test_labels)
    return ResultRow(
        model=label,
        budget=budget,
        init=init,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        conv_parameters=conv_parameters(model),
        macs=macs,
        accuracy_before=final if before is None else before,
        accuracy_after=None if before is None else final,
        multipliers=multipliers,
    )


def render_rows(rows: Sequence[ResultRow]) -> str:
    """Render the rows as a GitHub Markdown table."""
    from tabulate import tabulate

    original = rows[0]
    table = []
    for row in rows:
        table.append(
            [
                row.model,
                "-" if row.budget is None else f"{row.budget:g}",
                row.init,
                row.multipliers,
                f"{row.parameters:,}",
                f"{row.conv_parameters:,} ({row.conv_parameters / original.conv_parameters:.0%})",
                f"{row.macs:,}",
                f"{row.accuracy_before:.2%}",
                "-" if row.accuracy_after is None else f"{row.accuracy_after:.2%}",
            ]
        )
    headers = ["model", "budget", "init", "K per conv", "parameters", "conv parameters (kept)", "MACs", "test accuracy", "after fine-tuning"]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS), help="comma-separated shares of conv parameters to keep")
    parser.add_argument("--epochs", type=int, default=TRAIN_EPOCHS, help=f"training epochs of the original model (default: {TRAIN_EPOCHS})")
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS, help=f"fine-tuning epochs of each converted model (default: {FINETUNE_EPOCHS})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1; the model is so small that more threads mostly add overhead)")
    parser.add_argument("--calibration-samples", type=int, default=512, help="training images used as calibration data (default: 512)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    budgets = tuple(float(part) for part in arguments.budgets.split(","))
    torch.set_num_threads(arguments.threads)
    started = time.perf_counter()
    rows = run_benchmark(budgets, INITS, arguments.epochs, arguments.finetune_epochs, arguments.calibration_samples)
    print(render_rows(rows))
    print(f"\n{time.perf_counter() - started:.0f} s; MACs per image (FlopCounterMode FLOPs / 2)")


if __name__ == "__main__":
    main()
