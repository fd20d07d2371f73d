"""The base of every method's job-spec section (`adapter:` in a job spec; pydantic, outside input).

Each method folder defines its section(s) in `spec.py` and registers them with the method
(`register_peft_method(..., specs=(...))`); the job spec's `adapter` union is built from the table.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class MethodSpec(BaseModel):
    """An `adapter:` section. Subclasses declare `method: Literal["name"] = "name"` and HF PEFT's field names."""

    # allow_inf_nan=False: an inf/NaN alpha or dropout would train into NaN weights and still "succeed"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # fields that configure the job, not the method's config class: peft_kwargs leaves them out
    spec_only_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def describes(cls, config: dict[str, Any]) -> bool:
        """Whether a saved adapter_config.json of this method is this section's kind (LoRA vs DoRA, say)."""
        return True

    def peft_kwargs(self, base_ref: str | None = None) -> dict[str, Any]:
        """Keyword arguments of the method's config class (without `task_type`, which the job's task sets).

        Args:
            base_ref: the base model's folder or hub id, for methods that read from it (prompt tuning's text init).
        """
        return self.model_dump(exclude={"method", *self.spec_only_fields}, exclude_none=True)
