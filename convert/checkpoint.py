"""Reading models from checkpoints and writing results without ever losing data.

Inputs come in the forms that training runs leave behind:

* a whole module saved with ``torch.save(model)``, possibly wrapped in a dict
  next to optimizer state. Unpickling a module runs code from the file, so it
  needs ``trust_pickle=True``. Without it the file is read with
  ``weights_only=True``, and the error names the globals that were rejected;
* a state dict paired with an architecture factory (``--arch
  torchvision.models:resnet18``): plain, wrapped (see
  :mod:`convert.state_dicts`), prefixed by ``module.``/``_orig_mod.``, or in a
  ``.safetensors`` file. State dicts are read with ``weights_only=True``;
* TorchScript archives and ``torch.export`` programs, which no longer contain the
  Python modules that dsconv rewrites. Their weights can feed ``--arch`` when the
  file is trusted.

Input files are only opened for reading.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import logging
import os
import pickle
import re
import sys
import tempfile
import types
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CheckpointError, UsageError
from .state_dicts import is_state_dict, load_state_dict_checked, read_safetensors, select_entry, strip_prefixes

if TYPE_CHECKING:
    from .plan import ConversionPlan

    PlanSource = ConversionPlan | Mapping[str, Any] | str | os.PathLike[str]

__all__ = [
    "LoadedModel",
    "load_model",
    "detect_format",
    "import_modules",
    "load_architecture",
    "parse_factory_arguments",
    "atomic_write",
    "save_model",
    "write_text",
]

log = logging.getLogger(__name__)

# Globals that weights_only=True rejects by default but that are plain data, so
# reading them runs no code: training scripts store their argparse namespace next
# to the weights. Nothing else is added.
SAFE_EXTRA_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# File kinds that detect_format returns.
FILE_KINDS = ("torch", "torchscript", "torch-export", "safetensors", "json", "damaged-zip", "zip", "unknown")

# How many rejected globals an error message names.
LISTED_GLOBALS = 4

# JSON files larger than this are not parsed just to name them in an error.
JSON_SNIFF_LIMIT = 10 * 2**20


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
    key: str | None = None,
    imports: Sequence[str] = (),
    plan: PlanSource | None = None,
) -> LoadedModel:
    """Load a model from ``path``: a pickled module, or a state dict with ``arch``.

    Args:
        path: the checkpoint file. It is only read.
        arch: ``"module.path:factory"`` that builds the model a state dict belongs to.
        arch_kwargs: keyword arguments for the factory.
        trust_pickle: allow full unpickling, which runs code from the file.
        key: the checkpoint entry that contains the model or its weights (``a/b``
            for nested entries). It is found automatically when only one entry qualifies.
        imports: modules to import first. A pickled class that was defined in the
            ``__main__`` of the script that saved it is looked up in these modules.
        plan: a conversion plan (see :func:`convert.apply_plan`) applied to the
            ``arch`` model before the weights are loaded, for state dicts of
            converted models.

    Raises :class:`CheckpointError` with a message that names the file and the fix.
    """
    path = Path(path)
    if plan is not None and arch is None:
        raise UsageError("a conversion plan (--plan) is applied to the --arch model: pass --arch as well")
    modules = import_modules(imports)
    check_readable_file(path)
    kind = detect_format(path)
    log.debug("%s: detected format %s", path, kind)

    if kind == "json":
        raise CheckpointError(json_input_message(path))
    if kind == "damaged-zip":
        raise CheckpointError(f"{path} is a zip archive, as torch.save writes, but it is truncated or damaged; save the checkpoint again")
    if kind == "zip":
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint: it has no data.pkl record")

    if kind in ("torchscript", "torch-export"):
        if arch is None:
            raise CheckpointError(compiled_archive_message(path, kind))
        state_dict = read_compiled_weights(path, kind, trust_pickle)
        notes = [f"weights read from the {describe_kind(kind)} (its compiled code is not used)"]
        return load_into_architecture(path, state_dict, notes, arch, arch_kwargs, plan)
    if kind == "safetensors":
        if arch is None:
            raise CheckpointError(state_dict_needs_arch(path, "a state dict (it is a safetensors file)"))
        return load_into_architecture(path, read_safetensors(path), [], arch, arch_kwargs, plan)

    content = read_checkpoint(path, trust_pickle, modules, with_arch=arch is not None)
    if arch is not None:
        state_dict, notes = select_entry(content, path, key=key, want="state_dict")
        return load_into_architecture(path, state_dict, notes, arch, arch_kwargs, plan)
    model, notes = select_module(content, path, key)
    return LoadedModel(model, "module", notes)


def load_into_architecture(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    notes: list[str],
    arch: str,
    arch_kwargs: Mapping[str, Any] | None,
    plan: PlanSource | None,
) -> LoadedModel:
    """Build ``arch``, apply ``plan`` if any, strip wrapper prefixes and load the weights strictly."""
    model = load_architecture(arch, arch_kwargs or {})
    if plan is not None:
        from .plan import apply_plan

        try:
            model = apply_plan(model, plan, inplace=True)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"the conversion plan does not fit {arch}: {error}") from error
        notes = [*notes, "conversion plan applied to the architecture before loading the weights"]
    state_dict, stripped = strip_prefixes(state_dict, set(model.state_dict()))
    if stripped:
        notes = [*notes, f"stripped the key prefix {''.join(stripped)!r} that every key of {path.name} carries ({prefix_origin(stripped)})"]
    load_state_dict_checked(model, state_dict, path, arch)
    return LoadedModel(model, "state_dict", notes)


def prefix_origin(stripped: list[str]) -> str:
    origins = {"module.": "DataParallel/DistributedDataParallel", "_orig_mod.": "torch.compile"}
    return ", then ".join(origins[prefix] for prefix in stripped)


def select_module(content: Any, path: Path, key: str | None) -> tuple[nn.Module, list[str]]:
    """Find the module in a checkpoint read without ``--arch``."""
    if is_state_dict(content):
        raise CheckpointError(state_dict_needs_arch(path, "a state dict (a mapping of weights), not a model"))
    try:
        model, notes = select_entry(content, path, key=key, want="module")
    except CheckpointError:
        if isinstance(content, Mapping) and any(is_state_dict(value) for value in content.values()):
            raise CheckpointError(state_dict_needs_arch(path, "a state dict next to other training data, not a model")) from None
        raise
    return model, notes


def state_dict_needs_arch(path: Path, content_description: str) -> str:
    return (
        f"{path} contains {content_description}: pass --arch module.path:factory "
        "(for example --arch torchvision.models:resnet18) to build the model it belongs to"
    )


def check_readable_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"input file {path} not found")
    if path.is_dir():
        raise CheckpointError(f"input {path} is a directory: give the checkpoint file inside it")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"input file {path} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"input file {path} is empty")


def detect_format(path: Path) -> str:
    """Name the kind of file at ``path`` from its content, not its extension (see :data:`FILE_KINDS`)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    size = path.stat().st_size

    if head.startswith(b"PK\x03\x04"):
        return zip_kind(path)
    if looks_like_safetensors(path, head, size):
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"[") and size <= JSON_SNIFF_LIMIT and parses_as_json(path):
        return "json"
    if head.startswith(b"\x80"):  # the PROTO opcode that starts every pickle of protocol 2 or later
        return "torch"
    return "unknown"


def zip_kind(path: Path) -> str:
    """Tell a torch.save archive from a TorchScript archive and a torch.export program."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "damaged-zip"
    # Every record sits under one top-level folder named after the archive.
    inner = [name.split("/", 1)[1] if "/" in name else name for name in names]
    if any(name.startswith("code/") for name in inner):
        return "torchscript"
    if any(name in ("archive_format", "serialized_exported_program.json") or name.startswith("models/") for name in inner):
        return "torch-export"
    if "data.pkl" in inner:
        return "torch"
    return "zip"


def looks_like_safetensors(path: Path, head: bytes, size: int) -> bool:
    """Return whether the file starts as safetensors does: an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 2 <= header_length <= size - 8 and head[8:9] == b"{"


def parses_as_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def json_input_message(path: Path) -> str:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        content = None
    if isinstance(content, Mapping) and content.get("format") == "dsconv-plan":
        return (
            f"{path} is a dsconv conversion plan, not a checkpoint: give the state dict as INPUT "
            f"and this file as --plan {path}, together with --arch"
        )
    return f"{path} is a JSON file, not a model checkpoint: give a file written by torch.save or a .safetensors file"


def describe_kind(kind: str) -> str:
    return {"torchscript": "TorchScript archive", "torch-export": "torch.export program"}.get(kind, kind)


def compiled_archive_message(path: Path, kind: str) -> str:
    """Explain why a compiled archive cannot be converted, and what to give instead.

    dsconv rewrites the ``nn.Conv*d`` modules of a Python model, and a compiled
    archive has none left: TorchScript keeps compiled methods, and torch.export
    keeps a graph of ATen operators. Its weights still fit the source architecture.
    """
    name = describe_kind(kind)
    return (
        f"{path} is a {name}, which has no Python modules left to convert. Give the source model "
        "saved with torch.save(model), or its state dict with --arch module.path:factory; "
        f"with --arch and --trust-pickle, dsconv takes the weights from this {name}"
    )


def read_compiled_weights(path: Path, kind: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """Read the state dict of a TorchScript archive or a torch.export program, key for key as the source model has it."""
    name = describe_kind(kind)
    if not trust_pickle:
        reason = "compiles and can run the TorchScript code inside it" if kind == "torchscript" else "can unpickle Python objects"
        raise CheckpointError(
            f"{path} is a {name}; reading its weights {reason}. If you trust this file, pass --trust-pickle; "
            "otherwise give a state dict saved with torch.save(model.state_dict())"
        )
    try:
        with warnings.catch_warnings():
            # torch 2.9+ marks torch.jit as deprecated; the warning concerns writing new TorchScript.
            warnings.simplefilter("ignore", FutureWarning)
            if kind == "torchscript":
                state_dict = torch.jit.load(os.fspath(path), map_location="cpu").state_dict()
            else:
                state_dict = torch.export.load(os.fspath(path)).module().state_dict()
    except Exception as error:  # both loaders run the archive's own deserializer, which can raise anything
        raise CheckpointError(f"could not read the weights of the {name} {path}: {one_line(error)}") from error
    return {key: value.detach().cpu() for key, value in state_dict.items()}


class PickleRejected(Exception):
    """``weights_only=True`` rejected globals; ``names`` lists them."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names) or "unknown global")
        self.names = names


def read_checkpoint(path: Path, trust_pickle: bool, modules: Sequence[types.ModuleType], with_arch: bool = False) -> Any:
    """Read a torch.save file: with ``weights_only=True`` first, fully only if trusted."""
    try:
        return read_weights_only(path)
    except PickleRejected as rejected:
        if not trust_pickle:
            raise CheckpointError(rejection_message(path, rejected.names, with_arch)) from None
        log.info("%s: weights_only=True rejected %s; unpickling fully because of --trust-pickle", path, rejected)
    return read_trusted(path, modules)


def rejection_message(path: Path, names: list[str], with_arch: bool = False) -> str:
    listed = ", ".join(names[:LISTED_GLOBALS]) if names else "an unknown global"
    if len(names) > LISTED_GLOBALS:
        listed += f" and {len(names) - LISTED_GLOBALS} more"
    message = (
        f"{path} contains pickled Python objects (weights_only=True rejected {listed}); loading them runs code from the file. "
    )
    main_classes = [name.split(".", 1)[1] for name in names if name.startswith("__main__.")]
    if main_classes:
        return message + (
            f"{main_classes[0]} was defined in the __main__ of the script that saved the file: if you trust it, pass "
            f"--trust-pickle and --import MODULE, where MODULE defines {main_classes[0]} (for example --import my_project.models); "
            "or save model.state_dict() and pass --arch"
        )
    if with_arch:
        return message + (
            "The weights sit next to other Python objects: if you trust this file, pass --trust-pickle; "
            "otherwise save only model.state_dict() from the training run"
        )
    return message + (
        "If you trust this file, pass --trust-pickle (trust_pickle=True); "
        "if it contains a state dict, pass --arch module.path:factory instead"
    )


def read_weights_only(path: Path) -> Any:
    """Read ``path`` with ``torch.load(weights_only=True)`` on the CPU, allowing :data:`SAFE_EXTRA_GLOBALS`."""
    allow = getattr(torch.serialization, "safe_globals", None)  # added in torch 2.5
    context = allow(list(SAFE_EXTRA_GLOBALS)) if allow is not None else contextlib.nullcontext()
    try:
        with context:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = rejected_globals(path, error)
        if names:
            raise PickleRejected(names) from error
        raise not_a_checkpoint(path, error) from error
    except Exception as error:  # the weights-only unpickler runs no code, but reports damage in many types
        raise not_a_checkpoint(path, error) from error


def rejected_globals(path: Path, error: BaseException) -> list[str]:
    """Name every global that weights_only=True rejects in ``path``; empty if ``error`` is not a rejection."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if match is None:
        return []
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # added in torch 2.5
    if finder is not None:
        try:
            allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in SAFE_EXTRA_GLOBALS}
            names = [name for name in finder(path) if name not in allowed]
            if names:
                # The file's own classes are more informative than the torch.nn classes around them, so they come first.
                return sorted(names, key=lambda name: name.startswith("torch."))
        except (ValueError, RuntimeError, OSError):  # legacy (non-zip) files are not supported by the finder
            pass
    return [match.group(1)]


class ClassNotImportable(Exception):
    """A pickled class could not be found while unpickling a trusted file."""

    def __init__(self, module: str, name: str, reason: str) -> None:
        super().__init__(f"{module}.{name}: {reason}")
        self.module = module
        self.name = name
        self.reason = reason


def trusted_pickle_module(modules: Sequence[types.ModuleType]) -> types.ModuleType:
    """Build a ``pickle_module`` for ``torch.load`` whose unpickler reports missing classes by name.

    Classes pickled from ``__main__`` are looked up in ``modules``, in order.
    """

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "__main__":
                for imported in modules:
                    if hasattr(imported, name):
                        return getattr(imported, name)
                if modules:
                    reason = f"none of the --import modules ({', '.join(imported.__name__ for imported in modules)}) defines it"
                else:
                    reason = "no --import module was given to look it up in"
                raise ClassNotImportable(module, name, reason)
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError) as error:
                raise ClassNotImportable(module, name, str(error)) from error

    def load(file: IO[bytes], **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    module = types.ModuleType("dsconv_trusted_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    return module


def read_trusted(path: Path, modules: Sequence[types.ModuleType] = ()) -> Any:
    """Read ``path`` with full unpickling; the caller has opted in."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=trusted_pickle_module(modules))
    except ClassNotImportable as error:
        raise CheckpointError(class_not_importable_message(path, error)) from error
    except Exception as error:  # unpickling runs arbitrary code, which can raise anything
        raise not_a_checkpoint(path, error) from error


def class_not_importable_message(path: Path, error: ClassNotImportable) -> str:
    if error.module == "__main__":
        return (
            f"{path} contains class {error.name}, which was defined in the __main__ of the script that saved it, "
            f"and {error.reason}. Pass --import MODULE naming the module that defines {error.name}, "
            "for example --import my_project.models"
        )
    return (
        f"{path} refers to class {error.module}.{error.name}, which cannot be imported ({error.reason}); "
        f"run dsconv where {error.module.split('.')[0]} is importable (add its folder to PYTHONPATH), "
        "or pass --import MODULE to import it first"
    )


def import_modules(names: Sequence[str]) -> list[types.ModuleType]:
    """Import the ``--import`` modules, with the current folder on ``sys.path``."""
    if names:
        ensure_cwd_on_path()
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise CheckpointError(f"--import {name!r}: cannot import it ({error}); check the name and PYTHONPATH") from error
        except Exception as error:  # importing runs the module's code, which can raise anything
            raise CheckpointError(f"--import {name!r}: importing it failed: {one_line(error)}") from error
    return modules


def ensure_cwd_on_path() -> None:
    """Put the current folder on ``sys.path``, as ``python -m`` does, so the ``dsconv`` script finds the user's modules."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def not_a_checkpoint(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint ({describe_load_error(error)})")


def describe_load_error(error: BaseException) -> str:
    """Return the useful line of a torch.load error: the weights-only unpickler buries it in a long text."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", text, re.DOTALL)
    if match:
        return f"{type(error).__name__}: {' '.join(match.group(1).split())}"
    return one_line(error)


def one_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    first = message[0] if message else ""
    if len(first) > 300:
        first = first[:300] + " ..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_architecture(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build a model from ``"module.path:factory"`` called with ``kwargs``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CheckpointError(f"--arch {spec!r} is not of the form module.path:factory (e.g. torchvision.models:resnet18)")
    ensure_cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CheckpointError(f"--arch {spec!r}: cannot import module {module_name!r} ({error})") from error
    except Exception as error:  # importing runs the module's code, which can raise anything
        raise CheckpointError(f"--arch {spec!r}: importing {module_name!r} failed: {one_line(error)}") from error
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
    except Exception as error:  # the factory is the user's code
        raise CheckpointError(f"--arch {spec!r} failed with the arguments {dict(kwargs)}: {one_line(error)}") from error
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
        from .outputs import file_mode  # outputs imports this module

        os.chmod(handle.name, file_mode(target))  # NamedTemporaryFile creates the file readable by its owner only
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

