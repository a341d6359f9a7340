"""Every torchvision model converts and keeps its output structure.

Covers classification, segmentation, detection, keypoint, video, optical flow and
the quantization-ready float models, with random weights (nothing can be
downloaded) at small input sizes. Run alone with ``pytest -m sweep``; set
``DSCONV_SWEEP_REPORT=FILE`` to write the per-model summary table (converted,
skipped by reason, path) as Markdown.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torchvision import models

from convert import DepthwiseSeparableConvNd, run_conversion

pytestmark = pytest.mark.sweep


@dataclass
class Case:
    """How to build one model and feed it."""

    name: str
    family: str
    inputs: Callable[[], tuple[Any, ...]]
    arguments: dict[str, Any] = field(default_factory=dict)
    call_arguments: dict[str, Any] = field(default_factory=dict)


def image(size: int = 64) -> Callable[[], tuple[Any, ...]]:
    return lambda: (torch.randn(1, 3, size, size),)


def clip(frames: int, size: int) -> Callable[[], tuple[Any, ...]]:
    return lambda: (torch.randn(1, 3, frames, size, size),)


def build_cases() -> list[Case]:
    cases = []
    for name in models.list_models(module=models):
        arguments: dict[str, Any] = {}
        size = {"inception_v3": 80, "maxvit_t": 224}.get(name, 64)
        if name.startswith("vit_"):
            size = 56 if "_14" in name else 64
            arguments["image_size"] = size
        if name in ("googlenet", "inception_v3"):
            arguments["init_weights"] = False  # silences the warning about the default init changing
        cases.append(Case(name, "classification", image(size), arguments))

    backbone = {"weights": None, "weights_backbone": None}
    for name in models.list_models(module=models.segmentation):
        cases.append(Case(name, "segmentation", image(64), dict(backbone)))
    for name in models.list_models(module=models.detection):
        arguments = dict(backbone)
        if "rcnn" in name or "retinanet" in name or "fcos" in name:
            arguments.update(min_size=64, max_size=96)  # the transform would resize to 800 otherwise
        family = "keypoint detection" if "keypoint" in name else "detection"
        cases.append(Case(name, family, lambda: ([torch.rand(3, 64, 64)],), arguments))
    for name in models.list_models(module=models.video):
        inputs = clip(4, 32)
        if name.startswith("mvit"):
            inputs = clip(16, 224)  # positional embeddings fix the input size
        elif name == "s3d":
            inputs = clip(16, 224)  # the final 2x7x7 pooling needs the full size
        cases.append(Case(name, "video", inputs))
    for name in models.list_models(module=models.optical_flow):
        pair = lambda: (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))  # noqa: E731
        cases.append(Case(name, "optical flow", pair, call_arguments={"num_flow_updates": 2}))
    for name in models.list_models(module=models.quantization):
        arguments = {"init_weights": False} if name in ("quantized_googlenet", "quantized_inception_v3") else {}
        cases.append(Case(name, "quantization (float)", image(80 if "inception" in name else 64), arguments))
    return cases


CASES = build_cases()
SUMMARY: list[dict[str, Any]] = []


def structure(value: Any, loose: bool) -> Any:
    """Describe an output's structure; ``loose`` drops the leading size of tensors (detection counts)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape[1:]) if loose else tuple(value.shape))
    if isinstance(value, dict):
        return {key: structure(item, loose) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [structure(item, loose) for item in value]
    return type(value).__name__


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_model_converts_and_keeps_output_structure(case):
    torch.manual_seed(0)
    model = models.get_model(case.name, **case.arguments).eval()
    result = run_conversion(model)

    assert result.converted, "every torchvision model has at least one convertible conv"
    for layer in result.converted:
        assert isinstance(result.model.get_submodule(layer.name), DepthwiseSeparableConvNd)
    with torch.inference_mode():
        before = model(*case.inputs(), **case.call_arguments)
        after = result.model(*case.inputs(), **case.call_arguments)
    # detectors return as many boxes as pass the score threshold, which the conversion changes
    loose = case.family in ("detection", "keypoint detection")
    assert structure(after, loose) == structure(before, loose)

    SUMMARY.append(
        {
            "model": case.name,
            "family": case.family,
            "path": result.path,
            "converted": len(result.converted),
            "skipped": Counter(short_reason(layer.plan.reason) for layer in result.skipped),
        }
    )


def short_reason(reason: str) -> str:
    """Group reasons whose text carries layer-specific numbers."""
    if reason.startswith("at depth multiplier"):
        return "larger than dense"
    if reason.startswith("kernel is 1x1"):
        return "1x1"
    if reason.startswith("already depthwise"):
        return "depthwise"
    return reason


@pytest.fixture(scope="module", autouse=True)
def write_summary():
    yield
    target = os.environ.get("DSCONV_SWEEP_REPORT")
    if not target or not SUMMARY:
        return
    lines = [
        f"Generated by `DSCONV_SWEEP_REPORT={target} python -m pytest -m sweep` with torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, depth multiplier 1, random weights.",
        "",
        "| model | family | path | converted | skipped, by reason |",
        "|---|---|---|---|---|",
    ]
    for row in SUMMARY:
        skipped = ", ".join(f"{reason}: {count}" for reason, count in sorted(row["skipped"].items())) or "-"
        lines.append(f"| {row['model']} | {row['family']} | {row['path']} | {row['converted']} | {skipped} |")
    Path(target).write_text("\n".join(lines) + "\n")
