"""Plug-in: M' = [A', E]. Only the issued adapter tensors are accepted; M itself is never modified."""

from __future__ import annotations

import copy

import torch
from torch import nn

from shared.adapter import AdapterValidationError, TensorSpec, adapter_spec, validate_adapter


def plug_in(
    model: nn.Module,
    adapter: dict[str, torch.Tensor],
    adapter_layers: list[int],
    spec: dict[str, TensorSpec] | None = None,
) -> nn.Module:
    """Validate `adapter` against the issued spec (default: the full model's adapter layers), then return a
    copy of `model` with those layers' weights replaced. Raises AdapterValidationError before touching anything."""
    full = adapter_spec(model, adapter_layers)
    if spec is not None and {k: v.shape for k, v in spec.items()} != {k: v.shape for k, v in full.items()}:
        raise AdapterValidationError("the emulator's adapter spec does not match this full model's adapter layers; "
                                     "was the emulator built from a different model?")
    validate_adapter(adapter, spec if spec is not None else full)
    patched = copy.deepcopy(model)
    params = dict(patched.named_parameters())
    with torch.no_grad():
        for name, tensor in adapter.items():
            target = params[name]  # present: names were validated against this model's layers
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return patched.eval()
