"""The training loop, written out (torchtune style): no trainer framework, every step visible.

`train(spec, ctx)` runs on every worker. `ctx` (a `LoopContext`) is all it knows of the outside: its rank,
the world size, its device, how to report metrics + checkpoints, and the checkpoint to resume from. Ray
Train supplies one (`peftray.train.worker`); the benchmark runs the same loop in one plain process.

Losses are token-weighted over the whole global batch: each rank scales its token-sum loss by
world_size / (label tokens on all ranks), so after DDP's gradient average N workers with batch b take
exactly the step one worker with batch N*b would.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from peftray.data import BatchPlan, PreparedData, collate, eval_batches, prepare_data, total_steps
from peftray.errors import ConfigError, NonFiniteError
from peftray.jobspec import JobSpec
from peftray.train import checkpoint
from peftray.train.model import load_base, load_tokenizer, resolve_base, wrap
from peftray.train.schedule import make_optimizer, make_scheduler

CRASH_ENV = "PEFTRAY_TEST_CRASH_AT_STEP"  # test-only: rank PEFTRAY_TEST_CRASH_RANK (1) exits at this step


@dataclass
class LoopContext:
    """What the loop needs from its runner (Ray Train or a plain process)."""

    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict, Path | None], None]  # metrics, checkpoint folder (rank 0) or None
    resume_from: Callable[[], contextlib.AbstractContextManager]  # yields a local folder or None
    log: Callable[[dict, int], None] = lambda metrics, step: None  # MLflow (rank 0 only)
    config: Any = None  # peftray Config for s3:// sources
    workdir: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")))


@dataclass
class Job:
    """Everything one worker builds before its first step."""

    spec: JobSpec
    data: PreparedData
    plan: BatchPlan
    total: int
    model: torch.nn.Module  # the PeftModel
    ddp: torch.nn.Module  # the model DDP wraps (the PeftModel itself with one worker)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pad_id: int
    scaler: Any = None  # fp16 loss scaling (CUDA only); None otherwise


def build(spec: JobSpec, ctx: LoopContext) -> Job:
    """Load tokenizer, data, base model and adapter; make the optimizer and scheduler."""
    path = resolve_base(spec, ctx.config)
    tok = load_tokenizer(spec, path)
    data = prepare_data(spec, tok, ctx.config)
    t = spec.training
    plan = BatchPlan(len(data.train), t.batch_size, ctx.world_size, t.gradient_accumulation_steps, t.seed)
    plan.check()
    total = total_steps(plan, t.epochs, t.max_steps)
    model = wrap(spec, load_base(spec, path, tok, data.label_names, ctx.device), spec.base_model.path)
    model.train()
    ddp = model
    if ctx.world_size > 1 and dist.is_initialized():
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)  # syncs requires_grad params only
    optimizer = make_optimizer(model, t)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    return Job(spec, data, plan, total, model, ddp, optimizer, make_scheduler(optimizer, t, total), tok.pad_token_id,
               scaler)


def train(spec: JobSpec, ctx: LoopContext) -> dict[str, float]:
    """Run (or resume) the job on this worker; returns the final metrics (the same on every rank)."""
    job = build(spec, ctx)
    start = _resume(job, ctx)
    metrics: dict[str, float] = {}
    seconds = tokens = 0.0  # this attempt's training time and tokens, for the final throughput
    for step in range(start, job.total):
        _maybe_crash(spec, ctx, step)
        metrics = train_step(job, ctx, step)
        seconds += metrics["step_seconds"]
        tokens += metrics["tokens_per_s"] * metrics["step_seconds"]
        done = step + 1
        t = spec.training
        if t.eval_every and done % t.eval_every == 0 and done < job.total and job.data.eval:
            metrics.update(evaluate(job, ctx))
        ctx.log(metrics, done)
        _progress(spec, ctx, done, job.total, metrics)
        # Ray Train gets a result only with a checkpoint (and the final one): its report() hands results over
        # through a queue of one that the controller empties when it polls the workers (every 2 s), so a report
        # every step made every step wait ~2 s. Step metrics reach MLflow (ctx.log) and the progress lines.
        if done % t.checkpoint_every == 0 and done < job.total:
            ctx.report({**metrics, "step": float(done)}, _save(job, ctx, done, metrics))
    final = {**metrics, **(evaluate(job, ctx) if job.data.eval else {}), "step": float(job.total),
             "total_steps": float(job.total), "train_seconds": seconds,
             "train_tokens_per_s": tokens / seconds if seconds else 0.0}
    ctx.log({k: v for k, v in final.items() if k.startswith("eval_")}, job.total)  # step metrics are logged
    ctx.report(final, _save(job, ctx, job.total, final))
    return final


def _maybe_crash(spec: JobSpec, ctx: LoopContext, step: int) -> None:
    """Test hook: rank PEFTRAY_TEST_CRASH_RANK (1) dies at step PEFTRAY_TEST_CRASH_AT_STEP, once per job name."""
    if step != int(os.environ.get(CRASH_ENV, "-1")) or ctx.rank != int(os.environ.get("PEFTRAY_TEST_CRASH_RANK", "1")):
        return
    marker = Path(tempfile.gettempdir()) / f"peftray-test-crashed-{spec.name}"
    if marker.exists():
        return
    marker.touch()
    # Ray Train's controller records a reported checkpoint when it next polls the workers (every 2 s); die after
    # that, so the test sees a worker lost *after* a checkpoint was registered, as in a real mid-run failure.
    time.sleep(6)
    os._exit(17)


def _resume(job: Job, ctx: LoopContext) -> int:
    with ctx.resume_from() as folder:
        if folder is None:
            return 0
        step = checkpoint.restore(Path(folder), job.model, job.optimizer, job.scheduler)
    ctx.log({"resumed_from_step": float(step)}, step)
    if ctx.rank == 0:
        print(f"peftray: resumed {job.spec.name} from the checkpoint after step {step}", flush=True)
    return step


def _save(job: Job, ctx: LoopContext, step: int, metrics: dict) -> Path | None:
    if ctx.rank != 0:
        return None
    folder = ctx.workdir / f"peftray-ckpt-{job.spec.name}-{os.getpid()}-{step}"
    return checkpoint.save(folder, job.model, job.optimizer, job.scheduler, step, metrics)


def _targets(batch: dict[str, torch.Tensor], classification: bool) -> int:
    if classification:
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())  # causal LM: the shifted labels that count


def _all_sum(values: list[float], ctx: LoopContext) -> list[float]:
    if ctx.world_size == 1 or not dist.is_initialized():
        return list(values)
    # gloo reduces CPU tensors, NCCL and XLA device tensors; XLA has no float64
    dtype = torch.float32 if ctx.device.type == "xla" else torch.float64
    tensor = torch.tensor(values, dtype=dtype, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _autocast(spec: JobSpec, device: torch.device):
    if spec.training.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if spec.training.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(job: Job, ctx: LoopContext, step: int) -> dict[str, float]:
    """One optimizer step: this rank's micro-batches, token-weighted loss, clip, step, schedule."""
    began = time.perf_counter()
    classification = job.spec.task == "seq_cls"
    batches = [collate([job.data.train[i] for i in idx], job.pad_id) for idx in job.plan.micro_batches(step, ctx.rank)]
    local_targets = sum(_targets(b, classification) for b in batches)
    local_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    global_targets, global_tokens = _all_sum([local_targets, local_tokens], ctx)
    loss_sum = 0.0
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        sync = contextlib.nullcontext() if last or job.ddp is job.model else job.ddp.no_sync()
        with sync:
            with _autocast(job.spec, ctx.device):
                out = job.ddp(**{key: v.to(ctx.device) for key, v in batch.items()})
            token_sum = out.loss.float() * _targets(batch, classification)
            scaled = token_sum * ctx.world_size / max(global_targets, 1)
            (job.scaler.scale(scaled) if job.scaler else scaled).backward()
        loss_sum += float(token_sum.detach())
    (total_loss,) = _all_sum([loss_sum], ctx)  # the same on every rank, so every rank stops together
    grad_norm, lr = _optimizer_step(job, ctx, step, total_loss / max(global_targets, 1))
    seconds = time.perf_counter() - began
    return {"loss": total_loss / max(global_targets, 1), "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": global_tokens / seconds, "step_seconds": seconds,
            "epoch": float(step // job.plan.steps_per_epoch)}


def _optimizer_step(job: Job, ctx: LoopContext, step: int, loss: float) -> tuple[float, float]:
    """Check, clip, step, schedule, zero; returns (grad norm before clipping, the learning rate used).

    Raises:
        NonFiniteError: the loss or (without fp16 loss scaling, which skips such steps itself) the gradient
            norm is NaN or infinite; checked before the step, so no checkpoint ever holds the broken weights.
    """
    params = [p for p in job.model.parameters() if p.requires_grad]
    max_norm = job.spec.training.max_grad_norm or math.inf
    if job.scaler:
        job.scaler.unscale_(job.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # after DDP's all-reduce: same on all ranks
    if not math.isfinite(loss) or (job.scaler is None and not math.isfinite(grad_norm)):
        raise NonFiniteError(f"job {job.spec.name}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
                             f"at step {step + 1} (loss {loss}, gradient norm {grad_norm}); training stopped and "
                             "nothing is registered. Lower training.learning_rate or set training.max_grad_norm.")
    lr = job.scheduler.get_last_lr()[0]
    if job.scaler:
        job.scaler.step(job.optimizer)  # skips the step when the fp16 grads overflowed
        job.scaler.update()
    else:
        job.optimizer.step()
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    if ctx.device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.mark_step()
    return grad_norm, lr


@torch.no_grad()
def evaluate(job: Job, ctx: LoopContext) -> dict[str, float]:
    """Eval loss (token-weighted) over all eval rows, split across ranks; perplexity or accuracy."""
    classification = job.spec.task == "seq_cls"
    job.model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for chunk in eval_batches(job.data.eval, job.spec.training.batch_size, ctx.rank, ctx.world_size):
        batch = {k: v.to(ctx.device) for k, v in collate(chunk, job.pad_id).items()}
        with _autocast(job.spec, ctx.device):
            out = job.model(**batch)
        n = _targets(batch, classification)
        loss_sum += float(out.loss.float()) * n
        count += n
        if classification:
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    job.model.train()
    loss_sum, count, correct = _all_sum([loss_sum, count, correct], ctx)
    eval_loss = loss_sum / max(count, 1)
    if classification:
        return {"eval_loss": eval_loss, "eval_accuracy": correct / max(count, 1)}
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


def _progress(spec: JobSpec, ctx: LoopContext, step: int, total: int, metrics: dict) -> None:
    if ctx.rank != 0:
        return
    import json

    line = {"job": spec.name, "step": step, "total_steps": total, "loss": round(metrics["loss"], 6),
            "lr": metrics["lr"], "tokens_per_s": round(metrics["tokens_per_s"], 1)}
    if "eval_loss" in metrics:
        line["eval_loss"] = round(metrics["eval_loss"], 6)
    print("PEFTRAY_PROGRESS " + json.dumps(line), flush=True)


def check_precision(spec: JobSpec) -> None:
    """fp16 needs CUDA (its loss scaling has no CPU path here)."""
    if spec.training.precision == "fp16" and not spec.resources.use_gpu:
        raise ConfigError("`training.precision: fp16` needs a GPU; use training.precision=bf16 or fp32 on CPU")
