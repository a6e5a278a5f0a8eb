"""Turning a full causal LM into an emulator's module structure according to a LayerPlan.

Used by both parties: the model owner applies it to real weights (SRC compresses them: shared/src.py), the data
owner applies it to a freshly initialised skeleton and then loads the emulator file's tensors into it. One
code path means the state-dict names always agree.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from shared.architectures import decoder_layers, family_for
from shared.layer_plan import LayerPlan, Role
from shared.modules import DroppedLayer, Harmonizer, HarmonizerLayer
from shared.src import compress_projection


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, new)


def apply_plan(
    model: PreTrainedModel,
    plan: LayerPlan,
    harmonizers: dict[int, Harmonizer] | None = None,
    *,
    compress: bool = True,
    standin_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Rewrite `model` in place into the emulator structure of `plan` and return it.

    compress=True: SVD-compress real weights (model owner). compress=False: build shapes only (data owner,
    followed by loading the file's tensors; shared/src.py). Harmonizer positions use `harmonizers[i]` (given a
    fresh token mixer where the plan has one and it lacks it) or a fresh one, in `standin_dtype` (None: the
    model's dtype). The model owner builds them in float32 to calibrate them (a harmonizer computes in its own
    dtype and returns the model's) and casts the emulator when it saves it.
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
            if harmonizers is None:
                h = Harmonizer(hidden, plan.bottleneck, plan.mix_heads, plan.mix_head_dim)
            else:
                h = harmonizers[i]
                if plan.mix_heads and h.mix is None:  # stage 1 trains MLP stand-ins; the plan adds the mixer
                    h.add_mix(plan.mix_heads, plan.mix_head_dim, torch.Generator().manual_seed(i))
            layers[i] = HarmonizerLayer(h).to(device=ref.device, dtype=standin_dtype or ref.dtype)
        elif role == Role.DROPPED:
            layers[i] = DroppedLayer()
        elif role == Role.FROZEN and i in plan.ranks:
            for path, ranks in plan.ranks[i].items():
                if path not in projections:
                    raise ValueError(f"layer {i}: {path!r} is not an attention projection of {fam.name}")
                _set_submodule(layers[i], path, compress_projection(layers[i], projections[path], ranks, compress))
    # Harmonizer/dropped positions keep no KV cache; the emulator is for training and scoring, not generation.
    model.config.use_cache = False
    return model
