"""Turning a full causal LM into an emulator's module structure according to a LayerPlan.

Used by both parties: the model owner applies it to real weights (SVD compression happens here), the data
owner applies it to a freshly initialised skeleton and then loads the emulator file's tensors into it. One
code path means the state-dict names always agree.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from shared.architectures import Projection, decoder_layers, family_for, projection_blocks
from shared.layer_plan import LayerPlan, Role
from shared.modules import (
    ConcatLinear,
    DroppedLayer,
    Harmonizer,
    HarmonizerLayer,
    LowRankLinear,
    RankReducedLinear,
    factors_are_smaller,
    src_rank,
)


def projection_weight(module: nn.Module, proj: Projection) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as (out, in), bias) of an nn.Linear or a GPT-2 Conv1D."""
    weight: torch.Tensor = module.get_parameter("weight")
    bias: torch.Tensor | None = getattr(module, "bias", None)
    return (weight.T if proj.conv1d else weight), bias


def projection_full_ranks(layer: nn.Module, proj: Projection) -> list[int]:
    weight, _ = projection_weight(layer.get_submodule(proj.path), proj)
    out_f, in_f = weight.shape
    return [min(len(rows), in_f) for rows in projection_blocks(proj, layer, out_f)]


def src_ranks(layer: nn.Module, projections: tuple[Projection, ...], beta: float) -> dict[str, list[int]]:
    return {p.path: [src_rank(r, beta) for r in projection_full_ranks(layer, p)] for p in projections}


def _low_rank(layer: nn.Module, proj: Projection, ranks: list[int], compress: bool) -> nn.Module:
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


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, new)


def apply_plan(
    model: PreTrainedModel,
    plan: LayerPlan,
    harmonizers: dict[int, Harmonizer] | None = None,
    *,
    compress: bool = True,
) -> PreTrainedModel:
    """Rewrite `model` in place into the emulator structure of `plan` and return it.

    compress=True: SVD-compress real weights (model owner). compress=False: build shapes only (data owner,
    followed by loading the file's tensors). Harmonizer positions use `harmonizers[i]` or a fresh one.
    """
    fam = family_for(model.config)
    layers = decoder_layers(model)
    if plan.n_layers != len(layers):
        raise ValueError(f"plan has {plan.n_layers} layers, model has {len(layers)}")
    hidden = model.config.hidden_size
    ref = next(model.parameters())
    projections = {p.path: p for p in fam.projections}
    for i, role in enumerate(plan.roles):
        if role == Role.HARMONIZER:
            h = harmonizers[i] if harmonizers is not None else Harmonizer(hidden, plan.bottleneck)
            layers[i] = HarmonizerLayer(h).to(device=ref.device, dtype=ref.dtype)
        elif role == Role.DROPPED:
            layers[i] = DroppedLayer()
        elif role == Role.FROZEN and i in plan.ranks:
            for path, ranks in plan.ranks[i].items():
                if path not in projections:
                    raise ValueError(f"layer {i}: {path!r} is not an attention projection of {fam.name}")
                _set_submodule(layers[i], path, _low_rank(layers[i], projections[path], ranks, compress))
    # Harmonizer/dropped positions keep no KV cache; the emulator is for training and scoring, not generation.
    model.config.use_cache = False
    return model
