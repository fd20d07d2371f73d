"""`peftray bench train --objective dpo`: peftray's DPO step against TRL's `DPOTrainer` step, in one run.

Same tiny Llama base, same LoRA config, same batches of the shipped preference set, same sequence lengths,
fp32, same torch threads. Arms alternate over several repetitions (each: a few optimizer steps per arm);
printed: tokens/s per arm, the median ratio to TRL with its spread (min..max), where peftray's step time
goes (policy forward + loss, backward + optimizer, reference forward), and each arm's peak resident memory
(each arm run alone in a fresh process, so one arm's peak cannot hide in another's).
TRL (and HF PEFT) are optional here, as the baseline: the `test` extra (`pip install -e '.[test]'` in the checkout).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from peftray.tables import table

JOBS = Path(__file__).resolve().parents[2] / "jobs"
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"]}


def _data(model_dir: Path, seq: int):
    from peftray.data import prepare_data
    from peftray.jobspec import load_spec
    from peftray.train.model import load_tokenizer

    spec = load_spec(JOBS / "tiny-dpo.yaml", [f"base_model.path={model_dir}", f"dataset.max_seq_len={seq}",
                                               f"dataset.source={JOBS / 'data' / 'tiny_preference.jsonl'}",
                                               "dataset.eval_fraction=0"])
    tok = load_tokenizer(spec, str(model_dir))
    return spec, tok, prepare_data(spec, tok).train


def _peftray_arm(model_dir: Path, spec, precomputed: bool):
    from transformers import AutoModelForCausalLM

    import peftray
    from peftray.train.objectives import OBJECTIVES, Step

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peftray.get_peft_model(base, peftray.LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    objective = OBJECTIVES["dpo"]

    def step(batch):
        counts = objective.counts(batch, spec)
        loss, _ = objective.loss(Step(model, model, batch, counts, 1, spec))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def _trl_arm(model_dir: Path, tok, tmp: Path):
    import peft
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), beta=0.1, report_to="none", use_cpu=not torch.cuda.is_available(),
                         max_length=None, learning_rate=1e-3)
    rows = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4)
    trainer = trl.DPOTrainer(model=base, args=args, train_dataset=rows, processing_class=tok,
                             peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    trainer.model.train()
    opt = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch):
        trainer._compute_loss(trainer.model, batch, False).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return trainer, step


def _batches(examples, batch: int, pad_id: int, steps: int, ref=None):
    from peftray.train.preference import collate_pairs

    out = []
    for s in range(steps):
        chunk = [dict(e) for e in examples[(s * batch) % (len(examples) - batch):][:batch]]
        b = collate_pairs(chunk, pad_id)
        if ref is not None:
            b["ref_logps"] = ref(chunk)
        out.append(b)
    return out


def _timed(step, batches) -> tuple[float, int]:
    began = time.perf_counter()
    for b in batches:
        step(b)
    return time.perf_counter() - began, sum(int(b["attention_mask"].sum()) for b in batches)


def _breakdown(model, spec, batch) -> dict[str, float]:
    """Seconds of one peftray step's parts: policy forward + loss, backward, reference forward."""
    from peftray.train.objectives import OBJECTIVES, Step

    objective = OBJECTIVES["dpo"]
    counts = objective.counts(batch, spec)
    t0 = time.perf_counter()
    loss, _ = objective.loss(Step(model, model, {**batch, "ref_logps": torch.zeros(batch["input_ids"].shape[0])},
                                  counts, 1, spec))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    from peftray.train.preference import completion_logps, token_logps

    with torch.no_grad(), model.disable_adapter():
        completion_logps(token_logps(model, batch), batch)
    t3 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return {"policy_forward_and_loss_s": t1 - t0, "backward_s": t2 - t1, "reference_forward_s": t3 - t2}


def run(model_dir: Path, tmp: Path, steps: int, batch: int, seq: int, reps: int) -> dict[str, Any]:
    from peftray.train.preference import reference_logps

    spec, tok, examples = _data(model_dir, seq)
    live_model, live = _peftray_arm(model_dir, spec, False)
    table_model, table_step = _peftray_arm(model_dir, spec, True)
    trainer, trl_step = _trl_arm(model_dir, tok, tmp)
    t0 = time.perf_counter()
    ref = reference_logps(table_model, examples, batch, tok.pad_token_id, torch.device("cpu"))
    precompute_s = time.perf_counter() - t0
    index = {e["row"]: i for i, e in enumerate(examples)}

    def lookup(chunk):
        rows = [index[e["row"]] for e in chunk]
        return torch.cat([ref[rows, 0], ref[rows, 1]]).float()

    plain = _batches(examples, batch, tok.pad_token_id, steps)
    with_ref = _batches(examples, batch, tok.pad_token_id, steps, lookup)
    trl_batches = [{k: v for k, v in b.items()} for b in plain]
    for arm, bs in ((trl_step, trl_batches[:1]), (live, plain[:1]), (table_step, with_ref[:1])):
        arm(bs[0])  # warm-up
    tps: dict[str, list[float]] = {"trl": [], "peftray": [], "peftray_precomputed": []}
    for _ in range(reps):  # alternate the arms so machine noise hits them alike
        for name, arm, bs in (("trl", trl_step, trl_batches), ("peftray", live, plain),
                              ("peftray_precomputed", table_step, with_ref)):
            seconds, tokens = _timed(arm, bs)
            tps[name].append(tokens / seconds)
    ratios = {name: [a / b for a, b in zip(tps[name], tps["trl"])] for name in ("peftray", "peftray_precomputed")}
    return {"setup": {"model": "tiny-llama", "lora": LORA, "batch_pairs": batch, "max_seq_len": seq, "steps": steps,
                      "reps": reps, "threads": torch.get_num_threads(), "dtype": "fp32"},
            "tokens_per_s_median": {k: statistics.median(v) for k, v in tps.items()},
            "ratio_to_trl": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in ratios.items()},
            "precompute_reference_s": precompute_s, "peftray_step_breakdown": _breakdown(live_model, spec, plain[0])}


def _arm_memory(name: str, model_dir: str, tmp: str, steps: int, batch: int, seq: int, queue) -> None:
    """In a fresh process: build one arm, take one step, then run its steps; put (MiB resident before the steps,
    peak MiB resident during them)."""
    import psutil

    from peftray.train.preference import reference_logps

    spec, tok, examples = _data(Path(model_dir), seq)
    if name == "trl":
        _, step = _trl_arm(Path(model_dir), tok, Path(tmp))
        batches = _batches(examples, batch, tok.pad_token_id, steps)
    else:
        model, step = _peftray_arm(Path(model_dir), spec, name == "peftray_precomputed")
        lookup = None
        if name == "peftray_precomputed":
            ref = reference_logps(model, examples, batch, tok.pad_token_id, torch.device("cpu"))
            index = {e["row"]: i for i, e in enumerate(examples)}

            def lookup(chunk):
                rows = [index[e["row"]] for e in chunk]
                return torch.cat([ref[rows, 0], ref[rows, 1]]).float()
        batches = _batches(examples, batch, tok.pad_token_id, steps, lookup)
    import threading

    me, peak, done = psutil.Process(), [0.0], threading.Event()

    def sample() -> None:  # the process's resident size every 2 ms while the steps run
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss / 2**20)
            done.wait(0.002)

    step(batches[0])  # warm-up: lazily made buffers and the optimizer state belong to "built"
    before = me.memory_info().rss / 2**20
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for b in batches:
        step(b)
    done.set()
    sampler.join()
    queue.put((before, max(peak[0], me.memory_info().rss / 2**20)))


def peak_memory(model_dir: Path, tmp: Path, steps: int, batch: int, seq: int) -> dict[str, dict[str, float]]:
    """Peak resident memory of each arm run alone in its own process (an in-process peak would mix the arms).

    `peak_mib`: the process's resident peak while the steps run (model, data, optimizer state and the step's
    activations and gradients); `steps_mib`: that peak over what was resident just before, after a warm-up step,
    i.e. what a step's activations and gradients add.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for name in ("trl", "peftray", "peftray_precomputed"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_arm_memory, args=(name, str(model_dir), str(tmp), steps, batch, seq, queue))
        proc.start()
        before, peak = queue.get(timeout=900)
        proc.join()
        out[name] = {"peak_mib": peak, "steps_mib": peak - before}
    return out


def report(r: dict[str, Any]) -> None:
    rows = [[k, f"{v:.0f}"] for k, v in r["tokens_per_s_median"].items()]
    print(table(["DPO step", "tokens/s (median)"], rows))
    for k, v in r["ratio_to_trl"].items():
        print(f"{k} / TRL DPOTrainer: {v['median']:.2f}x (spread {v['min']:.2f}..{v['max']:.2f}, "
              f"{r['setup']['reps']} reps)")
    if r.get("peak_memory"):
        print(table(["DPO arm alone", "peak RSS in steps MiB", "added by a step MiB"],
                    [[k, f"{v['peak_mib']:.0f}", f"{v['steps_mib']:.0f}"] for k, v in r["peak_memory"].items()]))
    parts = r["peftray_step_breakdown"]
    print("peftray step: " + ", ".join(f"{k.removesuffix('_s')} {v * 1000:.1f} ms" for k, v in parts.items())
          + f"; reference precompute (once) {r['precompute_reference_s']:.2f} s")
