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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from peftray.data import BatchPlan, PreparedData, eval_batches, total_steps
from peftray.errors import ConfigError, NonFiniteError
from peftray.jobspec import JobSpec
from peftray.train import checkpoint
from peftray.train.objectives import Step, needs_reference_table, objective_of
from peftray.train.preference import reference_logps
from peftray.train.model import load_base, load_text_to_image, resolve_base, tokenizer_and_data, wrap
from peftray.tuners.tasks import TASKS
from peftray.train.schedule import make_optimizer, make_scheduler

TIMING = "timing/"  # prefix of the phase timestamps in the final report's metrics


@dataclass
class LoopContext:
    """What the loop needs from its runner (Ray Train or a plain process)."""

    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict, Path | None], None]  # metrics, checkpoint folder (rank 0) or None
    resume_from: Callable[[], contextlib.AbstractContextManager]  # yields a local folder or None
    log: Callable[[dict, int], None] = lambda metrics, step: None  # MLflow (rank 0 only)
    artifact: Callable[[Path, str], None] = lambda path, folder: None  # a file into the run's artifacts (rank 0)
    config: Any = None  # peftray Config for s3:// sources
    workdir: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")))
    # wall-clock time (time.time()) of each phase's end on this worker: the job's per-phase breakdown
    timings: dict[str, float] = field(default_factory=dict)


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
    pad_id: int | None
    scaler: Any = None  # fp16 loss scaling (CUDA only); None otherwise
    reference: torch.Tensor | None = None  # dpo, reference: precomputed: [train + eval rows, (chosen, rejected)]


def build(spec: JobSpec, ctx: LoopContext) -> Job:
    """Load tokenizer, data, base model and adapter; make the optimizer and scheduler."""
    path = resolve_base(spec, ctx.config)
    tok, data = tokenizer_and_data(spec, path, ctx.config)
    t = spec.training
    plan = BatchPlan(len(data.train), t.batch_size, ctx.world_size, t.gradient_accumulation_steps, t.seed)
    plan.check()
    total = total_steps(plan, t.epochs, t.max_steps)
    if TASKS[spec.task].diffusion:
        model = load_text_to_image(spec, path, data, ctx.device)
    else:
        model = wrap(spec, load_base(spec, path, tok, data.label_names, ctx.device), spec.base_model.path)
    model.train()
    ddp = model
    if ctx.world_size > 1 and dist.is_initialized():
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)  # syncs requires_grad params only
    optimizer = make_optimizer(model, t)
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    # an image processor (image_cls) has no pad token: image batches are stacked, never padded
    return Job(spec, data, plan, total, model, ddp, optimizer, make_scheduler(optimizer, t, total),
               getattr(tok, "pad_token_id", None), scaler)


def train(spec: JobSpec, ctx: LoopContext) -> dict[str, float]:
    """Run (or resume) the job on this worker; returns the final metrics (the same on every rank).

    The final report also carries `ctx.timings` as `timing/<phase>` keys (wall-clock seconds since the epoch),
    which the driver takes out of the metrics into the job's result record."""
    ctx.timings["loop_start"] = time.time()
    job = build(spec, ctx)
    start = _resume(job, ctx)
    ctx.timings["built"] = time.time()  # model, data, optimizer, and the checkpoint resumed from
    if ctx.rank == 0 and job.data.skipped:
        print(f"peftray: {job.data.skipped.describe(spec.dataset.source)}", flush=True)
        ctx.log(job.data.skipped.counts(), 0)
    if needs_reference_table(spec):
        _attach_reference(job, ctx)
    metrics: dict[str, float] = {}
    seconds = tokens = 0.0  # this attempt's training time and tokens, for the final throughput
    for step in range(start, job.total):
        metrics = train_step(job, ctx, step)
        ctx.timings.setdefault("first_step", time.time())
        seconds += metrics["step_seconds"]
        tokens += metrics["tokens_per_s"] * metrics["step_seconds"]
        done = step + 1
        t = spec.training
        if t.eval_every and done % t.eval_every == 0 and done < job.total and job.data.eval:
            metrics.update(evaluate(job, ctx))
            _samples(job, ctx, done)
        ctx.log(metrics, done)
        _progress(spec, ctx, done, job.total, metrics)
        # Ray Train gets a result only with a checkpoint (and the final one): its report() hands results over
        # through a queue of one that the controller empties when it polls the workers (every 2 s), so a report
        # every step made every step wait ~2 s. Step metrics reach MLflow (ctx.log) and the progress lines.
        if done % t.checkpoint_every == 0 and done < job.total:
            ctx.report({**metrics, "step": float(done)}, _save(job, ctx, done, metrics))
    ctx.timings["train_end"] = time.time()
    final = {**metrics, **(evaluate(job, ctx) if job.data.eval else {}), "step": float(job.total),
             "total_steps": float(job.total), "train_seconds": seconds,
             "train_tokens_per_s": tokens / seconds if seconds else 0.0}
    ctx.log({k: v for k, v in final.items() if k.startswith("eval_")}, job.total)  # step metrics are logged
    if job.data.eval:
        _samples(job, ctx, job.total)
    ctx.timings["final_eval"] = time.time()
    folder = _save(job, ctx, job.total, final)
    ctx.timings["final_saved"] = time.time()
    ctx.report({**final, **{f"{TIMING}{k}": v for k, v in ctx.timings.items()}}, folder)
    return final


def _samples(job: Job, ctx: LoopContext, step: int) -> None:
    """text_to_image: after an evaluation, rank 0 logs a grid of images generated for eval captions
    (`samples/step_000010.png` in the run's artifacts)."""
    if ctx.rank != 0 or not hasattr(job.model, "sample_grid"):
        return
    from peftray.train.diffusion import sample_captions

    path = ctx.workdir / f"peftray-samples-{job.spec.name}-{os.getpid()}" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    job.model.sample_grid(sample_captions(job.data.eval), seed=job.spec.training.seed).save(path)
    ctx.artifact(path, "samples")


def _attach_reference(job: Job, ctx: LoopContext) -> None:
    """Reference log-probs of every train and eval pair, computed once (or taken from the checkpoint resumed
    from) and carried by the examples, so a step runs no reference forward."""
    examples = job.data.train + job.data.eval
    if job.reference is not None and job.reference.shape[0] != len(examples):
        job.reference = None  # not this dataset's table: compute it again
    if job.reference is None:
        began = time.perf_counter()
        mine = reference_logps(job.model, examples, job.spec.training.batch_size, job.pad_id, ctx.device,
                               ctx.rank, ctx.world_size)
        job.reference = torch.tensor(_all_sum(mine.flatten().tolist(), ctx), dtype=torch.float64).view(-1, 2)
        ctx.log({"reference_seconds": time.perf_counter() - began}, 0)
    for example, (chosen, rejected) in zip(examples, job.reference.tolist()):
        example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen, rejected


def _resume(job: Job, ctx: LoopContext) -> int:
    with ctx.resume_from() as folder:
        if folder is None:
            return 0
        step = checkpoint.restore(Path(folder), job.model, job.optimizer, job.scheduler)
        job.reference = checkpoint.load_reference(Path(folder))
    ctx.log({"resumed_from_step": float(step)}, step)
    if ctx.rank == 0:
        _emit(f"peftray: resumed {job.spec.name} from the checkpoint after step {step}")
    return step


def _save(job: Job, ctx: LoopContext, step: int, metrics: dict) -> Path | None:
    if ctx.rank != 0:
        return None
    folder = ctx.workdir / f"peftray-ckpt-{job.spec.name}-{os.getpid()}-{step}"
    return checkpoint.save(folder, job.model, job.optimizer, job.scheduler, step, metrics, job.reference)


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
    """One optimizer step: this rank's micro-batches, the objective's globally weighted loss, clip, step, schedule."""
    began = time.perf_counter()
    objective = objective_of(job.spec)
    batches = [objective.collate([job.data.train[i] for i in idx], job.pad_id)
               for idx in job.plan.micro_batches(step, ctx.rank)]
    local = _add([objective.counts(b, job.spec) for b in batches])
    local["tokens"] = float(sum(_throughput_units(b) for b in batches))
    counts = _all_sum_dict(local, ctx)
    sums: dict[str, float] = {}
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        sync = contextlib.nullcontext() if last or job.ddp is job.model else job.ddp.no_sync()
        with sync:
            with _autocast(job.spec, ctx.device):
                on_device = {key: v.to(ctx.device) for key, v in batch.items()}
                scaled, part = objective.loss(Step(job.ddp, job.model, on_device, counts, ctx.world_size, job.spec))
            (job.scaler.scale(scaled) if job.scaler else scaled).backward()
        sums = _add([sums, part])
    metrics = objective.metrics(_all_sum_dict(sums, ctx), counts, job.spec, False)  # the same on every rank
    grad_norm, lr = _optimizer_step(job, ctx, step, metrics["loss"])  # so every rank stops together
    seconds = time.perf_counter() - began
    return {**metrics, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": counts["tokens"] / seconds,
            "step_seconds": seconds, "epoch": float(step // job.plan.steps_per_epoch)}


def _throughput_units(batch: dict[str, torch.Tensor]) -> int:
    """What tokens_per_s counts: the attended tokens of a text batch, the images of an image batch."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["pixel_values"].shape[0])


def _add(parts: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _all_sum_dict(values: dict[str, float], ctx: LoopContext) -> dict[str, float]:
    keys = sorted(values)  # the same order on every rank
    return dict(zip(keys, _all_sum([values[k] for k in keys], ctx)))


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
    """The objective's metrics over all eval rows, split across ranks, prefixed `eval_`."""
    objective = objective_of(job.spec)
    job.model.eval()
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for chunk in eval_batches(job.data.eval, job.spec.training.batch_size, ctx.rank, ctx.world_size):
        batch = {k: v.to(ctx.device) for k, v in objective.collate(chunk, job.pad_id).items()}
        mine = objective.counts(batch, job.spec)
        with _autocast(job.spec, ctx.device):
            _, part = objective.loss(Step(job.model, job.model, batch, mine, 1, job.spec))
        counts, sums = _add([counts, mine]), _add([sums, part])
    job.model.train()
    keys = sorted(objective.counts(objective.collate(job.data.eval[:1], job.pad_id), job.spec))
    counts = _all_sum_dict({k: counts.get(k, 0.0) for k in keys}, ctx)  # a rank may have had no eval rows
    sums = _all_sum_dict(_sum_keys(sums, job, objective, ctx), ctx)
    return {f"eval_{k}": v for k, v in objective.metrics(sums, counts, job.spec, True).items()}


def _sum_keys(sums: dict[str, float], job: Job, objective, ctx: LoopContext) -> dict[str, float]:
    if sums:
        return sums
    # this rank had no eval rows: the keys (with zeros) of one eval batch, so every rank reduces the same list
    batch = {k: v.to(ctx.device) for k, v in objective.collate(job.data.eval[:1], job.pad_id).items()}
    with torch.no_grad():
        _, part = objective.loss(Step(job.model, job.model, batch, objective.counts(batch, job.spec), 1, job.spec))
    return {k: 0.0 for k in part}


def _progress(spec: JobSpec, ctx: LoopContext, step: int, total: int, metrics: dict) -> None:
    if ctx.rank != 0:
        return
    import json

    line = {"job": spec.name, "step": step, "total_steps": total, "loss": round(metrics["loss"], 6),
            "lr": metrics["lr"], "tokens_per_s": round(metrics["tokens_per_s"], 1)}
    if "eval_loss" in metrics:
        line["eval_loss"] = round(metrics["eval_loss"], 6)
    _emit("PEFTRAY_PROGRESS " + json.dumps(line))


def _emit(line: str) -> None:
    """One line on stdout, once. Not `print`: Ray Train patches it in its workers to log each call as well as
    print it, so every progress line reached the job's log twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check_precision(spec: JobSpec) -> None:
    """fp16 needs CUDA (its loss scaling has no CPU path here)."""
    if spec.training.precision == "fp16" and not spec.resources.use_gpu:
        raise ConfigError("`training.precision: fp16` needs a GPU; use training.precision=bf16 or fp32 on CPU")
