"""Shared helpers of the serve tests: adapters with distinct random weights, and HF PEFT reference generations."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def make_lora(base_dir: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter whose A and B are random (seeded), so each seed's adapter answers differently."""
    import peftray
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = peftray.get_peft_model(model, peftray.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                                   init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # strong enough that each adapter picks its own tokens
    peft_model.save_pretrained(out)
    return out


def make_prompt_adapter(base_dir: Path, out: Path, seed: int, kind: str) -> Path:
    """A prompt-tuning or prefix-tuning adapter (random virtual tokens), saved in the HF PEFT format."""
    import peftray
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cls = peftray.PromptTuningConfig if kind == "prompt" else peftray.PrefixTuningConfig
    peft_model = peftray.get_peft_model(model, cls(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    peft_model.save_pretrained(out)
    return out


def hf_generate(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new: int) -> list[int]:
    """Greedy tokens from Hugging Face PEFT (the reference implementation), or plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    kind = (Path(adapter_dir) / "adapter_config.json").read_text() if adapter_dir is not None else ""
    if "PROMPT_TUNING" in kind:
        return _recompute_prompt_tuning(model, adapter_dir, prompt_ids, max_new)
    if adapter_dir is not None and "PREFIX_TUNING" in (Path(adapter_dir) / "adapter_config.json").read_text():
        # HF PEFT 0.21 passes prefixes as `past_key_values`, which transformers 5 ignores in favour of `cache`,
        # so its prefix-tuning generate is the base model's: peftray's PeftModel (tested against HF PEFT's
        # forward in tests/tuners) is the reference here.
        import peftray

        model = peftray.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    elif adapter_dir is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
    return _strip_eos(out[0, len(prompt_ids):].tolist(), model)


def _strip_eos(tokens: list[int], model) -> list[int]:
    eos = model.generation_config.eos_token_id if hasattr(model, "generation_config") else None
    eos = set(eos if isinstance(eos, list) else [eos])
    return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


def _recompute_prompt_tuning(model, adapter_dir: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding by plain math: the whole sequence (virtual tokens + prompt + output) re-run each step.

    HF PEFT 0.21's prompt-tuning generate drifts under transformers 5 (it drops position ids and its cached
    steps disagree with this recomputation), so the reference is computed without any cache.
    """
    from safetensors.torch import load_file

    prompts = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))["prompt_embeddings"]
    seq, out = list(prompt_ids), []
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        for _ in range(max_new):
            embeds = torch.cat([prompts, model.get_input_embeddings()(torch.tensor(seq))]).unsqueeze(0)
            token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
            if token == eos or (isinstance(eos, list) and token in eos):
                break
            out.append(token)
            seq.append(token)
    return out


PROMPT = "the quick brown fox jumps over"
MAX_NEW = 8


def reference_steps(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new: int,
                    presence: float = 0.0, frequency: float = 0.0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's float64 log-softmax from HF PEFT (or plain transformers), the whole sequence
    re-run each step (no cache), OpenAI's penalties applied in float64 by plain math before the argmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter_dir is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    eos = model.config.eos_token_id
    seq, out, logps = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
            logps.append(torch.log_softmax(logits, -1))
            counts = torch.zeros_like(logits)
            for t in out:
                counts[t] += 1
            token = int((logits - counts * frequency - (counts > 0).double() * presence).argmax())
            if token == eos:
                break
            out.append(token)
            seq.append(token)
    return out, logps


class InProcessBackend:
    """What OpenAIIngress gives the routes, minus Ray: the replica class (constructed without Serve) called
    directly, streamed or not; the in-process route tests put the real FastAPI app in front of it."""

    def __init__(self, replica, spec, api_key: str, request_timeout_s: float = 120.0) -> None:
        from peftray.serve.metrics import ServeMetrics
        from peftray.serve.watch import ModelResolver

        self.replica, self.resolver, self.api_key = replica, ModelResolver(spec), api_key
        self.default_max_tokens, self.request_timeout_s, self.metrics = 16, request_timeout_s, ServeMetrics()

    async def call(self, fn, *args):
        return fn(*args)

    async def run(self, target, job):
        if job.get("stream"):
            async for ev in self.replica.generate(target.key, job):
                yield ev
        else:
            yield await self.replica.generate_all(target.key, job)

    async def metrics_text(self) -> bytes:
        return self.metrics.render()
