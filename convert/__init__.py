"""dsconv: turn the convolutions of a trained PyTorch model into depthwise-separable pairs."""

from .errors import CheckpointError, ConversionError, DsconvError, UsageError
from .factorize import Factors, factorize_weight, full_rank
from .graph_pass import ConversionResult, LayerResult, convert_model, inspect_model, run_conversion
from .layers import (
    DepthwiseSeparableConv1d,
    DepthwiseSeparableConv2d,
    DepthwiseSeparableConv3d,
    DepthwiseSeparableConvNd,
)
from .selection import LayerPlan

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConversionError",
    "ConversionResult",
    "DepthwiseSeparableConv1d",
    "DepthwiseSeparableConv2d",
    "DepthwiseSeparableConv3d",
    "DepthwiseSeparableConvNd",
    "DsconvError",
    "Factors",
    "LayerPlan",
    "LayerResult",
    "UsageError",
    "convert_model",
    "factorize_weight",
    "full_rank",
    "inspect_model",
    "run_conversion",
]
