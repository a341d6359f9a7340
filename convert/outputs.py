"""Writing results so that every output file appears complete or not at all.

An :class:`OutputSet` writes each file to a hidden temporary file in the target's
folder and publishes all of them together with ``os.replace`` at the end. When
anything fails before or during publishing (an error, Ctrl-C, SIGTERM turned
into an exception by the CLI), the temporary files are removed and targets that
were already replaced are restored, so the folder is left as it was. A process
killed with SIGKILL can leave a hidden ``.NAME.*.tmp`` file behind, but never a
partial file under an output name.

The converted model is written in one of :data:`SAVE_FORMS`:

* ``module``: ``torch.save`` of the model object. It keeps the model's class,
  methods and attributes; loading it needs that class (and dsconv) importable.
* ``graph-module``: ``torch.save`` of a :class:`torch.fx.GraphModule`. It loads
  without the model's source code, but keeps only what ``forward`` uses, plus the
  root's plain-data attributes (numbers, strings, lists and dicts of them).
* ``state-dict`` / ``safetensors``: the weights, plus a JSON conversion plan that
  :func:`convert.apply_plan` uses to rebuild the converted architecture.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch
from torch import nn

from .checkpoint import check_writable_target, same_file
from .errors import CheckpointError

__all__ = [
    "SAVE_FORMS",
    "OutputSet",
    "check_output_targets",
    "default_plan_path",
    "keep_plain_attributes",
    "model_writer",
]

log = logging.getLogger(__name__)

SAVE_FORMS = ("module", "graph-module", "state-dict", "safetensors")

# Forms that store only weights and need the JSON plan to rebuild the architecture.
WEIGHT_FORMS = ("state-dict", "safetensors")


def check_output_targets(targets: Sequence[Path], *, force: bool, protect: Sequence[Path] = ()) -> None:
    """Check, before any work, that each target can be written and that no two targets are the same file."""
    for index, target in enumerate(targets):
        check_writable_target(target, force, tuple(protect))
        for earlier in targets[:index]:
            if same_file(target, earlier):
                raise CheckpointError(f"two outputs would both be written to {target}; give each output its own path")


def file_mode(target: Path) -> int:
    """Return the permission bits a new output gets: those of the file it replaces, else 0o666 minus the umask."""
    if target.exists():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class OutputSet:
    """Output files staged as temporary files and published together by :meth:`commit`.

    Use it as a context manager: leaving the block without :meth:`commit` (by an
    exception or a return) removes every staged file.
    """

    def __init__(self, *, force: bool = False, protect: Sequence[Path] = ()) -> None:
        self.force = force
        self.protect = tuple(Path(path) for path in protect)
        self.staged: list[tuple[Path, Path]] = []  # (target, temporary file)

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.discard()

    @property
    def targets(self) -> list[Path]:
        return [target for target, _ in self.staged]

    def add(self, target: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
        """Write one output to a temporary file beside ``target``; ``write`` receives the open binary file."""
        target = Path(target)
        check_output_targets([*self.targets, target], force=self.force, protect=self.protect)
        handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
        self.staged.append((target, Path(handle.name)))  # registered first, so discard() removes a half-written file
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, file_mode(target))

    def commit(self) -> None:
        """Rename every staged file over its target; on failure, restore the targets and re-raise."""
        for target in self.targets:  # a file may have appeared at a target while the run worked
            check_writable_target(target, self.force, self.protect)
        published: list[tuple[Path, Path | None]] = []
        try:
            for index, (target, temporary) in enumerate(self.staged):
                # Only a target that a later rename could still need to roll back gets a backup.
                needs_backup = target.exists() and index < len(self.staged) - 1
                backup = make_backup(target) if needs_backup else None
                try:
                    os.replace(temporary, target)
                except BaseException:
                    if backup is not None:
                        backup.unlink()
                    raise
                published.append((target, backup))
        except BaseException:
            restore(published)
            self.discard()
            raise
        for _, backup in published:
            if backup is not None:
                backup.unlink()
        self.staged = []

    def discard(self) -> None:
        """Remove every staged temporary file; the targets are not touched."""
        for _, temporary in self.staged:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        self.staged = []


def make_backup(target: Path) -> Path:
    """Keep the current content of ``target`` under a hidden name: a hard link, or a copy where links fail."""
    backup = target.with_name(f".{target.name}.{uuid.uuid4().hex}.bak")
    try:
        os.link(target, backup)
    except OSError:
        shutil.copy2(target, backup)
    return backup


def restore(published: list[tuple[Path, Path | None]]) -> None:
    """Undo published renames, newest first: put backups back, remove targets that did not exist."""
    for target, backup in reversed(published):
        with contextlib.suppress(FileNotFoundError):
            if backup is not None:
                os.replace(backup, target)
            else:
                target.unlink()


def default_plan_path(output: Path) -> Path:
    """Return where the plan of a weights-only output goes: ``model_ds.safetensors`` -> ``model_ds.plan.json``."""
    return output.with_name(f"{output.stem if output.suffix else output.name}.plan.json")


def model_writer(model: nn.Module, form: str) -> Callable[[IO[bytes]], None]:
    """Return a function that writes ``model`` in ``form`` (one of :data:`SAVE_FORMS`) to a binary file."""
    if form not in SAVE_FORMS:
        raise ValueError(f"save form {form!r} is not supported: choose one of {', '.join(SAVE_FORMS)}")

    def write(handle: IO[bytes]) -> None:
        if form in ("module", "graph-module"):
            pickle_model(model, handle)
        elif form == "state-dict":
            torch.save(model.state_dict(), handle)
        else:
            handle.write(safetensors_bytes(model))

    return write


def pickle_model(model: nn.Module, handle: IO[bytes]) -> None:
    try:
        torch.save(model, handle)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"the model cannot be pickled ({type(error).__name__}: {error}); "
            "save it with --save-as state-dict or --save-as safetensors instead"
        ) from error


def safetensors_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    from . import __version__
    from .state_dicts import tensors_for_safetensors

    return save(tensors_for_safetensors(model.state_dict()), metadata={"format": "pt", "producer": f"dsconv {__version__}"})


def is_plain_data(value: Any) -> bool:
    """Return whether ``value`` is built only from None, bool, int, float, str, lists, tuples and dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain_data(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, (str, int)) and is_plain_data(item) for key, item in value.items())
    return False


def keep_plain_attributes(original: nn.Module, graph_module: nn.Module) -> list[str]:
    """Copy the plain-data attributes of ``original`` (``num_classes``, config dicts) onto ``graph_module``.

    A GraphModule keeps only what ``forward`` uses. Returns the names of the public
    attributes that could not be kept because they are not plain data.
    """
    dropped = []
    for name, value in vars(original).items():
        if name.startswith("_") or name == "training" or name in vars(graph_module):
            continue
        if is_plain_data(value):
            setattr(graph_module, name, value)
        else:
            dropped.append(name)
    return dropped
