"""The on-disk adapter format (HF PEFT compatible): read/write adapter folders, local or s3://.

`peftray.adapters.format` holds the format's facts without torch; the readers and writers (`io`, which
loads tensors) are imported on first use, so the registry and the control plane can check folders torch-free.
"""

from peftray.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from peftray.tuners.methods import lazy_attributes

__getattr__ = lazy_attributes(__name__, **{name: "peftray.adapters.io" for name in (
    "load_safetensors_bytes", "model_card", "read_adapter", "read_adapter_config", "write_adapter")})

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_safetensors_bytes", "model_card", "read_adapter",
           "read_adapter_config", "write_adapter"]
