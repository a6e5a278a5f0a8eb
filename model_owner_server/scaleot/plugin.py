"""Plug-in: M' = [A', E]. Only the issued adapter tensors are accepted; M itself is never modified.

An adapter is either whole adapter layers (their weights replace M's) or a PEFT LoRA of the adapter layers'
linear modules (merged into a copy of M: W + alpha/r * B A), as the emulator's LoRA spec issued.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.adapter import AdapterValidationError, TensorSpec, adapter_spec, spec_from_json, validate_adapter
from shared.lora import LoraSpec, file_spec, is_lora, issued_lora, linear_modules, load_adapter, merge_lora


def plug_in(
    model: nn.Module,
    adapter: dict[str, torch.Tensor],
    adapter_layers: list[int],
    spec: dict[str, TensorSpec] | None = None,
    lora: LoraSpec | None = None,
) -> nn.Module:
    """Validate `adapter` against the issued spec (default: the full model's adapter layers), then return a
    copy of `model` with those layers' weights replaced (or the LoRA merged into them). Raises
    AdapterValidationError before touching anything."""
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
        patched = copy.deepcopy(model)
        merge_lora(patched, adapter, lora)
        return patched.eval()
    validate_adapter(adapter, spec if spec is not None else full)
    patched = copy.deepcopy(model)
    params = dict(patched.named_parameters())
    with torch.no_grad():
        for name, tensor in adapter.items():
            target = params[name]  # present: names were validated against this model's layers
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return patched.eval()


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
