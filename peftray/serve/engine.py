"""The continuous-batching generation engine of one replica: many requests, many adapters, one base model.

A background thread runs the loop: take new requests (up to `max_batch_size` rows in all), prefill them,
then one decode step for every running row in ONE forward pass whose LoRA layers apply each row's own
adapter (`adapter_names`, the mixed-adapter kernel of `peftray.ops`). Finished rows leave and new ones
join between decode steps; the KV cache keeps every row (see `peftray.serve.kv`). Prompt-tuning rows
prefill together (virtual tokens in front of their embeddings), prefix-tuning rows one by one (their
prefix is a prefilled cache); after prefill every row decodes in the same batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from peftray.errors import ConfigError
from peftray.serve import kv as kvops
from peftray.serve.engine_queue import EngineQueue
from peftray.serve.grammar import GrammarCompiler, RowGrammar, mask_rows
from peftray.serve.sampling import penalize, token_logprobs
from peftray.serve.slots import (
    AdapterSlots, LoadedAdapter, LoraHost, OverloadedError, check_text_adapter, prompt_tensors,
)
from peftray.tuners.mixed import fixed_adapter_weights

BASE = "__base__"


@dataclass
class SamplingParams:
    """OpenAI sampling fields, checked by the API layer."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # None: none; k: the chosen token's logprob and the k most likely


@dataclass
class Event:
    """What a request hears after each step: new text, and at the end why it stopped (or the error)."""

    text: str = ""
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # per token in token_ids, when params.logprobs is set
    error: Optional[BaseException] = None


@dataclass(eq=False)
class _Row:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Optional[LoadedAdapter]
    on_event: Callable[[Event], None]
    generator: Optional[torch.Generator] = None
    grammar: Optional[RowGrammar] = None  # structured output: masks this row's logits
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    lp_seen: int = 0  # characters of the output attributed to logprob entries
    emitted: int = 0
    reported: int = 0  # out_ids already handed to on_event
    cancelled: bool = False
    done: bool = False

    @property
    def lora_name(self) -> str:
        return self.adapter.internal if self.adapter is not None and self.adapter.kind == "lora" else BASE

    @property
    def kind(self) -> str:
        return self.adapter.kind if self.adapter is not None else "lora"


class GenerationEngine(EngineQueue, LoraHost):
    """Continuous batching over a causal LM with adapters in slots.

    Args:
        model: a transformers causal LM (eval mode; the engine wraps it in a PeftModel when a LoRA arrives).
        tokenizer: its tokenizer (decoding, EOS).
        max_batch_size: most rows in one forward pass.
        max_queue: requests waiting to join the batch; more are refused with OverloadedError.
        max_adapters: adapter slots (LRU).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 max_adapters: int = 8) -> None:
        self.base = model.eval()
        self.peft = None  # PeftModel holding the LoRA slots, made on the first LoRA adapter
        self.tokenizer = tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.slots = AdapterSlots(self, max_adapters)
        self.grammars = GrammarCompiler(tokenizer, int(model.config.vocab_size))
        self._dormant: Optional[str] = None  # last LoRA evicted but kept: a PeftModel needs one adapter
        self._model_lock = threading.RLock()
        # adapter weights change only through add_lora/remove_lora (which replace this): each step checks the
        # stacked adapter copies once per scope instead of reading every weight's version (peftray.tuners.lora.stack)
        self._weights_scope = object()
        self._cv = threading.Condition()
        self._pending: list[_Row] = []
        self._rows: list[_Row] = []
        self._kv: Optional[kvops.BatchKV] = None
        self._closed = False
        self.steps = self.tokens = 0
        self.last_step = time.monotonic()  # when the loop last finished a step (or went idle)
        self._stepping = False  # the loop took work and has not finished that step yet
        self._thread = threading.Thread(target=self._loop, name="peftray-engine", daemon=True)
        self._thread.start()

    # --- adapters (called by AdapterSlots) --------------------------------------------------------
    def check_adapter(self, key: str, config, state: dict) -> None:
        check_text_adapter(key, config, state, self.base)

    def prompt_tensors(self, config, state: dict):
        return prompt_tensors(config, state, self.base.config, self.dtype, self.device)

    def loaded_adapters(self) -> list[str]:
        return self.slots.keys()

    # --- requests ---------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams, adapter: Optional[LoadedAdapter]) -> None:
        """ConfigError when the request cannot fit the model's context."""
        virtual = adapter.virtual_tokens if adapter is not None else 0
        need = len(prompt_ids) + virtual + params.max_tokens
        if not prompt_ids:
            raise ConfigError("the prompt is empty; send at least one token of text.")
        if need > self.max_context:
            raise ConfigError(f"this model's maximum context length is {self.max_context} tokens, but the request "
                              f"needs {need} ({len(prompt_ids)} in the prompt, {virtual} virtual, {params.max_tokens} "
                              "max_tokens). Shorten the prompt or lower max_tokens.")

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: Optional[LoadedAdapter],
               on_event: Callable[[Event], None], schema: Optional[dict] = None, schema_field: str = "") -> _Row:
        """Queue a request; `on_event` is called from the engine thread after each of its steps.

        `schema`: a JSON schema the output is decoded under (structured output; `schema_field` names the
        request field in errors).

        Raises:
            ConfigError: it does not fit the context, or the schema cannot be enforced. OverloadedError: the
            queue is full.
        """
        self.check(prompt_ids, params, adapter)
        grammar = self.grammars.matcher(schema, schema_field or "response_format") if schema is not None else None
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        row = _Row(list(prompt_ids), params, adapter, on_event, generator=gen, grammar=grammar)
        return self._enqueue(row)

    def cancel(self, row: _Row) -> None:
        row.cancelled = True

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: Optional[LoadedAdapter] = None,
                 schema: Optional[dict] = None) -> Event:
        """Blocking helper (tests, benchmarks): run one request to the end and return its final event."""
        done = threading.Event()
        final: list[Event] = []
        ids: list[int] = []
        lps: list[dict] = []

        def on_event(ev: Event) -> None:
            ids.extend(ev.token_ids)
            lps.extend(ev.logprobs)
            if ev.finished:
                final.append(ev)
                done.set()

        self.submit(prompt_ids, params, adapter, on_event, schema=schema)
        done.wait()
        final[0].token_ids, final[0].logprobs = ids, lps
        if final[0].error is not None:
            raise final[0].error
        return final[0]

    def _in_flight(self) -> bool:
        return bool(self._rows)

    @property
    def running(self) -> int:
        return len(self._rows)

    # --- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._rows and not self._closed:
                    self._cv.wait()
                    self.last_step = time.monotonic()
                if self._closed:
                    break
                room = self.max_batch_size - len(self._rows)
                new, self._pending = self._pending[:room], self._pending[room:]
                self._stepping = True
            try:
                with self._model_lock, torch.inference_mode():
                    self._drop_finished()
                    if new:
                        self._admit([r for r in new if not r.cancelled])
                    # counted before it runs: a request its last step finishes wakes a caller who may read it
                    self.steps += 1
                    if self._rows:
                        self._decode()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, never the loop
                for row in self._rows + new:
                    self._finish(row, None, error=exc)
                self._rows, self._kv = [], None
            finally:
                self.last_step, self._stepping = time.monotonic(), False
        self._fail_all(OverloadedError("the engine shut down; retry on another replica."))

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            rows, self._pending = self._rows + self._pending, []
        for row in rows:
            self._finish(row, None, error=exc)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not (r.done or r.cancelled)]
        if len(keep) != len(self._rows):
            for r in self._rows:
                if r.cancelled and not r.done:
                    self._finish(r, "cancelled")
            self._rows = [self._rows[i] for i in keep]
            self._kv = kvops.select(self._kv, keep) if self._kv is not None else None

    def _forward(self, rows: list[_Row], mask, positions, cache, input_ids=None, inputs_embeds=None):
        """One model call for `rows`; returns the last position's logits [rows, vocab]."""
        kwargs = dict(attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        if self.peft is not None:
            with fixed_adapter_weights(self._weights_scope):
                out = self.peft(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                adapter_names=[r.lora_name for r in rows], **kwargs)
        else:
            out = self.base(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        return out.logits[:, -1, :]

    def _admit(self, new: list[_Row]) -> None:
        groups = [[r for r in new if r.kind == "lora"], [r for r in new if r.kind == "prompt"]]
        groups += [[r] for r in new if r.kind == "prefix"]
        for rows in groups:
            if rows:
                kv, logits = self._prefill(rows)
                self._kv = kvops.concat(self._kv, kv)
                self._rows.extend(rows)
                self._emit(rows, logits)
        self._drop_finished()

    def _prefill(self, rows: list[_Row]):
        from transformers import DynamicCache

        kind = rows[0].kind
        if kind == "prefix":  # the prefix is a prefilled cache of n real positions
            row, prefix = rows[0], rows[0].adapter.prefix
            n, length = row.adapter.virtual_tokens, len(row.prompt_ids)
            cache = DynamicCache([(k.clone(), v.clone()) for k, v in prefix])
            ids = torch.tensor([row.prompt_ids], dtype=torch.long, device=self.device)
            mask = torch.ones(1, n + length, dtype=torch.long, device=self.device)
            pos = torch.arange(n, n + length, device=self.device).unsqueeze(0)
            logits = self._forward(rows, mask, pos, cache, input_ids=ids)
            return kvops.BatchKV.from_cache(cache, mask), logits
        cache = DynamicCache()
        if kind == "prompt":
            embeds, mask = self._prompt_embeds(rows)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = self._forward(rows, mask, pos, cache, inputs_embeds=embeds)
        else:
            ids, mask = kvops.left_pad_ids([r.prompt_ids for r in rows], self.pad_id, self.device)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = self._forward(rows, mask, pos, cache, input_ids=ids)
        return kvops.BatchKV.from_cache(cache, mask), logits

    def _prompt_embeds(self, rows: list[_Row]):
        embed = self.base.get_input_embeddings()
        seqs = [torch.cat([r.adapter.prompt, embed(torch.tensor(r.prompt_ids, device=self.device))]) for r in rows]
        t = max(s.shape[0] for s in seqs)
        out = torch.zeros(len(rows), t, seqs[0].shape[1], dtype=seqs[0].dtype, device=self.device)
        mask = torch.zeros(len(rows), t, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            out[i, t - s.shape[0]:] = s
            mask[i, t - s.shape[0]:] = 1
        return out, mask

    def _decode(self) -> None:
        ids = torch.tensor([[r.out_ids[-1]] for r in self._rows], dtype=torch.long, device=self.device)
        mask, pos, cache = self._kv.extended_mask(1), self._kv.positions(1), self._kv.to_cache()
        logits = self._forward(self._rows, mask, pos, cache, input_ids=ids)
        self._kv = kvops.BatchKV.from_cache(cache, mask)
        self._emit(self._rows, logits)
        self._drop_finished()

    # --- tokens out -------------------------------------------------------------------------------
    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
        masked = dict(zip(constrained, mask_rows([rows[i].grammar for i in constrained], logits[constrained]))) \
            if constrained else {}  # all constrained rows' grammar masks at once
        for i, (row, row_logits) in enumerate(zip(rows, logits)):
            p = row.params
            # the mask's -inf stay -inf under the penalties: masking first equals penalizing first
            adjusted = penalize(masked.get(i, row_logits), row.out_ids, p.presence_penalty, p.frequency_penalty)
            token = kvops.sample(adjusted, p.temperature, p.top_p, row.generator)
            self.tokens += 1
            if token in self.eos_ids:
                self._finish(row, "stop")
                continue
            if row.grammar is not None:
                row.grammar.accept(token)
            row.out_ids.append(token)
            text = self.tokenizer.decode(row.out_ids, skip_special_tokens=True)
            if p.logprobs is not None:  # the token's text: what it adds to the decoded output (a character split
                stable = text.rstrip("\ufffd")  # over tokens goes to the token that completes it)
                piece, row.lp_seen = stable[row.lp_seen:], max(row.lp_seen, len(stable))
                row.logprobs.append({**token_logprobs(row_logits, token, p.logprobs), "text": piece})
            cut = min((i for i in (text.find(s) for s in p.stop if s) if i >= 0), default=-1)
            if cut >= 0:
                self._finish(row, "stop", text[:cut])
            elif row.grammar is not None and row.grammar.finished:
                self._finish(row, "stop", text)
            elif len(row.out_ids) >= p.max_tokens:
                self._finish(row, "length", text)
            else:
                self._send(row, text)

    def _unreported(self, row: _Row) -> tuple[list[int], list[dict]]:
        ids, lps, row.reported = row.out_ids[row.reported:], row.logprobs[row.reported:], len(row.out_ids)
        return ids, lps

    def _send(self, row: _Row, text: str) -> None:
        hold = max((len(s) - 1 for s in row.params.stop), default=0)  # a stop string may be starting
        safe = len(text) - hold
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            safe = min(safe, len(text) - 1)
        delta = text[row.emitted:safe] if safe > row.emitted else ""
        row.emitted = max(row.emitted, safe)
        ids, lps = self._unreported(row)
        row.on_event(Event(text=delta, token_ids=ids, logprobs=lps, prompt_tokens=len(row.prompt_ids),
                           completion_tokens=len(row.out_ids)))

    def _finish(self, row: _Row, reason: Optional[str], text: Optional[str] = None,
                error: Optional[BaseException] = None) -> None:
        if row.done:
            return
        row.done = True
        if text is None:
            text = self.tokenizer.decode(row.out_ids, skip_special_tokens=True) if error is None else ""
        delta = text[row.emitted:] if len(text) > row.emitted else ""
        if row.logprobs and len(text) > row.lp_seen:  # an unfinished character at the end: the last token's
            row.logprobs[-1]["text"] += text[row.lp_seen:]
        if row.adapter is not None:
            self.slots.release(row.adapter)
        ids, lps = self._unreported(row)
        try:
            row.on_event(Event(text=delta, finished=True, finish_reason=reason, prompt_tokens=len(row.prompt_ids),
                               completion_tokens=len(row.out_ids), error=error, token_ids=ids, logprobs=lps))
        except Exception:  # noqa: BLE001 - a consumer that went away must not stop the loop
            pass


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}
