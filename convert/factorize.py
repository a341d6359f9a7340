"""Low-rank factorization of a dense conv weight into depthwise and pointwise weights.

For each input channel ``c`` the slice ``W[:, c]``, reshaped to ``(C_out, prod(kernel))``,
factors by SVD into ``U S Vh``. The top ``K`` rows of ``Vh`` are the ``K`` depthwise
filters of channel ``c`` and ``U[:, :K] * S[:K]`` are the matching pointwise columns.
By the Eckart-Young theorem this is the best Frobenius-norm approximation of the
weight for that ``K``, and at ``K = min(C_out, prod(kernel))`` it is exact
(Guo et al., "Network Decoupling", BMVC 2018). For a grouped conv, channel ``c``
only feeds the outputs of its own group, so ``C_out`` above is ``C_out / groups``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "INIT_METHODS",
    "Factors",
    "factorize_weight",
    "full_rank",
    "channel_spectra",
]

# "svd": truncated SVD of the weight. "random": PyTorch's default initialization.
INIT_METHODS = ("svd", "random")


@dataclass
class Factors:
    """The two weights of a separable pair and how far their product is from the original.

    ``depthwise`` has shape ``(C_in * K, 1, *kernel)`` and ``pointwise``
    ``(C_out, C_in * K / groups, 1, ...)``, both in the original weight's dtype and
    device. ``relative_error`` is ``||W - W_K||_F / ||W||_F`` (0 for a zero weight).
    """

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    relative_error: float


def full_rank(out_channels: int, kernel_size: tuple[int, ...], groups: int = 1) -> int:
    """Return the depth multiplier at which the factorization is exact."""
    return min(out_channels // groups, math.prod(kernel_size))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype to run the SVD in: float64 stays, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Reshape a dense weight into one ``(C_out / groups, prod(kernel))`` matrix per input channel.

    The matrices are on the CPU, in the dtype the SVD runs in. Raises ``ValueError`` on NaN or inf.
    """
    # NOTE: the SVD runs on the CPU even for CUDA weights, because a batched SVD of
    # thousands of small matrices is expected to be slower through cuSOLVER; this was not
    # measured on a GPU here, and benchmarks/gpu_check.sh times both devices.
    weight = weight.detach().to(device="cpu", dtype=compute_dtype(weight.dtype))
    if not torch.isfinite(weight).all():
        raise ValueError("the weight contains NaN or infinite values, so it has no SVD")
    out_channels, in_per_group = weight.shape[:2]
    out_per_group = out_channels // groups

    # (C_out, C_in/g, *kernel) -> (g, C_out/g, C_in/g, k) -> (g, C_in/g, C_out/g, k)
    matrices = weight.reshape(groups, out_per_group, in_per_group, -1).transpose(1, 2)
    # -> (C_in, C_out/g, k): input channel c = group * C_in/g + local index
    return matrices.reshape(groups * in_per_group, out_per_group, -1)


def svd_per_channel(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a batched thin SVD, retrying in float64 if float32 does not converge."""
    try:
        return torch.linalg.svd(matrices, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrices.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(matrices.double(), full_matrices=False)
        return u.to(matrices.dtype), s.to(matrices.dtype), vh.to(matrices.dtype)


def channel_spectra(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Return the singular values of every input channel's slice, shape ``(C_in, rank)``.

    Row ``c`` is sorted in decreasing order; the error of keeping ``K`` values is
    ``sqrt(sum(s[:, K:] ** 2))``. Used by rank selection before any weight is built.
    """
    return torch.linalg.svdvals(channel_matrices(weight, groups))


def factorize_weight(weight: torch.Tensor, depth_multiplier: int, groups: int = 1) -> Factors:
    """Factor a dense conv weight into depthwise and pointwise weights by truncated SVD.

    ``weight`` has shape ``(C_out, C_in / groups, *kernel)``. The SVD runs in float32
    (float64 for float64 weights) on the CPU; the factors come back on the weight's
    device and in its dtype. ``depth_multiplier`` must not exceed :func:`full_rank`.
    """
    out_channels = weight.shape[0]
    kernel_size = tuple(weight.shape[2:])
    rank = full_rank(out_channels, kernel_size, groups)
    if not 1 <= depth_multiplier <= rank:
        raise ValueError(f"depth_multiplier={depth_multiplier}: must be between 1 and the full rank {rank}")

    u, s, vh = svd_per_channel(channel_matrices(weight, groups))
    in_channels, out_per_group, _ = u.shape
    multiplier = depth_multiplier

    # depthwise: the top K right singular vectors of each channel, (C_in, K, k) -> (C_in*K, 1, *kernel)
    depthwise = vh[:, :multiplier, :].reshape(in_channels * multiplier, 1, *kernel_size)

    # pointwise: U S of each channel, (C_in, C_out/g, K) -> (g, C_out/g, C_in/g, K) -> (C_out, C_in*K/g, 1...)
    scaled = u[:, :, :multiplier] * s[:, None, :multiplier]
    scaled = scaled.reshape(groups, in_channels // groups, out_per_group, multiplier).transpose(1, 2)
    pointwise = scaled.reshape(out_channels, in_channels // groups * multiplier, *([1] * len(kernel_size)))

    return Factors(
        depthwise=depthwise.to(device=weight.device, dtype=weight.dtype).contiguous(),
        pointwise=pointwise.to(device=weight.device, dtype=weight.dtype).contiguous(),
        relative_error=truncation_error(s, multiplier),
    )


def truncation_error(singular_values: torch.Tensor, depth_multiplier: int) -> float:
    """Return ``||W - W_K||_F / ||W||_F`` from per-channel singular values of shape ``(C_in, rank)``."""
    total = singular_values.double().pow(2).sum()
    if total == 0:
        return 0.0
    dropped = singular_values[:, depth_multiplier:].double().pow(2).sum()
    return math.sqrt(float(dropped / total))
