"""Learnable synthetic image sets: coloured shapes on white.

`make_shapes(folder)` writes `metadata.jsonl` (`{"image": "images/red-circle-0.png", "caption": "a red
circle"}` per row) and the PNGs it names, deterministically; `jobs/data/shapes/` is its output, small
enough to ship (`peftray.data.shapes` regenerates it: `python -m peftray.data.shapes jobs/data/shapes`).

`make_colour_classes(folder)` writes an image classification set in the folder-per-class layout: the class is
the colour (`red/circle-0.png`, ...), every shape in every class. The class is the colour, not the shape: a
tiny ViT whose random weights stay frozen (only LoRA and the head train) learns colours to 1.0 held-out
accuracy in a few dozen steps, but shapes only to about 0.55 with a few dozen images per class.
`jobs/data/colours/` is its output (`python -m peftray.data.shapes --classes jobs/data/colours`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random):
    """One `size`x`size` RGB image: the shape, jittered in place and scale, on a white background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    half = rng.uniform(0.28, 0.4) * size
    cx, cy = (rng.uniform(0.4, 0.6) * size for _ in range(2))
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    else:
        bar = half / 3
        draw.rectangle((cx - half, cy - bar, cx + half, cy + bar), fill=colour)
        draw.rectangle((cx - bar, cy - half, cx + bar, cy + half), fill=colour)
    return image


def make_shapes(folder: str | Path, per_caption: int = 4, size: int = 32, seed: int = 0) -> Path:
    """Write `per_caption` images of every colour x shape, and metadata.jsonl; returns the metadata file."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(per_caption):
                name = f"images/{colour}-{shape}-{k}.png"
                draw_shape(shape, rgb, size, rng).save(folder / name, optimize=True)
                rows.append({"image": name, "caption": f"a {colour} {shape}"})
    out = folder / "metadata.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def colour_classes() -> list[str]:
    """The class names of `make_colour_classes`, in label-id order (sorted, as peftray orders folder names)."""
    return sorted(COLOURS)


def make_colour_classes(folder: str | Path, per_shape: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Write `folder/<colour>/<shape>-<k>.png`, `per_shape` images of every shape per colour; returns `folder`."""
    folder = Path(folder)
    rng = random.Random(seed)
    for colour in colour_classes():
        (folder / colour).mkdir(parents=True, exist_ok=True)
        for shape in SHAPES:
            for k in range(per_shape):
                draw_shape(shape, COLOURS[colour], size, rng).save(folder / colour / f"{shape}-{k}.png", optimize=True)
    return folder


if __name__ == "__main__":  # pragma: no cover - regenerates the shipped sets
    if sys.argv[1:2] == ["--classes"]:
        print(make_colour_classes(sys.argv[2] if len(sys.argv) > 2 else "jobs/data/colours"))
    else:
        print(make_shapes(sys.argv[1] if len(sys.argv) > 1 else "jobs/data/shapes"))
