"""Where setting values come from: config files (TOML, YAML) and strings from the environment.

Kept apart from ``settings.py`` (which says what the settings are and which values are valid) so that
each has one job: this turns raw values into the types the fields declare, and names the source and
the key when it cannot.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, published on PyPI as tomli (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]


def read_file(path: Path) -> dict[str, Any]:
    """A config file as a flat mapping; an ``evalstream`` table/section is unwrapped."""
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data: Any = tomllib.loads(text)
    elif suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    if set(data) == {"evalstream"} and isinstance(data["evalstream"], dict):
        data = data["evalstream"]
    return dict(data)


def coerce_all(raw: Mapping[str, Any], types_by_name: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``raw`` with each value turned into its setting's type; ValueError naming ``source`` and the key
    for an unknown setting or a value of the wrong type (a typo never falls back to a default)."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in types_by_name:
            valid = ", ".join(sorted(types_by_name))
            raise ValueError(f"unknown setting {name!r} in {source}; valid settings: {valid}")
        try:
            out[name] = coerce(value, types_by_name[name])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"setting {name} from {source}: {exc}") from None
    return out


def coerce(value: Any, hint: Any) -> Any:
    """Turn a file or environment value into the field's type (strings come from the environment)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(hint)
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return tuple(coerce(v, item_type) for v in items)
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported setting type {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported setting type {hint}")
