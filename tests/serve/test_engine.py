"""The continuous-batching engine in-process (no Ray): per-row adapters, KV cache joins, slots, limits."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from peftray.errors import ConfigError
from peftray.serve.engine import GenerationEngine, SamplingParams
from peftray.serve.slots import OverloadedError
from serve_helpers import hf_generate, make_lora, make_prompt_adapter

PROMPTS = ["hello there", "the quick brown fox jumps over", "a", "one two three four five six seven"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    out = {f"lora{i}": make_lora(tiny_model, root / f"lora{i}", seed=i) for i in range(3)}
    out["prompt"] = make_prompt_adapter(tiny_model, root / "prompt", 7, "prompt")
    out["prefix"] = make_prompt_adapter(tiny_model, root / "prefix", 8, "prefix")
    return out


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every engine here runs torch on one thread, as a Serve replica does; the next test gets its setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _engine(tiny_model, tok, **kw) -> GenerationEngine:
    from transformers import AutoModelForCausalLM

    return GenerationEngine(AutoModelForCausalLM.from_pretrained(tiny_model), tok, **kw)


def _wait_until(cond, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.05)


def _run_concurrently(engine, jobs):
    """Submit every (prompt ids, adapter) at once so they share forward passes; returns token lists in order."""
    results = [None] * len(jobs)

    def go(i, ids, ad):
        results[i] = engine.generate(ids, GREEDY, ad).token_ids

    threads = [threading.Thread(target=go, args=(i, ids, ad)) for i, (ids, ad) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_each_row_matches_hf_peft_alone_and_in_a_mixed_batch(tiny_model, tok, adapters):
    engine = _engine(tiny_model, tok, max_batch_size=16)
    try:
        names = ["lora0", "lora1", "prompt", "prefix"]
        slots = {n: engine.slots.acquire(n, adapters[n]) for n in names}
        ids = [tok.encode(p) for p in PROMPTS]
        ref = {(n, i): hf_generate(tiny_model, adapters[n], ids[i], 10) for n in names for i in range(len(ids))}
        ref.update({(None, i): hf_generate(tiny_model, None, ids[i], 10) for i in range(len(ids))})
        # the adapters really differ: same prompt, different answers
        assert len({tuple(ref[(n, 1)]) for n in [None, *names]}) == 5, {n: ref[(n, 1)] for n in [None, *names]}
        alone = {(n, i): engine.generate(ids[i], GREEDY, slots.get(n)).token_ids for n, i in ref}
        assert alone == ref
        keys = list(ref)
        steps_before = engine.steps
        mixed = _run_concurrently(engine, [(ids[i], slots.get(n)) for n, i in keys])
        assert dict(zip(keys, mixed)) == ref
        # shared forward passes: far fewer steps than 20 requests x 10 tokens one after another
        assert engine.steps - steps_before < len(keys) * 10 / 2
    finally:
        engine.close()


def test_lru_eviction_keeps_answers_right(tiny_model, tok, adapters):
    engine = _engine(tiny_model, tok, max_adapters=2)
    try:
        ids = tok.encode(PROMPTS[1])
        ref = {n: hf_generate(tiny_model, adapters[n], ids, 10) for n in ("lora0", "lora1", "lora2")}
        for n in ["lora0", "lora1", "lora2", "lora0", "lora2", "lora1"]:
            slot = engine.slots.acquire(n, adapters[n])
            assert engine.generate(ids, GREEDY, slot).token_ids == ref[n]
            assert len(engine.slots.keys()) <= 2
        assert engine.slots.evictions >= 3
        assert engine.slots.keys()[-1] == "lora1"
        # a pinned slot is never evicted: with both slots pinned a third adapter is refused
        engine.slots.acquire("lora1", adapters["lora1"])
        engine.slots.acquire("lora2", adapters["lora2"])
        with pytest.raises(OverloadedError):
            engine.slots.acquire("lora0", adapters["lora0"])
    finally:
        engine.close()


def test_stop_sequences_max_tokens_and_limits(tiny_model, tok):
    engine = _engine(tiny_model, tok, max_queue=1)
    try:
        ids = tok.encode(PROMPTS[0])
        full = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0))
        assert full.finish_reason == "length" and full.completion_tokens == 12
        text = tok.decode(full.token_ids, skip_special_tokens=True)
        stop = text[len(text) // 2: len(text) // 2 + 2]
        cut = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
        assert cut.finish_reason == "stop"
        with pytest.raises(ConfigError, match="maximum context length"):
            engine.generate(list(range(5, 505)), SamplingParams(max_tokens=20))
        a = engine.generate(ids, SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8, seed=3)).token_ids
        b = engine.generate(ids, SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8, seed=3)).token_ids
        assert a == b
    finally:
        engine.close()


def test_queue_limit_refuses_fast(tiny_model, tok):
    engine = _engine(tiny_model, tok, max_queue=2, max_batch_size=1)
    try:
        ids = tok.encode(PROMPTS[0])
        events = []
        refused = 0
        for _ in range(20):
            try:
                engine.submit(ids, SamplingParams(max_tokens=50), None, events.append)
            except OverloadedError:
                refused += 1
        assert refused >= 15
    finally:
        engine.close()


def test_loading_an_adapter_while_a_row_finishes_does_not_deadlock(tiny_model, tok, adapters):
    """A load holds the slot table while it waits for the model; a row finishing meanwhile (the engine thread
    holds the model and releases the row's slot) must not wait for the slot table: no lock-order cycle."""

    class SlowLoad(GenerationEngine):
        def add_lora(self, internal, config, state):
            time.sleep(1.0)  # the row below finishes while this load holds the slot table
            super().add_lora(internal, config, state)

    from transformers import AutoModelForCausalLM

    engine = SlowLoad(AutoModelForCausalLM.from_pretrained(tiny_model), tok)
    try:
        ids = tok.encode(PROMPTS[1])
        slot = engine.slots.acquire("lora0", adapters["lora0"])
        ref = hf_generate(tiny_model, adapters["lora0"], ids, 40)
        done: list = []
        row = threading.Thread(target=lambda: done.append(
            engine.generate(ids, SamplingParams(max_tokens=40, temperature=0.0), slot).token_ids))
        loader = threading.Thread(target=lambda: done.append(engine.slots.acquire("lora1", adapters["lora1"]).key))
        row.start()
        loader.start()
        row.join(30)
        loader.join(30)
        assert not row.is_alive() and not loader.is_alive(), "the engine deadlocked"
        assert sorted(map(str, done)) == sorted([str(ref), "lora1"])
        assert engine.generate(ids, GREEDY, engine.slots.acquire("lora1", adapters["lora1"])).token_ids == \
            hf_generate(tiny_model, adapters["lora1"], ids, 10)
    finally:
        engine.close()


def test_stall_detector_sees_a_stuck_step_and_clears_when_it_moves(tiny_model, tok):
    engine = _engine(tiny_model, tok)
    try:
        ids = tok.encode(PROMPTS[0])
        engine.generate(ids, GREEDY)
        _wait_until(lambda: engine.stalled_for() == 0.0, "idle (the loop ends its step after the answer is out)")
        done = threading.Event()
        with engine._model_lock:  # the next step cannot run: what a hung step looks like from outside
            engine.submit(ids, GREEDY, None, lambda ev: ev.finished and done.set())
            _wait_until(lambda: engine.stalled_for() >= 0.5, "the stall seen (work waiting, no step for 0.5 s)")
        assert done.wait(30)
        assert engine.stalled_for() < 0.5
    finally:
        engine.close()


def test_a_request_cancelled_during_its_adapter_load_leaves_no_pin(tiny_model, tok, adapters):
    import asyncio

    started, release = threading.Event(), threading.Event()

    class HeldLoad(GenerationEngine):
        def add_lora(self, internal, config, state):
            started.set()
            assert release.wait(60), "the test never let the load finish"  # held until the request is cancelled
            super().add_lora(internal, config, state)

    from transformers import AutoModelForCausalLM

    engine = HeldLoad(AutoModelForCausalLM.from_pretrained(tiny_model), tok, max_adapters=1)
    try:
        async def cancelled_mid_load():
            task = asyncio.ensure_future(engine.slots.acquire_async("lora0", adapters["lora0"]))
            assert await asyncio.to_thread(started.wait, 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            # The load finishes in its thread; its pin is dropped by a callback on this loop, so keep it running.
            deadline = time.monotonic() + 60
            while _pins(engine, "lora0") != 0:
                assert time.monotonic() < deadline, f"lora0 still pinned: {_pins(engine, 'lora0')}"
                await asyncio.sleep(0.05)

        asyncio.run(cancelled_mid_load())
        assert engine.slots.keys() == ["lora0"]
        # nothing pins it: a second adapter can take the only slot
        assert engine.slots.acquire("lora1", adapters["lora1"]).key == "lora1"
        assert engine.slots.keys() == ["lora1"]
    finally:
        release.set()
        engine.close()


def _pins(engine, key: str) -> int | None:
    """Pins of a loaded adapter; None while it is not loaded."""
    slot = engine.slots._slots.get(key)  # noqa: SLF001 - the pin count is the state under test
    return None if slot is None else slot.pins


def test_penalties_and_logprobs_match_float64_reference(tiny_model, tok, adapters):
    from serve_helpers import reference_steps

    engine = _engine(tiny_model, tok)
    try:
        slot = engine.slots.acquire("lora1", adapters["lora1"])
        ids = tok.encode(PROMPTS[1])
        params = SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7,
                                logprobs=3)
        got = engine.generate(ids, params, slot)
        want, logps = reference_steps(tiny_model, adapters["lora1"], ids, 12, presence=1.5, frequency=0.7)
        plain, _ = reference_steps(tiny_model, adapters["lora1"], ids, 12)
        assert want != plain  # the penalties change the answer, so the comparison below tests them
        assert got.token_ids == want
        for entry, token, ref in zip(got.logprobs, want, logps):
            assert entry["id"] == token and abs(entry["logprob"] - float(ref[token])) < 1e-4
            top = torch.topk(ref, 3)
            assert [i for i, _ in entry["top"]] == top.indices.tolist()
            assert max(abs(lp - float(v)) for (_, lp), v in zip(entry["top"], top.values)) < 1e-4
    finally:
        engine.close()


def test_json_schema_output_always_validates_with_random_adapters(tiny_model, tok, adapters):
    import json

    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
    engine = _engine(tiny_model, tok, max_batch_size=16)
    try:
        slots = [None] + [engine.slots.acquire(n, adapters[n]) for n in ("lora0", "lora1", "prompt")]
        results = [None] * 12

        def go(i):  # constrained and free rows of different adapters share the forward passes
            params = SamplingParams(max_tokens=80, temperature=1.0, seed=i)
            results[i] = engine.generate(tok.encode(PROMPTS[i % 4]), params, slots[i % 4],
                                         schema=schema if i % 3 else None)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, ev in enumerate(results):
            if i % 3:
                assert ev.finish_reason == "stop", (i, tok.decode(ev.token_ids))
                jsonschema.validate(json.loads(tok.decode(ev.token_ids)), schema)
        free = [tok.decode(results[i].token_ids) for i in range(0, 12, 3)]
        assert not any(_parses(t) for t in free), free  # unconstrained, these random models write no JSON
        with pytest.raises(ConfigError, match="response_format"):
            engine.generate(tok.encode("x"), GREEDY, None, schema={"type": "no-such-type"})
    finally:
        engine.close()


def _parses(text: str) -> bool:
    import json

    try:
        json.loads(text)
        return True
    except ValueError:
        return False
