"""dsconv: turn the convolutions of a trained PyTorch model into depthwise-separable pairs."""

from .checkpoint import LoadedModel, load_model
from .config import LayerConfig, load_config
from .densify import DensifyResult, densify_model, run_densify
from .errors import CheckpointError, ConversionError, DsconvError, UsageError
from .factorize import Factors, factorize_weight, full_rank
from .graph_pass import ConversionResult, LayerResult, convert_model, inspect_model, run_conversion
from .layers import (
    DepthwiseSeparableConv1d,
    DepthwiseSeparableConv2d,
    DepthwiseSeparableConv3d,
    DepthwiseSeparableConvNd,
)
from .plan import ConversionPlan, apply_plan, build_plan, load_plan
from .selection import LayerPlan
from .verify import CheckResult, check_outputs

__version__ = "0.1.0"

__all__ = [
    "CheckResult",
    "CheckpointError",
    "ConversionError",
    "ConversionPlan",
    "ConversionResult",
    "DepthwiseSeparableConv1d",
    "DepthwiseSeparableConv2d",
    "DepthwiseSeparableConv3d",
    "DepthwiseSeparableConvNd",
    "DensifyResult",
    "DsconvError",
    "Factors",
    "LayerConfig",
    "LayerPlan",
    "LayerResult",
    "LoadedModel",
    "UsageError",
    "apply_plan",
    "build_plan",
    "check_outputs",
    "convert_model",
    "densify_model",
    "factorize_weight",
    "full_rank",
    "inspect_model",
    "load_config",
    "load_model",
    "load_plan",
    "run_conversion",
    "run_densify",
]
