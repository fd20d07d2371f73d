"""The Ray Serve application: an OpenAI ingress in front of engine replicas that multiplex adapters.

    HTTP proxy -> OpenAIIngress (auth, validation, `model` -> name/version, retries) -> AdapterEngine replicas

Requests carry the resolved immutable version (`name/3`) as Serve's multiplexed model id, so Serve routes
them to a replica that already holds that adapter when one has room, and to any replica otherwise (a hot
adapter is loaded on several replicas rather than pinned to one). Each engine replica loads the base model
once and keeps `max_adapters_per_replica` adapters in LRU slots; its continuous-batching engine serves every
adapter it holds in the same forward passes. Overload is refused at the ingress (its admission count, 429) or
in the replica (every slot pinned, 503), with Retry-After; a dead replica's requests are retried on another
one when they had not produced output yet, else they fail with 503. Serve's controller replaces the replica,
also one whose engine stalls (its health check fails after `stall_timeout_s` without a step).
A `task: text_to_image` spec runs ImageEngine replicas (`peftray.serve.image_replica`: a diffusers pipeline, UNet
adapters in the same slots), and `task: seq_cls | image_cls` ClassifierEngine replicas
(`peftray.serve.classify_replica`: a transformers classifier, `/v1/classify`), behind the same ingress, resolver
and admission.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator, Optional

from ray import serve

from peftray.endpoints import without_secrets
from peftray.errors import PeftrayError
from peftray.serve.metrics import ServeMetrics
from peftray.serve.openai_api import make_app
from peftray.serve.replica import REPLICA_OPTIONS, EngineReplica, keep_replica_grpc_on_loopback
from peftray.serve.serve_spec import CLASSIFY_TASKS, ServeConfig, replica_placement
from peftray.serve.slots import OverloadedError
from peftray.serve.watch import ModelResolver, Target

log = logging.getLogger("peftray.serve")
fastapi_app = make_app()


class TooManyRequests(OverloadedError):
    code = "rate_limit_exceeded"
    http_status = 429


def _error_event(exc: BaseException) -> dict:
    status = int(getattr(exc, "http_status", 500)) if isinstance(exc, PeftrayError) else 500
    msg = str(exc) if isinstance(exc, PeftrayError) else f"internal error in the engine: {type(exc).__name__}: {exc}"
    return {"error": {"status": status, "message": msg, "code": getattr(exc, "code", "internal_error")}}


@serve.deployment(name="AdapterEngine", **REPLICA_OPTIONS)
class AdapterEngine(EngineReplica):
    """One replica: the base model once, adapters in LRU slots, a continuous-batching engine (counters, health and
    shutdown are `EngineReplica`'s)."""

    @staticmethod
    def load_engine(spec: ServeConfig):
        return load_engine(spec)[0]  # the module's function: (engine, tokenizer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, key: Optional[str], job: dict) -> AsyncIterator[dict]:
        """Run one job (prompt or chat messages + sampling params); yields event dicts, errors as events."""
        from peftray.serve.engine import SamplingParams

        adapter, row, finished = None, None, False
        try:
            if key:
                path = await self._adapter_path(key)
                adapter = await self.engine.slots.acquire_async(key, path)
            ids = self._encode(job)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            try:
                row = self.engine.submit(ids, SamplingParams(**job["params"]), adapter,
                                         lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                                         schema=job.get("schema"), schema_field=job.get("schema_field", ""))
            except BaseException:
                if adapter is not None:
                    self.engine.slots.release(adapter)
                raise
            first = {}
            if job.get("echo"):  # the prompt as sent; token ids as their text
                prompt = job.get("prompt")
                first["prompt_text"] = prompt if isinstance(prompt, str) else self.tokenizer.decode(
                    ids, skip_special_tokens=True)
            while not finished:
                ev = await queue.get()
                finished = ev.finished
                if ev.error is not None:
                    yield _error_event(ev.error)
                    return
                if ev.finished:  # the ingress's metrics of this replica ride on the last event
                    first["engine"] = self._counters()
                yield {"text": ev.text, "finished": ev.finished, "finish_reason": ev.finish_reason,
                       "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                       "logprobs": [self._token_logprobs(e) for e in ev.logprobs], **first}
                first = {}
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error for the client
            if not isinstance(exc, PeftrayError):
                log.exception("engine request failed")
            yield _error_event(exc)
        finally:
            if row is not None and not finished:
                self.engine.cancel(row)  # the client went away or timed out: free the row and its slot

    async def generate_all(self, key: Optional[str], job: dict) -> dict:
        """`generate`'s events folded into one (text and logprobs joined; the error event if one came)."""
        out: dict = {"text": "", "logprobs": []}
        async for ev in self.generate(key, job):
            if ev.get("error"):
                return ev
            text, lps = out["text"] + ev.get("text", ""), out["logprobs"] + ev.get("logprobs", [])
            out.update(ev, text=text, logprobs=lps)
        return out

    def _token_logprobs(self, entry: dict) -> dict:
        def text(i: int) -> str:
            return self.tokenizer.decode([i])

        return {"token": entry["text"], "logprob": entry["logprob"],
                "top": [[text(i), lp] for i, lp in entry["top"]]}

    def _encode(self, job: dict) -> list[int]:
        from peftray.errors import ConfigError

        tok = self.tokenizer
        if job.get("messages") is not None:
            if not getattr(tok, "chat_template", None):
                raise ConfigError("this base model's tokenizer has no chat template; use /v1/completions.")
            text = tok.apply_chat_template(job["messages"], tools=job.get("tools"), add_generation_prompt=True,
                                           tokenize=False)
            return tok.encode(text, add_special_tokens=False)
        prompt = job.get("prompt")
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= int(t) < len(tok)]
            if bad:
                raise ConfigError(f"`prompt` has token ids outside the vocabulary (0..{len(tok) - 1}): {bad[:5]}")
            return [int(t) for t in prompt]
        return tok.encode(prompt)

    async def stats(self) -> dict:
        e = self.engine
        return {**self._counters(), "adapters": e.loaded_adapters(), "steps": e.steps, "tokens": e.tokens,
                "rss_mb": _rss_mb()}


def _rss_mb() -> float:
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def load_engine(spec: ServeConfig):
    """(GenerationEngine, tokenizer) for a serve spec: base model on its device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftray.serve.engine import GenerationEngine

    device, dtype = replica_placement(spec, cuda_auto_dtype="bfloat16")
    from peftray.base_models import local_model_dir

    path = local_model_dir(spec.base_model)  # an s3:// base model is downloaded once per node
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    engine = GenerationEngine(model, tokenizer, max_batch_size=spec.max_batch_size,
                              max_queue=spec.max_ongoing_requests, max_adapters=spec.max_adapters_per_replica)
    return engine, tokenizer


BUSY_RETRIES = 5  # an admitted request refused by Serve's own queue limit: retried after 50, 100 ... 800 ms


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=2000)
@serve.ingress(fastapi_app)
class OpenAIIngress:
    """The HTTP front: OpenAI routes, the API key, alias resolution, routing to engine replicas."""

    def __init__(self, engine, spec: dict, api_key: Optional[str]) -> None:
        from peftray.serve import openai_api

        keep_replica_grpc_on_loopback()
        self.spec = ServeConfig.model_validate(spec)
        self.engine = engine
        self.resolver = ModelResolver(self.spec)
        self.api_key = api_key
        self.default_max_tokens = self.spec.default_max_tokens
        self.request_timeout_s = self.spec.request_timeout_s
        self.capacity = self.spec.capacity
        self.inflight = 0
        self.metrics = ServeMetrics()
        openai_api.set_backend(self)

    async def call(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def run(self, target: Target, job: dict) -> AsyncIterator[dict]:
        """The engine's events for one job; retried on another replica if its replica died before any output.

        Admission is decided here, exactly: at most `capacity` requests (replicas x max_ongoing_requests +
        max_queued_requests) are in flight, the next is refused at once with 429. Serve's own queue limit stays
        as a backstop, but its router counts a request as queued until it is assigned, so a burst within the
        limits can be refused there while slots are about to free up; an admitted request is retried instead.
        """
        if self.inflight >= self.capacity:
            raise self._busy()
        self.inflight += 1
        try:
            async for ev in self._run(target, job):
                yield ev
        finally:
            self.inflight -= 1

    def _busy(self) -> TooManyRequests:
        return TooManyRequests(f"every engine replica is busy and its queue is full ({self.inflight} requests in "
                               f"flight; max_ongoing_requests {self.spec.max_ongoing_requests} per replica, "
                               f"max_queued_requests {self.spec.max_queued_requests}); retry after a moment.")

    async def _run(self, target: Target, job: dict) -> AsyncIterator[dict]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        died = busy = 0
        while True:
            started = False
            try:
                if job.get("stream"):
                    handle = self.engine.options(stream=True, multiplexed_model_id=target.key or "")
                    async for ev in handle.generate.remote(target.key, job):
                        started = True
                        yield ev
                else:  # one reply instead of an object per step: the non-streamed path's main overhead
                    handle = self.engine.options(multiplexed_model_id=target.key or "")
                    yield await handle.generate_all.remote(target.key, job)
                return
            except BackPressureError:
                busy += 1
                if busy > BUSY_RETRIES:  # replicas gone or scaled down: Serve's limit is the real one now
                    raise self._busy() from None
                await asyncio.sleep(0.025 * 2 ** busy)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                died += 1
                if started or died == 3:
                    raise OverloadedError(f"the engine replica serving this request died ({type(exc).__name__}); "
                                          "retry the request.") from None
                await asyncio.sleep(0.5 * died)

    async def stats(self) -> dict:
        return {"ok": True}

    async def metrics_text(self) -> bytes:
        """Prometheus text; the engine gauges refreshed from one replica (others report with their requests)."""
        self.metrics.inflight.set(self.inflight)
        try:
            self.metrics.engine_stats(await asyncio.wait_for(self.engine.stats.remote(), 2.0))
        except Exception:  # noqa: BLE001 - a busy or restarting replica: its last reported values stay
            pass
        return self.metrics.render()


def build_app(spec: ServeConfig, env: dict[str, str], api_key: Optional[str]):
    """The bound Serve application for `spec`; `env` less its secrets reaches every replica (endpoints).

    Ray shows and logs actor options, so replicas find credentials in their node's environment or the stack's
    0600 state file; the API key reaches the ingress only as an init argument (in memory), never in the spec.
    """
    runtime_env = {"env_vars": without_secrets(env)}
    engine_opts: dict[str, Any] = dict(
        max_ongoing_requests=spec.max_ongoing_requests, max_queued_requests=spec.max_queued_requests,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "runtime_env": runtime_env})
    if spec.autoscaling:
        engine_opts["autoscaling_config"] = spec.autoscaling.model_dump()
    else:
        engine_opts["num_replicas"] = spec.num_replicas
    public = spec.model_dump(exclude={"api_key"})
    if spec.task == "text_to_image":
        from peftray.serve.image_replica import ImageEngine

        engine = ImageEngine.options(**engine_opts).bind(public)
    elif spec.task in CLASSIFY_TASKS:
        from peftray.serve.classify_replica import ClassifierEngine

        engine = ClassifierEngine.options(**engine_opts).bind(public)
    else:
        engine = AdapterEngine.options(**engine_opts).bind(public)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env}).bind(
        engine, public, api_key)


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder for `serve run` / `serveConfigV2` (KubeRay's RayService).

    `args` holds the fields of a serve spec (see `peftray.serve.serve_spec.ServeConfig`); endpoints and credentials
    come from the environment of the cluster's nodes (`PEFTRAY_*`, `MLFLOW_*`, `AWS_*`), and the API key from
    `api_key` or `PEFTRAY_SERVE_API_KEY`. A serve application without a key is refused.

        import_path: peftray.serve.app:app_builder
        args: {base_model: s3://peftray/models/tiny-llama, adapters: ["*"], num_gpus: 1, device: cuda}
    """
    from peftray.endpoints import load_config
    from peftray.serve.serve_spec import load_serve_config

    spec = load_serve_config(dict(args or {}))
    api_key = spec.api_key or os.environ.get("PEFTRAY_SERVE_API_KEY")
    if not api_key:
        raise PeftrayError("the serve application needs an API key: set `api_key` in its args or "
                           "PEFTRAY_SERVE_API_KEY in the cluster's environment")
    return build_app(spec, load_config().env(), api_key)
