"""Loss section of `peftray bench tuners`: transformers' ForCausalLMLoss vs peftray's fused causal-LM loss.

One training-shaped step of the output end of a causal LM: a frozen lm_head (hidden 256) on 2 x 512 tokens,
the loss and its backward, for vocabularies of 4096 (the train section's model), 32000 (Llama 2, Mistral) and
128256 (Llama 3). Time interleaved in this process; peak RSS of each (loss, vocab) in a fresh subprocess
(`python -m peftray.bench._tuners_loss IMPL VOCAB`), because a process's peak never goes down.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from peftray.bench._tuners_setup import median_ms, time_interleaved

VOCABS = (4096, 32000, 128256)
TOKENS, HIDDEN = (2, 512), 256
IMPLS = ("transformers", "peftray")


def _loss_fn(impl: str):
    if impl == "peftray":
        from peftray.ops.loss import causal_lm_loss

        return causal_lm_loss
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def make_step(impl: str, vocab: int, seed: int):
    """A closure running lm_head + loss forward and backward once (the hidden states get the gradient)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*TOKENS, HIDDEN, generator=gen).requires_grad_()
    weight = torch.randn(vocab, HIDDEN, generator=gen) * 0.05
    labels = torch.randint(0, vocab, TOKENS, generator=gen)
    fn = _loss_fn(impl)

    def step() -> float:
        loss = fn(hidden @ weight.t(), labels, vocab)
        loss.backward()
        hidden.grad = None
        return float(loss.detach())

    return step


def run(seed: int, repeats: int, warmup: int, threads: int, memory: bool) -> dict:
    out: dict = {}
    for vocab in VOCABS:
        steps = {impl: make_step(impl, vocab, seed) for impl in IMPLS}
        same = abs(steps["transformers"]() - steps["peftray"]())
        times = time_interleaved(steps, repeats, warmup)
        row = {impl: {"ms": median_ms(times[impl])} for impl in IMPLS}
        row["speedup"] = row["transformers"]["ms"] / row["peftray"]["ms"]
        row["loss_abs_diff"] = same
        if memory:
            for impl in IMPLS:
                row[impl]["peak_rss_mib"] = _peak_rss(impl, vocab, seed, threads)
        out[str(vocab)] = row
    return out


def _peak_rss(impl: str, vocab: int, seed: int, threads: int):
    cmd = [sys.executable, "-m", "peftray.bench._tuners_loss", impl, str(vocab), str(seed), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def _memory_main(argv: list[str]) -> None:
    from peftray.bench._tuners_train import peak_rss_kb

    impl, vocab, seed, threads = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    torch.set_num_threads(threads)
    step = make_step(impl, vocab, seed)
    for _ in range(3):
        step()
    print(json.dumps({"peak_rss_mib": round(peak_rss_kb()[0] / 1024, 1)}))


if __name__ == "__main__":
    _memory_main(sys.argv[1:])
