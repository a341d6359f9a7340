"""Data-aware initialization: fit each separable layer to the original layer's outputs on calibration data.

Weight SVD gives the best approximation of a conv's weights, not of its outputs.
Here each planned conv is fitted, in the order the forward calls them, on
calibration batches:

1. Depthwise filters. For input channel ``c`` with weight slice ``W_c`` (shape
   ``(C_out / groups, k)``, ``k`` the kernel's element count), the separable form
   computes ``M_c p`` from the channel's input patch ``p``, with ``M_c`` of rank K.
   The layer's input in the partly converted model (patches ``q``) differs from
   the original model's (patches ``p``), so the target is
   ``min E||W_c p - M_c q||^2`` (asymmetric reconstruction, Zhang et al.,
   "Accelerating Very Deep Convolutional Networks for Classification and
   Detection", 2015). Its solution is the rank-K truncated SVD of ``M* L``, where
   ``M* = W_c E[p q^T] E[q q^T]^-1`` and ``L`` is the Cholesky factor of
   ``E[q q^T]``: this is the whitening step. The depthwise filters are the top
   right singular vectors mapped back through ``L^-1``.
2. Pointwise weights and bias. With those depthwise filters fixed, the pointwise
   conv is a linear map from the depthwise outputs ``h`` to the original layer's
   outputs ``y``, solved by ridge least squares from ``E[h h^T]`` and ``E[y h^T]``
   over all channels together, so correlations between channels count too.
3. Guard. The weight-SVD layer is measured on the same batches; whichever of the
   two has the lower output error is kept, so ``init="data"`` never returns a
   layer worse than weight SVD on the data it was given.

Statistics are sums over batches in float64, so memory does not grow with the
number of batches. Each layer takes two passes over the data, each running the
original and the converted model up to that layer.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import PickleRejected, check_readable_file, read_weights_only
from .errors import CheckpointError, ConversionError, UsageError
from .factorize import Factors, channel_matrices, factorize_weight
from .layers import DepthwiseSeparableConvNd, separable_type_for
from .selection import ConvSite, LayerPlan

__all__ = [
    "RIDGE",
    "CalibrationData",
    "LayerFit",
    "fit_layers",
    "load_calibration_batches",
    "measure_output_errors",
    "output_spectra",
]

log = logging.getLogger(__name__)

# Ridge added to a covariance's diagonal, as a share of its mean diagonal entry. It
# keeps singular covariances (dead channels, constant inputs) solvable while moving
# a well-conditioned solution by about this relative amount.
RIDGE = 1e-5

Swap = Callable[[nn.Module, dict[str, nn.Module]], nn.Module]


class CalibrationData:
    """Calibration batches, validated, iterated as input tensors on the model's device.

    ``data`` is a tensor (one batch) or a re-iterable collection of batches, such
    as a list or a ``DataLoader``. A batch is a tensor or a tuple/list whose first
    item is the input tensor. One-shot iterators (generators) are rejected, because
    the fit reads the data several times.
    """

    def __init__(self, data: object, device: torch.device) -> None:
        if isinstance(data, torch.Tensor):
            data = [data]
        elif not isinstance(data, Iterable) or isinstance(data, (str, bytes, dict)):
            raise TypeError(
                f"calibration_data of type {type(data).__name__} is not supported: pass a tensor, "
                "a list of tensors or a DataLoader"
            )
        elif iter(data) is data:
            raise TypeError(
                f"calibration_data is a one-shot iterator ({type(data).__name__}), but it is read several times: "
                "pass a list, a tensor or a DataLoader"
            )
        self.data = data
        self.device = device

    def __iter__(self) -> Iterator[torch.Tensor]:
        empty = True
        for index, batch in enumerate(self.data):
            empty = False
            yield batch_input(batch, index).to(self.device)
        if empty:
            raise UsageError("calibration_data contains no batches")

    def __len__(self) -> int:
        try:
            return len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return 0


def load_calibration_batches(path: str | os.PathLike[str]) -> list[torch.Tensor]:
    """Read calibration batches saved with ``torch.save``: a tensor (one batch) or a list/tuple of tensors.

    The file is read with ``weights_only=True`` on the CPU. Raises
    :class:`CheckpointError` naming the file when it cannot be read or contains
    anything else.
    """
    path = Path(path)
    check_readable_file(path)
    try:
        content = read_weights_only(path)
    except PickleRejected as rejected:
        raise CheckpointError(
            f"calibration file {path} contains pickled Python objects (weights_only=True rejected {rejected}); "
            "save a tensor or a list of tensors with torch.save"
        ) from None
    if isinstance(content, torch.Tensor):
        content = [content]
    if not isinstance(content, (list, tuple)) or not content:
        if isinstance(content, (list, tuple)):
            kind = f"an empty {type(content).__name__}"
        elif isinstance(content, Mapping):
            kind = f"a mapping ({type(content).__name__}), such as a state dict"
        else:
            kind = f"an object of type {type(content).__name__}"
        raise CheckpointError(f"calibration file {path} contains {kind}: save a tensor or a non-empty list of tensors with torch.save")
    for index, batch in enumerate(content):
        if not isinstance(batch, torch.Tensor):
            raise CheckpointError(f"calibration file {path}: item {index} is of type {type(batch).__name__}, not a tensor")
    return list(content)


def batch_input(batch: object, index: int) -> torch.Tensor:
    """Return the input tensor of one batch: the batch itself or its first item."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        f"calibration batch {index} is a {type(batch).__name__}: a batch must be a tensor "
        "or a tuple/list whose first item is the input tensor"
    )


# Start of the note on a layer whose pointwise fit has fewer samples than unknowns.
UNDERDETERMINED = "underdetermined fit"


@dataclass
class LayerFit:
    """Result of the data-aware fit, or of measuring with calibration data, for one layer.

    Errors are relative output errors on the calibration data,
    ``sqrt(sum ||y - y_hat||^2 / sum ||y||^2)`` with ``y`` the original layer's
    output in the original model and ``y_hat`` the separable layer's output on its
    input in the converted model. ``svd_output_error`` is the weight-SVD layer's
    error on those same inputs. ``init`` is the initialization that was kept.
    """

    name: str
    init: str
    output_error: float | None
    svd_output_error: float | None = None
    relative_error: float | None = None
    note: str | None = None


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


class LayerTap:
    """Forward hooks that record a module's inputs and outputs for one forward pass.

    After ``stop_after`` calls (when given) the hook raises :class:`StopForward`,
    so the rest of the model does not run.
    """

    def __init__(self, module: nn.Module, keep_outputs: bool, stop_after: int | None) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.keep_outputs = keep_outputs
        self.stop_after = stop_after
        self.handle = module.register_forward_hook(self.record)

    def record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.inputs.append(inputs[0].detach())
        if self.keep_outputs:
            self.outputs.append(output.detach())
        if self.stop_after is not None and len(self.inputs) >= self.stop_after:
            raise StopForward

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        self.handle.remove()


def run_forward(model: nn.Module, batch: torch.Tensor) -> None:
    """Run ``model`` on ``batch`` without gradients, stopping early when a tap raises :class:`StopForward`."""
    try:
        with torch.no_grad():
            model(batch)
    except StopForward:
        pass
    except ConversionError:
        raise
    except Exception as error:  # a user model can raise anything on a bad batch
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConversionError(
            f"the model failed on a calibration batch of shape {tuple(batch.shape)}: {type(error).__name__}: {first_line}. "
            "Pass calibration batches shaped like the model's input"
        ) from error


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter or buffer (the CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


# --- statistics -------------------------------------------------------------------


def patch_extractor(conv: nn.modules.conv._ConvNd) -> nn.modules.conv._ConvNd:
    """Build a depthwise conv whose outputs are the input patches that ``conv`` reads.

    It has one one-hot filter per kernel position and channel, and ``conv``'s
    stride, padding, dilation and padding mode, so it works for 1d, 2d and 3d convs
    and every padding mode alike. Output channel ``c * k + j`` is position ``j`` of
    channel ``c``'s patch.
    """
    channels = conv.in_channels
    kernel = math.prod(conv.kernel_size)
    extractor = type(conv)(
        channels,
        channels * kernel,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=channels,
        bias=False,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=torch.float64,
    )
    identity = torch.eye(kernel, dtype=torch.float64, device=conv.weight.device)
    with torch.no_grad():
        extractor.weight.copy_(identity.repeat(channels, 1).reshape(extractor.weight.shape))
    return extractor.requires_grad_(False)


def channel_patches(extractor: nn.Module, x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Return the patches of every channel as ``(C, k, positions)``, batch folded into positions."""
    # NOTE: one batch's patches take N * C * k * positions float64 values, about k times the
    # input's elements at stride 1, so large inputs need small calibration batches.
    patches = extractor(x.to(torch.float64))  # (N, C*k, *out)
    batch, stacked = patches.shape[:2]
    patches = patches.reshape(batch, stacked // kernel, kernel, -1)  # (N, C, k, P)
    return patches.permute(1, 2, 0, 3).reshape(stacked // kernel, kernel, -1)  # (C, k, N*P)


class PatchMoments:
    """Per-channel second moments of input patches, summed over batches.

    ``converted``: ``sum q q^T`` of the patches in the converted model, and
    ``cross``: ``sum p q^T`` pairing the original model's patches ``p`` with them;
    both ``(C, k, k)``.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        self.kernel = math.prod(conv.kernel_size)
        self.extractor = patch_extractor(conv)
        shape = (conv.in_channels, self.kernel, self.kernel)
        self.converted = torch.zeros(shape, dtype=torch.float64, device=conv.weight.device)
        self.cross = torch.zeros_like(self.converted)
        self.count = 0

    @torch.no_grad()
    def update(self, original_input: torch.Tensor, converted_input: torch.Tensor) -> None:
        original = channel_patches(self.extractor, original_input, self.kernel)
        converted = channel_patches(self.extractor, converted_input, self.kernel)
        self.converted += converted @ converted.mT
        self.cross += original @ converted.mT
        self.count += converted.shape[-1]


class PointwiseMoments:
    """Moments for the pointwise least-squares fit, per group, summed over batches.

    ``gram``: ``sum h h^T`` of the depthwise outputs (with a constant 1 appended
    when the layer has a bias), ``(groups, d, d)``; ``cross``: ``sum y h^T``,
    ``(groups, C_out / groups, d)``; ``target_energy``: ``sum ||y||^2``. The
    weight-SVD layer's squared error on the same batches is summed alongside.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd, depthwise: nn.Module, svd_layer: nn.Module) -> None:
        self.groups = conv.groups
        self.bias = conv.bias is not None
        self.depthwise = depthwise
        self.svd_layer = svd_layer
        width = depthwise.out_channels // conv.groups + int(self.bias)
        device = conv.weight.device
        self.gram = torch.zeros((conv.groups, width, width), dtype=torch.float64, device=device)
        self.cross = torch.zeros((conv.groups, conv.out_channels // conv.groups, width), dtype=torch.float64, device=device)
        self.target_energy = 0.0
        self.svd_squared_error = 0.0
        self.width = width
        self.samples = 0

    @torch.no_grad()
    def update(self, target: torch.Tensor, converted_input: torch.Tensor) -> None:
        hidden = grouped_positions(self.depthwise(converted_input.to(torch.float64)), self.groups)  # (g, d, N*P)
        self.samples += hidden.shape[-1]
        if self.bias:
            ones = torch.ones_like(hidden[:, :1, :])
            hidden = torch.cat([hidden, ones], dim=1)
        outputs = grouped_positions(target.to(torch.float64), self.groups)  # (g, C_out/g, N*P)
        self.gram += hidden @ hidden.mT
        self.cross += outputs @ hidden.mT
        self.target_energy += float(outputs.pow(2).sum())

        svd_output = self.svd_layer(converted_input)
        self.svd_squared_error += float((svd_output.to(torch.float64) - target.to(torch.float64)).pow(2).sum())


def grouped_positions(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Reshape ``(N, C, *spatial)`` into ``(groups, C / groups, N * positions)``."""
    batch, channels = values.shape[:2]
    values = values.reshape(batch, groups, channels // groups, -1)  # (N, g, C/g, P)
    return values.permute(1, 2, 0, 3).reshape(groups, channels // groups, -1)


# --- solving ----------------------------------------------------------------------


def add_ridge(matrices: torch.Tensor) -> torch.Tensor:
    """Add ``RIDGE`` times the mean diagonal entry to each matrix's diagonal; an all-zero matrix becomes the identity."""
    size = matrices.shape[-1]
    scale = matrices.diagonal(dim1=-2, dim2=-1).sum(-1) / size  # (batch,)
    identity = torch.eye(size, dtype=matrices.dtype, device=matrices.device)
    ridge = torch.where(scale > 0, RIDGE * scale, torch.ones_like(scale))
    regularized = matrices + ridge[:, None, None] * identity
    return torch.where((scale > 0)[:, None, None], regularized, identity.expand_as(matrices))


def fit_depthwise(conv: nn.modules.conv._ConvNd, multiplier: int, moments: PatchMoments) -> torch.Tensor:
    """Return depthwise filters ``(C_in * K, 1, *kernel)`` from the whitened, asymmetric per-channel fit.

    Each filter is scaled to unit norm; the pointwise fit that follows absorbs the scale.
    """
    weights = channel_matrices(conv.weight, conv.groups).to(torch.float64)  # (C, O/g, k)
    covariance = add_ridge(moments.converted / moments.count)  # E[q q^T], (C, k, k)
    cross = moments.cross / moments.count  # E[p q^T], (C, k, k)

    # unconstrained optimum M* = W E[p q^T] E[q q^T]^-1; the covariance is symmetric
    optimum = torch.linalg.solve(covariance, (weights @ cross).mT).mT  # (C, O/g, k)
    cholesky = torch.linalg.cholesky(covariance)  # E[q q^T] = L L^T
    _, _, right = torch.linalg.svd(optimum @ cholesky, full_matrices=False)  # rows: (C, min(O/g, k), k)

    # filters D = Vh_K L^-1, solved as L^T D^T = Vh_K^T
    filters = torch.linalg.solve_triangular(cholesky.mT, right[:, :multiplier, :].mT, upper=True).mT  # (C, K, k)
    filters = filters / filters.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return filters.reshape(conv.in_channels * multiplier, 1, *conv.kernel_size)


def depthwise_conv(conv: nn.modules.conv._ConvNd, filters: torch.Tensor) -> nn.modules.conv._ConvNd:
    """Build a float64 depthwise conv with ``conv``'s geometry and the given filters."""
    layer = type(conv)(
        conv.in_channels,
        filters.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.in_channels,
        bias=False,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=torch.float64,
    )
    with torch.no_grad():
        layer.weight.copy_(filters)
    return layer.requires_grad_(False)


def fit_pointwise(moments: PointwiseMoments) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Solve the pointwise weights (and bias) by ridge least squares.

    Returns the weights ``(groups, C_out / groups, d)``, the bias ``(C_out,)`` or
    ``None``, and the fit's squared output error on the batches, computed from the
    moments as ``sum ||y||^2 - 2 tr(P C^T) + tr(P G P^T)``.
    """
    solution = torch.linalg.solve(add_ridge(moments.gram), moments.cross.mT).mT  # P = C (G + rI)^-1, G symmetric
    squared_error = (
        moments.target_energy
        - 2 * float((solution * moments.cross).sum())
        + float(((solution @ moments.gram) * solution).sum())
    )
    squared_error = max(squared_error, 0.0)  # rounding can push an exact fit slightly below zero
    if not moments.bias:
        return solution, None, squared_error
    return solution[..., :-1], solution[..., -1].reshape(-1), squared_error


def build_data_layer(
    conv: nn.modules.conv._ConvNd, filters: torch.Tensor, pointwise: torch.Tensor, bias: torch.Tensor | None
) -> tuple[DepthwiseSeparableConvNd, float]:
    """Assemble the separable layer from fitted weights; returns it and its relative weight error."""
    spatial = len(conv.kernel_size)
    pointwise = pointwise.reshape(conv.out_channels, -1, *([1] * spatial))
    layer = separable_type_for(conv).from_factors(conv, Factors(filters, pointwise, relative_error=0.0))
    if bias is not None:
        with torch.no_grad():
            layer.conv_pw.bias.copy_(bias)
    return layer, weight_error(conv, layer)


def weight_error(conv: nn.modules.conv._ConvNd, layer: DepthwiseSeparableConvNd) -> float:
    """Return ``||W - W_layer||_F / ||W||_F`` (0 for a zero weight)."""
    weight = conv.weight.detach().to(torch.float64)
    reference = weight.norm()
    difference = (layer.dense_weight().detach().to(torch.float64) - weight).norm()
    return float(difference / reference) if reference > 0 else 0.0


# --- the sequential fit -----------------------------------------------------------


@dataclass
class PlannedLayer:
    """A planned conv: its site in the converted model and its module in the original."""

    site: ConvSite
    plan: LayerPlan
    original: nn.modules.conv._ConvNd


def fit_layers(
    reference: nn.Module,
    target: nn.Module,
    layers: Sequence[PlannedLayer],
    data: CalibrationData,
    swap: Swap,
    show_progress: bool | None = None,
) -> tuple[nn.Module, dict[str, LayerFit]]:
    """Replace each planned conv of ``target`` with a layer fitted on ``data``, in forward order.

    ``reference`` is the unconverted model, whose layer outputs are the targets. Both
    models run in eval mode during the fit and get their modes back afterwards.
    ``swap(model, {name: layer})`` puts a layer into ``target`` and returns its root.
    Returns the converted model and one :class:`LayerFit` per planned layer.
    """
    reference_modes = remember_modes(reference)
    target_modes = remember_modes(target)
    reference.eval()
    target.eval()
    try:
        order, calls = forward_order(reference, layers, data)
        fits: dict[str, LayerFit] = {}
        uncalled = [layer for layer in layers if layer.site.name not in calls]
        for layer in uncalled:
            svd_layer, svd_weight_error = build_svd_layer(layer)
            target = swap(target, dict.fromkeys(layer.site.names, svd_layer))
            fits[layer.site.name] = LayerFit(
                layer.site.name,
                "svd",
                None,
                relative_error=svd_weight_error,
                note="not called on the calibration data, so initialized by weight SVD",
            )
        if uncalled:
            warnings.warn(
                f"{len(uncalled)} planned conv(s) never ran on the calibration data and were initialized by weight SVD: "
                f"{', '.join(layer.site.name for layer in uncalled)}",
                stacklevel=4,  # the caller of run_conversion
            )

        batches = len(data)
        progress = tqdm(
            total=2 * batches * len(order) if batches else None,
            desc="calibrating",
            unit="batch",
            disable=None if show_progress is None else not show_progress,
            file=sys.stderr,
            leave=False,
        )
        with progress:
            for layer in order:
                progress.set_postfix_str(layer.site.name, refresh=False)
                replacement, fits[layer.site.name] = fit_one_layer(reference, target, layer, calls[layer.site.name], data, progress)
                target = swap(target, dict.fromkeys(layer.site.names, replacement))
                log.info(
                    "%s: kept %s init, output error %.4g (weight SVD %.4g)",
                    layer.site.name,
                    fits[layer.site.name].init,
                    fits[layer.site.name].output_error,
                    fits[layer.site.name].svd_output_error,
                )
    finally:
        restore_modes(reference, reference_modes)
        restore_modes(target, target_modes)
    underdetermined = [name for name, fit in fits.items() if fit.note and fit.note.startswith(UNDERDETERMINED)]
    if underdetermined:
        warnings.warn(
            f"{len(underdetermined)} layer(s) had fewer calibration positions than pointwise weights per output "
            f"({', '.join(underdetermined)}), so their fit may not generalize: pass more calibration batches",
            stacklevel=4,  # the caller of run_conversion
        )
    return target, fits


def forward_order(
    reference: nn.Module, layers: Sequence[PlannedLayer], data: CalibrationData
) -> tuple[list[PlannedLayer], dict[str, int]]:
    """Run the first calibration batch and return the planned layers in call order, with calls per forward."""
    by_module = {id(layer.original): layer for layer in layers}
    order: list[PlannedLayer] = []
    calls: dict[str, int] = {}

    def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        layer = by_module[id(module)]
        if layer.site.name not in calls:
            order.append(layer)
        calls[layer.site.name] = calls.get(layer.site.name, 0) + 1

    handles = [layer.original.register_forward_pre_hook(record) for layer in layers]
    try:
        run_forward(reference, next(iter(data)))
    finally:
        for handle in handles:
            handle.remove()
    return order, calls


def build_svd_layer(layer: PlannedLayer) -> tuple[DepthwiseSeparableConvNd, float]:
    """Build the weight-SVD layer for a planned conv; returns it and its relative weight error."""
    conv = layer.site.module
    assert layer.plan.depth_multiplier is not None, "only planned layers are fitted"
    factors = factorize_weight(conv.weight, layer.plan.depth_multiplier, groups=conv.groups)
    return separable_type_for(conv).from_factors(conv, factors), factors.relative_error


def fit_one_layer(
    reference: nn.Module,
    target: nn.Module,
    layer: PlannedLayer,
    calls: int,
    data: CalibrationData,
    progress: tqdm,
) -> tuple[DepthwiseSeparableConvNd, LayerFit]:
    """Fit one layer in two passes over the data and keep the better of the fitted and the weight-SVD layer."""
    conv = layer.site.module
    multiplier = layer.plan.depth_multiplier
    assert multiplier is not None, "only planned layers are fitted"
    name = layer.site.name
    try:
        svd_layer, svd_weight_error = build_svd_layer(layer)
        patch_moments = PatchMoments(conv)
        for original, converted, _ in paired_activations(reference, target, layer, calls, data, progress):
            patch_moments.update(original, converted)
        filters = fit_depthwise(conv, multiplier, patch_moments)

        pointwise_moments = PointwiseMoments(conv, depthwise_conv(conv, filters), svd_layer)
        for _, converted, output in paired_activations(reference, target, layer, calls, data, progress):
            pointwise_moments.update(output, converted)
        pointwise, bias, squared_error = fit_pointwise(pointwise_moments)
        data_layer, data_weight_error = build_data_layer(conv, filters, pointwise, bias)
    except torch.linalg.LinAlgError as error:
        raise ConversionError(f"layer {name!r}: the data-aware fit failed: {error}") from error

    energy = pointwise_moments.target_energy
    data_error = relative_from_squared(squared_error, energy)
    svd_error = relative_from_squared(pointwise_moments.svd_squared_error, energy)
    if data_error <= svd_error:
        note = None
        if pointwise_moments.samples < pointwise_moments.width:
            note = (
                f"{UNDERDETERMINED}: {pointwise_moments.samples} calibration positions for "
                f"{pointwise_moments.width} pointwise weights per output, so the error on the calibration data understates the real one"
            )
        return data_layer, LayerFit(name, "data", data_error, svd_error, data_weight_error, note)
    note = "weight SVD had the lower output error on the calibration data, so it was kept"
    return svd_layer, LayerFit(name, "svd", svd_error, svd_error, svd_weight_error, note)


def relative_from_squared(squared_error: float, energy: float) -> float:
    """Return ``sqrt(squared_error / energy)``: 0 when both are 0, infinite for an error on a zero output."""
    if energy > 0:
        return math.sqrt(squared_error / energy)
    return 0.0 if squared_error == 0 else math.inf


def paired_activations(
    reference: nn.Module,
    target: nn.Module,
    layer: PlannedLayer,
    calls: int,
    data: CalibrationData,
    progress: tqdm,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield, per call of the layer on each batch: the original model's input, the converted model's input, and the original output."""
    original_tap = LayerTap(layer.original, keep_outputs=True, stop_after=calls)
    converted_tap = LayerTap(layer.site.module, keep_outputs=False, stop_after=calls)
    try:
        for batch in data:
            original_tap.clear()
            converted_tap.clear()
            run_forward(reference, batch)
            run_forward(target, batch)
            if len(original_tap.inputs) != len(converted_tap.inputs):
                raise ConversionError(
                    f"layer {layer.site.name!r} ran {len(original_tap.inputs)} time(s) in the original model and "
                    f"{len(converted_tap.inputs)} in the converted one on the same batch, so their inputs cannot be paired"
                )
            yield from zip(original_tap.inputs, converted_tap.inputs, original_tap.outputs)
            progress.update()
    finally:
        original_tap.remove()
        converted_tap.remove()


# --- output-error spectra -----------------------------------------------------------


class InputMoments:
    """Per-channel second moments ``sum p p^T`` of a conv's input patches, ``(C, k, k)``, summed over calls and batches."""

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        self.kernel = math.prod(conv.kernel_size)
        self.extractor = patch_extractor(conv)
        self.moments = torch.zeros((conv.in_channels, self.kernel, self.kernel), dtype=torch.float64, device=conv.weight.device)
        self.count = 0

    @torch.no_grad()
    def record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        patches = channel_patches(self.extractor, inputs[0], self.kernel)
        self.moments += patches @ patches.mT
        self.count += patches.shape[-1]


def output_spectra(
    model: nn.Module, convs: dict[str, nn.modules.conv._ConvNd], data: CalibrationData
) -> dict[str, torch.Tensor]:
    """Return each conv's per-channel singular values weighted by its inputs on ``data``, shape ``(C_in, rank)``.

    For channel ``c`` these are the singular values of ``W_c L_c``, where
    ``L_c L_c^T = E[p p^T]`` over the channel's input patches. The squares of the
    values dropped at K add up to that channel's expected squared output error at
    K, where the weight-SVD spectra measure the weight error instead. A channel whose input is
    always zero gets zeros. Convs that never run on ``data`` are absent.
    """
    modes = remember_modes(model)
    model.eval()
    recorders = {name: InputMoments(conv) for name, conv in convs.items()}
    handles = [conv.register_forward_pre_hook(recorders[name].record) for name, conv in convs.items()]
    try:
        for batch in data:
            run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        restore_modes(model, modes)

    spectra = {}
    for name, recorder in recorders.items():
        if recorder.count == 0:
            continue
        conv = convs[name]
        covariance = recorder.moments / recorder.count
        active = covariance.diagonal(dim1=-2, dim2=-1).sum(-1) > 0  # (C,)
        cholesky = torch.linalg.cholesky(add_ridge(covariance))
        weights = channel_matrices(conv.weight, conv.groups).to(torch.float64)
        spectra[name] = torch.linalg.svdvals(weights @ cholesky) * active[:, None]
    return spectra


# --- measuring ----------------------------------------------------------------------


def measure_output_errors(
    reference: nn.Module,
    converted: nn.Module,
    layers: Sequence[tuple[str, nn.Module, nn.Module]],
    data: CalibrationData,
) -> dict[str, float]:
    """Return each layer's relative output error on ``data`` in one pass over both models.

    ``layers`` contains ``(name, original module, converted module)`` tuples. The error pairs
    the original layer's output in ``reference`` with the converted layer's output in
    ``converted``, call by call, so it includes what earlier layers changed.
    """
    reference_modes = remember_modes(reference)
    converted_modes = remember_modes(converted)
    reference.eval()
    converted.eval()
    original_taps = {name: LayerTap(original, keep_outputs=True, stop_after=None) for name, original, _ in layers}
    converted_taps = {name: LayerTap(module, keep_outputs=True, stop_after=None) for name, _, module in layers}
    squared = dict.fromkeys(original_taps, 0.0)
    energy = dict.fromkeys(original_taps, 0.0)
    called: set[str] = set()
    try:
        for batch in data:
            for tap in (*original_taps.values(), *converted_taps.values()):
                tap.clear()
            run_forward(reference, batch)
            run_forward(converted, batch)
            for name, tap in original_taps.items():
                for expected, produced in zip(tap.outputs, converted_taps[name].outputs):
                    called.add(name)
                    expected = expected.to(torch.float64)
                    squared[name] += float((produced.to(torch.float64) - expected).pow(2).sum())
                    energy[name] += float(expected.pow(2).sum())
    finally:
        for tap in (*original_taps.values(), *converted_taps.values()):
            tap.remove()
        restore_modes(reference, reference_modes)
        restore_modes(converted, converted_modes)
    return {name: relative_from_squared(squared[name], energy[name]) for name in called}


# --- modes --------------------------------------------------------------------------


def remember_modes(model: nn.Module) -> dict[str, bool]:
    """Return each submodule's train/eval flag by qualified name."""
    return {name: module.training for name, module in model.named_modules()}


def restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Give each submodule its remembered flag; a separable layer takes the flag of the conv it replaced."""
    for name, module in model.named_modules():
        if name in modes:
            if isinstance(module, DepthwiseSeparableConvNd):
                module.train(modes[name])
            else:
                module.training = modes[name]
