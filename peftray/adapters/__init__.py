"""The on-disk adapter format (HF PEFT compatible): read/write adapter folders, local or s3://."""

from peftray.adapters.io import (
    CONFIG_NAME, WEIGHTS_NAME, load_safetensors_bytes, model_card, read_adapter, read_adapter_config, write_adapter,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_safetensors_bytes", "model_card", "read_adapter",
           "read_adapter_config", "write_adapter"]
