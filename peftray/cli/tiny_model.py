"""`peftray make-tiny-model PATH`."""

from __future__ import annotations

import argparse

from peftray.base_models import TinyLlamaSpec, make_tiny_llama


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="output folder (a Hugging Face model folder)")
    p.add_argument("--hidden-size", type=int, default=TinyLlamaSpec.hidden_size)
    p.add_argument("--layers", type=int, default=TinyLlamaSpec.num_hidden_layers)
    p.add_argument("--overwrite", action="store_true", help="replace the folder if it holds something else")
    p.set_defaults(func=_run)


def _run(args) -> int:
    spec = TinyLlamaSpec(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                         intermediate_size=2 * args.hidden_size)
    out = make_tiny_llama(args.path, spec, overwrite=args.overwrite)
    print(f"tiny Llama model written to {out}")
    return 0
