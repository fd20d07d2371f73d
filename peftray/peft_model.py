"""`PeftModel` and `get_peft_model`: a transformers model plus one or more adapters, with the API of HF PEFT.

Layer-injecting methods (LoRA, IA3) live in `self.base_model` (a tuner wrapping the transformers model, so
tensor names start with `base_model.model.`); prompt methods keep the transformers model as `self.base_model`
and their encoders in `self.prompt_encoder[adapter]`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import types
import warnings
from typing import Any, Iterator, Optional

import torch
from torch import nn

from peftray.adapters import io as adapter_io
from peftray.errors import AdapterFormatError, ConfigError
from peftray.ops.loss import causal_lm_loss
from peftray.tuners import prompt_learning as pl
from peftray.tuners.config import PeftConfig, PeftType, TaskType
from peftray.tuners.layers import upcast_adapter_weights
from peftray.tuners.mixed import build_mixed_batch, fixed_adapter_weights, mixed_batch
from peftray.tuners.methods import get_method
from peftray.tuners.tuner import BaseTuner, wrap_modules_to_save

CLASSIFIER_NAMES = ["classifier", "score"]
# The task subclasses (`peftray.task_models`) register here as they are defined (`class X(PeftModel,
# task_type=...)`), so this module never imports them; the public API (`peftray.PeftModel`,
# `peftray.get_peft_model`) comes from `peftray.task_models`, which always has them all.
TASK_CLASSES: dict[TaskType, type] = {}


class PeftModel(nn.Module):
    """A base model with adapters. Build it with `get_peft_model` or `PeftModel.from_pretrained`."""

    #: Causal LMs given `labels` compute their loss with peftray's fused cross-entropy (`peftray.ops.loss`):
    #: the same value and gradient as transformers', faster. Set False to use the model's own loss function.
    use_fused_loss: bool = True

    def __init_subclass__(cls, task_type: TaskType | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if task_type is not None:
            TASK_CLASSES[task_type] = cls

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 init_weights: bool = True, autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.active_adapter = adapter_name
        self._prompt_configs: dict[str, PeftConfig] = {}
        self._prompt_disabled = False
        if peft_config.is_prompt_learning:
            self.base_model = model
            self.prompt_encoder = nn.ModuleDict()
            self.add_adapter(adapter_name, peft_config, init_weights)
        else:
            _, tuner_cls = get_method(peft_config.peft_type)
            self.base_model = tuner_cls(model, peft_config, adapter_name, init_weights=init_weights)
            if autocast_adapter_dtype:
                upcast_adapter_weights(self.base_model, adapter_name)
        self.forward = _forward_with_signature_of(self)

    # --- adapters ---------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._prompt_configs if self._is_prompt else self.base_model.peft_config

    @property
    def _is_prompt(self) -> bool:
        return "prompt_encoder" in self._modules

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._is_prompt else self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, init_weights: bool = True,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new, untrained adapter (not activated: call `set_adapter`); on a float16/bfloat16 base its
        weights are float32 unless `autocast_adapter_dtype=False` (as in HF PEFT)."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"adapter {adapter_name!r} already exists; pick another name or delete it first.")
        if peft_config.is_prompt_learning != self._is_prompt or (
                not self._is_prompt and peft_config.peft_type != self.active_peft_config.peft_type):
            raise ConfigError(f"cannot add a {peft_config.peft_type.value} adapter to a model with "
                              f"{self.active_peft_config.peft_type.value} adapters; use a separate PeftModel.")
        if not self._is_prompt:
            self.base_model.inject_adapter(adapter_name, peft_config, init_weights=init_weights)
            if autocast_adapter_dtype:
                upcast_adapter_weights(self.base_model, adapter_name)
            self.base_model.set_adapter(self.active_adapters, trainable=not self.active_peft_config.inference_mode)
            return
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        self.prompt_encoder[adapter_name] = pl.make_prompt_encoder(self.base_model, peft_config, not init_weights)
        self._prompt_configs[adapter_name] = peft_config
        if peft_config.modules_to_save:
            wrap_modules_to_save(self.base_model, peft_config.modules_to_save, adapter_name)
        if adapter_name == self.active_adapter:
            self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter (its weights become trainable unless loaded for inference)."""
        if adapter_name not in self.peft_config:
            raise ConfigError(f"unknown adapter {adapter_name!r}; loaded adapters: {sorted(self.peft_config)}.")
        self.active_adapter = adapter_name
        trainable = not self.peft_config[adapter_name].inference_mode
        if not self._is_prompt:
            self.base_model.set_adapter(adapter_name, trainable=trainable)
            return
        for name, enc in self.prompt_encoder.items():
            for p in enc.parameters():
                p.requires_grad_(trainable and name == adapter_name)
        for m in self.base_model.modules():
            if hasattr(m, "modules_to_save") and isinstance(m.modules_to_save, nn.ModuleDict):
                m.set_adapter([adapter_name], trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its weights (cheap; the serving engine evicts with it)."""
        if adapter_name not in self.peft_config:
            raise ConfigError(f"unknown adapter {adapter_name!r}; loaded adapters: {sorted(self.peft_config)}.")
        if self._is_prompt:
            del self.prompt_encoder[adapter_name]
            self._prompt_configs.pop(adapter_name)
        else:
            self.base_model.delete_adapter(adapter_name)
        if self.active_adapter == adapter_name:
            remaining = list(self.peft_config)
            self.active_adapter = remaining[0] if remaining else adapter_name
            if remaining:
                self.set_adapter(remaining[0])

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the `with` block."""
        if self._is_prompt:
            self._prompt_disabled = True
        else:
            self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if self._is_prompt:
                self._prompt_disabled = False
            else:
                self.base_model.enable_adapter_layers()

    # --- merging (LoRA, IA3) ----------------------------------------------------------------------
    def _tuner(self, what: str) -> BaseTuner:
        if self._is_prompt:
            raise ConfigError(f"{what} is not possible for prompt methods (nothing to fold into the weights).")
        return self.base_model

    def merge_adapter(self, adapter_names: Optional[list[str]] = None) -> None:
        self._tuner("merge_adapter").merge_adapter(adapter_names)

    def unmerge_adapter(self) -> None:
        self._tuner("unmerge_adapter").unmerge_adapter()

    def merge_and_unload(self, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Fold the active adapter(s) into the base weights and return the plain transformers model."""
        return self._tuner("merge_and_unload").merge_and_unload(adapter_names)

    def unload(self) -> nn.Module:
        return self._tuner("unload").unload()

    # --- parameters -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters); 4-bit weights count 2 per stored byte, as in PEFT."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":
                n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # --- state ------------------------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the names HF PEFT saves them with."""
        name = adapter_name or self.active_adapter
        if not self._is_prompt:
            return {f"base_model.model.{k}": v for k, v in self.base_model.adapter_state_dict(name).items()}
        out = {"prompt_embeddings": pl.prompt_embedding_to_save(self.prompt_encoder[name], self.peft_config[name])}
        for path, m in self.base_model.named_modules():
            if hasattr(m, "modules_to_save") and isinstance(m.modules_to_save, nn.ModuleDict) and name in m.modules_to_save:
                out.update({f"base_model.{path}.{k}": v for k, v in m.modules_to_save[name].state_dict().items()})
        return out

    def set_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load HF-PEFT-named tensors into an existing adapter; shape errors name the tensor and both shapes."""
        if not self._is_prompt:
            prefix = "base_model.model."
            odd = [k for k in state if not k.startswith(prefix)]
            if odd:
                raise AdapterFormatError(f"tensor names {odd[:3]} do not start with {prefix!r}: not a "
                                         f"{self.peft_config[adapter_name].peft_type.value} adapter of this format.")
            self.base_model.load_adapter_state_dict(adapter_name, {k[len(prefix):]: v for k, v in state.items()}, prefix)
            return
        state = dict(state)
        if "prompt_embeddings" not in state:
            raise AdapterFormatError("adapter file lacks the tensor `prompt_embeddings`.")
        emb = state.pop("prompt_embeddings")
        weight = self.prompt_encoder[adapter_name].embedding.weight
        if tuple(emb.shape) != tuple(weight.shape):
            raise AdapterFormatError(f"tensor `prompt_embeddings` has shape {tuple(emb.shape)} but the base model "
                                     f"needs {tuple(weight.shape)}: the adapter was made for another base model.")
        with torch.no_grad():
            weight.copy_(emb)
        for key, value in state.items():
            path, _, pname = key.removeprefix("base_model.").rpartition(".")
            wrapper = self.base_model.get_submodule(path)
            getattr(wrapper.modules_to_save[adapter_name], pname).data.copy_(value)

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Optional[list[str]] = None,
                        storage_options: Optional[dict] = None) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors (non-default ones in a subfolder)."""
        for name in selected_adapters or list(self.peft_config):
            config = copy.copy(self.peft_config[name])
            out = str(save_directory) if name == "default" else f"{str(save_directory).rstrip('/')}/{name}"
            readme = adapter_io.model_card(config.base_model_name_or_path, config.peft_type.value) \
                if name == "default" else None
            adapter_io.write_adapter(out, config, self.get_adapter_state_dict(name), readme, storage_options)

    def load_adapter(self, path_or_state: Any, adapter_name: str = "default", is_trainable: bool = False,
                     on_base_mismatch: str = "warn", storage_options: Optional[dict] = None,
                     autocast_adapter_dtype: bool = True) -> None:
        """Load an adapter from a folder / s3:// URI, or from a `(config, state_dict)` pair, as `adapter_name`.

        Args:
            path_or_state: local folder, `s3://` URI, or `(PeftConfig, {HF tensor name: tensor})`.
            adapter_name: name of the new adapter (must not exist yet).
            is_trainable: keep the weights trainable (else loaded in inference mode).
            on_base_mismatch: "warn", "error" or "ignore" when the adapter names another base model.
            autocast_adapter_dtype: on a float16/bfloat16 base, hold the weights in float32 (HF PEFT's default).
        """
        if isinstance(path_or_state, tuple):
            config, state = path_or_state
            config = copy.deepcopy(config)
        else:
            config, state = adapter_io.read_adapter(path_or_state, storage_options)
        self._check_base(config, on_base_mismatch)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, init_weights=False, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            self.set_adapter_state_dict(state, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)  # leave the model as it was
            raise
        if not self._is_prompt:  # keep the active adapter's trainability as it was
            self.base_model.set_adapter(self.active_adapters, not self.active_peft_config.inference_mode)

    def _check_base(self, config: PeftConfig, mode: str) -> None:
        want = config.base_model_name_or_path
        have = getattr(self.get_base_model(), "name_or_path", None) or getattr(
            getattr(self.get_base_model(), "config", None), "_name_or_path", None)
        if not want or not have or want == have or os.path.basename(str(want).rstrip("/")) == os.path.basename(
                str(have).rstrip("/")):
            return
        msg = f"the adapter was made for base model {want!r} but is being loaded on {have!r}"
        if mode == "error":
            raise AdapterFormatError(msg + "; load it on its own base model or pass on_base_mismatch='warn'.")
        if mode == "warn":
            warnings.warn(msg, stacklevel=3)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike | tuple, adapter_name: str = "default",
                        is_trainable: bool = False, on_base_mismatch: str = "warn",
                        storage_options: Optional[dict] = None, autocast_adapter_dtype: bool = True) -> "PeftModel":
        """Wrap `model` with the adapter stored at `model_id` (local folder or s3:// URI); on a float16/bfloat16
        base its weights are float32 unless `autocast_adapter_dtype=False`."""
        if isinstance(model_id, tuple):
            config, state = model_id
        else:
            config, state = adapter_io.read_adapter(model_id, storage_options)
        config = copy.deepcopy(config)
        config.inference_mode = not is_trainable
        peft_cls = TASK_CLASSES.get(config.task_type, PeftModel)
        peft_model = peft_cls.__new__(peft_cls)
        PeftModel._check_base(_Probe(model), config, on_base_mismatch)
        peft_cls.__init__(peft_model, model, config, adapter_name, init_weights=False,
                          autocast_adapter_dtype=autocast_adapter_dtype)
        peft_model.set_adapter_state_dict(state, adapter_name)
        if not is_trainable:
            peft_model.eval()  # as HF PEFT: an adapter loaded for inference starts in eval mode
        return peft_model

    # --- running ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict:  # pickle/deepcopy: the per-instance forward is rebuilt, not pickled
        state = dict(self.__dict__)
        state.pop("forward", None)
        state.pop("_last_mixed", None)  # the last mixed batch's plan (holds the compiled kernel's handle)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.forward = _forward_with_signature_of(self)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @contextlib.contextmanager
    def _mixed(self, adapter_names: Optional[list[str]]) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval().")
        if self._is_prompt or self.active_peft_config.peft_type != PeftType.LORA:
            raise ConfigError("`adapter_names` (mixed-adapter batches) is supported for LoRA adapters only.")
        order = tuple(self.peft_config)
        device = next(self.parameters()).device
        batch = build_mixed_batch(adapter_names, order, device, self.__dict__.get("_last_mixed"))
        self.__dict__["_last_mixed"] = batch  # a plain attribute: no nn.Module bookkeeping, not in state_dict
        with mixed_batch(batch):
            yield

    @contextlib.contextmanager
    def _fused_loss(self, labels: Any) -> Iterator[None]:
        """While a causal LM computes its loss, use `peftray.ops.loss.causal_lm_loss` (same value and gradient
        as transformers' `ForCausalLMLoss`, without its three [tokens, vocab] temporaries). Left alone: no
        labels, a loss function the user set, a model with another loss, `use_fused_loss = False`."""
        model = self.get_base_model()
        if (labels is None or not self.use_fused_loss or "_loss_function" in vars(model)
                or getattr(model, "loss_type", None) != "ForCausalLM"):
            yield
            return
        model._loss_function = causal_lm_loss
        try:
            yield
        finally:
            if vars(model).get("_loss_function") is causal_lm_loss:
                del model._loss_function

    def forward(self, *args: Any, labels: Any = None, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        # `labels` is named so that transformers' Trainer finds the label column (it reads this class's signature)
        if labels is not None:
            kwargs["labels"] = labels
        with self._fused_loss(labels):
            if self._is_prompt and not self._prompt_disabled:
                return self._prompt_forward(*args, **kwargs)
            with self._mixed(adapter_names):
                return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any):
        """`transformers` generate on the adapted model; `adapter_names` picks a LoRA adapter per row."""
        if self._is_prompt and not self._prompt_disabled:
            return self._prompt_generate(*args, **kwargs)
        # one generate call owns the model: its decode steps check the stacked adapter copies once, not per step
        with self._mixed(adapter_names), fixed_adapter_weights() if adapter_names is not None else \
                contextlib.nullcontext():
            return self.get_base_model().generate(*args, **kwargs)

    def _prompt_forward(self, *args, **kwargs):  # pragma: no cover - task subclasses implement it
        raise ConfigError(f"prompt methods need a task type; set task_type (one of {[t.value for t in TaskType]}).")

    def _prompt_generate(self, *args, **kwargs):
        raise ConfigError("generate with a prompt method needs task_type CAUSAL_LM.")


def _forward_with_signature_of(peft_model: PeftModel) -> Any:
    """`peft_model.forward`, showing the base model's parameters to `inspect.signature`.

    transformers' Trainer drops the dataset columns the model's forward does not name (for HF PEFT's class it
    looks at the base model instead); with `*args, **kwargs` it would drop every column. The base model's
    parameters plus `adapter_names` are what this forward accepts.
    """
    base_params = list(inspect.signature(peft_model.get_base_model().forward).parameters.values())
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    params = [p for p in base_params if p.kind != p.VAR_KEYWORD] + [extra] + \
             [p for p in base_params if p.kind == p.VAR_KEYWORD]
    if any(p.name == "adapter_names" for p in base_params):
        params = base_params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self).forward(self, *args, **kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = inspect.Signature([self_param] + params)
    return types.MethodType(forward, peft_model)


class _Probe:
    """Lets `_check_base` run before the PeftModel exists."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def get_base_model(self) -> nn.Module:
        return self._model
