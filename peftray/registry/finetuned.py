"""OpenAI-style fine-tuned model names and the registered adapters they name.

A fine-tuning job of the OpenAI API (`peftray.service.openai_jobs`) registers its adapter under the job's id
(`ftjob-<hex>`, a valid adapter name) and tags the version with its OpenAI name:

    ft:<base>:<owner>:<suffix>:<job id>                    the job's result        -> adapter `<job id>`
    ft:<base>:<owner>:<suffix>:<job id>:ckpt-step-<n>      one of its checkpoints  -> adapter `<job id>-step-<n>`

MLflow alias names cannot hold ':', so the name maps deterministically to an adapter, and the version's
`openai.fine_tuned_model` tag must equal the requested name: a name with another base, owner or suffix
than the job's is unknown (404), not an alias of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peftray.endpoints import Config
from peftray.errors import ConfigError, NotFoundError

FT_TAG = "openai.fine_tuned_model"
PREFIX = "ft:"
# one ':'-free part of a name: base model names, owners and suffixes
PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_CKPT = re.compile(r"^ckpt-step-(\d{1,9})$")


@dataclass(frozen=True)
class FineTunedRef:
    """A parsed `ft:` name: the adapter it maps to and, for a checkpoint, its step."""

    name: str  # the whole `ft:...` string
    job_id: str
    step: int | None = None

    @property
    def adapter(self) -> str:
        return adapter_name(self.job_id, self.step)


def adapter_name(job_id: str, step: int | None = None) -> str:
    """The registry name of a job's adapter (or of its checkpoint after `step`)."""
    return job_id if step is None else f"{job_id}-step-{step}"


def fine_tuned_name(base: str, owner: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<owner>:<suffix>:<job id>` (the suffix may be empty, as OpenAI's)."""
    for what, value in (("base model name", base), ("owner", owner)):
        if not PART.match(value):
            raise ConfigError(f"{what} {value!r} cannot be part of a fine-tuned model name: use letters, digits, "
                              "'.', '-' and '_' (at most 64)")
    if suffix and not PART.match(suffix):
        raise ConfigError(f"`suffix` must be 1 to 64 letters, digits, '.', '-' or '_', got {suffix!r}")
    return f"{PREFIX}{base}:{owner}:{suffix or ''}:{job_id}"


def checkpoint_name(fine_tuned: str, step: int) -> str:
    return f"{fine_tuned}:ckpt-step-{step}"


def is_fine_tuned(model: str) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def parse_fine_tuned(model: str) -> FineTunedRef:
    """Parse an `ft:` name. Raises NotFoundError (naming the expected shape) when it is malformed."""
    parts = model[len(PREFIX):].split(":") if is_fine_tuned(model) else []
    step = None
    if len(parts) == 5:
        found = _CKPT.match(parts[4])
        step = int(found.group(1)) if found else None
        parts = parts[:4] if found else []
    if len(parts) != 4 or not JOB_ID.match(parts[3]) or not PART.match(parts[0]) or not PART.match(parts[1]):
        raise NotFoundError(f"The model `{model}` does not exist: a fine-tuned model is named "
                            "ft:<base>:<owner>:<suffix>:ftjob-<id> (plus :ckpt-step-<n> for a checkpoint).")
    return FineTunedRef(model, parts[3], step)


def resolve_fine_tuned(model: str, config: Config | None = None):
    """The registered version an `ft:` name stands for (an `AdapterVersion`).

    Raises:
        NotFoundError: malformed, not registered (yet), or registered under another `ft:` name.
    """
    from peftray.registry.resolve import resolve

    ref = parse_fine_tuned(model)
    try:
        version = resolve(f"{ref.adapter}@latest", config)
    except NotFoundError:
        version = None
    if version is None or version.tags.get(FT_TAG) != model:
        raise NotFoundError(f"The model `{model}` does not exist: no finished fine-tuning job (or listed "
                            "checkpoint) has this name. GET /v1/fine_tuning/jobs/{id} shows a job's "
                            "fine_tuned_model once it succeeded.")
    return version
