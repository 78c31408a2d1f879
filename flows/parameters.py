"""The flow's parameters: its signature, as the Prefect UI's Custom Run form and the API see it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from shapline.tasks.redact import redact

_PARAMETER_KEYS = {
    "explain_rows": "data.explain_rows",
    "background_size": "background.size",
    "algorithm": "explainer.algorithm",
    "nsamples": "explainer.nsamples",
    "shard_size": "shards.size",
    "workers": "shards.workers",
}


class ExplainParameters(BaseModel):
    """The flow's parameters, as the Prefect UI shows them: the config plus what people change by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config_path: str = Field(description="The model's YAML config, as the worker sees it.")
    explain_rows: Annotated[int, Field(ge=1)] | Literal["all"] | None = Field(
        None, description="Override data.explain_rows."
    )
    background_size: int | None = Field(None, ge=1, description="Override background.size.")
    algorithm: Literal["auto", "tree", "kernel", "permutation", "exact", "linear"] | None = Field(
        None, description="Override explainer.algorithm."
    )
    nsamples: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="Override explainer.nsamples."
    )
    shard_size: int | None = Field(None, ge=1, description="Override shards.size.")
    workers: int | None = Field(None, ge=1, description="Override shards.workers.")
    # Stored by Prefect with the flow run: serialized redacted (a URL's password stays in this process).
    overrides: list[Annotated[str, PlainSerializer(redact, when_used="json")]] = Field(
        default_factory=list, description="Any other key.path=value, as with --set."
    )

    def to_overrides(self) -> list[str]:
        """The named fields as --set style overrides, then the free-form ones (which win)."""
        named = [
            f"{key}={getattr(self, field)}"
            for field, key in _PARAMETER_KEYS.items()
            if getattr(self, field) is not None
        ]
        return [*named, *self.overrides]
