"""One registry of decoder-only model families: where the decoder layers and attention projections live.

To support a new family, add one `Family` entry to `FAMILIES`. Everything else (stage 1, stage 2,
emulator files, plug-in) finds layers and projections only through this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's family is not in the registry, or its modules are not where the registry says."""


@dataclass(frozen=True)
class Projection:
    """One attention weight matrix inside a decoder layer, relative to the layer."""

    path: str  # e.g. "self_attn.q_proj"
    conv1d: bool = False  # GPT-2's Conv1D stores the weight as (in, out), not (out, in)
    # Fused q/k/v projections are rank-compressed per block (the spec compresses W_q, W_k, W_v separately):
    #   "qkv"          rows are [q | k | v] (GPT-2 c_attn; Phi-3 qkv_proj, where k and v may have fewer heads)
    #   "qkv_per_head" rows are [q_h | k_h | v_h] for each head h in turn (GPT-NeoX query_key_value)
    fused: str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted path from the CausalLM to its nn.ModuleList of decoder layers
    projections: tuple[Projection, ...]  # the MHSA projections SRC may compress (never the FFN)


_LLAMA_ATTN = tuple(Projection(f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj"))

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", _LLAMA_ATTN),
    # Gemma 2/3: same projections; q_norm/k_norm (Gemma 3) are norms, not projections, so SRC leaves them.
    # Sliding/full attention alternates per layer via config.layer_types, read by the model, not the layer.
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), "model.layers", _LLAMA_ATTN),
    Family(
        "phi3",
        ("phi3",),
        "model.layers",
        (Projection("self_attn.qkv_proj", fused="qkv"), Projection("self_attn.o_proj")),
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        (Projection("attention.query_key_value", fused="qkv_per_head"), Projection("attention.dense")),
    ),
    Family(
        "opt",
        ("opt",),
        "model.decoder.layers",
        tuple(Projection(f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
    ),
    Family(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        (Projection("attn.c_attn", conv1d=True, fused="qkv"), Projection("attn.c_proj", conv1d=True)),
    ),
)


def family_for(config) -> Family:
    """The registry entry for a transformers config (or anything with `model_type`)."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported: {', '.join(known)}. "
        "Add a Family entry in shared/architectures.py naming its decoder-layer list and attention projections "
        "(and a tiny config in scaleot_samples/tiny.py, so the per-family tests cover it)."
    )


def _qkv_heads(config, out_features: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a fused projection with `out_features` rows."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim, rest = divmod(out_features, heads + 2 * kv_heads)
    if rest:
        raise UnsupportedArchitectureError(
            f"a fused q/k/v projection with {out_features} outputs does not split "
            f"into {heads} query and 2 x {kv_heads} key/value heads"
        )
    return heads, kv_heads, head_dim


def projection_blocks(proj: Projection, layer: nn.Module, out_features: int) -> list[torch.Tensor]:
    """Output-row indices of each block SRC compresses separately: one block, or q, k, v of a fused projection.

    Head counts come from the config the attention module keeps (every transformers attention class does)."""
    rows = torch.arange(out_features)
    if proj.fused is None:
        return [rows]
    attn_path = proj.path.rpartition(".")[0]
    config = getattr(layer.get_submodule(attn_path) if attn_path else layer, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(f"{attn_path!r} keeps no config; cannot split the fused {proj.path}")
    heads, kv_heads, head_dim = _qkv_heads(config, out_features)
    if proj.fused == "qkv":
        return list(rows.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]))
    if proj.fused == "qkv_per_head":  # (heads, 3, head_dim): row h*3d + j*d + t belongs to block j
        if kv_heads != heads:
            raise UnsupportedArchitectureError("per-head fused q/k/v needs as many key/value heads as query heads")
        per_head = rows.view(heads, 3, head_dim)
        return [per_head[:, j].reshape(-1) for j in range(3)]
    raise UnsupportedArchitectureError(f"unknown fused projection layout {proj.fused!r} for {proj.path}")


def get_submodule(root: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(f"{what} not found at {path!r} in {type(root).__name__}") from exc


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    fam = family_for(model.config)
    layers = get_submodule(model, fam.layers_path, "decoder layer list")
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{fam.layers_path!r} is a {type(layers).__name__}, expected nn.ModuleList")
    return layers


def layer_prefix(model: nn.Module, index: int) -> str:
    """State-dict prefix of decoder layer `index`, e.g. 'model.layers.3.'."""
    return f"{family_for(model.config).layers_path}.{index}."


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))
