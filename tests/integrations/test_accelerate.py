"""A peftray model in an Accelerate loop: bf16 mixed precision, save_state/load_state, unwrap + save_pretrained,
and `accelerate launch --num_processes 2` on the CPU (gloo DDP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import accelerate  # a test-only dependency (the `test` extra): missing, it fails, not skips
import peft
import pytest
import torch

from integration_helpers import adapter_weights, saved_adapter_matches


SCRIPT = Path(__file__).with_name("accelerate_ddp_script.py")


def _step(model, optimizer, accelerator, ids):
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss)


def test_bf16_loop_state_round_trip_and_adapter_save(lora_model, base_model, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate's state is a process-wide singleton: a Trainer run earlier in this process (test_trl) set it
    AcceleratorState._reset_state(reset_partial_state=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 40], [10, 11, 12, 13, 14, 41]])
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = lora_model(init_lora_weights=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    _step(model, optimizer, accelerator, ids)
    accelerator.save_state(str(tmp_path / "state"))
    after_one = adapter_weights(model)
    second = _step(model, optimizer, accelerator, ids)
    want = adapter_weights(model)

    accelerator.load_state(str(tmp_path / "state"))  # adapter and Adam moments back to step 1
    assert all(torch.equal(after_one[n], w) for n, w in adapter_weights(model).items())
    assert _step(model, optimizer, accelerator, ids) == second
    assert all(torch.equal(want[n], w) for n, w in adapter_weights(model).items())

    accelerator.unwrap_model(model).save_pretrained(tmp_path / "adapter")
    assert set(os.listdir(tmp_path / "adapter")) >= {"adapter_config.json", "adapter_model.safetensors"}
    ours = accelerator.unwrap_model(model)
    assert saved_adapter_matches(ours, peft.PeftModel.from_pretrained(base_model(), tmp_path / "adapter"),
                                 tmp_path / "adapter", ids)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    # --multi_gpu makes `launch` start 2 processes through torchrun; with no GPU (and `cpu=True` in the script)
    # Accelerate runs them as MULTI_CPU over gloo (`--cpu` alone would start a single process)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", "0",
           str(SCRIPT), str(tiny_model), str(tmp_path)]
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stdout, done.stdout[-2000:]
    sums = sorted((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert sums[0] == sums[1]  # DDP kept both ranks' adapters identical after the steps
    assert set(os.listdir(tmp_path / "adapter")) >= {"adapter_config.json", "adapter_model.safetensors"}
