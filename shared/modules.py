"""The small modules ScaleOT adds: the harmonizer and the decoder-layer stand-ins. SRC's modules are in
shared/src.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalMix(nn.Module):
    """Cheap token mixing for a stand-in: pre-norm causal self-attention with few heads and its own RoPE.

    A token-wise MLP cannot move information between tokens, so an emulator whose replaced layers are MLPs only
    makes the adapter layers learn the missing mixing, which M does not need (issue 21). The rotary phases are
    computed here from positions 0..T-1 (right-padded batches, as the product pads), so the module works the same
    in every architecture. The output projection starts at zero: a fresh mixer adds nothing.
    """

    def __init__(self, hidden: int, heads: int, head_dim: int, rope_base: float = 10000.0):
        super().__init__()
        if heads < 1 or head_dim < 2 or head_dim % 2:
            raise ValueError(f"token mixing needs >= 1 head of an even dimension; got {heads} x {head_dim}")
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, hidden, bias=False)
        nn.init.zeros_(self.out.weight)
        self.rope_base = rope_base

    def _rope(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) -> (B, H, T, D), rotated by position
        # Frequencies in float32 every call, not a buffer: a buffer would be cast with a bf16 emulator and rotate
        # differently for the data owner than in the model owner's float32 calibration.
        d = torch.arange(0, self.head_dim, 2, device=x.device, dtype=torch.float32) / self.head_dim
        t = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        ang = torch.outer(t, self.rope_base**-d)  # (T, D/2)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C), the residual update
        B, T, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self._rope(q), self._rope(k), v, is_causal=True)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class Harmonizer(nn.Module):
    """Lightweight stand-in for one decoder layer: h + W_up(gelu(W_down(norm(h)))), after an optional cheap causal
    attention (`mix_heads` > 0: h <- h + CausalMix(h)).

    W_up (and the mixer's output) start at zero, so a fresh harmonizer is exactly the identity (the residual
    stream passes through). It computes in its own weights' dtype and returns the input's: float32 harmonizers
    train inside a bf16 model (in bf16, an update of ~1e-3 to a LayerNorm weight of 1.0 rounds away;
    docs/algorithm.md). Without mixing its tensors are named as before the mixer existed (old files load).
    """

    def __init__(self, hidden: int, bottleneck: int = 64, mix_heads: int = 0, mix_head_dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.mix: CausalMix | None = None
        if mix_heads:
            self.add_mix(mix_heads, mix_head_dim)

    def add_mix(self, heads: int, head_dim: int, generator: torch.Generator | None = None) -> None:
        """Give this harmonizer (e.g. one stage 1 trained without mixing) a fresh mixer; it stays the same function.

        `generator` seeds the mixer's projections (reproducible emulator builds); the output starts at zero."""
        w = self.up.weight
        mix = CausalMix(w.shape[0], heads, head_dim)
        if generator is not None:
            with torch.no_grad():
                bound = 1 / math.sqrt(w.shape[0])  # nn.Linear's default range
                mix.qkv.weight.copy_(torch.rand(mix.qkv.weight.shape, generator=generator) * 2 * bound - bound)
        self.mix = mix.to(device=w.device, dtype=w.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.up.weight.dtype)  # no-op (the same tensor) when the dtypes agree
        if self.mix is not None:
            x = x + self.mix(x)
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
