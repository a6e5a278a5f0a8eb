"""The small modules ScaleOT adds: the harmonizer, the SVD low-rank linear, and decoder-layer stand-ins."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Harmonizer(nn.Module):
    """Lightweight stand-in for one decoder layer: h + W_up(gelu(W_down(norm(h)))).

    W_up starts at zero, so a fresh harmonizer is exactly the identity (the residual stream passes through).
    """

    def __init__(self, hidden: int, bottleneck: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return h + self.up(F.gelu(self.down(self.norm(h))))


class LowRankLinear(nn.Module):
    """y = up(down(x)): a rank-r factorisation of a (out, in) weight, stored as two matrices so files shrink."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)  # (r, in)
        self.up = nn.Linear(rank, out_features, bias=bias)  # (out, r)

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> LowRankLinear:
        """Truncated SVD of `weight` (out, in) keeping the top `rank` singular values (Eckart–Young optimal)."""
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, rank, bias is not None).to(dtype=weight.dtype, device=weight.device)
        U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        root = S[:rank].sqrt()  # split the spectrum evenly between the factors for conditioning
        with torch.no_grad():
            mod.down.weight.copy_((root[:, None] * Vh[:rank]).to(weight.dtype))
            mod.up.weight.copy_((U[:, :rank] * root[None, :]).to(weight.dtype))
            if bias is not None:
                mod.up.bias.copy_(bias.detach())
        return mod

    def dense_weight(self) -> torch.Tensor:  # (out, in)
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class RankReducedLinear(nn.Linear):
    """A rank-r weight stored dense: used where two factors would be no smaller than the matrix itself
    (r >= in*out / (in+out), e.g. beta < 0.5 on a square projection), so SRC never grows the file."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.rank = rank

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> RankReducedLinear:
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, rank, bias is not None).to(dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            mod.weight.copy_(LowRankLinear.from_weight(weight.double(), None, rank).dense_weight().to(weight.dtype))
            if bias is not None:
                mod.bias.copy_(bias.detach())
        return mod

    def dense_weight(self) -> torch.Tensor:
        return self.weight


def factors_are_smaller(in_features: int, out_features: int, rank: int) -> bool:
    return rank * (in_features + out_features) < in_features * out_features


class ConcatLinear(nn.Module):
    """Fused projection (GPT-2 c_attn = [q|k|v]) compressed block by block: outputs are concatenated.

    `rows[i]` is the fused output row that concatenated output i stands for; when the blocks are not
    contiguous (GPT-NeoX interleaves q, k, v per head) the outputs are put back in the fused order."""

    order: torch.Tensor | None  # a non-persistent buffer: the fused order of the concatenated outputs

    def __init__(self, parts: list[nn.Module], rows: torch.Tensor | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        order = None if rows is None or torch.equal(rows, torch.arange(len(rows))) else torch.argsort(rows)
        # Derived from the family registry on both sides, so not part of the emulator file's tensors.
        self.register_buffer("order", order, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([p(x) for p in self.parts], dim=-1)
        return out if self.order is None else out.index_select(-1, self.order)


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


def src_rank(full_rank: int, beta: float) -> int:
    """Ranks kept by Selective Rank Compression: round((1 - beta) * full_rank), at least 1."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return max(1, round((1.0 - beta) * full_rank))


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
