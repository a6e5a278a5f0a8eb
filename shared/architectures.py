"""One registry of decoder-only model families: where the decoder layers and attention projections live.

To support a new family, add one `Family` entry to `FAMILIES`. Everything else (stage 1, stage 2,
emulator files, plug-in) finds layers and projections only through this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's family is not in the registry, or its modules are not where the registry says."""


@dataclass(frozen=True)
class Projection:
    """One attention weight matrix inside a decoder layer, relative to the layer."""

    path: str  # e.g. "self_attn.q_proj"
    conv1d: bool = False  # GPT-2's Conv1D stores the weight as (in, out), not (out, in)
    splits: int = 1  # fused projections (GPT-2 c_attn = q|k|v) are rank-compressed per block


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted path from the CausalLM to its nn.ModuleList of decoder layers
    projections: tuple[Projection, ...]  # the MHSA projections SRC may compress (never the FFN)


_LLAMA_ATTN = tuple(Projection(f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj"))

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", _LLAMA_ATTN),
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
        (Projection("attn.c_attn", conv1d=True, splits=3), Projection("attn.c_proj", conv1d=True)),
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
        "Add a Family entry in shared/architectures.py naming its decoder-layer list and attention projections."
    )


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
