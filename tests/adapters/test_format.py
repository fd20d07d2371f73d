"""The adapter format module (`peftray.adapters.format`): torch-free, and the one rule both readers apply."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys

import pytest

from peftray.adapters import format as adapter_format
from peftray.errors import AdapterFormatError
from peftray.tuners.methods import registered_methods


def _safetensors(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _check(data: bytes) -> list[str]:
    return adapter_format.check_safetensors(io.BytesIO(data), len(data), "w.safetensors")


def test_the_format_and_the_registrys_validation_import_no_torch():
    code = ("import sys, peftray.adapters.format, peftray.registry.validate, peftray.adapters; "
            "print(sorted(m for m in ('torch', 'safetensors.torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_header_check_names_tensors_and_refuses_what_is_not_safetensors():
    good = _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "__metadata__": {"format": "pt"}}, b"\0" * 8)
    assert _check(good) == ["a"]
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        _check(good[:-1])
    with pytest.raises(AdapterFormatError, match="pickle renamed"):
        _check(pickle.dumps({"a": 1}) + b"\0" * 16)
    with pytest.raises(AdapterFormatError, match="only 3 bytes"):
        _check(b"abc")
    with pytest.raises(AdapterFormatError, match="no tensors"):
        _check(_safetensors({"__metadata__": {}}))
    with pytest.raises(AdapterFormatError, match="corrupt"):
        _check(struct.pack("<Q", 4) + b"{no}")


def test_config_reading_names_the_file_and_the_known_peft_types():
    assert adapter_format.parse_config(b'{"peft_type": "LORA"}', "c.json") == {"peft_type": "LORA"}
    with pytest.raises(AdapterFormatError, match="c.json is not valid JSON"):
        adapter_format.parse_config(b"{", "c.json")
    with pytest.raises(AdapterFormatError, match="c.json must hold a JSON object, got list"):
        adapter_format.parse_config(b"[1]", "c.json")
    with pytest.raises(AdapterFormatError, match=r"`peft_type` in c.json must be one of .*LORA.*got 'LOHA'"):
        adapter_format.check_peft_type({"peft_type": "LOHA"}, "c.json")
    assert adapter_format.peft_type_names() == registered_methods()


@pytest.mark.parametrize("suffix", adapter_format.PICKLE_SUFFIXES)
def test_both_readers_refuse_every_pickle_suffix_unread(suffix, tmp_path):
    from peftray.adapters.io import read_adapter
    from peftray.registry.validate import validate_adapter_dir

    marker = tmp_path / "was-unpickled"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / adapter_format.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                                  "target_modules": ["q_proj"]}))
    (folder / f"adapter_model{suffix.upper() if suffix == '.pt' else suffix}").write_bytes(
        pickle.dumps(_Trap(marker)))
    with pytest.raises(AdapterFormatError, match="pickle"):
        validate_adapter_dir(folder)
    with pytest.raises(AdapterFormatError, match="pickle"):
        read_adapter(folder)
    assert not marker.exists()


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
