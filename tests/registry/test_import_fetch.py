"""Import an adapter written by HF PEFT, fetch it back byte-exact, detect tampering, serve from cache offline."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import socket

import pytest

from peftray import registry as R
from peftray.cli import main as cli
from peftray.errors import IntegrityError


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hf_adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter saved by HF PEFT itself (the reference implementation) on the tiny Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("hf") / "adapter"
    model.save_pretrained(out)
    return out


def test_import_hf_peft_adapter_via_cli_and_fetch_it_back(cfg, hf_adapter, tiny_model, unique_name, capsys):
    rc = cli(["registry", "import", str(hf_adapter), "--name", unique_name, "--base", "tiny-llama",
              "--metric", "eval_loss=0.31", "--job", "hf-import", "--json"])
    assert rc == 0
    av = R.AdapterVersion(**json.loads(capsys.readouterr().out))
    hf_cfg = json.loads((hf_adapter / "adapter_config.json").read_text())
    assert (av.base_model, av.method, av.rank, av.peft_type) == ("tiny-llama", "lora", 4, "LORA")
    assert av.target_modules == sorted(hf_cfg["target_modules"]) and av.metrics == {"eval_loss": 0.31}
    assert set(av.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    assert cli(["registry", "fetch", f"{unique_name}/{av.version}"]) == 0
    folder = __import__("pathlib").Path(capsys.readouterr().out.strip())
    assert str(folder).startswith(str(cfg.cache_dir))
    for rel in av.files:
        assert (folder / rel).read_bytes() == (hf_adapter / rel).read_bytes()
    # HF PEFT loads the fetched copy and gets the weights it saved.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder)
    saved = load_file(hf_adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert (loaded.state_dict()[key.replace("lora_A.weight", "lora_A.default.weight")] == saved[key]).all()


def test_import_from_s3_uri(cfg, lora_dir, unique_name):
    src = lora_dir("s3src", seed=7)
    fs = cfg.s3fs()
    prefix = f"{cfg.bucket}/imports/{unique_name}"
    for p in src.iterdir():
        fs.put_file(str(p), f"{prefix}/{p.name}")
    av = R.register_adapter(f"s3://{prefix}", unique_name, config=cfg)
    assert av.files == {p.name: _sha(p) for p in src.iterdir()}
    assert R.register_adapter(src, unique_name, config=cfg).version == av.version  # same bytes, same (no) job


def test_flipped_byte_in_s3_is_refused_and_not_cached(cfg, lora_dir, unique_name):
    av = R.register_adapter(lora_dir(seed=3), unique_name, config=cfg)
    fs = cfg.s3fs()
    key = av.tags["peftray.s3_uri"].removeprefix("s3://") + "/adapter_model.safetensors"
    data = bytearray(fs.cat(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe(key, bytes(data))
    with pytest.raises(IntegrityError, match="'adapter_model.safetensors' failed its integrity check"):
        R.fetch(f"{unique_name}/{av.version}", cfg)
    root = cfg.cache_dir / "registry"
    assert not (root / "blobs" / av.files["adapter_model.safetensors"][:2] / av.files["adapter_model.safetensors"]).exists()
    assert not list((root / "adapters").glob("*")) and not list((root / "tmp").glob("*"))
    with pytest.raises(IntegrityError):  # still refused next time: nothing bad was kept
        R.fetch(av, cfg)


def test_cached_copy_needs_no_network_and_a_tampered_cache_heals(cfg, lora_dir, unique_name):
    src = lora_dir(seed=4)
    av = R.register_adapter(src, unique_name, config=cfg)
    first = R.fetch(f"{unique_name}/{av.version}", cfg)
    # Read-only: the files are hard links to blobs that other versions with the same bytes share.
    assert sorted(p.name for p in first.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in first.iterdir()}
    assert all(int(m, 8) & 0o222 == 0 for m in modes.values()), modes
    with _closed_port() as dead_port:
        dead = dataclasses.replace(cfg, s3_endpoint_url=f"http://127.0.0.1:{dead_port}",
                                   mlflow_tracking_uri=f"http://127.0.0.1:{dead_port}")
        assert R.fetch(f"{unique_name}/{av.version}", dead) == first  # resolves and reads from the cache only
        assert R.fetch(av, dead) == first
    assert {p.name: _sha(p) for p in first.iterdir()} == av.files
    # Someone edits the cached weights: the cache notices before use, evicts and downloads again.
    blob = cfg.cache_dir / "registry" / "blobs" / av.files["adapter_model.safetensors"][:2] / av.files[
        "adapter_model.safetensors"]
    blob.chmod(0o644)
    blob.write_bytes(b"garbage")
    healed = R.fetch(av, cfg)
    assert _sha(healed / "adapter_model.safetensors") == av.files["adapter_model.safetensors"]


@contextlib.contextmanager
def _closed_port():
    """A loopback port nobody listens on, held for the whole block: bound without `listen()`, so a connection is
    refused and no other process can take the port meanwhile (a bind-then-release port could be reused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with socket.socket() as probe, pytest.raises(OSError):
            probe.connect(("127.0.0.1", port))
        yield port
