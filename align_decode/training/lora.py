"""Low-rank adapters (LoRA) for training a guide cheaply, merged back into plain weights to save.

A frozen linear layer W gets a trainable update  W' = W + (alpha / r) * B @ A  with A [r, in] small random
and B [out, r] zero, so training starts from the unchanged model. Merging writes W' into the layer, so
the saved folder is an ordinary model that every decoder loads directly.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..validation import AT_LEAST_ONE, POSITIVE, Bounds

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T, with base frozen.

    Example:
        >>> layer = LoRALinear(nn.Linear(8, 4), r=2, alpha=4.0)
        >>> layer(torch.zeros(1, 8)).shape
        torch.Size([1, 4])
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        AT_LEAST_ONE.check(r, "LoRA rank r")
        POSITIVE.check(alpha, "LoRA alpha")
        Bounds(ge=0, lt=1).check(dropout, "LoRA dropout")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (self.dropout(x) @ self.lora_a.T @ self.lora_b.T)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += self.scale * (self.lora_b @ self.lora_a)
        return self.base


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze the model and wrap its linear layers named in `targets`; returns the wrapped names."""
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named any of {targets} in {type(model).__name__}")
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base layer (in place); returns how many were merged."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                count += 1
    return count
