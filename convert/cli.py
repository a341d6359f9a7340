"""The ``dsconv`` command line: convert, report, inspect, densify and demo."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

import torch
from torch import nn

from . import __version__
from .calibration import load_calibration_batches
from .checkpoint import LoadedModel, load_model, one_line, parse_factory_arguments
from .config import load_config
from .densify import render_densify_report, run_densify
from .errors import CheckpointError, ConversionError, DsconvError, UsageError
from .graph_pass import PASS_INIT_METHODS, TRACING_MODES, ConversionResult, inspect_model, run_conversion
from .outputs import SAVE_FORMS, WEIGHT_FORMS, OutputSet, check_output_targets, default_plan_path, keep_plain_attributes, model_writer
from .plan import build_plan, load_plan
from .plot import check_plot_path, compute_tradeoff, save_tradeoff_plot, tradeoff_writer
from .progress import enable_progress
from .ranks import BUDGET_TARGETS, RANK_MODES
from .report import FORMATS, ConversionReport, build_report, render_plans, render_report
from .verify import CheckResult, check_outputs, non_finite_parameters

log = logging.getLogger("convert")

# Writes one output file's content to an open binary file.
Writer = Callable[[IO[bytes]], None]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM

EXIT_CODES = """\
exit codes:
  0    success
  1    the conversion or its verification failed (including --check), or an
       unexpected error
  2    usage error: an invalid argument, or a file that cannot be read or written
  130  interrupted (Ctrl-C); 143: terminated (SIGTERM). Nothing is written then.

Outputs are written to a temporary file and renamed at the end, so a failed or
interrupted run leaves no partial file. An existing output is only replaced with
--force. Logs go to stderr (-v, -q), reports to stdout or --report FILE. Errors
are one line; --debug shows the traceback.
"""

EPILOG = EXIT_CODES + """
examples:
  dsconv convert model.pt -o model_ds.pt --trust-pickle
  dsconv convert weights.pt --arch torchvision.models:resnet18 -o resnet18_ds.pt --depth-multiplier 2
  dsconv convert ckpt.pt --arch torchvision.models:resnet18 --key model_ema -o r18_ds.safetensors --save-as safetensors
  dsconv convert weights.pt --arch torchvision.models:resnet18 -k 9 -o r18_ds.pt --check 10
  dsconv densify r18_ds.safetensors --arch torchvision.models:resnet18 --plan r18_ds.plan.json -o r18_dense.pt
  dsconv inspect weights.pt --arch torchvision.models:resnet18 --multipliers 1,2,4
  dsconv convert model.pt -o small.pt --trust-pickle --rank budget --budget 0.33 --init data --calibration-data batches.pt
"""


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other dsconv error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that staged output files are removed on the way out."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    enable_progress(args.quiet == 0)
    with sigterm_as_exception():
        try:
            return args.handler(args)
        except DsconvError as error:
            if args.debug:
                raise
            print(f"dsconv: error: {error}", file=sys.stderr)
            return EXIT_FAILED if isinstance(error, ConversionError) else EXIT_USAGE
        except KeyboardInterrupt:
            print("dsconv: interrupted; nothing was written", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated:
            print("dsconv: terminated; nothing was written", file=sys.stderr)
            return EXIT_TERMINATED
        except Exception as error:  # a bug or an unforeseen failure: one line unless --debug
            if args.debug:
                raise
            print(f"dsconv: error: unexpected {one_line(error)}; rerun with --debug to see the traceback", file=sys.stderr)
            return EXIT_FAILED


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the command runs (main thread only)."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not in the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="dsconv",
        description="Convert the convolutions of a trained PyTorch model into depthwise-separable pairs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dsconv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, help="convert a checkpoint and write the converted model")
    add_input_arguments(convert)
    add_output_arguments(convert, SAVE_FORMS, plan_output=True)
    add_conversion_arguments(convert)
    add_report_arguments(convert)
    add_check_arguments(convert)
    convert.set_defaults(handler=run_convert)

    report = commands.add_parser("report", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, help="convert in memory and print the before/after report; writes no model")
    add_input_arguments(report)
    report.add_argument("--force", action="store_true", help="replace --report FILE if it exists")
    add_conversion_arguments(report)
    add_report_arguments(report)
    report.set_defaults(handler=run_report)

    inspect = commands.add_parser("inspect", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, help="list every conv, whether it is eligible, and what each multiplier costs")
    add_input_arguments(inspect)
    add_selection_arguments(inspect)
    inspect.add_argument("--multipliers", type=parse_multipliers, default=(1, 2, 4), metavar="K,K,...", help="depth multipliers to price (default: 1,2,4)")
    inspect.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    inspect.add_argument("--plot", type=Path, metavar="FILE", help="also draw relative error against parameters per layer and for the whole model (.png/.svg/.pdf; needs matplotlib)")
    inspect.add_argument("--force", action="store_true", help="replace --plot FILE if it exists")
    inspect.set_defaults(handler=run_inspect)

    densify = commands.add_parser("densify", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, help="merge every depthwise-separable pair back into one dense conv, exactly")
    add_input_arguments(densify)
    add_output_arguments(densify, tuple(form for form in SAVE_FORMS if form != "graph-module"))
    add_densify_arguments(densify)
    add_check_arguments(densify)
    densify.set_defaults(handler=run_densify_command)

    demo = commands.add_parser("demo", help="save a torchvision resnet18 checkpoint (random weights) and convert it with this CLI")
    demo.add_argument("--workdir", type=Path, help="folder for the demo files (default: a temporary folder, removed afterwards)")
    demo.add_argument("--depth-multiplier", type=parse_positive_int, default=1, metavar="K", help="depth multiplier (default: 1)")
    demo.set_defaults(handler=run_demo)

    for command in (convert, report, inspect, densify, demo):
        verbosity = command.add_argument_group("logging")
        verbosity.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug logs)")
        verbosity.add_argument("-q", "--quiet", action="count", default=0, help="log only errors")
        verbosity.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    return parser


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, metavar="INPUT", help="checkpoint: a module saved with torch.save(model), or a state dict with --arch")
    parser.add_argument("--arch", metavar="MODULE:FACTORY", help="build the model with this factory and load INPUT as its state dict, e.g. torchvision.models:resnet18")
    parser.add_argument("--arch-arg", action="append", default=[], metavar="NAME=VALUE", help="keyword argument for the --arch factory, e.g. num_classes=10 (repeatable)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole module; this runs code from INPUT, so only use it on files you trust")
    add_checkpoint_arguments(parser)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoint contents")
    group.add_argument("--key", metavar="NAME", help="checkpoint entry that contains the weights or model, e.g. model_ema (a/b for nested entries); found automatically when only one qualifies")
    group.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help="import MODULE first; classes pickled from a training script's __main__ are looked up in it (repeatable)")
    group.add_argument("--plan", type=Path, metavar="FILE", help="conversion plan (JSON) to apply to the --arch model before loading INPUT, for state dicts of converted models")


def add_output_arguments(parser: argparse.ArgumentParser, forms: Sequence[str], plan_output: bool = False) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("-o", "--output", required=True, type=Path, help="file to write the model to")
    group.add_argument("--force", action="store_true", help="replace OUTPUT (and the plan and --report files) if they exist")
    save_help = {
        "module": "module: torch.save of the model object (default; loading needs its class)",
        "graph-module": "graph-module: torch.save of a torch.fx GraphModule (loads without the model's source; keeps only forward and plain-data attributes)",
        "state-dict": "state-dict: torch.save of the state dict",
        "safetensors": "safetensors: the state dict as a .safetensors file",
    }
    group.add_argument("--save-as", choices=forms, default="module", help="; ".join(save_help[form] for form in forms))
    if plan_output:
        group.add_argument("--plan-output", type=Path, metavar="FILE", help="where to write the JSON conversion plan (default for state-dict and safetensors: OUTPUT with the suffix .plan.json)")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("verification")
    group.add_argument("--check", type=parse_positive_int, metavar="N", help="run N random inputs of --input-shape through both models and fail (exit 1) when the outputs differ by more than the tolerance")
    group.add_argument("--rtol", type=parse_tolerance, default=1e-3, metavar="R", help="allowed max |difference| as a fraction of max |original output| (default: 1e-3, for exact conversions; a conversion below full rank changes outputs, so raise it to what you accept)")
    group.add_argument("--atol", type=parse_tolerance, default=1e-6, metavar="A", help="allowed absolute difference added to the relative one (default: 1e-6)")
    group.add_argument("--keep-on-check-failure", action="store_true", help="write the outputs even when --check fails (the exit code is still 1)")


def add_densify_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("report")
    group.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224), metavar="N,C,H,W", help="shape of the random inputs for --check (default: 1,3,224,224)")
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to merge and check on (default: cpu)")
    group.add_argument("--format", choices=FORMATS, default="table", help="report format (default: table)")
    group.add_argument("--report", type=Path, metavar="FILE", help="write the report to FILE instead of stdout")


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that decide which convs are converted and at which multiplier."""
    group = parser.add_argument_group("layer selection")
    group.add_argument("--depth-multiplier", "-k", type=parse_positive_int, metavar="K", help="with --rank fixed: depthwise filters per input channel (default: 1); lowered per layer to its full rank")
    group.add_argument("--rank", choices=RANK_MODES, default="fixed", help="how K is chosen per layer: fixed (--depth-multiplier, default), energy (--energy), budget (--budget)")
    group.add_argument("--energy", type=parse_share, metavar="SHARE", help="with --rank energy: smallest K at which every input channel keeps this share of its squared singular values, e.g. 0.9")
    group.add_argument("--budget", type=parse_share, metavar="SHARE", help="with --rank budget: share of the eligible convs' parameters (or MACs) to keep, e.g. 0.33")
    group.add_argument("--config", type=Path, metavar="FILE", help="JSON per-layer settings: global, module_type, name_pattern, name; a multiplier or null to leave a layer alone")
    group.add_argument("--allow-larger", action="store_true", help="also convert layers whose separable form has more parameters than the original")
    group.add_argument("--convert-parametrized", action="store_true", help="convert convs with weight_norm/spectral_norm from their current effective weight")
    group.add_argument("--convert-subclasses", action="store_true", help="convert nn.Conv*d subclasses whose output is that of one conv (checked on random inputs)")

    tracing = parser.add_argument_group("tracing")
    tracing.add_argument("--tracing", choices=TRACING_MODES, default="auto", help="auto: trace with torch.fx, fall back to swapping by name; fx: fail if tracing fails; swap: do not trace")
    tracing.add_argument("--leaf-module", action="append", default=[], metavar="NAME", help="qualified module name for the tracer to keep as one call (repeatable)")
    tracing.add_argument("--leaf-type", action="append", default=[], metavar="MODULE:CLASS", help="module class for the tracer to keep as one call, e.g. my_project.blocks:Attention (repeatable)")
    tracing.add_argument("--autowrap", action="append", default=[], metavar="MODULE:FUNCTION", help="function for the tracer to record as one call instead of tracing into (repeatable)")


def add_conversion_arguments(parser: argparse.ArgumentParser) -> None:
    add_selection_arguments(parser)
    group = parser.add_argument_group("conversion")
    group.add_argument("--init", choices=PASS_INIT_METHODS, default="svd", help="svd: factor the trained weights (default); random: PyTorch's default init; data: fit each layer's outputs on --calibration-data")
    group.add_argument("--budget-on", choices=BUDGET_TARGETS, help="with --rank budget: what the budget counts (default: params; macs uses --input-shape)")
    group.add_argument("--latency-aware", action="store_true", help="time each layer dense and separable on --device with a random input of --input-shape; keep dense where not faster")
    group.add_argument("--layer-latency-time", type=parse_positive_float, metavar="SECONDS", help="with --latency-aware: minimum timing per layer and form (default: 0.1)")
    group.add_argument("--calibration-data", type=Path, metavar="FILE", help="input batches saved with torch.save (a tensor, or a list/tuple of tensors); needed by --init data, and with other inits used to report each layer's output error")
    group.add_argument("--plot", type=Path, metavar="FILE", help="also draw relative error against parameters per layer and for the whole model (.png/.svg/.pdf; needs matplotlib)")


def selection_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """Turn the selection and tracing flags into keyword arguments of the conversion pass."""
    if args.depth_multiplier is not None and args.rank != "fixed":
        raise UsageError(f"--depth-multiplier is only used with --rank fixed; --rank {args.rank} chooses K itself")
    leaf_types = tuple(import_object(spec, "--leaf-type") for spec in args.leaf_type)
    for spec, value in zip(args.leaf_type, leaf_types):
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            raise DsconvError(f"--leaf-type {spec!r} is not an nn.Module class")
    functions = tuple(import_object(spec, "--autowrap") for spec in args.autowrap)
    for spec, value in zip(args.autowrap, functions):
        if not callable(value):
            raise DsconvError(f"--autowrap {spec!r} is not a function")
    return {
        "depth_multiplier": args.depth_multiplier if args.depth_multiplier is not None else 1,
        "rank": args.rank,
        "energy": args.energy,
        "budget": args.budget,
        "config": load_config(args.config) if args.config is not None else None,
        "allow_larger": args.allow_larger,
        "convert_parametrized": args.convert_parametrized,
        "convert_subclasses": args.convert_subclasses,
        "tracing": args.tracing,
        "leaf_modules": (*args.leaf_module, *leaf_types),
        "autowrap_functions": functions,
    }


def import_object(spec: str, flag: str) -> Any:
    """Import ``"package.module:name"``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise DsconvError(f"{flag} {spec!r} is not of the form module.path:name")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as error:
        raise DsconvError(f"{flag} {spec!r} cannot be imported: {error}") from None
    return value


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("report")
    group.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224), metavar="N,C,H,W", help="shape of the random sample input (default: 1,3,224,224)")
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to convert and measure on (default: cpu)")
    group.add_argument("--format", choices=FORMATS, default="table", help="report format (default: table)")
    group.add_argument("--report", type=Path, metavar="FILE", help="write the report to FILE (format from --format) instead of stdout")
    group.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    group.add_argument("--latency-time", type=parse_positive_float, default=1.0, metavar="SECONDS", help="minimum timing per model (default: 1.0)")


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1; use a positive integer")
    return value


def parse_float(text: str, hint: str = "") -> float:
    """Parse a float for an argparse option; ``hint`` is appended to the error for non-numbers."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number{hint}") from None


def parse_positive_float(text: str) -> float:
    value = parse_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def parse_share(text: str) -> float:
    """Parse a share in (0, 1], such as ``0.33``."""
    value = parse_float(text, "; give a share in (0, 1], e.g. 0.33")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]; give a share such as 0.33")
    return value


def parse_tolerance(text: str) -> float:
    value = parse_float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` into a tuple of positive ints."""
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,3,224,224") from None
    if len(shape) < 2 or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least batch and channels, all sizes >= 1, e.g. 1,3,224,224")
    return shape


def parse_multipliers(text: str) -> tuple[int, ...]:
    return tuple(parse_positive_int(part.strip()) for part in text.split(","))


def configure_logging(level: int) -> None:
    levels = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}
    logging.basicConfig(
        level=levels.get(max(-1, min(level, 2)), logging.DEBUG),
        format="dsconv: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if level < 2:
        # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on CPU-only
        # machines; that concerns compiling extensions, not anything dsconv does.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def load_input(args: argparse.Namespace) -> LoadedModel:
    """Load INPUT as the arguments request, and reject weights that are not finite."""
    plan = None
    if args.plan is not None:
        try:
            plan = load_plan(args.plan)
        except ValueError as error:
            raise UsageError(f"--plan: {error}") from error
    loaded = load_model(
        args.input,
        arch=args.arch,
        arch_kwargs=parse_factory_arguments(args.arch_arg),
        trust_pickle=args.trust_pickle,
        key=args.key,
        imports=args.imports,
        plan=plan,
    )
    for note in loaded.notes:
        log.info("%s", note)
    broken = non_finite_parameters(loaded.model)
    if broken:
        raise ConversionError(
            f"{args.input}: parameter {broken[0]!r} contains NaN or infinite values ({len(broken)} parameters in all); "
            "dsconv needs finite trained weights, so check the checkpoint (did training diverge?)"
        )
    return loaded


def input_paths(args: argparse.Namespace) -> tuple[Path, ...]:
    """Return the files this run reads, which no output may overwrite."""
    return tuple(path for path in (args.input, args.plan) if path is not None)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DsconvError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


def conversion_keywords(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Turn the conversion flags into ``run_conversion`` keywords, reading --calibration-data.

    ``run_conversion`` validates the combination (for example --energy without
    --rank energy) and raises ``UsageError``, which exits with code 2.
    """
    needs_example = args.budget_on == "macs" or args.latency_aware
    keywords: dict[str, object] = {
        **selection_keywords(args),
        "init": args.init,
        "budget_on": args.budget_on or "params",
        "latency_aware": args.latency_aware,
        "latency_device": device if args.latency_aware else None,
        "latency_time": args.layer_latency_time,
        "example_input": torch.randn(args.input_shape, device=device) if needs_example else None,
    }
    if args.calibration_data is not None:
        keywords["calibration_data"] = load_calibration_batches(args.calibration_data)
    elif args.init == "data":
        raise UsageError("--init data needs --calibration-data FILE: input batches saved with torch.save")
    return keywords


@dataclass
class Conversion:
    """The product of ``convert``/``report``: both models, the per-layer result and the loading notes."""

    original: nn.Module
    result: ConversionResult
    was_training: bool
    notes: list[str] = field(default_factory=list)
    calibration_data: object = None


def convert_input(args: argparse.Namespace, graph_module: bool = False) -> Conversion:
    """Load INPUT and convert it; the original model is left in eval mode."""
    device = resolve_device(args.device)
    loaded = load_input(args)
    model = loaded.model.to(device)
    was_training = model.training
    model.eval()
    keywords = conversion_keywords(args, device)

    try:
        result = run_conversion(model, graph_module=graph_module, **keywords)  # type: ignore[arg-type]
    except UsageError:
        raise
    except ValueError as error:
        raise ConversionError(str(error)) from error
    return Conversion(model, result, was_training, list(loaded.notes), keywords.get("calibration_data"))


def measure_conversion(args: argparse.Namespace, conversion: Conversion) -> ConversionReport:
    """Run the sample input through both models and fill the before/after report."""
    example_input = torch.randn(args.input_shape, device=next_device(conversion.original))
    probe_forward(conversion.original, example_input)
    report = build_report(
        conversion.original,
        conversion.result,
        example_input,
        init=args.init,
        latency=not args.no_latency,
        min_run_time=args.latency_time,
    )
    report.notes[:0] = conversion.notes
    return report


def next_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def probe_forward(model: nn.Module, example_input: torch.Tensor) -> None:
    """Run one forward pass so that an input of the wrong shape fails with a message naming --input-shape."""
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as error:  # forward is the user's code
        raise UsageError(
            f"the model failed on a random input of shape {','.join(map(str, example_input.shape))}: {one_line(error)}. "
            "Set --input-shape to the shape the model expects"
        ) from error


def convert_and_report(args: argparse.Namespace) -> tuple[Conversion, str]:
    """Load, convert and measure; returns the conversion and the rendered report."""
    conversion = convert_input(args)
    report = measure_conversion(args, conversion)
    conversion.result.model.train(conversion.was_training)
    return conversion, render_report(report, args.format)


def stage_plot(outputs: OutputSet, args: argparse.Namespace, conversion: Conversion) -> None:
    """Add the --plot image, drawn from the unconverted model and the plans, to the staged outputs."""
    if args.plot is None:
        return
    plans = [layer.plan for layer in conversion.result.layers]
    tradeoff = compute_tradeoff(conversion.original, plans, conversion.calibration_data, True)
    stage(outputs, args.plot, tradeoff_writer(tradeoff, args.plot))


def run_convert(args: argparse.Namespace) -> int:
    """Convert INPUT, verify it if asked, and write the model, its plan and the report together."""
    if args.save_as == "graph-module" and args.tracing == "swap":
        raise UsageError("--save-as graph-module needs a traced graph, so it cannot be combined with --tracing swap")
    plan_path = args.plan_output or (default_plan_path(args.output) if args.save_as in WEIGHT_FORMS else None)
    targets = [args.output, *(path for path in (plan_path, args.report, args.plot) if path is not None)]
    check_output_targets(targets, force=args.force, protect=input_paths(args))
    if args.plot is not None:
        check_plot_path(args.plot, force=args.force, protect=input_paths(args))

    if args.save_as == "graph-module" and args.tracing == "auto":
        args.tracing = "fx"  # a GraphModule needs the trace, so a tracing failure must stop the run
    conversion = convert_input(args, graph_module=args.save_as == "graph-module")
    result = conversion.result
    if not result.converted:
        raise ConversionError(nothing_converted_message(args.input, result))
    report = measure_conversion(args, conversion)
    reject_non_finite_outputs(args, report)
    check = run_check(args, conversion.original, result.model)
    if check is not None:
        report.notes.append(check.describe())
    result.model.train(conversion.was_training)

    converted = result.model
    write_outputs = check is None or check.passed or args.keep_on_check_failure
    if args.save_as == "graph-module":
        dropped = keep_plain_attributes(conversion.original, converted)
        if dropped:
            report.notes.append(f"the graph-module output drops attributes that are not plain data: {', '.join(dropped)} (--save-as module keeps them)")
    if plan_path is not None and write_outputs:
        report.notes.append(f"conversion plan written to {plan_path}: rebuild the model with convert.apply_plan(model, plan) before load_state_dict")
    text = render_report(report, args.format)

    if write_outputs:
        with OutputSet(force=args.force, protect=input_paths(args)) as outputs:
            stage(outputs, args.output, model_writer(converted, args.save_as))
            if plan_path is not None:
                stage(outputs, plan_path, text_writer(build_plan(converted).to_json()))
            if args.report is not None:
                stage(outputs, args.report, text_writer(text))
            stage_plot(outputs, args, conversion)
            commit(outputs)
        log.info("wrote %s", ", ".join(map(str, targets)))
    if args.report is None:
        sys.stdout.write(text)
    return finish_check(check, args)


def reject_non_finite_outputs(args: argparse.Namespace, report: ConversionReport) -> None:
    """Fail the conversion when either model returns NaN or inf on the sample input."""
    difference = report.output_difference
    if difference is None or (difference.original_finite and difference.converted_finite):
        return
    shape = ",".join(map(str, args.input_shape))
    if not difference.original_finite:
        raise ConversionError(
            f"{args.input}: the original model's output on a random input of shape {shape} contains NaN or inf, "
            "so the conversion cannot be checked (are the weights from a diverged training run?); nothing was written"
        )
    raise ConversionError(
        f"{args.input}: the converted model's output on a random input of shape {shape} contains NaN or inf, "
        "although the original's does not; nothing was written"
    )


def nothing_converted_message(path: Path, result: ConversionResult) -> str:
    model_name = type(result.model).__name__
    if not result.layers:
        return f"{path}: {model_name} has no nn.Conv1d/2d/3d layer, so there is nothing to convert; nothing was written"
    reasons = "; ".join(f"{layer.name or '(model)'}: {layer.plan.reason}" for layer in result.layers[:3])
    more = f" (and {len(result.layers) - 3} more)" if len(result.layers) > 3 else ""
    return f"{path}: none of the {len(result.layers)} convs of {model_name} can be converted ({reasons}{more}); nothing was written"


def run_check(args: argparse.Namespace, original: nn.Module, converted: nn.Module) -> CheckResult | None:
    """Run ``--check N`` when it was given; both models must be in eval mode."""
    if args.check is None:
        return None
    try:
        return check_outputs(
            original,
            converted,
            args.input_shape,
            args.check,
            rtol=args.rtol,
            atol=args.atol,
            device=next_device(original),
        )
    except RuntimeError as error:
        raise UsageError(f"--check: the models failed on a random input of shape {','.join(map(str, args.input_shape))}: {one_line(error)}") from error


def finish_check(check: CheckResult | None, args: argparse.Namespace) -> int:
    """Raise for a failed check, saying whether the outputs were kept."""
    if check is None or check.passed:
        return EXIT_OK
    outcome = "the outputs were written anyway (--keep-on-check-failure)" if args.keep_on_check_failure else "nothing was written (pass --keep-on-check-failure to keep the outputs)"
    raise ConversionError(
        f"--check failed: {check.problem}; max relative difference {check.max_relative:.3g} over {check.inputs} inputs "
        f"(--rtol {check.rtol:g}, --atol {check.atol:g}); {outcome}"
    )


def stage(outputs: OutputSet, path: Path, write: Writer) -> None:
    try:
        outputs.add(path, write)
    except OSError as error:
        raise CheckpointError(f"could not write {path}: {error.strerror or error}") from error


def commit(outputs: OutputSet) -> None:
    try:
        outputs.commit()
    except OSError as error:
        raise CheckpointError(f"could not write {', '.join(map(str, outputs.targets)) or 'the outputs'}: {error.strerror or error}; nothing was written") from error


def text_writer(text: str) -> Writer:
    def write(handle: IO[bytes]) -> None:
        handle.write(text.encode())

    return write


def run_report(args: argparse.Namespace) -> int:
    targets = [path for path in (args.report, args.plot) if path is not None]
    check_output_targets(targets, force=args.force, protect=input_paths(args))
    if args.plot is not None:
        check_plot_path(args.plot, force=args.force, protect=input_paths(args))
    conversion, text = convert_and_report(args)
    emit_report(text, args, conversion)
    return EXIT_OK


def emit_report(text: str, args: argparse.Namespace, conversion: Conversion) -> None:
    """Write the report to --report FILE and the --plot image (atomically, together); the report goes to stdout without --report."""
    if args.report is None:
        sys.stdout.write(text)
    if args.report is None and args.plot is None:
        return
    with OutputSet(force=args.force, protect=input_paths(args)) as outputs:
        if args.report is not None:
            stage(outputs, args.report, text_writer(text))
        stage_plot(outputs, args, conversion)
        commit(outputs)


def run_densify_command(args: argparse.Namespace) -> int:
    """Merge the separable pairs of INPUT into dense convs and write the dense model."""
    targets = [args.output, *([args.report] if args.report is not None else [])]
    check_output_targets(targets, force=args.force, protect=input_paths(args))
    device = resolve_device(args.device)
    model = load_input(args).model.to(device)
    was_training = model.training
    model.eval()

    result = run_densify(model)
    if not result.layers:
        raise ConversionError(
            f"{args.input}: {type(model).__name__} has no depthwise-separable layer to merge; "
            "give a model converted by dsconv (for a state dict: --arch and --plan); nothing was written"
        )
    text = render_densify_report(result, args.format)
    if args.check is not None:
        probe_forward(model, torch.randn(args.input_shape, device=device))
    check = run_check(args, model, result.model)
    if check is not None:
        text += check.describe() + "\n"
    result.model.train(was_training)

    write_outputs = check is None or check.passed or args.keep_on_check_failure
    if write_outputs:
        with OutputSet(force=args.force, protect=input_paths(args)) as outputs:
            stage(outputs, args.output, model_writer(result.model, args.save_as))
            if args.report is not None:
                stage(outputs, args.report, text_writer(text))
            commit(outputs)
        log.info("wrote %s", ", ".join(map(str, targets)))
    if args.report is None:
        sys.stdout.write(text)
    return finish_check(check, args)


def run_inspect(args: argparse.Namespace) -> int:
    if args.plot is not None:
        check_plot_path(args.plot, force=args.force, protect=input_paths(args))
    model = load_input(args).model
    try:
        plans, trace_error = inspect_model(model, **selection_keywords(args))
    except UsageError:
        raise
    except ValueError as error:
        raise ConversionError(str(error)) from error
    sys.stdout.write(render_plans(model, plans, args.multipliers, args.format, trace_error))
    if args.plot is not None:
        save_tradeoff_plot(model, plans, args.plot, mark_chosen=False, force=args.force, protect=input_paths(args))
        log.info("wrote %s", args.plot)
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    """Save a torchvision resnet18 state dict and convert it through this CLI in a subprocess."""
    try:
        import torchvision
    except ImportError:
        raise DsconvError("the demo needs torchvision: pip install torchvision (or the project's [demo] extra)") from None

    with tempfile.TemporaryDirectory(prefix="dsconv-demo-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = workdir / "resnet18.pt"
        output = workdir / "resnet18_dsconv.pt"
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
        command = [
            sys.executable, "-m", "convert", "convert", str(checkpoint),
            "--arch", "torchvision.models:resnet18",
            "-o", str(output), "--force",
            "--depth-multiplier", str(args.depth_multiplier),
        ]
        print("$ dsconv " + " ".join(command[3:]), flush=True)
        print("(resnet18 with random weights: trained weights have more low-rank structure and a smaller error)\n", flush=True)
        return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
