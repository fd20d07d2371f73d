"""Helpers of the control-plane tests (importable by test modules, unlike conftest)."""

from __future__ import annotations

from pathlib import Path

from peftray.stack.control_plane import ServiceProc, start_service

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = REPO / "jobs" / "data" / "tiny_instruct.jsonl"


def launch(stack, folder: Path, admin_token: str | None = None, **settings) -> ServiceProc:
    """A service process on the session stack; settings are PEFTRAY_SERVICE_<NAME> values."""
    env = {f"PEFTRAY_SERVICE_{k.upper()}": str(v) for k, v in settings.items()}
    env.setdefault("PEFTRAY_SERVICE_POLL_S", "0.3")
    # users' jobs read the repo's example data and the session's tiny models (the folder above `folder`)
    env.setdefault("PEFTRAY_SERVICE_READ_ROOTS", f"{REPO / 'jobs'},{Path(folder).absolute().parent}")
    return start_service(folder, env, admin_token=admin_token, state_dir=stack.state_dir)


def tiny_spec(name: str, model: Path, **sections) -> dict:
    """A tiny LoRA job on the tiny Llama: seconds of training on 2 CPUs."""
    spec = {
        "name": name,
        "base_model": {"path": str(model)},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "dataset": {"source": str(TINY_DATA), "format": "instruction", "max_seq_len": 32, "eval_fraction": 0.2},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "checkpoint_every": 50},
        "resources": {"num_workers": 1},
        "registry": {"model_name": name},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec
