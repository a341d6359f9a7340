"""Time the per-channel SVD of real conv weights on the CPU and on a CUDA device.

dsconv runs the SVD on the CPU even for models on a GPU (``convert/factorize.py``).
This script measures whether that is the faster choice on the machine at hand.

    python benchmarks/factorize_device.py            # needs a CUDA device for the GPU column
"""

from __future__ import annotations

import time

import torch
import torchvision
from torch import nn

from common import describe_environment, markdown_table
from convert.factorize import channel_matrices


def time_svd(matrices: torch.Tensor, repeats: int = 3) -> float:
    """Return the fastest of ``repeats`` batched SVDs of ``matrices``, in milliseconds."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first call includes cuSOLVER's initialization
        if matrices.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.linalg.svd(matrices, full_matrices=False)
        if matrices.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    model = torchvision.models.resnet50()
    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)]
    cuda = torch.cuda.is_available()
    rows = []
    totals = [0.0, 0.0]
    for name, conv in convs:
        matrices = channel_matrices(conv.weight, conv.groups)  # on the CPU, float32
        cpu_ms = time_svd(matrices)
        cuda_ms = time_svd(matrices.cuda()) if cuda else float("nan")
        totals[0] += cpu_ms
        totals[1] += cuda_ms
        rows.append([name, tuple(matrices.shape), f"{cpu_ms:.1f}", f"{cuda_ms:.1f}" if cuda else "no CUDA device"])
    rows.append(["all", "", f"{totals[0]:.0f}", f"{totals[1]:.0f}" if cuda else "no CUDA device"])
    print("### Per-channel SVD time for resnet50's 3x3 and 7x7 convs, CPU against CUDA\n")
    print(describe_environment("cuda" if cuda else "cpu") + "\n")
    print(markdown_table(["layer", "matrices (batch, rows, cols)", "CPU ms", "CUDA ms"], rows))


if __name__ == "__main__":
    main()
