"""Checking a converted model against the original on random inputs (``--check N``).

Both models run on the same ``N`` random normal inputs. For every input, the
check passes when ``max|converted - original| <= atol + rtol * max|original|``
over all output tensors, the same shape of test as :func:`torch.allclose`, but
relative to the largest output so that entries near zero do not dominate. Any
NaN or infinite output fails.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .measure import iter_tensors
from .progress import progress

__all__ = ["CheckResult", "check_outputs", "non_finite_parameters"]

log = logging.getLogger(__name__)


@dataclass
class CheckResult:
    """The worst output difference over all checked inputs, and whether it is within tolerance.

    ``max_relative`` is ``max_absolute`` divided by the largest absolute original
    output of the same input. ``problem`` is the reason the check failed, in words
    (``None`` when it passed).
    """

    inputs: int
    input_shape: tuple[int, ...]
    rtol: float
    atol: float
    max_absolute: float
    max_relative: float
    passed: bool
    problem: str | None = None

    def describe(self) -> str:
        """Return one line for the report."""
        verdict = "passed" if self.passed else f"FAILED: {self.problem}"
        shape = ",".join(map(str, self.input_shape))
        return (
            f"check on {self.inputs} random inputs of shape {shape}: max abs difference {self.max_absolute:.3g}, "
            f"max relative {self.max_relative:.3g} (rtol {self.rtol:g}, atol {self.atol:g}): {verdict}"
        )


def check_outputs(
    original: nn.Module,
    converted: nn.Module,
    input_shape: Sequence[int],
    count: int,
    *,
    rtol: float,
    atol: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> CheckResult:
    """Run ``count`` random inputs through both models (in their current modes) and compare the outputs.

    Inputs come from a generator seeded with ``seed``, so a check is repeatable.
    Raises ``ValueError`` for a non-positive ``count`` or a negative tolerance, and
    whatever the models raise on an input of ``input_shape``.
    """
    if count < 1:
        raise ValueError(f"count={count}: must be >= 1")
    if rtol < 0 or atol < 0 or math.isnan(rtol) or math.isnan(atol):
        raise ValueError(f"rtol={rtol}, atol={atol}: tolerances must be >= 0")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = tuple(input_shape)
    worst_absolute = 0.0
    worst_relative = 0.0
    problem = None
    for index in progress(range(count), description="check"):
        example = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        with torch.no_grad():
            expected = original(example)
            actual = converted(example)
        absolute, reference, input_problem = compare(expected, actual, index)
        if reference > 0:
            relative = absolute / reference
        else:
            relative = 0.0 if absolute == 0 else math.inf
        worst_absolute = max(worst_absolute, absolute)
        worst_relative = max(worst_relative, relative)
        if input_problem is None and absolute > atol + rtol * reference:
            input_problem = f"input {index}: max abs difference {absolute:.3g} exceeds atol + rtol * max|original| = {atol + rtol * reference:.3g}"
        if input_problem is not None and problem is None:
            problem = input_problem
    result = CheckResult(count, shape, rtol, atol, worst_absolute, worst_relative, problem is None, problem)
    log.info("%s", result.describe())
    return result


def compare(expected: object, actual: object, index: int) -> tuple[float, float, str | None]:
    """Return the max absolute difference, the max absolute original value, and a problem if any."""
    originals = list(iter_tensors(expected))
    converteds = list(iter_tensors(actual))
    if len(originals) != len(converteds):
        return math.inf, 0.0, f"input {index}: the models return {len(originals)} and {len(converteds)} tensors"
    absolute = 0.0
    reference = 0.0
    for position, (before, after) in enumerate(zip(originals, converteds)):
        if before.shape != after.shape:
            return math.inf, 0.0, f"input {index}: output {position} has shape {tuple(before.shape)} vs {tuple(after.shape)}"
        if not before.is_floating_point() or before.numel() == 0:
            if not torch.equal(before, after):
                return math.inf, 0.0, f"input {index}: non-floating output {position} differs"
            continue
        before = before.detach().double()
        after = after.detach().double()
        if not torch.isfinite(before).all():
            return math.inf, 0.0, f"input {index}: the original model's output {position} contains NaN or inf"
        if not torch.isfinite(after).all():
            return math.inf, 0.0, f"input {index}: the converted model's output {position} contains NaN or inf"
        absolute = max(absolute, float((before - after).abs().max()))
        reference = max(reference, float(before.abs().max()))
    return absolute, reference, None


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Return the names of the parameters that contain NaN or infinite values."""
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.is_floating_point() and not torch.isfinite(parameter.detach()).all()
    ]
