"""`GET /v1/fine_tuning/jobs/{id}/checkpoints`: a job's stored checkpoints, each a servable `ft:...` name.

The checkpoints are the ones the run keeps in storage (`<bucket>/train/<owner>/<name>-<fingerprint>/
checkpoint_*`, see `peftray.train.checkpoint`), with the metrics of their `meta.json`. Listing one registers
its adapter once, as adapter `<job id>-step-<n>` tagged with its `ft:...:ckpt-step-<n>` name, so the
serving endpoint resolves that name through the registry like any other adapter.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from peftray.endpoints import Config
from peftray.errors import NotFoundError
from peftray.jobspec import JobSpec
from peftray.registry.finetuned import FT_TAG, adapter_name, checkpoint_name, resolve_fine_tuned
from peftray.service.openai_objects import checkpoint_object
from peftray.service.openai_store import FineTuningRecord
from peftray.train import checkpoint

_PREFIX = "checkpoint_"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def list_checkpoints(config: Config, ft: FineTuningRecord) -> list[dict[str, Any]]:
    """Checkpoint objects of the job's run, newest first (registering the ones not registered yet)."""
    from peftray.train.run import run_folder

    spec = JobSpec.model_validate(ft.spec)
    prefix, name = run_folder(spec, ft.owner)
    fs = config.s3fs()
    root = f"{config.bucket}/{prefix}/{name}"
    try:
        entries = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    steps = sorted((int(e.rsplit("/", 1)[-1][len(_PREFIX):]) for e in entries
                    if e.rsplit("/", 1)[-1].startswith(_PREFIX) and e.rsplit("/", 1)[-1][len(_PREFIX):].isdigit()),
                   reverse=True)
    out = []
    for step in steps:
        folder = f"{root}/{_PREFIX}{step:06d}"
        ckpt = checkpoint_name(ft.request["fine_tuned_model"], step)
        try:
            # complete only when every file is stored (uploads are not atomic; Ray's has no order)
            infos = [fs.info(f"{folder}/{file}") for file in checkpoint.FILES]
            metrics = json.loads(fs.cat_file(f"{folder}/meta.json")).get("metrics") or {}
            _register_once(config, fs, ft, spec, folder, step, ckpt, metrics)
        except FileNotFoundError:  # not uploaded whole yet, or pruned by the run (it keeps the newest few) meanwhile
            continue
        created = infos[checkpoint.FILES.index("meta.json")].get("LastModified")
        out.append(checkpoint_object(ft.id, step, created.timestamp() if created else ft.created_at, metrics, ckpt))
    return out


def _register_once(config: Config, fs, ft: FineTuningRecord, spec: JobSpec, folder: str, step: int, ckpt: str,
                   metrics: dict[str, Any]) -> None:
    from peftray.registry import register_adapter

    try:
        resolve_fine_tuned(ckpt, config)
        return
    except NotFoundError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        for file in _ADAPTER_FILES:
            fs.get_file(f"{folder}/adapter/{file}", str(Path(tmp) / file))
        register_adapter(tmp, adapter_name(ft.id, step), base_model=spec.base_model.path,
                         base_revision=spec.base_model.revision, job_name=spec.name,
                         metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                         tags={FT_TAG: ckpt, "openai.job": ft.id, "openai.step": str(step)},
                         description=f"checkpoint after step {step} of {ft.id}", owner=ft.owner, config=config)
