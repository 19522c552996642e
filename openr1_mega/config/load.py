"""Strict YAML loading into the config dataclasses.

`load_config("recipe.yaml", ["parallel.tp=2"])` reads the YAML, applies dotted
`key=value` overrides (values parsed as YAML scalars), and builds the nested dataclasses.
Unknown keys, wrong types and bad values are errors that name the offending key, so a typo
in a recipe fails at start-up instead of being silently ignored. A recipe with a `parallel`
section is then checked as a whole (config.validate: world size, layout against the model's
architecture, context length, reward names), still before any process group exists.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from openr1_mega.config import validate
from openr1_mega.config.schema import Config

T = TypeVar("T")


def load_config(path: str | Path, overrides: Iterable[str] = (), cls: type[T] = Config, *,
                world_size: int | None = None, on_cuda: bool | None = None) -> T:
    """Read a YAML recipe, apply `a.b=value` overrides, build `cls` strictly, validate it.

    Args:
        path: the YAML recipe.
        overrides: `dotted.key=value` strings.
        cls: the recipe dataclass.
        world_size: ranks the recipe must fit; None: $WORLD_SIZE, else 1.
        on_cuda: whether the job runs on GPUs; None: whether this machine has one.
    """
    data = _parse_yaml(Path(path).read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    recipe = from_dict(cls, apply_overrides(data, overrides))
    if hasattr(recipe, "parallel"):
        world = validate.world_size_from_env() if world_size is None else world_size
        validate.validate_recipe(recipe, world, validate.recipe_arch(recipe, path),
                                 on_cuda=on_cuda)
    return recipe


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of `data` with each `dotted.key=value` override set (value read as YAML)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _parse_yaml(raw, f"override {item!r}")
    return out


def _parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with a parse error re-raised as a ValueError naming `where`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML ({err})") from err


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ValueError."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{label}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=repr)  # YAML keys need not be strings
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, _join(where, name))
              for name, value in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain dicts/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Check/convert one value against a type hint (dataclass, Optional, list/tuple, scalar)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of "
                         f"{[getattr(o, '__name__', str(o)) for o in options]}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ValueError(f"{where}: expected {hint.__name__}, got a boolean {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__} "
                         f"{value!r}")
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
