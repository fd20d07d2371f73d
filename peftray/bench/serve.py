"""`peftray bench serve`: the serving engine against its baselines, in one run (CPU or GPU).

Per model (the tiny Llama and a hidden-512 Llama config), in-process, greedy, same workload:
- mixed: 32 concurrent requests spread over 16 LoRA adapters, tokens/s ÷ the same 32 on ONE adapter (goal >= 0.8);
- the mixed workload ÷ HF PEFT in one process, `set_adapter` + `generate` per request (goal >= 5);
- adapter latency in-process: a request whose adapter is not loaded yet (cold: read from disk into a slot) vs
  loaded (warm);
- structured output: tokens/s of a batch under a JSON schema ÷ the same batch free (arms alternated; goal >= 0.8).
Through Ray Serve on the local stack (the running one, or a temporary one; `--no-http` skips this part), tiny model:
- cold from S3: the first request for a registered adapter (MLflow lookup, verified S3 fetch into an empty cache,
  slot load, generation) vs warm (the same request again), p50/p99 over HTTP;
- Serve's HTTP overhead: a warm request through the OpenAI route ÷ the same generation called in-process; beside
  each, the floor: a request to a FastAPI replica that answers at once (`_serve_floor`), so (in-process + floor)
  ÷ in-process is the least that ratio can be through Serve's proxy on this machine;
- load: `--requests` streamed clients over `--adapters` adapters through HTTP (p50/p99, TTFT, tokens/s) ÷ the same
  requests on the engine in-process (goal >= 0.85); after each round, the floor: the same clients streaming from
  the floor replica, which sends one-token chunks at the pace the in-process engine gave each row in that round
  and does no other work, so its tokens/s ÷ in-process is the most that ratio can be through Serve's proxy here;
- overload: 10x the deployment's capacity at once; refusal latency p50/p99 (goal p99 <= 1 s), all accepted succeed.
`--url URL --api-key KEY --model M` drives any OpenAI-compatible server with the same streamed load instead.
Writes bench-results/serve.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from peftray.bench._serve_load import drive, refusals, structured_vs_free
from peftray.bench._tuners_setup import peft_baseline

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _models(root: Path, quick: bool) -> dict[str, Path]:
    from peftray.base_models import TinyLlamaSpec, make_tiny_llama

    out = {"tiny": make_tiny_llama(root / "tiny")}
    if not quick:
        out["llama-h512"] = make_tiny_llama(root / "h512", TinyLlamaSpec(
            hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4))
    return out


def _adapters(base_dir: Path, root: Path, n: int) -> list[Path]:
    import peftray
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(n):
        torch.manual_seed(i)
        m = peftray.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                   peftray.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
        m.save_pretrained(root / f"a{i}")
        out.append(root / f"a{i}")
    return out


def _run_engine(engine, jobs, params) -> tuple[float, int]:
    """Submit all jobs at once; (seconds, completion tokens)."""
    done = []
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda j=j: done.append(engine.generate(j[0], params, j[1])))
               for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(ev.completion_tokens for ev in done)


def _hf_peft(base_dir: Path, folders: list[Path], jobs_idx, prompts, max_new: int) -> tuple[float, int]:
    peft = peft_baseline("serve")
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(folders[0]),
                                           adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        model.load_adapter(str(f), adapter_name=f"a{i}")
    model.eval()
    tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for ids, a in zip(prompts, jobs_idx):
            model.set_adapter(f"a{a}")
            t = torch.tensor([ids])
            out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=0)
            tokens += out.shape[1] - t.shape[1]
    return time.perf_counter() - start, tokens


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def _latency(engine, folders: list[Path], ids, params, reps: int) -> dict[str, float]:
    cold, warm = [], []
    for r in range(reps):
        key = f"cold-{r}"
        start = time.perf_counter()
        slot = engine.slots.acquire(key, folders[r % len(folders)])
        engine.generate(ids, params, slot)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.generate(ids, params, engine.slots.acquire(key, folders[r % len(folders)]))
        warm.append(time.perf_counter() - start)

    return {"cold_p50_ms": _pct(cold, 0.5), "cold_p99_ms": _pct(cold, 0.99), "warm_p50_ms": _pct(warm, 0.5),
            "warm_p99_ms": _pct(warm, 0.99)}


def bench_model(name: str, base_dir: Path, root: Path, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftray.serve.engine import GenerationEngine, SamplingParams

    tok = AutoTokenizer.from_pretrained(base_dir)
    folders = _adapters(base_dir, root / name, args.adapters)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = GenerationEngine(AutoModelForCausalLM.from_pretrained(base_dir).to(device), tok,
                              max_batch_size=args.requests, max_queue=4 * args.requests,
                              max_adapters=args.adapters + 4)
    try:
        slots = [engine.slots.acquire(f"a{i}", f) for i, f in enumerate(folders)]
        prompts = [tok.encode(f"request {i}: the quick brown fox jumps over the lazy dog")
                   for i in range(args.requests)]
        # min_tokens by banning EOS would change the model; random weights rarely emit it within max_tokens
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        _run_engine(engine, [(prompts[0], slots[0])] * 4, params)  # warm-up
        idx = [i % args.adapters for i in range(args.requests)]
        t_mixed, n_mixed = _run_engine(engine, [(p, slots[a]) for p, a in zip(prompts, idx)], params)
        t_single, n_single = _run_engine(engine, [(p, slots[0]) for p in prompts], params)
        t_hf, n_hf = _hf_peft(base_dir, folders, idx, prompts, args.max_tokens)
        lat = _latency(engine, folders, prompts[0], params, args.latency_reps)
        # the cold-latency loads above may have evicted a0: acquire it again (a no-op when still loaded)
        structured = structured_vs_free(engine, tok, engine.slots.acquire("a0", folders[0]), min(args.requests, 16),
                                        args.max_tokens, args.structured_reps)
    finally:
        engine.close()
    mixed, single, hf = n_mixed / t_mixed, n_single / t_single, n_hf / t_hf
    return {"model": name, "device": device, "mixed_tok_s": mixed, "single_adapter_tok_s": single,
            "hf_peft_set_adapter_tok_s": hf, "mixed_over_single": mixed / single, "mixed_over_hf_peft": mixed / hf,
            **lat, **structured}


def bench_http(base_dir: Path, root: Path, args) -> dict:
    """Cold (from S3) / warm request latency through Serve, and Serve's overhead over the in-process engine.

    The in-process engines live beside the deployment for the whole run, so each HTTP sample is paired with an
    in-process sample taken right after it (this machine is shared and noisy): the 8-token latencies alternate
    request by request, the load alternates over `--load-reps` rounds and reports the median ratio and its spread.
    """
    import dataclasses
    import statistics
    import uuid

    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftray.bench import _serve_floor
    from peftray.bench.common import local_stack
    from peftray.registry import register_adapter
    from peftray.serve import ServeConfig, deploy, down
    from peftray.serve.engine import SamplingParams

    prompt, max_tokens, reps = "the quick brown fox jumps over the lazy dog", 8, args.latency_reps
    folders = _adapters(base_dir, root / "http", max(reps, args.adapters))
    tag = uuid.uuid4().hex[:6]
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids, params = tok.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)
    # one engine for both in-process arms: the 8-token request on its first adapter, the load over all of them
    local_engine = _InProcess(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tok, folders[:args.adapters],
                              batch=args.requests)
    try:
        local_engine.generate(ids, params, 0)  # warm-up
        with local_stack("peftray-bench-serve-", ray_num_cpus=4) as cfg:
            # an empty adapter cache for the replica: every first request really reads from S3
            cfg = dataclasses.replace(cfg, cache_dir=root / "serve-cache")
            names = [f"bench{tag}-{i}" for i in range(len(folders))]
            for f, n in zip(folders, names):
                register_adapter(f, n, base_model=str(base_dir), config=cfg)
            # capacity = max_ongoing + max_queued = the concurrent clients of the load run
            spec = ServeConfig(name=f"bench{tag}", base_model=str(base_dir),
                               max_adapters_per_replica=len(names) + 1, num_cpus=0, torch_threads=args.threads,
                               api_key=f"bench-key-{tag}", max_batch_size=args.requests,
                               max_ongoing_requests=args.requests // 2,
                               max_queued_requests=args.requests - args.requests // 2)
            dep = deploy(spec, cfg, wait_s=300)
            floor_name = f"floor{tag}"
            try:
                _serve_floor.start(floor_name)
                with httpx.Client(base_url=dep.url, headers={"Authorization": f"Bearer {dep.api_key}"},
                                  timeout=120) as http:
                    def ask(model: str) -> tuple[float, int]:
                        t0 = time.perf_counter()
                        r = http.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                               "max_tokens": max_tokens, "temperature": 0})
                        r.raise_for_status()
                        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

                    ask(f"{names[0]}/1")  # the replica's first request (torch warm-up) is not a cold sample
                    cold, warm = [], []
                    for n in names[1:reps]:
                        cold.append(ask(f"{n}/1")[0])
                        warm.append(ask(f"{n}/1")[0])
                    floor_url = f"http://127.0.0.1:{dep.port}/{floor_name}/v1/completions"

                    def ask_floor() -> float:
                        t0 = time.perf_counter()
                        http.post(floor_url, json={"model": "floor", "prompt": prompt,
                                                   "max_tokens": max_tokens}).raise_for_status()
                        return time.perf_counter() - t0

                    ask_floor()
                    served, local, floor = [], [], []
                    for _ in range(reps * 2):  # paired: one through HTTP, the same in this process, the floor
                        served.append(ask(f"{names[0]}/1"))
                        t0 = time.perf_counter()
                        ev = local_engine.generate(ids, params, 0)
                        local.append(time.perf_counter() - t0)
                        floor.append(ask_floor())
                mixed = [f"{n}/1" for n in names[:args.adapters]]
                drive(dep.url, dep.api_key, mixed, args.adapters, args.adapters, args.max_tokens)  # every adapter
                local_engine.run(args.requests, args.max_tokens, warm_up=True)
                rounds, floor_rounds, floor_chunks = [], [], []
                floor_base = f"http://127.0.0.1:{dep.port}/{floor_name}"
                for _ in range(args.load_reps):
                    got = drive(dep.url, dep.api_key, mixed, args.requests, args.requests, args.max_tokens)
                    local_tok_s = local_engine.run(args.requests, args.max_tokens)
                    rounds.append((got, local_tok_s))
                    # the floor streams each request's tokens at the pace the in-process engine just gave each
                    # of the `requests` concurrent rows
                    pace = {"floor_interval_s": args.requests / local_tok_s}
                    streamed = drive(floor_base, dep.api_key, ["floor"], args.requests, args.requests,
                                     args.max_tokens, pace)
                    floor_rounds.append(streamed["tokens_per_s"] / local_tok_s)
                    floor_chunks.append(streamed["text_chunks_per_s"])
                over = refusals(dep.url, dep.api_key, mixed[0], 10 * args.requests)
            finally:
                _serve_floor.stop(floor_name)
                down(spec.name, cfg)
    finally:
        local_engine.close()
    if ev.completion_tokens != served[0][1]:
        print(f"note: in-process generated {ev.completion_tokens} tokens, Serve {served[0][1]}")
    served_t = [t for t, _ in served]
    pair = sorted(s / lo for s, lo in zip(served_t, local))
    least = sorted((lo + f) / lo for lo, f in zip(local, floor))
    ratio_of = [got["tokens_per_s"] / local_tok_s for got, local_tok_s in rounds]
    ratios = sorted(ratio_of)
    load = rounds[ratio_of.index(ratios[len(ratios) // 2])][0]  # latency/TTFT of the median round
    return {"http_cold_s3_p50_ms": _pct(cold, 0.5), "http_cold_s3_p99_ms": _pct(cold, 0.99),
            "http_warm_p50_ms": _pct(warm, 0.5), "http_warm_p99_ms": _pct(warm, 0.99),
            "serve_http_p50_ms": _pct(served_t, 0.5), "in_process_p50_ms": _pct(local, 0.5),
            "serve_http_over_in_process": _pct(served_t, 0.5) / _pct(local, 0.5),
            "serve_http_over_in_process_paired_median": statistics.median(pair),
            "serve_http_over_in_process_paired_iqr": f"{pair[len(pair) // 4]:.2f}-{pair[3 * len(pair) // 4]:.2f}",
            "floor_http_p50_ms": _pct(floor, 0.5),
            "floor_over_in_process_paired_median": statistics.median(least),
            "floor_over_in_process_paired_iqr": f"{least[len(least) // 4]:.2f}-{least[3 * len(least) // 4]:.2f}",
            "tokens": ev.completion_tokens,
            **{f"load_{k}": v for k, v in load.items()},
            "in_process_load_tok_s": statistics.median(lo for _, lo in rounds),
            "http_load_over_in_process": statistics.median(ratios),
            "http_load_over_in_process_spread": f"{ratios[0]:.2f}-{ratios[-1]:.2f} over {len(ratios)} rounds",
            "floor_load_over_in_process": statistics.median(floor_rounds),
            "floor_load_over_in_process_spread": f"{min(floor_rounds):.2f}-{max(floor_rounds):.2f}",
            "floor_load_text_chunks_per_s": statistics.median(floor_chunks),
            **{f"overload_{k}": v for k, v in over.items()}}


class _InProcess:
    """The serving engine in this process with `folders` loaded, for the HTTP part's paired in-process samples."""

    def __init__(self, model, tok, folders: list[Path], batch: int):
        from peftray.serve.engine import GenerationEngine

        self.tok = tok
        self.engine = GenerationEngine(model, tok, max_batch_size=batch, max_queue=4 * batch,
                                       max_adapters=len(folders) + 1)
        self.slots = [self.engine.slots.acquire(f"a{i}", f) for i, f in enumerate(folders)]

    def generate(self, ids, params, i: int):
        return self.engine.generate(ids, params, self.slots[i])

    def run(self, requests: int, max_tokens: int, warm_up: bool = False) -> float:
        """Tokens/s of the HTTP load's requests (same prompts, adapters, max_tokens) on this engine."""
        from peftray.bench._serve_load import PROMPT
        from peftray.serve.engine import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        jobs = [(self.tok.encode(PROMPT.format(i=i)), self.slots[i % len(self.slots)]) for i in range(requests)]
        seconds, tokens = _run_engine(self.engine, jobs[:2] if warm_up else jobs, params)
        return tokens / seconds

    def close(self) -> None:
        self.engine.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="peftray bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--latency-reps", type=int, default=10)
    p.add_argument("--load-reps", type=int, default=3,
                   help="rounds of the HTTP load, each followed by the same load in-process (median ratio)")
    p.add_argument("--structured-reps", type=int, default=7,
                   help="alternated rounds of the JSON-schema and the free batch (median ratio)")
    p.add_argument("--quick", action="store_true", help="tiny model only")
    p.add_argument("--no-http", action="store_true", help="skip the part through Ray Serve on the local stack")
    p.add_argument("--http-only", action="store_true", help="only the part through Ray Serve (tiny model)")
    p.add_argument("--out", default="bench-results/serve.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on CPU, same for engine and baseline (1 avoids OpenMP spin contention on "
                        "shared machines)")
    p.add_argument("--url", help="drive this OpenAI-compatible endpoint only (any server), then exit")
    p.add_argument("--api-key", default="", help="its bearer key (with --url)")
    p.add_argument("--model", action="append", help="model(s) to spread the load over (with --url; repeatable)")
    args = p.parse_args(argv)
    if args.url:
        return _drive_url(args)
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="peftray-bench-serve-") as tmp:
        root = Path(tmp)
        models = _models(root, args.quick or args.http_only)
        rows = [] if args.http_only else [bench_model(name, d, root, args) for name, d in models.items()]
        http = None if args.no_http else bench_http(models["tiny"], root, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "results": rows, "http_tiny": http,
                               "goals": {"mixed_over_single": 0.8, "mixed_over_hf_peft": 5.0}}, indent=2))
    from peftray.tables import table

    keys = ["mixed_tok_s", "single_adapter_tok_s", "hf_peft_set_adapter_tok_s", "mixed_over_single",
            "mixed_over_hf_peft", "cold_p50_ms", "cold_p99_ms", "warm_p50_ms", "warm_p99_ms",
            "json_schema_over_free_median", "json_schema_over_free_spread"]
    if rows:
        print(table(["metric", *[r["model"] for r in rows]], [[k, *[f"{r[k]:.2f}" for r in rows]] for k in keys]))
    if http:
        print("\nthrough Ray Serve (tiny model, OpenAI route, 8 tokens):")
        print(table(["metric", "value"], [[k, f"{v:.2f}" if isinstance(v, float) else str(v)]
                                          for k, v in http.items()]))
    print(f"goals: mixed/single >= 0.8, mixed/HF PEFT >= 5, json_schema/free >= 0.8; through HTTP: 8-token p50 "
          f"<= 1.3x in-process (floor_over_in_process: the least it can be through Serve's proxy here), load tok/s "
          f">= 0.85x in-process (floor_load_over_in_process: the most it can be), refusal p99 <= 1000 ms; "
          f"JSON in {out}")
    return 0


def _drive_url(args) -> int:
    """`--url`: the same streamed load against any OpenAI-compatible server (compare peftray with another)."""
    from peftray.tables import table

    if not args.model:
        raise SystemExit("peftray bench serve --url needs --model (the model name(s) the server serves)")
    got = drive(args.url, args.api_key, args.model, args.requests, args.requests, args.max_tokens)
    print(table(["metric", "value"], [[k, f"{v:.2f}" if isinstance(v, float) else str(v)] for k, v in got.items()]))
    return 0
