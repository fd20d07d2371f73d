"""IA3 layer: output scaling `ia3_l` [out, 1], or input scaling [1, in] for feedforward modules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftray.tuners.layers import AdapterLayer, base_weight, in_out_features, set_base_weight


class Linear(AdapterLayer):
    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = in_out_features(base_layer)
        self.ia3_l = nn.ParameterDict()

    def update_layer(self, name: str, init_weights: bool, random_init: bool) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        w = self.base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        value = torch.randn(shape) if random_init else torch.ones(shape)
        if not init_weights:
            value = torch.empty(shape)
        self.ia3_l[name] = nn.Parameter(value.to(device=w.device, dtype=dtype))
        self._generation += 1

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l[name]} if name in self.ia3_l else {}

    def _merge_one(self, name: str) -> None:
        # Assigns new tensors (never in place) so the saved original stays intact for unmerge.
        scale = self.ia3_l[name].data
        w = base_weight(self.base_layer)
        set_base_weight(self.base_layer, (w * (scale if self.is_feedforward else scale.view(-1, 1))).to(w.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and not self.is_feedforward:
            bias.data = (bias.data * scale.flatten()).to(bias.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged:
            self.unmerge()
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = None
        for name in self.active_adapters:
            if name in self.ia3_l:
                v = self.ia3_l[name].flatten()
                scale = v if scale is None else scale * v
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer((x * scale.to(x.dtype)), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return out * scale.to(out.dtype)
