"""peftray's DPO (each loss_type) and ORPO losses against TRL's trainers, the reference implementation.

Same tiny base, the same LoRA weights (TRL's HF PEFT adapter, saved and loaded into peftray), the same
batch: the loss, the chosen/rejected log-probabilities and the logged rewards agree within 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch
import trl  # a test-only dependency (the `test` extra): missing, it fails, not skips

from peftray.train import preference
from peftray.train.objectives import OBJECTIVES, Step


PAIRS = [
    {"prompt_ids": [1, 5, 6, 40], "chosen_ids": [7, 8, 90, 2], "rejected_ids": [9, 2]},
    {"prompt_ids": [1, 10], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 99, 2]},
    {"prompt_ids": [1, 33, 34, 35, 36], "chosen_ids": [70, 2], "rejected_ids": [71, 72, 2]},
]


def _hf_lora(tiny_model):
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])


def _randomize(model) -> None:
    # a fresh LoRA is the identity (B = 0), so policy = reference; random weights make every term count
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _peftray_twin(trl_model, tiny_model, tmp_path):
    """peftray's model with the same adapter weights as TRL's HF PEFT model."""
    from transformers import AutoModelForCausalLM

    import peftray

    trl_model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = peftray.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    model.train()
    return model


def _spec(objective: str, **training):
    from peftray.jobspec import JobSpec

    return JobSpec.model_validate({
        "name": "t", "base_model": "x", "dataset": {"source": "x.jsonl", "format": "preference"},
        "training": {"objective": objective, **training}})


def _peftray_step(model, spec, batch):
    objective = OBJECTIVES[spec.training.objective]
    counts = objective.counts(batch, spec)
    scaled, sums = objective.loss(Step(model, model, batch, counts, 1, spec))
    return scaled, objective.metrics(sums, counts, spec, False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl(loss_type, tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    base, lora = _hf_lora(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.pad_token or tok.eos_token
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), beta=0.3, loss_type=[loss_type], report_to="none",
                         use_cpu=True, max_length=None)
    rows = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4)
    trainer = trl.DPOTrainer(model=base, args=args, train_dataset=rows, processing_class=tok, peft_config=lora)
    _randomize(trainer.model)
    trainer.model.train()
    theirs = trainer.data_collator([dict(p) for p in PAIRS])
    ref_loss = trainer._compute_loss(trainer.model, theirs, False)
    ref = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    batch = preference.collate_pairs(PAIRS, tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], theirs[key]), key  # the same batch layout as TRL's collator
    model = _peftray_twin(trainer.model, tiny_model, tmp_path)
    loss, metrics = _peftray_step(model, _spec("dpo", beta=0.3, loss_type=loss_type), batch)

    assert abs(float(loss) - float(ref_loss)) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert abs(metrics[key] - ref[key]) < 1e-5, (key, metrics[key], ref[key])
    assert ref["rewards/margins"] != 0  # the adapter matters: the comparison is not of zeros


def test_dpo_gradients_match_trl(tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    base, lora = _hf_lora(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.pad_token or tok.eos_token
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), beta=0.1, report_to="none", use_cpu=True, max_length=None)
    rows = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4)
    trainer = trl.DPOTrainer(model=base, args=args, train_dataset=rows, processing_class=tok, peft_config=lora)
    _randomize(trainer.model)
    trainer.model.train()
    trainer._compute_loss(trainer.model, trainer.data_collator([dict(p) for p in PAIRS]), False).backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}

    model = _peftray_twin(trainer.model, tiny_model, tmp_path)
    loss, _ = _peftray_step(model, _spec("dpo"), preference.collate_pairs(PAIRS, tok.pad_token_id))
    loss.backward()
    ours = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-4)


def test_orpo_matches_trl(tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    base, lora = _hf_lora(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.pad_token or tok.eos_token
    args = ORPOConfig(output_dir=str(tmp_path / "out"), beta=0.25, report_to="none", use_cpu=True)
    rows = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4)
    trainer = ORPOTrainer(model=base, args=args, train_dataset=rows, processing_class=tok, peft_config=lora)
    _randomize(trainer.model)
    trainer.model.train()
    batch = preference.collate_pairs(PAIRS, tok.pad_token_id)
    n = len(PAIRS)
    theirs = {}
    for side, rows_ in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n))):
        ids, mask = batch["input_ids"][rows_], batch["attention_mask"][rows_]
        theirs[f"{side}_input_ids"], theirs[f"{side}_attention_mask"] = ids, mask
        theirs[f"{side}_labels"] = ids.masked_fill(batch["completion_mask"][rows_] == 0, -100)
    ref_loss, ref = trainer.get_batch_loss_metrics(trainer.model, theirs)

    model = _peftray_twin(trainer.model, tiny_model, tmp_path)
    loss, metrics = _peftray_step(model, _spec("orpo", beta=0.25), batch)

    assert abs(float(loss) - float(ref_loss)) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert abs(metrics[key] - ref[key]) < 1e-5, (key, metrics[key], ref[key])


def test_label_smoothing_against_float64_formula(tiny_model):
    """Conservative DPO (sigmoid with label smoothing): TRL 1.16 has no such sigmoid, so float64 math."""
    logps = torch.tensor([-10.0, -12.5, -11.0, -9.0], dtype=torch.float32)
    ref = torch.tensor([-10.5, -12.0, -11.2, -9.7], dtype=torch.float32)
    losses, rewards = preference.dpo_losses(logps, ref, torch.ones(4, 3), beta=0.2, loss_type="sigmoid",
                                            label_smoothing=0.1)
    d = (logps.double()[:2] - ref.double()[:2]) - (logps.double()[2:] - ref.double()[2:])
    sig = torch.sigmoid(0.2 * d)
    expected = -0.9 * torch.log(sig) - 0.1 * torch.log(1 - sig)
    torch.testing.assert_close(losses.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards.double(), 0.2 * (logps.double() - ref.double()), atol=1e-6, rtol=0)
