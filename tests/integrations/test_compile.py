"""torch.compile of a peftray LoRA model, for training and for inference: the same outputs and gradients as eager.

The `aot_eager` backend runs the whole compile stack that matters here (Dynamo tracing through the wrapper's
forward, the fused LoRA autograd function and the autocast checks; AOT autograd's joint graph) without
generating C++ kernels, which would take minutes on a small shared CPU and test inductor, not peftray.
"""

from __future__ import annotations

import torch

from integration_helpers import adapter_weights

IDS = torch.tensor([[5, 6, 7, 8, 9, 40], [10, 11, 12, 13, 14, 41]])


def test_compiled_training_steps_match_eager(lora_model):
    torch._dynamo.reset()
    eager, compiled_model = lora_model(init_lora_weights=False), lora_model(init_lora_weights=False)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for model in (eager, compiled):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
    want, got = adapter_weights(eager), adapter_weights(compiled_model)
    assert all(torch.allclose(got[n], want[n], atol=1e-5) for n in want)


def test_compiled_inference_matches_eager_also_under_autocast(lora_model):
    torch._dynamo.reset()
    model = lora_model(init_lora_weights=False).eval()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = model(input_ids=IDS).logits.float(), compiled(input_ids=IDS).logits.float()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
