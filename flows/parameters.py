"""The flow's parameters: its signature, as the Prefect UI's Custom Run form and the API see it.

Each is a top-level field with a title and a sentence for a person; empty means "what the config says".
`ExplainParameters` is the same set as one object (what the CLI passes, and the nested `parameters`
form of deployments made before the parameters were flat).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError

from shapline.tasks.common.errors import ConfigError
from shapline.tasks.common.redact import redact

Algorithm = Literal["auto", "tree", "kernel", "permutation", "exact", "linear"]

# field -> (config key it overrides, title, description); the one place the form is worded.
FORM: dict[str, tuple[str | None, str, str]] = {
    "config_path": (
        None,
        "Config file",
        "The model's YAML config, as the worker sees it (an absolute path, or relative to its working folder).",
    ),
    "explain_rows": (
        "data.explain_rows",
        "Rows to explain",
        "How many rows to explain (a seeded sample), or all. Empty: the config's value.",
    ),
    "background_size": (
        "background.size",
        "Background rows",
        "Rows (or k-means centres) the explainer averages over. Empty: the config's value.",
    ),
    "algorithm": (
        "explainer.algorithm",
        "Explainer",
        "auto picks tree for tree models, linear for linear ones, kernel otherwise. Empty: the config's value.",
    ),
    "nsamples": (
        "explainer.nsamples",
        "Coalitions per row",
        "Kernel explainer only: coalitions sampled per row, or auto (2 × features + 2048). "
        "Empty: the config's value.",
    ),
    "shard_size": ("shards.size", "Rows per shard", "Rows per shard task. Empty: the config's value."),
    "workers": ("shards.workers", "Workers", "Shards explained at once. Empty: the config's value."),
    "overrides": (
        None,
        "Other settings",
        "Any other config key, as key.path=value (the value read as YAML), e.g. output.top_k=3.",
    ),
}

_PARAMETER_KEYS = {field: key for field, (key, _, _) in FORM.items() if key is not None}


def form_field(name: str, default: Any = None, **constraints: Any) -> Any:
    """A flow parameter's default with its title and description, as Prefect puts them in the form."""
    _, title, description = FORM[name]
    return Field(default, description=description, json_schema_extra={"title": title}, **constraints)


class ExplainParameters(BaseModel):
    """The flow's parameters as one object: the config plus what people change by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config_path: str = Field(description=FORM["config_path"][2])
    explain_rows: Annotated[int, Field(ge=1)] | Literal["all"] | None = Field(
        None, description=FORM["explain_rows"][2]
    )
    background_size: int | None = Field(None, ge=1, description=FORM["background_size"][2])
    algorithm: Algorithm | None = Field(None, description=FORM["algorithm"][2])
    nsamples: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description=FORM["nsamples"][2]
    )
    shard_size: int | None = Field(None, ge=1, description=FORM["shard_size"][2])
    workers: int | None = Field(None, ge=1, description=FORM["workers"][2])
    # Stored by Prefect with the flow run: serialized redacted (a URL's password stays in this process).
    overrides: list[Annotated[str, PlainSerializer(redact, when_used="json")]] = Field(
        default_factory=list, description=FORM["overrides"][2]
    )

    @classmethod
    def from_form(cls, **fields: Any) -> ExplainParameters:
        """The flow's flat parameters as one object; a bad value is one line naming the parameter."""
        given = {key: value for key, value in fields.items() if value is not None}
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            details = "; ".join(
                f"flow parameter {'.'.join(str(p) for p in error['loc'][:1])}: {error['msg']}"
                for error in exc.errors()
            )
            raise ConfigError(details) from exc

    def to_overrides(self) -> list[str]:
        """The named fields as --set style overrides, then the free-form ones (which win)."""
        named = [
            f"{key}={getattr(self, field)}"
            for field, key in _PARAMETER_KEYS.items()
            if getattr(self, field) is not None
        ]
        return [*named, *self.overrides]


def _without_null(field: dict[str, Any]) -> dict[str, Any]:
    """A field's schema without the `null` choice: the form shows the type itself (a number box, a list of
    explainers) instead of a toggle to None; leaving an optional field empty already means "the config's"."""
    choices = [choice for choice in field.get("anyOf", []) if choice.get("type") != "null"]
    if not choices:
        return field
    simpler = {key: value for key, value in field.items() if key not in ("anyOf", "default")}
    if len(choices) == 1:
        return {**simpler, **choices[0]}
    return {**simpler, "anyOf": choices}


def form_for_config(schema: dict[str, Any], config_values: dict[str, Any]) -> dict[str, Any]:
    """A deployment's form: each field typed without a None toggle, its description ending with what its
    config uses when the field is left empty."""
    properties = {}
    for name, field in schema.get("properties", {}).items():
        described = _without_null(dict(field))
        key = FORM.get(name, (None,))[0]
        if key is not None and key in config_values:
            text = str(described.get("description", "")).removesuffix("Empty: the config's value.").rstrip()
            described["description"] = f"{text} Empty: the config's {config_values[key]!r} ({key}).".strip()
        properties[name] = described
    return {**schema, "properties": properties}
