"""Shared helpers of the classification-serving tests: LoRA adapters with their own heads (MiniLM seq_cls, tiny
ViT image_cls) made with distinct random weights, base64 images, and HF PEFT (`peft`) as the reference."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

LABELS = ["negative", "positive"]  # the MiniLM deployments' labels (a plain encoder's config names none)
TEXTS = ["a wonderful, moving film", "dull and far too long", "it was fine I guess, nothing special at all",
         "the best thing I saw this year"]
COLOURS = Path(__file__).resolve().parents[2] / "jobs" / "data" / "colours"


def _randomize(peft_model, lora_std: float, head_std: float) -> None:
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_std)
            elif "modules_to_save" in name:  # a trained head differs from the base's: so does this one
                p.normal_(0, head_std)


def make_seq_cls_lora(minilm: Path, out: Path, seed: int, num_labels: int = 2, dora: bool = False) -> Path:
    """A SEQ_CLS LoRA (or DoRA) adapter on MiniLM's query/value with its own classifier head, random (seeded)."""
    from transformers import AutoModelForSequenceClassification

    import peftray

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=num_labels)
    peft_model = peftray.get_peft_model(model, peftray.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
        use_dora=dora))
    _randomize(peft_model, 0.3, 0.5)
    peft_model.save_pretrained(out)
    return out


def make_vit_lora(tiny_vit: Path, out: Path, seed: int) -> Path:
    """An image_cls LoRA adapter (no task_type, `modules_to_save: [classifier]`, as training writes it), random."""
    from transformers import ViTForImageClassification

    import peftray

    torch.manual_seed(seed)
    model = ViTForImageClassification.from_pretrained(tiny_vit)
    peft_model = peftray.get_peft_model(model, peftray.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
        init_lora_weights=False))
    _randomize(peft_model, 0.5, 0.5)
    peft_model.save_pretrained(out)
    return out


def colour_images() -> list[tuple[str, str]]:
    """(label, base64 PNG) of the shipped colour images, two per class."""
    out = []
    for folder in sorted(COLOURS.iterdir()):
        for path in sorted(folder.glob("*.png"))[:2]:
            out.append((folder.name, base64.b64encode(path.read_bytes()).decode()))
    return out


def png_b64(seed: int, size: int = 40) -> str:
    """A random RGB image (not the model's size: the processor resizes it) as base64 PNG."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def minilm_base(minilm: Path):
    """The MiniLM classifier exactly as a deployment with `labels: LABELS` loads it (its head seeded)."""
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(
            minilm, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={n: i for i, n in enumerate(LABELS)}, ignore_mismatched_sizes=True).eval()


def hf_text_logits(minilm: Path, adapter: Path | None, texts: list[str]) -> torch.Tensor:
    """Logits of HF PEFT (the reference) with `adapter` on MiniLM, each text alone; the base's without one."""
    import peft
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    model = minilm_base(minilm)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts]).float()


def hf_image_logits(tiny_vit: Path, adapter: Path | None, images_b64: list[str], peftray_model: bool = False):
    """Logits of HF PEFT (or, with `peftray_model`, of peftray's own PeftModel: the adapter's own forward) on the
    decoded images, resized and normalized by the base's image processor."""
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification

    import peftray

    images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in images_b64]
    pixels = AutoImageProcessor.from_pretrained(tiny_vit)(images=images, return_tensors="pt")["pixel_values"]
    model = ViTForImageClassification.from_pretrained(tiny_vit).eval()
    if adapter is not None:
        if peftray_model:
            model = peftray.PeftModel.from_pretrained(model, str(adapter)).eval()
        else:
            import peft

            model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits.float()
