"""The op registry: every op declares its name, argument schema and shape.

An op's arguments are a frozen dataclass. :func:`parse_args` checks a received
``args`` map against it (unknown keys, missing keys, wrong types, bounds) and
builds the instance, so a handler receives typed, validated values and never a
raw map. Bounds live in the field's metadata, set with :func:`arg`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidRequest, UnknownOp


def arg(
    default: Any = dataclasses.MISSING,
    *,
    minimum: int | float | None = None,
    maximum: int | float | None = None,
    max_length: int | None = None,
    doc: str = "",
) -> Any:
    """Declare an argument field with optional bounds (inclusive)."""
    metadata = {"minimum": minimum, "maximum": maximum, "max_length": max_length, "doc": doc}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpSpec:
    """One operation of the STOQ API."""

    name: str
    """Wire name, ``service.verb``."""
    args: type[Any]
    """Frozen dataclass describing the arguments."""
    streaming: bool = False
    """True if the op answers with events instead of one ``ok``."""
    summary: str = ""
    """One line for ``node.info`` and the docs."""


_REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry; names are unique."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"op {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    _hints(spec.args)  # fail at import time, not on the first request
    return spec


def lookup(name: str) -> OpSpec:
    """The spec of op ``name``.

    :raises UnknownOp: no such op.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownOp(f"unknown op {name!r}", op=name) from None


def registered() -> dict[str, OpSpec]:
    """All registered ops by name."""
    return dict(_REGISTRY)


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


_DEFAULTS: dict[type[Any], Any] = {}


@dataclass(frozen=True, slots=True)
class _Argument:
    """What :func:`parse_args` needs of one argument field, worked out once per op."""

    name: str
    hint: Any
    plain: type[Any] | None
    """The hint itself if it is a class that a value must be exactly (``type(v) is``)."""
    required: bool
    where: str
    metadata: typing.Mapping[str, Any]
    bounded: bool


_PLAIN_HINTS = frozenset((int, str, bytes, bool, dict))
_ARGUMENTS: dict[str, tuple[dict[str, _Argument], OpSpec]] = {}


def _arguments(spec: OpSpec) -> dict[str, _Argument]:
    """The argument fields of ``spec`` by name (kept: reading dataclass fields and type
    hints again for every request cost more than the checks themselves)."""
    known = _ARGUMENTS.get(spec.name)
    if known is not None and known[1] is spec:
        return known[0]
    hints = _hints(spec.args)
    arguments = {}
    for f in dataclasses.fields(spec.args):
        hint = hints[f.name]
        bounded = any(f.metadata.get(k) is not None
                      for k in ("minimum", "maximum", "max_length"))
        arguments[f.name] = _Argument(
            name=f.name, hint=hint, plain=hint if hint in _PLAIN_HINTS else None,
            required=(f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING),
            where=f"{spec.name}: argument {f.name!r}", metadata=f.metadata, bounded=bounded)
    _ARGUMENTS[spec.name] = (arguments, spec)
    return arguments


def parse_args(spec: OpSpec, raw: dict[str, Any]) -> Any:
    """Build ``spec.args`` from the received map ``raw``.

    :raises InvalidRequest: with ``field`` naming the offending argument.
    """
    if not raw:
        # No arguments: every request of this op gets the same frozen instance.
        default = _DEFAULTS.get(spec.args)
        if default is not None:
            return default
    arguments = _arguments(spec)
    for key in raw:
        if key not in arguments:
            raise InvalidRequest(f"{spec.name}: unknown argument {key!r}", field=str(key))
    values: dict[str, Any] = {}
    for name, argument in arguments.items():
        if name not in raw:
            if argument.required:
                raise InvalidRequest(f"{spec.name}: missing argument {name!r}", field=name)
            continue
        value = raw[name]
        if argument.plain is None or type(value) is not argument.plain:
            value = _convert(value, argument.hint, argument.where, name)
        if argument.bounded:
            _check_bounds(value, argument.metadata, argument.where, name)
        values[name] = value
    try:
        args = spec.args(**values)
    except InvalidRequest:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{spec.name}: {exc}") from exc
    if not raw and all(not isinstance(getattr(args, f), (list, dict)) for f in arguments):
        _DEFAULTS[spec.args] = args
    return args


_TYPE_NAMES = {int: "an integer", str: "a text string", bytes: "a byte string",
               bool: "a boolean", float: "a number", dict: "a map", list: "an array"}


def _convert(value: Any, hint: Any, where: str, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where, name)
            except InvalidRequest as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value in typing.get_args(hint) and type(value) in (str, int):
            return value
        choices = ", ".join(repr(c) for c in typing.get_args(hint))
        raise InvalidRequest(f"{where} must be one of {choices}", field=name)
    if origin is list:
        if type(value) is not list:
            raise InvalidRequest(f"{where} must be an array", field=name)
        (element,) = typing.get_args(hint) or (Any,)
        return [_convert(v, element, f"{where}[{i}]", name) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if type(value) is not dict:
            raise InvalidRequest(f"{where} must be a map", field=name)
        return value
    if hint is Any:
        return value
    if hint is float:
        if type(value) in (int, float):
            return float(value)
    elif type(value) is hint:  # bool is not accepted where int is expected
        return value
    raise InvalidRequest(f"{where} must be {_TYPE_NAMES.get(hint, hint)}", field=name)


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], where: str, name: str) -> None:
    if value is None:
        return
    minimum, maximum, max_length = meta.get("minimum"), meta.get("maximum"), meta.get("max_length")
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"{where} must be at least {minimum}", field=name)
    if maximum is not None and value > maximum:
        raise InvalidRequest(f"{where} must be at most {maximum}", field=name)
    if max_length is not None and len(value) > max_length:
        raise InvalidRequest(f"{where} must be at most {max_length} long", field=name)
