"""Preference jobs end to end on the session stack: DPO on 2 Ray Train workers with a precomputed reference,
ORPO on 1; MLflow metrics, registry tags, the promotion gate on eval reward accuracy, HF PEFT margins."""

from __future__ import annotations

import pytest
import torch

from peftray.jobspec import load_spec

pytestmark = [pytest.mark.stack, pytest.mark.slow]

PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def _spec(path, tiny_model, *extra):
    name = "p" + __import__("uuid").uuid4().hex[:8]
    return load_spec(path, [f"base_model.path={tiny_model}", f"name={name}", f"registry.model_name={name}", *extra])


@pytest.fixture(scope="module")
def dpo_job(stack, ray_session, tiny_model):
    from peftray.train import run_job

    spec = _spec("jobs/tiny-dpo.yaml", tiny_model, "resources.num_workers=2", "training.batch_size=4",
                 "training.reference=precomputed")
    return spec, run_job(spec, stack)


def _history(stack, run_id, key):
    from peftray.registry.client import mlflow_client

    return [m.value for m in sorted(mlflow_client(stack).get_metric_history(run_id, key), key=lambda m: m.step)]


def _hf_margins(stack, uri, spec, tiny_model, tmp_path):
    """Held-out chosen-minus-rejected completion log-prob margins of the registered adapter in HF PEFT,
    computed pair by pair with an explicit log-softmax (float64), and those of the bare base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftray.data import prepare_data

    local = tmp_path / "adapter"
    stack.s3fs().get(uri.removeprefix("s3://") + "/", str(local) + "/", recursive=True)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(local)).eval()

    def logp(prompt, completion):
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        picked = logits.gather(-1, ids[0, 1:, None]).squeeze(-1)
        return float(picked[len(prompt) - 1:].sum())

    margins, base = [], []
    with torch.no_grad():
        for ex in prepare_data(spec, tok).eval:
            margins.append(logp(ex["prompt_ids"], ex["chosen_ids"]) - logp(ex["prompt_ids"], ex["rejected_ids"]))
            with model.disable_adapter():
                base.append(logp(ex["prompt_ids"], ex["chosen_ids"]) - logp(ex["prompt_ids"], ex["rejected_ids"]))
    return torch.tensor(margins), torch.tensor(base)


def test_dpo_learns_logs_registers_and_passes_its_gate(dpo_job, stack, tiny_model, tmp_path):
    from peftray.registry import list_versions, resolve

    spec, result = dpo_job
    assert result.metrics["eval_rewards/accuracies"] >= 0.9
    for key in PAIR_METRICS:
        assert len(_history(stack, result.run_id, key)) == spec.training.max_steps, key
        assert _history(stack, result.run_id, f"eval_{key}"), key
    losses = _history(stack, result.run_id, "loss")
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0] - 0.1  # log 2, then falls
    (v,) = list_versions(spec.model_name, config=stack)
    assert v.tags["objective"] == "dpo" and v.tags["hp.beta"] == "0.1" and v.tags["hp.reference"] == "precomputed"
    assert v.metrics["eval_rewards/accuracies"] == pytest.approx(result.metrics["eval_rewards/accuracies"])
    assert result.promoted_alias == "staging" and resolve(f"{spec.model_name}@staging", config=stack).version == v.version
    margins, base = _hf_margins(stack, result.adapter_uri, spec, tiny_model, tmp_path)
    assert margins.mean() > 0 and (margins > base).float().mean() >= 0.9


def test_two_dpo_workers_match_one_worker_with_double_batch(dpo_job, stack):
    from peftray.train.local import run_local

    spec, result = dpo_job
    one = run_local(load_spec(spec.model_dump(mode="json"), ["resources.num_workers=1", "training.batch_size=8"]))
    for key in ("loss", "rewards/margins"):
        torch.testing.assert_close(torch.tensor([m[key] for m in one.history]),
                                   torch.tensor(_history(stack, result.run_id, key)), rtol=0, atol=2e-3)


def test_orpo_job_learns_on_ray(stack, ray_session, tiny_model, tmp_path):
    from peftray.train import run_job

    spec = _spec("jobs/tiny-orpo.yaml", tiny_model)
    result = run_job(spec, stack)
    assert result.metrics["eval_rewards/accuracies"] >= 0.9 and result.promoted_alias == "staging"
    margins, base = _hf_margins(stack, result.adapter_uri, spec, tiny_model, tmp_path)
    assert margins.mean() > 0 and (margins > base).float().mean() >= 0.9
