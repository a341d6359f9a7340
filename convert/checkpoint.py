"""Reading models from checkpoints and writing results without ever losing data.

Two input forms are understood: a whole module saved with ``torch.save(model)``,
and a state dict paired with an architecture factory (``--arch
torchvision.models:resnet18``). Unpickling a module runs code from the file, so it
needs ``trust_pickle=True``; state dicts are always read with ``weights_only=True``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = [
    "LoadedModel",
    "load_model",
    "load_architecture",
    "parse_factory_arguments",
    "atomic_write",
    "save_model",
    "write_text",
]

log = logging.getLogger(__name__)

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "model_ema", "ema", "net", "module")


@dataclass
class LoadedModel:
    """A model read from a file, and how it was read."""

    model: nn.Module
    source: str  # "module" (pickled nn.Module) or "state_dict" (weights + --arch)
    notes: list[str] = field(default_factory=list)


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load a model from ``path``: a pickled module, or a state dict with ``arch``.

    Raises :class:`CheckpointError` with a message that names the file and the fix.
    """
    path = Path(path)
    check_readable_file(path)
    if arch is not None:
        model = load_architecture(arch, arch_kwargs or {})
        state = read_weights_only(path)
        state_dict, notes = extract_state_dict(state, path)
        load_state_dict_checked(model, state_dict, path, arch)
        return LoadedModel(model, "state_dict", notes)

    try:
        content = read_weights_only(path)
    except PickleRejected as rejected:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} contains pickled Python objects ({rejected.detail}); loading them runs code from the file. "
                "If you trust this file, pass --trust-pickle (trust_pickle=True); "
                "if it contains a state dict, pass --arch module.path:factory instead"
            ) from None
        content = read_trusted(path)
    if isinstance(content, nn.Module):
        return LoadedModel(content, "module")
    if isinstance(content, Mapping):
        raise CheckpointError(
            f"{path} contains a state dict (a mapping of weights), not a model: pass --arch module.path:factory "
            "(for example --arch torchvision.models:resnet18) to build the model it belongs to"
        )
    raise CheckpointError(f"{path} contains a {type(content).__name__}, not an nn.Module or a state dict")


def check_readable_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"input file {path} not found")
    if path.is_dir():
        raise CheckpointError(f"input {path} is a directory: give the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"input file {path} is empty")


class PickleRejected(Exception):
    """``weights_only=True`` rejected a global; ``detail`` names it."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def read_weights_only(path: Path) -> Any:
    """Read ``path`` with ``torch.load(weights_only=True)`` on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = refused_global(error)
        if refused is None:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({unpickler_detail(error)})") from error
        raise PickleRejected(f"weights_only=True rejected the global {refused}") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, UnicodeDecodeError) as error:
        raise not_a_checkpoint(path, error) from error


def read_trusted(path: Path) -> Any:
    """Read ``path`` with full unpickling; the caller has opted in."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as error:
        raise CheckpointError(
            f"{path} refers to a class that cannot be imported ({error}); "
            "run dsconv where the module that defines it is importable (add its folder to PYTHONPATH)"
        ) from error
    except Exception as error:  # unpickling runs arbitrary code, which can raise anything
        raise not_a_checkpoint(path, error) from error


def not_a_checkpoint(path: Path, error: BaseException) -> CheckpointError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {first_line})")


def refused_global(error: BaseException) -> str | None:
    """Return the global that torch's weights-only unpickler refused, if that was the failure."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None


def unpickler_detail(error: BaseException) -> str:
    """Return the line of torch's weights-only error that describes the problem with the bytes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:") or "Please file an issue" in line:
            detail = line.partition("WeightsUnpickler error:")[2].strip()
            if detail:
                return detail
            if index + 1 < len(lines):
                return lines[index + 1]
    return lines[0] if lines else type(error).__name__


def extract_state_dict(content: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the state dict in a checkpoint: the mapping itself, or one nested under a usual key."""
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} contains a {type(content).__name__}, not a state dict; drop --arch if it is a pickled model")
    if content and all(isinstance(value, torch.Tensor) for value in content.values()):
        return dict(content), []
    for key in STATE_DICT_KEYS:
        nested = content.get(key)
        if isinstance(nested, Mapping) and nested and all(isinstance(v, torch.Tensor) for v in nested.values()):
            return dict(nested), [f"weights read from the checkpoint's {key!r} entry"]
    raise CheckpointError(
        f"{path} has no state dict: its top-level keys are {', '.join(map(repr, list(content)[:8]))}"
    )


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load ``state_dict`` strictly, turning mismatches into a message that lists the first keys."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", wrong_shape)):
        if keys:
            problems.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)")
    if problems:
        raise CheckpointError(
            f"the weights in {path} do not fit {arch}: " + "; ".join(problems)
            + ". Check --arch and its --arch-arg values (for example num_classes)"
        )
    model.load_state_dict(state_dict)


def load_architecture(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build a model from ``"module.path:factory"`` called with ``kwargs``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CheckpointError(f"--arch {spec!r} is not of the form module.path:factory (e.g. torchvision.models:resnet18)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CheckpointError(f"--arch {spec!r}: cannot import module {module_name!r} ({error})") from error
    factory: Any = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise CheckpointError(f"--arch {spec!r}: {module_name!r} has no attribute {attribute!r}")
    if not callable(factory):
        raise CheckpointError(f"--arch {spec!r}: {attribute!r} is not callable")
    try:
        model = factory(**kwargs)
    except TypeError as error:
        raise CheckpointError(f"--arch {spec!r} rejected the arguments {dict(kwargs)}: {error}") from error
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--arch {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def parse_factory_arguments(pairs: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are Python literals when they parse, else strings."""
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or not key.isidentifier():
            raise CheckpointError(f"--arch-arg {pair!r} is not of the form NAME=VALUE (e.g. num_classes=10)")
        try:
            arguments[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            arguments[key] = text
    return arguments


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, force: bool = False, protect: tuple[Path, ...] = ()) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path``; on success it is renamed over ``path``.

    On any error the temporary file is removed and ``path`` is untouched. Refuses to
    replace an existing file unless ``force``, and never writes over ``protect``.
    """
    target = Path(path)
    check_writable_target(target, force, protect)
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise


def check_writable_target(target: Path, force: bool, protect: tuple[Path, ...]) -> None:
    if any(same_file(target, source) for source in protect):
        raise CheckpointError(f"output {target} is the input file; choose another output path")
    if target.is_dir():
        raise CheckpointError(f"output {target} is a directory; give a file path")
    if target.exists() and not force:
        raise CheckpointError(f"output {target} already exists; pass --force to replace it")
    parent = target.parent
    if not parent.is_dir():
        raise CheckpointError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"output folder {parent} is not writable")


def same_file(first: Path, second: Path) -> bool:
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def save_model(model: nn.Module, path: str | os.PathLike[str], *, force: bool = False, protect: tuple[Path, ...] = ()) -> None:
    """Save the whole module with ``torch.save``, atomically."""
    try:
        with atomic_write(path, force=force, protect=protect) as handle:
            torch.save(model, handle)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise CheckpointError(f"the converted model cannot be pickled to {path}: {error}") from error


def write_text(text: str, path: str | os.PathLike[str], *, force: bool = False, protect: tuple[Path, ...] = ()) -> None:
    """Write a text file atomically."""
    with atomic_write(path, force=force, protect=protect) as handle:
        handle.write(text.encode())

