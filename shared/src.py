"""Selective Rank Compression (SRC): the one module for its maths (docs/algorithm.md, "SRC").

In a frozen (kept) layer, each attention projection W (q, k, v, o; never the FFN) is replaced by its best
rank-r approximation, r = round((1 - beta) * rank(W)): the truncated SVD (Eckart–Young optimal). A fused q/k/v
projection is compressed block by block (q, k and v separately). The result is stored as two factors where that
is smaller than the matrix, else as the rank-reduced matrix kept dense, so SRC never grows the emulator file.

Both parties use this module: the model owner compresses real weights (`compress_projection(..., compress=True)`),
the data owner builds the same shapes empty and loads the file's tensors into them (`compress=False`).
"""

from __future__ import annotations

import torch
from torch import nn

from shared.architectures import Projection, decoder_layers, family_for, projection_blocks
from shared.layer_plan import LayerPlan, Role


def src_rank(full_rank: int, beta: float) -> int:
    """Ranks kept by Selective Rank Compression: round((1 - beta) * full_rank), at least 1."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return max(1, round((1.0 - beta) * full_rank))


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


# ---------------------------------------------------------------- the projections (blocks: shared/architectures.py)


def projection_weight(module: nn.Module, proj: Projection) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as (out, in), bias) of an nn.Linear or a GPT-2 Conv1D."""
    weight: torch.Tensor = module.get_parameter("weight")
    bias: torch.Tensor | None = getattr(module, "bias", None)
    return (weight.T if proj.conv1d else weight), bias


def projection_full_ranks(layer: nn.Module, proj: Projection) -> list[int]:
    """The full rank of each block of one projection (min of its rows and the input width)."""
    weight, _ = projection_weight(layer.get_submodule(proj.path), proj)
    out_f, in_f = weight.shape
    return [min(len(rows), in_f) for rows in projection_blocks(proj, layer, out_f)]


# ---------------------------------------------------------------- ranks of a plan, and compressing


def src_ranks(layer: nn.Module, projections: tuple[Projection, ...], beta: float) -> dict[str, list[int]]:
    """{projection path: ranks kept per block} of one layer at ratio beta."""
    return {p.path: [src_rank(r, beta) for r in projection_full_ranks(layer, p)] for p in projections}


def with_src_ranks(plan: LayerPlan, model: nn.Module) -> LayerPlan:
    """Fill `plan.ranks` for its frozen layers when beta > 0 (in place; returns the plan)."""
    if plan.beta > 0:
        layers = decoder_layers(model)
        projections = family_for(model.config).projections
        plan.ranks = {i: src_ranks(layers[i], projections, plan.beta) for i in plan.layers_with(Role.FROZEN)}
    return plan


def compress_projection(layer: nn.Module, proj: Projection, ranks: list[int], compress: bool) -> nn.Module:
    """The SRC module replacing `proj` of `layer`: SVD of the real weights (compress=True) or, for the data
    owner's skeleton, the same shapes with uninitialised values that the emulator file then fills."""
    weight, bias = projection_weight(layer.get_submodule(proj.path), proj)
    out_f, in_f = weight.shape
    blocks = projection_blocks(proj, layer, out_f)
    parts: list[nn.Module] = []
    for rows, rank in zip(blocks, ranks, strict=True):
        w = weight[rows]
        b = None if bias is None else bias[rows]
        # Same rule on both sides: two factors where they are smaller, else the rank-reduced matrix kept dense.
        cls = LowRankLinear if factors_are_smaller(in_f, len(rows), rank) else RankReducedLinear
        if compress:
            parts.append(cls.from_weight(w, b, rank))
        else:  # skeleton: right shapes, values come from the emulator file
            parts.append(cls(in_f, len(rows), rank, bias is not None).to(weight.dtype))
    return parts[0] if len(parts) == 1 else ConcatLinear(parts, torch.cat(blocks))
