"""The small modules ScaleOT adds: the harmonizer and the decoder-layer stand-ins. SRC's modules are in
shared/src.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Harmonizer(nn.Module):
    """Lightweight stand-in for one decoder layer: h + W_up(gelu(W_down(norm(h)))).

    W_up starts at zero, so a fresh harmonizer is exactly the identity (the residual stream passes through).
    It computes in its own weights' dtype and returns the input's: float32 harmonizers train inside a bf16 model
    (in bf16, an update of ~1e-3 to a LayerNorm weight of 1.0 rounds away; docs/algorithm.md).
    """

    def __init__(self, hidden: int, bottleneck: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = h.to(self.up.weight.dtype)  # no-op (the same tensor) when the dtypes agree
        return (x + self.up(F.gelu(self.down(self.norm(x))))).to(h.dtype)


class HarmonizerLayer(nn.Module):
    """Takes a decoder layer's place: same call signature, returns the new hidden states."""

    def __init__(self, harmonizer: Harmonizer):
        super().__init__()
        self.harmonizer = harmonizer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.harmonizer(hidden_states)


class DroppedLayer(nn.Module):
    """A removed layer (uniform LayerDrop baseline): the identity, no parameters."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
