"""Checkpoints of a peftray model in transformers' `Trainer` (and the TRL trainers built on it): the adapter only.

`Trainer` saves, resumes and reloads its best checkpoint through HF PEFT's own `PeftModel` class (an isinstance
check on that class); any other model gets its whole state dict written as `model.safetensors` (the base
model too: gigabytes instead of megabytes) and read back whole. `peft_trainer(Trainer)` returns the same trainer
with those three steps done on the adapter: `adapter_config.json` + `adapter_model.safetensors` in HF PEFT's
format in every checkpoint, loaded back into the live adapter weights (so the optimizer keeps its parameters).
Everything else (optimizer, scheduler, RNG state, `trainer_state.json`) stays the trainer's own.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from peftray.adapters import io as adapter_io
from peftray.errors import AdapterFormatError
from peftray.peft_model import PeftModel, _forward_with_signature_of


def _peftray_model(trainer: Any, model: Any = None) -> Optional[PeftModel]:
    model = trainer.accelerator.unwrap_model(model if model is not None else trainer.model)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return model if isinstance(model, PeftModel) else None


def load_adapter_weights(model: PeftModel, folder: str) -> None:
    """Copy the adapters saved in `folder` (by `save_pretrained`) into `model`'s existing adapter weights."""
    found = False
    for name in model.peft_config:
        path = folder if name == "default" else os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, adapter_io.WEIGHTS_NAME)):
            _, state = adapter_io.read_adapter(path)
            model.set_adapter_state_dict(state, name)
            found = True
    if not found:
        raise AdapterFormatError(f"checkpoint {folder!r} holds no {adapter_io.WEIGHTS_NAME} for the adapters "
                                 f"{sorted(model.peft_config)}: not a checkpoint of this peftray model.")


def _move_fused_lm_head(model: PeftModel) -> None:
    """TRL's trainers patch `model.forward` with a fused LM head that runs `model.base_model` as the backbone; on
    an HF PEFT model they patch the transformers model inside instead (`get_base_model()`), since the wrapper's
    `base_model` is the tuner. Do the same for a peftray model: put our forward back and patch the inner model
    with the settings TRL chose (read from the patch it made)."""
    patched = vars(model).get("forward")
    func = getattr(patched, "__func__", None)
    if func is None or func.__code__.co_name != "_fused_forward" or not func.__closure__:
        return
    settings = dict(zip(func.__code__.co_freevars, (c.cell_contents for c in func.__closure__)))
    from trl.trainer.utils import add_fused_lm_head  # only reached when TRL made the patch

    model.forward = _forward_with_signature_of(model)
    add_fused_lm_head(model.get_base_model(), temperature=settings.get("temperature", 1.0),
                      cast_lm_head_to_fp32=settings.get("cast_lm_head_to_fp32", False),
                      outputs=settings.get("outputs", ("log_probs",)))


class AdapterDisabledReference(torch.nn.Module):
    """A preference trainer's reference model that is the policy itself with its adapter switched off.

    TRL's `DPOTrainer` does this for HF PEFT models (no `ref_model`: the adapter is disabled for the reference
    forward); for any other model it loads a second copy of the base. Handed in as `ref_model`, this module gives
    a peftray model the PEFT behaviour: no second model in memory, the reference is exactly the frozen base. It
    shows TRL what it patches and calls (`config`, `base_model`, the output embeddings) from the policy's inner
    transformers model, and every call runs inside `disable_adapter()`. Its parameters are the policy's (not
    registered twice: the policy is held outside `_modules`).
    """

    def __init__(self, policy: PeftModel) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", policy)
        self.config = policy.get_base_model().config

    @property
    def base_model(self) -> torch.nn.Module:
        return self._policy.get_base_model().base_model

    def get_output_embeddings(self) -> torch.nn.Module:
        return self._policy.get_base_model().get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._policy.get_base_model()(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._policy.disable_adapter():
            return super().__call__(*args, **kwargs)


def _takes_ref_model(trainer_cls: type) -> bool:
    """Whether the trainer under the mixin (the next `__init__` in the MRO) takes a `ref_model`."""
    import inspect

    mro = trainer_cls.__mro__
    after = mro[mro.index(PeftTrainerMixin) + 1:]
    init = next((c.__init__ for c in after if "__init__" in vars(c)), object.__init__)
    return "ref_model" in inspect.signature(init).parameters


class PeftTrainerMixin:
    """Mix into `transformers.Trainer` or a subclass (TRL's `SFTTrainer`, `DPOTrainer`); see `peft_trainer`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        args_obj = kwargs.get("args")
        if (isinstance(model, PeftModel) and kwargs.get("ref_model") is None and _takes_ref_model(type(self))
                and not getattr(args_obj, "precompute_ref_log_probs", False)):
            kwargs["ref_model"] = AdapterDisabledReference(model)  # as TRL does for HF PEFT: the adapter off
        super().__init__(*args, **kwargs)
        model = _peftray_model(self)
        if model is not None:
            _move_fused_lm_head(model)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = _peftray_model(self)
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        peft_model = _peftray_model(self, model)
        if peft_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        peft_model = _peftray_model(self)
        if peft_model is None:
            return super()._load_best_model()
        load_adapter_weights(peft_model, self.state.best_model_checkpoint)


def peft_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (transformers' `Trainer` or a subclass) saving and loading a peftray model's adapter only.

    Example:
        >>> from transformers import Trainer
        >>> trainer = peftray.peft_trainer(Trainer)(model=peft_model, args=args, train_dataset=ds)
    """
    return type(trainer_cls.__name__, (PeftTrainerMixin, trainer_cls), {"__module__": trainer_cls.__module__})
