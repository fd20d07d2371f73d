"""The three snippets of the README's "Use with Trainer / TRL / Accelerate" section run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Use with Trainer / TRL / Accelerate", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_three_snippets():
    assert len(_snippets()) == 3


@pytest.mark.parametrize("index", [0, 1, 2], ids=["trainer", "trl-sft", "accelerate"])
def test_snippet_runs_and_writes_the_adapter_only(index, tiny_model, lm_dataset, tmp_path):
    out = tmp_path / "out"
    scope = {"model_path": str(tiny_model), "output_dir": str(out),
             "train_dataset": lm_dataset.remove_columns(["text"])}
    exec(compile(_snippets()[index], f"README snippet {index + 1}", "exec"), scope)  # noqa: S102 - our README
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
