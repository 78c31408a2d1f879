"""The config reference (docs/config.md), generated from the config models so the two cannot drift apart."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from shapline.tasks.common.config import MODEL_KINDS, ExplainConfig, kind_name


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
    if field.default is PydanticUndefined:
        return "required"
    return json.dumps(field.default)


def _rows(model: type[BaseModel], prefix: str, kinds: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(models) == 1:
            annotation = models[0]  # an optional section, e.g. schedule
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{prefix}{name}.", kinds)
            continue
        if name == "model":
            for kind in MODEL_KINDS:
                rows += _rows(kind, "model.", kind_name(kind))
            continue
        description = (field.description or "").replace("|", "\\|")
        type_name = _type_name(annotation)
        default = _default(field).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {kinds or 'all'} | {type_name} | {default} | {description} |")
    return rows


def config_reference() -> str:
    """A markdown table: every key, which model kinds it applies to, its type, default and meaning."""
    header = ["| key | model kinds | type | default | meaning |", "|---|---|---|---|---|"]
    seen: dict[str, str] = {}
    for row in _rows(ExplainConfig, ""):
        key = row.split("|")[1]
        kinds = row.split("|")[2].strip()
        if key in seen and kinds != "all":
            cells = seen[key].split(" | ")
            cells[1] = f"{cells[1]}, {kinds}"
            if key.strip() == "`model.kind`":
                cells[2] = f"{cells[2]} \\| {kinds}"
            seen[key] = " | ".join(cells)
        else:
            seen[key] = row
    return "\n".join(header + list(seen.values()))
