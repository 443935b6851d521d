"""Typed dataclass configs: YAML in, CLI dot-overrides on top, strict errors, YAML out.

Unknown keys are errors naming the nearest valid keys; a wrong type is an error naming the
field and the expected type. Supports nested dataclasses, list/tuple/dict of those, Optional,
Literal and the scalar types.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message says where and what to change."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp` and convert it (ints to floats, lists to tuples, dicts to dataclasses)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items ({_type_name(tp)}), got {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected str, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    """The error for `key` not in dataclass `cls`: where it moved (a `moved` ClassVar of `cls`), or the nearest keys."""
    full = f"{where}.{key}" if where else key
    moved = getattr(cls, "moved", {})
    if key in moved:
        new, why = moved[key]
        return ConfigError(f"config key '{full}' is now '{new}' ({why}); rename it in your config")
    valid = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return ConfigError(f"unknown config key '{full}'{hint} (valid keys: {', '.join(valid)})")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly (unknown keys and wrong types are errors)."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, key, where)
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (dataclasses and tuples become dicts and lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a","b","c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}' has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_override(data: dict[str, Any], cls: type, path: list[str], value: Any) -> None:
    """Set `value` at `path` inside the plain mapping `data` of dataclass `cls`, checking each key."""
    node, node_cls, where = data, cls, ""
    for i, key in enumerate(path):
        if node_cls is not None and dataclasses.is_dataclass(node_cls):
            if key not in {f.name for f in dataclasses.fields(node_cls)}:
                raise _unknown_key(node_cls, key, where)
            sub_cls = get_type_hints(node_cls)[key]
        else:
            sub_cls = None
        where = f"{where}.{key}" if where else key
        if i == len(path) - 1:
            node[key] = value
            return
        if isinstance(node, list):
            raise ConfigError(f"override {'.'.join(path)}: cannot index into a list; set the whole list")
        node = node.setdefault(key, {})
        if get_origin(sub_cls) in (Union, types.UnionType):
            sub_cls = next((a for a in get_args(sub_cls) if dataclasses.is_dataclass(a)), None)
        node_cls = sub_cls if dataclasses.is_dataclass(sub_cls) else None


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` with mapping `top` merged in recursively (`top` wins; lists and scalars are replaced whole).

    Neither input is modified; the result shares no mutable value with them.
    """
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded


def split_paths(path: str | Path | list[str | Path] | None) -> list[Path]:
    """Config paths from one path, a comma-separated string, or a list (later files override earlier)."""
    if path is None:
        return []
    items = path if isinstance(path, list) else str(path).split(",")
    return [Path(p) for p in (str(i).strip() for i in items) if p]


def merged_data(cls: type, path: str | Path | list[str | Path] | None = None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """The plain mapping of what the YAML file(s) at `path` (merged in order) and the overrides set, keys checked."""
    data: dict[str, Any] = {}
    for p in split_paths(path):
        data = deep_merge(data, _read_yaml(p))
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(data, cls, keys, value)
    return data


def load_data(cls: type[T], data: dict[str, Any], path: str | Path | list[str | Path] | None = None) -> T:
    """Defaults of `cls` with `data` on top; errors name the file(s) at `path` the data came from."""
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        where = ", ".join(str(p) for p in split_paths(path))
        raise ConfigError(f"{where}: {e}" if where else str(e)) from e


def load(cls: type[T], path: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, then the YAML file(s) at `path` (merged in order), then `key.sub=value` overrides."""
    return load_data(cls, merged_data(cls, path, overrides), path)


def dumps(obj: Any) -> str:
    """The merged config as YAML text (so a run directory records exactly what ran)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def dump(obj: Any, path: str | Path) -> None:
    """Write the merged config as YAML (not atomic; pretrain.config.save_config is)."""
    Path(path).write_text(dumps(obj))
