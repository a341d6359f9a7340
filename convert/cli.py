"""The ``dsconv`` command line: convert, report, inspect and demo."""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .calibration import load_calibration_batches
from .checkpoint import LoadedModel, check_writable_target, load_model, parse_factory_arguments, save_model, write_text
from .config import load_config
from .errors import ConversionError, DsconvError, UsageError
from .graph_pass import PASS_INIT_METHODS, TRACING_MODES, inspect_model, run_conversion
from .plot import check_plot_path, save_tradeoff_plot
from .ranks import BUDGET_TARGETS, RANK_MODES
from .report import FORMATS, build_report, render_plans, render_report

log = logging.getLogger("convert")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

EPILOG = """\
exit codes:
  0  success
  1  the conversion failed
  2  usage error: invalid argument, or an input that cannot be read

examples:
  dsconv convert model.pt -o model_ds.pt --trust-pickle
  dsconv convert weights.pt --arch torchvision.models:resnet18 -o resnet18_ds.pt --depth-multiplier 2
  dsconv inspect weights.pt --arch torchvision.models:resnet18 --multipliers 1,2,4
  dsconv convert model.pt -o small.pt --trust-pickle --rank budget --budget 0.33 --init data --calibration-data batches.pt
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        return args.handler(args)
    except DsconvError as error:
        if args.debug:
            raise
        print(f"dsconv: error: {error}", file=sys.stderr)
        return EXIT_FAILED if isinstance(error, ConversionError) else EXIT_USAGE
    except KeyboardInterrupt:
        print("dsconv: interrupted; nothing was written", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsconv",
        description="Convert the convolutions of a trained PyTorch model into depthwise-separable pairs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dsconv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="convert a checkpoint and write the converted model")
    add_input_arguments(convert)
    convert.add_argument("-o", "--output", required=True, type=Path, help="file to write the converted model to (torch.save of the module)")
    convert.add_argument("--force", action="store_true", help="replace OUTPUT (and --report FILE) if it exists")
    add_conversion_arguments(convert)
    add_report_arguments(convert)
    convert.set_defaults(handler=run_convert)

    report = commands.add_parser("report", help="convert in memory and print the before/after report; writes no model")
    add_input_arguments(report)
    report.add_argument("--force", action="store_true", help="replace --report FILE if it exists")
    add_conversion_arguments(report)
    add_report_arguments(report)
    report.set_defaults(handler=run_report)

    inspect = commands.add_parser("inspect", help="list every conv, whether it is eligible, and what each multiplier costs")
    add_input_arguments(inspect)
    add_selection_arguments(inspect)
    inspect.add_argument("--multipliers", type=parse_multipliers, default=(1, 2, 4), metavar="K,K,...", help="depth multipliers to price (default: 1,2,4)")
    inspect.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    inspect.add_argument("--plot", type=Path, metavar="FILE", help="also draw relative error against parameters per layer and for the whole model (.png/.svg/.pdf; needs matplotlib)")
    inspect.add_argument("--force", action="store_true", help="replace --plot FILE if it exists")
    inspect.set_defaults(handler=run_inspect)

    demo = commands.add_parser("demo", help="save a torchvision resnet18 checkpoint (random weights) and convert it with this CLI")
    demo.add_argument("--workdir", type=Path, help="folder for the demo files (default: a temporary folder, removed afterwards)")
    demo.add_argument("--depth-multiplier", type=parse_positive_int, default=1, metavar="K", help="depth multiplier (default: 1)")
    demo.set_defaults(handler=run_demo)

    for command in (convert, report, inspect, demo):
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
    group.add_argument("--format", choices=FORMATS, default="table", help="report format on stdout (default: table)")
    group.add_argument("--report", type=Path, metavar="FILE", help="also write the report to FILE (format from --format)")
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


def parse_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def parse_share(text: str) -> float:
    """Parse a share in (0, 1], such as ``0.33``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a share in (0, 1], e.g. 0.33") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]; give a share such as 0.33")
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
    loaded = load_model(
        args.input,
        arch=args.arch,
        arch_kwargs=parse_factory_arguments(args.arch_arg),
        trust_pickle=args.trust_pickle,
    )
    for note in loaded.notes:
        log.info("%s", note)
    return loaded


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


def convert_and_report(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """Load, convert and measure; returns the converted model and the rendered report.

    With --plot, the picture is drawn from the unconverted model and the plans
    once the report has been built, so a run that fails while converting or
    measuring leaves no plot behind.
    """
    device = resolve_device(args.device)
    if args.plot is not None:
        check_plot_path(args.plot, force=args.force, protect=(args.input,))
    model = load_input(args).model.to(device)
    was_training = model.training
    model.eval()
    keywords = conversion_keywords(args, device)

    try:
        result = run_conversion(model, **keywords)  # type: ignore[arg-type]
    except UsageError:
        raise
    except ValueError as error:
        raise ConversionError(str(error)) from error

    example_input = torch.randn(args.input_shape, device=device)
    try:
        report = build_report(
            model,
            result,
            example_input,
            init=args.init,
            latency=not args.no_latency,
            min_run_time=args.latency_time,
        )
    except RuntimeError as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise DsconvError(
            f"the model failed on a sample input of shape {','.join(map(str, args.input_shape))}: {first_line}. "
            "Set --input-shape to the shape the model expects"
        ) from error

    if args.plot is not None:
        plans = [layer.plan for layer in result.layers]
        calibration = keywords.get("calibration_data")
        save_tradeoff_plot(model, plans, args.plot, calibration_data=calibration, force=args.force, protect=(args.input,))
        log.info("wrote %s", args.plot)
    result.model.train(was_training)
    return result.model, render_report(report, args.format)


def run_convert(args: argparse.Namespace) -> int:
    check_writable_target(args.output, args.force, (args.input,))  # fail before a long conversion, not after
    converted, text = convert_and_report(args)
    save_model(converted, args.output, force=args.force, protect=(args.input,))
    log.info("wrote %s", args.output)
    emit_report(text, args)
    return EXIT_OK


def run_report(args: argparse.Namespace) -> int:
    _, text = convert_and_report(args)
    emit_report(text, args)
    return EXIT_OK


def emit_report(text: str, args: argparse.Namespace) -> None:
    sys.stdout.write(text)
    if args.report is not None:
        write_text(text, args.report, force=args.force, protect=(args.input,))


def run_inspect(args: argparse.Namespace) -> int:
    if args.plot is not None:
        check_plot_path(args.plot, force=args.force, protect=(args.input,))
    model = load_input(args).model
    try:
        plans, trace_error = inspect_model(model, **selection_keywords(args))
    except UsageError:
        raise
    except ValueError as error:
        raise ConversionError(str(error)) from error
    sys.stdout.write(render_plans(model, plans, args.multipliers, args.format, trace_error))
    if args.plot is not None:
        save_tradeoff_plot(model, plans, args.plot, mark_chosen=False, force=args.force, protect=(args.input,))
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
