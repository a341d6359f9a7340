"""State dicts as training runs leave them: wrapped, prefixed, or in safetensors files.

A checkpoint often contains more than weights: optimizer state, the epoch, the
argparse namespace of the run, and sometimes two copies of the weights (the
model and its exponential moving average). This module finds the state dict in
such a checkpoint, strips the prefixes that ``DataParallel``/``DistributedDataParallel``
(``module.``) and ``torch.compile`` (``_orig_mod.``) add to every key, and loads
it into an architecture with a message that lists the first keys that do not fit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = [
    "WRAPPER_KEYS",
    "PREFIXES",
    "is_state_dict",
    "select_entry",
    "strip_prefixes",
    "load_state_dict_checked",
    "read_safetensors",
    "tensors_for_safetensors",
]

log = logging.getLogger(__name__)

# Entries under which training scripts commonly store the model or its weights,
# next to optimizer state and other run data. "ema"/"model_ema"/"state_dict_ema"
# hold the exponential moving average of the weights (timm, YOLO and others).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "ema", "model_ema", "state_dict_ema", "net", "module")

# Key prefixes added by wrappers: DataParallel and DistributedDataParallel store the
# model as ``.module``; torch.compile stores it as ``._orig_mod``.
PREFIXES = ("module.", "_orig_mod.")

# How many differing keys an error message lists.
LISTED_KEYS = 5


def is_state_dict(value: Any) -> bool:
    """Return whether ``value`` is a non-empty mapping from string keys to tensors."""
    if not isinstance(value, Mapping) or not value:
        return False
    return all(isinstance(key, str) and isinstance(item, torch.Tensor) for key, item in value.items())


def select_entry(
    content: Any,
    path: Path,
    *,
    key: str | None = None,
    want: str = "state_dict",
) -> tuple[Any, list[str]]:
    """Find the state dict (``want="state_dict"``) or module (``want="module"``) in a checkpoint.

    ``key`` names the entry to use; nested entries are separated by ``/``
    (``--key ema/module``). Without ``key``, the checkpoint itself is used when it
    is already what is wanted, else the one entry under :data:`WRAPPER_KEYS` that
    contains it. Entries that hold identical weights count as one. Returns the value
    and notes for the report; raises :class:`CheckpointError` when no entry or
    several different entries qualify.
    """
    fits = is_state_dict if want == "state_dict" else (lambda value: isinstance(value, nn.Module))
    noun = "a state dict" if want == "state_dict" else "an nn.Module"
    read = "weights read" if want == "state_dict" else "model read"

    if key is not None:
        value = entry_at(content, key, path)
        if not fits(value):
            raise CheckpointError(f"entry {key!r} of {path} contains a {describe(value)}, not {noun}")
        return value, [f"{read} from the checkpoint's entry {key!r} (--key)"]

    if fits(content):
        return content, []
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} contains a {describe(content)}, not {noun}")

    candidates = [name for name in WRAPPER_KEYS if fits(content.get(name))]
    distinct = drop_duplicate_entries(content, candidates)
    if len(distinct) == 1:
        name = distinct[0]
        note = f"{read} from the checkpoint's entry {name!r}"
        if len(candidates) > 1:
            note += f" (entries {', '.join(map(repr, candidates))} hold the same weights)"
        return content[name], [note]
    if len(distinct) > 1:
        raise CheckpointError(
            f"{path} contains several different sets of weights (entries {', '.join(map(repr, distinct))}); "
            f"pass --key with the one to convert, for example --key {distinct[-1]}"
        )

    others = [str(name) for name, value in content.items() if fits(value)]
    hint = f"; entries that contain {noun}: {', '.join(others)} (pass --key NAME)" if others else ""
    listed = ", ".join(repr(name) for name in list(content)[:8])
    raise CheckpointError(f"{path} has no {want.replace('_', ' ')} under the usual entries; its top-level entries are {listed}{hint}")


def entry_at(content: Any, key: str, path: Path) -> Any:
    """Follow a ``/``-separated key through nested mappings."""
    value = content
    walked: list[str] = []
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            where = f"entry {'/'.join(walked)!r}" if walked else str(path)
            available = ", ".join(repr(name) for name in list(value)[:8]) if isinstance(value, Mapping) else "none"
            raise CheckpointError(f"--key {key!r}: {where} has no entry {part!r}; its entries are {available}")
        value = value[part]
        walked.append(part)
    return value


def drop_duplicate_entries(content: Mapping[str, Any], names: list[str]) -> list[str]:
    """Keep the first of several entries that hold the same object or equal tensors."""
    distinct: list[str] = []
    for name in names:
        if not any(same_weights(content[name], content[kept]) for kept in distinct):
            distinct.append(name)
    return distinct


def same_weights(first: Any, second: Any) -> bool:
    if first is second:
        return True
    if not (is_state_dict(first) and is_state_dict(second)) or first.keys() != second.keys():
        return False
    return all(
        first[key].shape == second[key].shape and first[key].dtype == second[key].dtype and torch.equal(first[key], second[key])
        for key in first
    )


def describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"mapping with {len(value)} entries"
    return type(value).__name__


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove :data:`PREFIXES` that every key carries, as long as the model's own keys lack them.

    ``expected`` is the key set of the target model: a prefix is kept when every
    expected key has it too (a model whose top-level child is named ``module``).
    Prefixes nest in either order (``module._orig_mod.``). Returns the new dict and
    the prefixes removed, outermost first.
    """
    result = dict(state_dict)
    stripped: list[str] = []
    changed = True
    while changed and result:
        changed = False
        for prefix in PREFIXES:
            if all(key.startswith(prefix) for key in result) and not all(key.startswith(prefix) for key in expected):
                result = {key[len(prefix):]: value for key, value in result.items()}
                stripped.append(prefix)
                changed = True
    return result, stripped


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
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
            listed = ", ".join(keys[:LISTED_KEYS])
            more = " ..." if len(keys) > LISTED_KEYS else ""
            problems.append(f"{label}: {listed}{more} ({len(keys)} in all)")
    if problems:
        if any(key.endswith((".conv_dw.weight", ".conv_pw.weight")) for key in unexpected):
            hint = (
                ". These are the weights of a converted model: pass --plan with the conversion plan "
                "(NAME.plan.json) that dsconv wrote next to them"
            )
        else:
            hint = ". Check --arch and its --arch-arg values (for example num_classes)"
        raise CheckpointError(f"the weights in {path} do not fit {arch}: " + "; ".join(problems) + hint)
    model.load_state_dict(state_dict)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file onto the CPU. The format stores only tensors, so no code runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line})") from error


def tensors_for_safetensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prepare a state dict for ``safetensors.torch.save``: contiguous tensors, no shared storage.

    safetensors rejects tensors that share memory, which a module registered under
    two names produces. Each later alias is saved as its own copy, so the file still
    loads with ``load_state_dict(strict=True)``; the copies cost disk space.
    """
    seen: set[tuple[torch.device, int]] = set()
    prepared: dict[str, torch.Tensor] = {}
    copies = 0
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if storage is not None and storage in seen:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
            copies += 1
        elif storage is not None:
            seen.add(storage)
        prepared[key] = tensor.contiguous()
    if copies:
        log.info("saved %d tensors that share storage with another key as separate copies", copies)
    return prepared
