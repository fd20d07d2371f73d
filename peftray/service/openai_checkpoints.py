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

_ADAPTER_FILES = tuple(f for f in checkpoint.FILES if f.startswith(f"{checkpoint.ADAPTER_DIR}/"))


def list_checkpoints(config: Config, ft: FineTuningRecord) -> list[dict[str, Any]]:
    """Checkpoint objects of the job's run, newest first (registering the ones not registered yet)."""
    from peftray.train.run import run_folder

    spec = JobSpec.model_validate(ft.spec)
    prefix, name = run_folder(spec, ft.owner)
    fs = config.s3fs()
    root = f"{config.bucket}/{prefix}/{name}"
    try:
        stored = fs.find(root, detail=True)  # one listing of every file of every checkpoint, never cached
    except FileNotFoundError:
        return []
    folders: dict[int, dict[str, dict]] = {}  # step -> the folder's files (relative path -> info)
    for path, info in stored.items():
        folder, _, rel = path[len(root) + 1:].partition("/")
        if checkpoint.step_of(folder) >= 0 and rel:
            folders.setdefault(checkpoint.step_of(folder), {})[rel] = info
    out = []
    for step, files in sorted(folders.items(), reverse=True):
        if not all(f in files for f in checkpoint.FILES):  # not uploaded whole yet (Ray's upload has no order)
            continue
        folder, ckpt = f"{root}/{checkpoint.folder_name(step)}", checkpoint_name(ft.request["fine_tuned_model"], step)
        try:
            metrics = json.loads(fs.cat_file(f"{folder}/meta.json")).get("metrics") or {}
            _register_once(config, fs, ft, spec, folder, step, ckpt, metrics)
        except FileNotFoundError:  # pruned by the run (it keeps the newest few) since the listing
            continue
        created = files["meta.json"].get("LastModified")
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
            fs.get_file(f"{folder}/{file}", str(Path(tmp) / Path(file).name))
        register_adapter(tmp, adapter_name(ft.id, step), base_model=spec.base_model.path,
                         base_revision=spec.base_model.revision, job_name=spec.name,
                         metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                         tags={FT_TAG: ckpt, "openai.job": ft.id, "openai.step": str(step)},
                         description=f"checkpoint after step {step} of {ft.id}", owner=ft.owner, config=config)
