"""Describe a component's pydantic options model as flat rows (`lora.rank`), for `ff show`.

Kept apart from rendering so the rows can be printed as a table or as JSON, and tested as plain data.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

# annotated_types constraint attribute -> how it reads after the type, e.g. "int, >= 1".
_BOUNDS: tuple[tuple[str, str], ...] = (
    ("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("multiple_of", "multiple of"),
    ("min_length", "min length"), ("max_length", "max length"),
)


@dataclass(frozen=True)
class OptionRow:
    """One option of a component: dotted name, readable type, default as YAML would spell it."""

    name: str
    type: str
    default: str
    description: str
    required: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def type_name(tp: Any) -> str:
    """A short, readable spelling of an annotation: `int`, `float | null`, `'group' | 'global'`."""
    if tp is type(None):
        return "null"
    if tp is Ellipsis:
        return "..."
    if tp is Any:
        return "any"
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else repr(a) for a in args)
    if origin is Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join(type_name(a) for a in args)}]" if args else base
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _constraints(field: FieldInfo) -> list[str]:
    out = []
    for meta in field.metadata:
        for attr, word in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} {value}")
    return out


def _yaml_value(value: Any) -> str:
    """A default as it would be written in a YAML config (JSON is YAML): null, true, 0.7, "text", [1, 2]."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _default(field: FieldInfo) -> tuple[str, bool, Any]:
    """(rendered default, required, default value or None)."""
    if field.is_required():
        return "required", True, None
    if field.default_factory is not None:
        if getattr(field, "default_factory_takes_data", False):
            return "computed", False, None
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    return _yaml_value(value), False, value


def _nested_models(tp: Any) -> list[tuple[type[BaseModel], str]]:
    """Models reachable from an annotation, with the suffix their rows get: `` or `[]` for list items."""
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [(tp, "")]
    if origin is Union or origin is types.UnionType or origin is typing.Annotated:
        members = get_args(tp)[:1] if origin is typing.Annotated else get_args(tp)
        return [m for a in members for m in _nested_models(a)]
    if origin in (list, tuple, set, frozenset):
        return [(m, "[]") for a in get_args(tp) for m, _ in _nested_models(a)]
    if origin is dict:
        args = get_args(tp)
        return [(m, ".<key>") for m, _ in _nested_models(args[1])] if len(args) == 2 else []
    return []


def option_rows(model: type[BaseModel], prefix: str = "", _seen: frozenset[type] = frozenset()) -> list[OptionRow]:
    """Every option of `model`, nested models' options included under `parent.child` names."""
    rows: list[OptionRow] = []
    for attr, field in model.model_fields.items():
        key = f"{prefix}{field.alias or attr}"
        typ = type_name(field.annotation)
        bounds = _constraints(field)
        if bounds:
            typ = f"{typ}, {', '.join(bounds)}"
        default, required, _ = _default(field)
        rows.append(OptionRow(key, typ, default, field.description or "", required))
        for sub, suffix in _nested_models(field.annotation):
            if sub in _seen or sub is model:
                continue  # a self-referencing model is described once
            rows += option_rows(sub, f"{key}{suffix}.", _seen | {model})
    return rows
