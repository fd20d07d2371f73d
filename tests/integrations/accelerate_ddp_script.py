"""Run by test_accelerate.py under `accelerate launch --num_processes 2`: a few DDP steps on each rank's own
rows, then each rank writes a checksum of its adapter weights and the main process saves the adapter."""

import sys

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

import peftray

model_path, out = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)  # the same initial adapter on both ranks
model = peftray.get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                               peftray.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)
rank = accelerator.process_index
ids = torch.tensor([[5 + rank, 6, 7, 8, 9, 40 + rank]])  # different data per rank: only DDP keeps them equal
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
weights = [p.detach().double().sum().item() for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
with open(f"{out}/rank{rank}.txt", "w") as f:
    f.write(repr(weights))
accelerator.wait_for_everyone()
if accelerator.is_main_process:
    accelerator.unwrap_model(model).save_pretrained(f"{out}/adapter")
    print(f"world size {accelerator.num_processes}, {accelerator.distributed_type}")
