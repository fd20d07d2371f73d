"""`peftray make-tiny-model [--kind llama|sd|vit] PATH`."""

from __future__ import annotations

import argparse

from peftray.base_models import TinyLlamaSpec, make_tiny_llama


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="output folder (a Hugging Face model folder; for --kind sd a diffusers pipeline folder)")
    p.add_argument("--kind", choices=("llama", "sd", "vit"), default="llama",
                   help="llama: the tiny causal LM; sd: a tiny Stable Diffusion pipeline (text_to_image); vit: a tiny "
                        "ViT image classifier with an image processor (image_cls)")
    p.add_argument("--labels", default=None,
                   help="vit: comma-separated class names (default: the colours of jobs/data/colours)")
    p.add_argument("--hidden-size", type=int, default=TinyLlamaSpec.hidden_size)
    p.add_argument("--layers", type=int, default=TinyLlamaSpec.num_hidden_layers)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                   help="sd: what the scheduler's UNet predicts")
    p.add_argument("--overwrite", action="store_true", help="replace the folder if it holds something else")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.kind == "sd":
        return _run_sd(args)
    if args.kind == "vit":
        return _run_vit(args)
    spec = TinyLlamaSpec(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                         intermediate_size=2 * args.hidden_size)
    out = make_tiny_llama(args.path, spec, overwrite=args.overwrite)
    print(f"tiny Llama model written to {out}")
    return 0


def _run_sd(args) -> int:
    from peftray.tiny_sd import TinySDSpec, make_tiny_sd

    out = make_tiny_sd(args.path, TinySDSpec(prediction_type=args.prediction_type), overwrite=args.overwrite)
    print(f"tiny Stable Diffusion pipeline written to {out}")
    return 0


def _run_vit(args) -> int:
    from peftray.data.shapes import colour_classes
    from peftray.tiny_vit import make_tiny_vit

    labels = [n.strip() for n in args.labels.split(",")] if args.labels else colour_classes()
    out = make_tiny_vit(args.path, labels, overwrite=args.overwrite)
    print(f"tiny ViT image classifier ({', '.join(labels)}) written to {out}")
    return 0
