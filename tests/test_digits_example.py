"""The digits example: data-aware init keeps the accuracy of a CNN trained on real handwriting."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
import torch

from conftest import REPO_ROOT


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_example", REPO_ROOT / "examples" / "digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look up their module while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_data_init_keeps_accuracy_before_finetuning() -> None:
    pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn (the dev extra)")
    digits = load_example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the documented table: one thread, so the float sums match it
    try:
        rows = digits.run_benchmark(budgets=(0.25, 0.33), inits=("svd", "data"), finetune_epochs=0)
    finally:
        torch.set_num_threads(threads)

    original = rows[0]
    by_setting = {(row.budget, row.init): row for row in rows[1:]}
    assert original.accuracy_before >= 0.97

    quarter = by_setting[(0.25, "data")]
    third = by_setting[(0.33, "data")]
    assert quarter.conv_parameters <= 0.25 * original.conv_parameters
    assert 0.28 * original.conv_parameters <= third.conv_parameters <= 0.33 * original.conv_parameters
    assert quarter.accuracy_before >= 0.97 * original.accuracy_before
    assert third.accuracy_before >= 0.99 * original.accuracy_before
    # the same K per layer with weight SVD loses clearly more before fine-tuning
    assert by_setting[(0.25, "svd")].multipliers == quarter.multipliers
    assert by_setting[(0.25, "svd")].accuracy_before < quarter.accuracy_before - 0.01
