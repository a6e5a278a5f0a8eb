"""Plug-in: M' = [A', E]. Only the issued adapter tensors are accepted; M itself is never modified.

An adapter is either whole adapter layers (their weights replace M's) or a PEFT LoRA of the adapter layers'
linear modules (merged: W + alpha/r * B A, W always M's own weight), as the emulator's LoRA spec issued.

Two ways to get M': `plug_in` makes a standalone copy of M (the evaluation job), and `layer_copy` +
`write_adapter` make and refill a serving copy that shares every tensor with M except the adapter layers'
parameters, so that serving many adapters costs one set of adapter layers per resident copy, not one M per
adapter. Both write the adapter layers with `write_adapter`, so they give the same model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.adapter import AdapterValidationError, TensorSpec, adapter_spec, spec_from_json, validate_adapter
from shared.architectures import decoder_layers, layer_prefix
from shared.lora import PEFT_PREFIX, LoraSpec, file_spec, is_lora, issued_lora, linear_modules, load_adapter


def check_adapter(
    model: nn.Module,
    adapter: dict[str, torch.Tensor],
    adapter_layers: list[int],
    spec: dict[str, TensorSpec] | None = None,
    lora: LoraSpec | None = None,
) -> None:
    """Raise AdapterValidationError unless `adapter` is exactly what the emulator issued for this full model:
    whole adapter layers (`spec`, default: the full model's adapter layers) or its issued LoRA."""
    full = adapter_spec(model, adapter_layers)
    if spec is not None and {k: v.shape for k, v in spec.items()} != {k: v.shape for k, v in full.items()}:
        raise AdapterValidationError(
            "the emulator's adapter spec does not match this full model's adapter layers; "
            "was the emulator built from a different model?"
        )
    if is_lora(adapter):
        if lora is None:
            raise AdapterValidationError("a LoRA adapter needs the emulator's LoRA spec; upload whole layers instead")
        if lora.modules != linear_modules(model, adapter_layers):
            raise AdapterValidationError(
                "the emulator's LoRA spec does not match this full model's adapter layers; "
                "was the emulator built from a different model?"
            )
        validate_adapter(adapter, file_spec(lora))
    else:
        validate_adapter(adapter, spec if spec is not None else full)


def _layer_params(model: nn.Module, adapter_layers: list[int]) -> dict[str, nn.Parameter]:
    blocks = decoder_layers(model)
    return {layer_prefix(model, i) + name: p for i in adapter_layers for name, p in blocks[i].named_parameters()}


def write_adapter(
    target: nn.Module,
    base: nn.Module,
    adapter: dict[str, torch.Tensor],
    adapter_layers: list[int],
    lora: LoraSpec | None = None,
) -> None:
    """Set every parameter of `target`'s adapter layers to M' = [A', E]'s value, in place. `target` is a copy
    of `base` (M); `adapter` was checked with `check_adapter`. Whole layers: the adapter's tensors. LoRA:
    base's weight + alpha/r * B A (computed in fp32, then cast) for the issued modules and base's value for
    the rest, always from base's untouched weights, so refilling a copy with another adapter never
    accumulates merges and leaves nothing of the previous adapter behind."""
    originals = _layer_params(base, adapter_layers)
    merged = is_lora(adapter)
    if merged and lora is None:
        raise AdapterValidationError("a LoRA adapter needs the emulator's LoRA spec; upload whole layers instead")
    with torch.no_grad():
        for name, dst in _layer_params(target, adapter_layers).items():
            src = originals[name]
            if not merged:
                value = adapter[name]  # present: the names were validated against this model's layers
                dst.copy_(value.to(device=dst.device, dtype=dst.dtype))
                continue
            assert lora is not None
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in lora.modules:
                a = adapter[f"{PEFT_PREFIX}{module}.lora_A.weight"].float()
                b = adapter[f"{PEFT_PREFIX}{module}.lora_B.weight"].float()
                delta = (b @ a).to(src.device) * lora.scaling
                dst.copy_(src.float() + (delta.T if lora.modules[module].conv1d else delta))
            else:
                dst.copy_(src)


def plug_in(
    model: nn.Module,
    adapter: dict[str, torch.Tensor],
    adapter_layers: list[int],
    spec: dict[str, TensorSpec] | None = None,
    lora: LoraSpec | None = None,
) -> nn.Module:
    """Validate `adapter` against the issued spec (default: the full model's adapter layers), then return a
    standalone copy of `model` with those layers' weights replaced (or the LoRA merged into them). Raises
    AdapterValidationError before touching anything."""
    check_adapter(model, adapter, adapter_layers, spec, lora)
    patched = copy.deepcopy(model)
    write_adapter(patched, model, adapter, adapter_layers, lora)
    return patched.eval()


def layer_copy(model: nn.Module, adapter_layers: list[int]) -> nn.Module:
    """A copy of `model` that owns only the adapter layers' parameters and shares every other parameter and
    buffer with `model` (the same tensors: no memory). Fill it with `write_adapter`; never modify its shared
    tensors (inference only), since they are M's."""
    own = {id(p) for p in _layer_params(model, adapter_layers).values()}
    shared = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in own]
    memo: dict[int, Any] = {id(t): t for t in shared}  # deepcopy returns memo hits as they are
    return copy.deepcopy(model, memo).eval()


def plug_in_file(
    model: nn.Module,
    path: str | Path,
    adapter_layers: list[int],
    adapter_spec_json: dict[str, Any],
    build_info: dict[str, Any] | None,
) -> nn.Module:
    """Load a stored adapter file of either kind, validated against what the emulator issued, and plug it in
    (the emulator row's adapter_layers, adapter_spec and build_info)."""
    spec, lora = spec_from_json(adapter_spec_json), issued_lora(build_info)
    return plug_in(model, load_adapter(path, spec, lora), list(adapter_layers), spec, lora)
