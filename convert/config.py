"""Per-layer settings: which convs to convert and at which depth multiplier.

Settings resolve like ``torch.ao.quantization.QConfigMapping``, from the most general
to the most specific, each level overriding the one before:

1. the global setting,
2. the module type (exact type, never a subclass or a class name),
3. a qualified-name pattern (regular expression matched against the whole name;
   patterns are tried in the order they were added and the first match counts),
4. the exact qualified name.

A setting is a depth multiplier (an int >= 1) or ``None``, which means "leave this
layer alone". The layer then shows in the report with the reason that the config
excluded it.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import UsageError
from .layers import check_positive_int

__all__ = ["LayerConfig", "LayerSetting", "load_config"]

# A depth multiplier, or None for "leave this layer alone".
LayerSetting = int | None

LISTING_HINT = "list the convs and their names with `dsconv inspect INPUT` or convert.inspect_model(model)"


@dataclass
class LayerConfig:
    """Depth multipliers per layer, resolved global < module type < name pattern < exact name."""

    # The string "depth_multiplier" means: use the depth_multiplier argument of the pass.
    global_setting: LayerSetting | str = "depth_multiplier"
    module_types: dict[type[nn.Module], LayerSetting] = field(default_factory=dict)
    name_patterns: list[tuple[str, LayerSetting]] = field(default_factory=list)
    names: dict[str, LayerSetting] = field(default_factory=dict)

    def set_global(self, setting: LayerSetting) -> "LayerConfig":
        check_setting("global", setting)
        self.global_setting = setting
        return self

    def set_module_type(self, module_type: type[nn.Module], setting: LayerSetting) -> "LayerConfig":
        if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
            raise UsageError(f"module type {module_type!r}: must be an nn.Module subclass such as nn.Conv2d")
        check_setting(module_type.__name__, setting)
        self.module_types[module_type] = setting
        return self

    def set_name_pattern(self, pattern: str, setting: LayerSetting) -> "LayerConfig":
        try:
            re.compile(pattern)
        except re.error as error:
            raise UsageError(f"name pattern {pattern!r} is not a valid regular expression: {error}") from error
        check_setting(pattern, setting)
        self.name_patterns.append((pattern, setting))
        return self

    def set_name(self, name: str, setting: LayerSetting) -> "LayerConfig":
        check_setting(name, setting)
        self.names[name] = setting
        return self

    def resolve(self, names: Iterable[str], module: nn.Module, default: int) -> tuple[LayerSetting, str]:
        """Return the setting for a module known under ``names``, and which rule set it.

        ``default`` is the pass's ``depth_multiplier``, used when the config sets no
        global value.
        """
        names = tuple(names)
        for name in names:
            if name in self.names:
                return self.names[name], f"name {name!r}"
        for pattern, setting in self.name_patterns:
            if any(re.fullmatch(pattern, name) for name in names):
                return setting, f"name pattern {pattern!r}"
        if type(module) in self.module_types:
            return self.module_types[type(module)], f"module type {type(module).__name__}"
        if self.global_setting == "depth_multiplier":
            return default, "depth_multiplier"
        return self.global_setting, "global"

    def check_names(self, known: Iterable[str]) -> None:
        """Raise :class:`UsageError` for exact names or patterns that match no conv."""
        known = set(known)
        unknown = sorted(name for name in self.names if name not in known)
        if unknown:
            raise UsageError(f"the config names layers that are not convs of this model: {', '.join(unknown)}; {LISTING_HINT}")
        unmatched = [pattern for pattern, _ in self.name_patterns if not any(re.fullmatch(pattern, name) for name in known)]
        if unmatched:
            raise UsageError(f"the config's name patterns match no conv of this model: {', '.join(unmatched)}; {LISTING_HINT}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerConfig":
        """Build a config from the JSON form.

        ``{"global": 1, "module_type": {"torch.nn.Conv1d": null},
        "name_pattern": {"layer4\\\\..*": 2}, "name": {"conv1": null}}``; every key is optional.
        """
        unknown = set(data) - {"global", "module_type", "name_pattern", "name"}
        if unknown:
            raise UsageError(f"unknown config keys: {', '.join(sorted(unknown))}; use global, module_type, name_pattern, name")
        config = cls()
        if "global" in data:
            config.set_global(data["global"])
        for type_path, setting in section(data, "module_type").items():
            config.set_module_type(import_type(type_path), setting)
        for pattern, setting in section(data, "name_pattern").items():
            config.set_name_pattern(pattern, setting)
        for name, setting in section(data, "name").items():
            config.set_name(name, setting)
        return config


def section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise UsageError(f"config key {key!r} must map names to depth multipliers or null, not {type(value).__name__}")
    return value


def check_setting(where: str, setting: object) -> None:
    """Raise :class:`UsageError` unless ``setting`` is None or an int >= 1."""
    if setting is None:
        return
    try:
        check_positive_int("depth_multiplier", setting)
    except (TypeError, ValueError) as error:
        raise UsageError(f"config entry {where!r}: {error}, or null to leave the layer alone") from None


def import_type(path: str) -> type[nn.Module]:
    """Import ``"package.module.Class"`` (or ``"package.module:Class"``)."""
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise UsageError(f"config module type {path!r} cannot be imported: {error}") from None
    if not isinstance(value, type) or not issubclass(value, nn.Module):
        raise UsageError(f"config module type {path!r} is not an nn.Module class")
    return value


def load_config(path: str | Path) -> LayerConfig:
    """Read a JSON config file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(data, Mapping):
        raise UsageError(f"config file {path} must contain a JSON object")
    return LayerConfig.from_dict(data)
