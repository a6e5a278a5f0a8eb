"""Stage 2: from (M, S, H) to an emulator at (N_a, alpha, beta), with no further training.

- N_a most important layers (by S) -> adapter: original, trainable, at their original positions.
- the least important alpha share of the other layers -> their harmonizers.
- the rest -> frozen originals whose attention q/k/v/o (never the FFN) keep round((1 - beta) * rank)
  singular values (Selective Rank Compression), stored as two factors so the file shrinks.
Also the OT baseline: uniform LayerDrop (first/last 2 layers adapter, middle layers evenly dropped).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from shared.architectures import decoder_layers, family_for
from shared.emulator_file import EmulatorFileInfo, count_params, save_emulator
from shared.emulator_model import apply_plan, src_ranks
from shared.layer_plan import LayerPlan, Role
from shared.modules import Harmonizer

from .importance import ImportanceResult


def scaleot_plan(scores: torch.Tensor, n_adapter: int, alpha: float, beta: float, model: nn.Module,
                 bottleneck: int = 64) -> LayerPlan:
    n = len(scores)
    if not 1 <= n_adapter <= n:
        raise ValueError(f"n_adapter must be between 1 and the number of layers ({n}), got {n_adapter}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))  # most important first; ties by position
    adapter = set(order[:n_adapter])
    rest = order[n_adapter:][::-1]  # least important first
    harmonized = set(rest[: round(alpha * len(rest))])
    roles = [Role.ADAPTER if i in adapter else Role.HARMONIZER if i in harmonized else Role.FROZEN for i in range(n)]
    return _with_ranks(LayerPlan(roles, {}, "scaleot", n_adapter, alpha, beta, bottleneck if harmonized else 0), model)


def uniform_layerdrop_plan(n_layers: int, n_dropped: int, n_edge: int = 2) -> LayerPlan:
    """OT baseline: adapter = first and last `n_edge` layers; `n_dropped` middle layers evenly dropped."""
    middle = list(range(n_edge, n_layers - n_edge))
    if n_layers <= 2 * n_edge or not 0 <= n_dropped <= len(middle):
        raise ValueError(f"cannot drop {n_dropped} of the {len(middle)} middle layers of a {n_layers}-layer model")
    # Evenly spaced: the centre of each of n_dropped equal slices of the middle.
    dropped = {middle[int((j + 0.5) * len(middle) / n_dropped)] for j in range(n_dropped)}
    roles = [Role.ADAPTER if i not in middle else Role.DROPPED if i in dropped else Role.FROZEN for i in range(n_layers)]
    return LayerPlan(roles, {}, "uniform_layerdrop", 2 * n_edge, n_dropped / max(1, len(middle)), 0.0, 0)


def _with_ranks(plan: LayerPlan, model: nn.Module) -> LayerPlan:
    """Fill the SRC ranks of frozen layers (beta > 0)."""
    if plan.beta > 0:
        layers = decoder_layers(model)
        projections = family_for(model.config).projections
        plan.ranks = {i: src_ranks(layers[i], projections, plan.beta) for i in plan.layers_with(Role.FROZEN)}
    return plan


def build_emulator(model: nn.Module, plan: LayerPlan, harmonizers: dict[int, Harmonizer] | None = None) -> nn.Module:
    """A new emulator module for `plan` (M itself is untouched)."""
    if plan.layers_with(Role.HARMONIZER) and harmonizers is None:
        raise ValueError("this plan has harmonizer positions: pass the harmonizers from stage 1")
    emu = copy.deepcopy(model)
    hs = {i: copy.deepcopy(h) for i, h in (harmonizers or {}).items()}
    with torch.no_grad():
        apply_plan(emu, plan, hs, compress=True)
    emu.config = copy.deepcopy(emu.config)
    emu.requires_grad_(False)
    for i in plan.adapter_layers:
        decoder_layers(emu)[i].requires_grad_(True)
    return emu.eval()


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def make_emulator(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    importance: ImportanceResult | None,
    n_adapter: int,
    alpha: float,
    beta: float,
    output: str | Path,
    *,
    method: str = "scaleot",
    n_dropped: int | None = None,
    dtype: torch.dtype | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> EmulatorFileInfo:
    """Plan, build and save an emulator; the returned info carries sizes next to the full model's."""
    if method == "scaleot":
        if importance is None:
            raise ValueError("ScaleOT emulators need a stage-1 importance run")
        plan = scaleot_plan(importance.scores, n_adapter, alpha, beta, model, importance.config.bottleneck)
        harmonizers = importance.harmonizers
    elif method == "uniform_layerdrop":
        n_layers = len(decoder_layers(model))
        plan = uniform_layerdrop_plan(n_layers, n_dropped if n_dropped is not None else (n_layers - 4) // 2)
        harmonizers = None
    else:
        raise ValueError(f"unknown emulator method {method!r}; use 'scaleot' or 'uniform_layerdrop'")
    emu = build_emulator(model, plan, harmonizers)
    if dtype is not None:
        emu.to(dtype)
    sizes = {"full_model_params": count_params(model), "full_model_bytes": param_bytes(model)}
    info = save_emulator(emu, plan, tokenizer, output, {**sizes, **(extra_metadata or {})})
    info.extra.update(sizes)
    return info
