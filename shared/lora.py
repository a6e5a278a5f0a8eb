"""LoRA adapters as PEFT writes them: the issued LoRA spec, its file names, config checks and the merge.

The model owner issues, with each emulator, the LoRA it accepts (`LoraSpec`): rank, alpha, storage dtype and
the target modules, which are every linear module of the adapter layers by its FULL-model name (the emulator
keeps each layer at its position, so PEFT's names in the emulator are the full model's). A LoRA upload is
PEFT's `adapter_model.safetensors` (lora_A/lora_B of exactly those modules) plus PEFT's
`adapter_config.json`; `PeftModel.from_pretrained(full_model, folder)` loads it, and the server merges it
(W + alpha/r * B A) into a copy of the full model, which gives the same logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from shared.adapter import (
    DTYPE_NAMES,
    AdapterValidationError,
    TensorSpec,
    load_and_validate_adapter_file,
    read_safetensors_header,
    validate_adapter_file,
)
from shared.architectures import decoder_layers, layer_prefix
from shared.importance_config import LORA_ALPHA, LORA_R

DEFAULT_R = LORA_R  # one source: shared/importance_config.py
DEFAULT_ALPHA = LORA_ALPHA
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the model as base_model.model
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraModule:
    in_features: int
    out_features: int
    conv1d: bool  # GPT-2 Conv1D stores its weight as (in, out): PEFT's fan_in_fan_out


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA an emulator accepts: exactly these modules, this rank and alpha, tensors in this dtype."""

    r: int
    alpha: float
    dtype: str  # safetensors dtype name, e.g. "F32"
    modules: dict[str, LoraModule]  # full-model module name -> shape

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_json(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dtype": self.dtype,
            "target_modules": {
                k: {"in": m.in_features, "out": m.out_features, "conv1d": m.conv1d} for k, m in self.modules.items()
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoraSpec:
        mods = {k: LoraModule(int(v["in"]), int(v["out"]), bool(v["conv1d"])) for k, v in d["target_modules"].items()}
        return cls(int(d["r"]), float(d["alpha"]), str(d["dtype"]), mods)


def issued_lora(build_info: dict[str, Any] | None) -> LoraSpec | None:
    """The LoRA spec stored with an emulator (its build_info), or None for emulators built before LoRA uploads."""
    d = (build_info or {}).get("lora")
    return LoraSpec.from_json(d) if d else None


def linear_modules(model: nn.Module, layers: list[int]) -> dict[str, LoraModule]:
    """Every linear (nn.Linear, GPT-2 Conv1D) inside the given decoder layers, by full-model module name.

    Full names, not suffixes like "q_proj": the same projections exist in frozen layers, which must get no
    LoRA (their updates could never be exported)."""
    blocks = decoder_layers(model)
    out: dict[str, LoraModule] = {}
    for i in layers:
        prefix = layer_prefix(model, i)
        for n, m in blocks[i].named_modules():
            if isinstance(m, Conv1D):
                out[prefix + n] = LoraModule(m.weight.shape[0], m.weight.shape[1], True)
            elif isinstance(m, nn.Linear):
                out[prefix + n] = LoraModule(m.in_features, m.out_features, False)
    return out


def issue_lora(
    model: nn.Module,
    layers: list[int],
    r: int = DEFAULT_R,
    alpha: float = DEFAULT_ALPHA,
    dtype: torch.dtype | None = None,
) -> LoraSpec:
    """The LoRA spec for `layers` of `model`, tensors in `dtype` (default: the model's)."""
    dtype = dtype or next(model.parameters()).dtype
    return LoraSpec(r, float(alpha), DTYPE_NAMES[dtype], linear_modules(model, layers))


def file_spec(lora: LoraSpec) -> dict[str, TensorSpec]:
    """The tensors of PEFT's adapter_model.safetensors for this spec: A (r, in) and B (out, r) per module."""
    spec: dict[str, TensorSpec] = {}
    for name, m in lora.modules.items():
        spec[f"{PEFT_PREFIX}{name}.lora_A.weight"] = TensorSpec((lora.r, m.in_features), lora.dtype)
        spec[f"{PEFT_PREFIX}{name}.lora_B.weight"] = TensorSpec((m.out_features, lora.r), lora.dtype)
    return spec


def is_lora(names: Iterable[str]) -> bool:
    """True when tensor names are PEFT LoRA names (any lora_A/lora_B): the file is a LoRA, not whole layers."""
    return any(n.endswith(LORA_SUFFIXES) for n in names)


def _fail(what: str) -> AdapterValidationError:
    return AdapterValidationError(
        f"LoRA {what}. Retrain with `dataowner-client tune --method lora` "
        "(it uses the emulator's issued LoRA spec) or upload whole layers (--method full)."
    )


def peft_config_of(config: dict[str, Any] | None) -> dict[str, Any]:
    """PEFT's adapter_config.json from an upload's adapter_config part: nested as 'peft' (what the client
    sends) or the PEFT file itself."""
    if config and isinstance(config.get("peft"), dict):
        return config["peft"]
    if config and "peft_type" in config:
        return config
    raise _fail(
        "upload without its PEFT config: send PEFT's adapter_config.json as the 'adapter_config' part "
        "(alpha cannot be read from the tensors)"
    )


def check_peft_config(config: dict[str, Any], lora: LoraSpec) -> None:
    """PEFT's adapter_config.json must describe exactly the issued LoRA: plain LoRA, issued r, alpha, modules."""
    if config.get("peft_type") != "LORA":
        raise _fail(f"config has peft_type {str(config.get('peft_type'))[:50]!r}, not 'LORA'")
    if config.get("r") != lora.r:
        raise _fail(f"rank r={str(config.get('r'))[:50]} was not issued: this emulator accepts r={lora.r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or float(alpha) != lora.alpha:
        raise _fail(f"lora_alpha={str(alpha)[:50]} was not issued: this emulator accepts lora_alpha={lora.alpha:g}")
    targets = config.get("target_modules")
    got = {str(t) for t in targets} if isinstance(targets, list) else {str(targets)}
    if got != set(lora.modules):
        extra, missing = sorted(got - set(lora.modules)), sorted(set(lora.modules) - got)
        raise _fail(
            f"target modules were not issued (unexpected {extra[:3]}, missing {missing[:3]}): target "
            "exactly the adapter layers' linear modules by full name"
        )
    for key, plain in (("use_dora", False), ("use_rslora", False), ("bias", "none")):
        if config.get(key, plain) != plain:
            raise _fail(f"option {key}={str(config[key])[:50]!r} is not supported (only plain LoRA merges as issued)")
    # Per-module ranks/alphas would change the merge silently; whole modules would leave the issued layers.
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if config.get(key):
            raise _fail(f"option {key} is not supported: one rank and alpha for exactly the issued modules")


def merge_lora(model: nn.Module, tensors: dict[str, torch.Tensor], lora: LoraSpec) -> None:
    """W += alpha/r * B @ A for every issued module of `model`, in place (computed in fp32, then cast)."""
    with torch.no_grad():
        for name, m in lora.modules.items():
            a = tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"].float()
            b = tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"].float()
            weight = model.get_submodule(name).get_parameter("weight")
            delta = (b @ a).to(weight.device) * lora.scaling
            weight.copy_(weight.float() + (delta.T if m.conv1d else delta))


def expected_tensors(path: str | Path, spec: dict[str, TensorSpec], lora: LoraSpec | None) -> dict[str, TensorSpec]:
    """What an adapter file must hold: PEFT LoRA tensors when its names are LoRA names, else whole layers."""
    if not is_lora(read_safetensors_header(path)):
        return spec
    if lora is None:
        raise AdapterValidationError(
            "this emulator was issued without a LoRA spec (built before LoRA uploads): "
            "upload whole adapter layers (--method full), or build a new emulator"
        )
    return file_spec(lora)


def validate_upload(
    path: str | Path,
    spec: dict[str, TensorSpec],
    lora: LoraSpec | None,
    config: dict[str, Any] | None,
    max_bytes: int | None,
) -> str:
    """Stream-check an uploaded adapter (whole layers or PEFT LoRA); returns its method, 'full' or 'lora'."""
    want = expected_tensors(path, spec, lora)
    if want is spec:
        validate_adapter_file(path, spec, max_bytes)
        return "full"
    assert lora is not None
    check_peft_config(peft_config_of(config), lora)
    validate_adapter_file(path, want)  # cap: the LoRA tensors' own size (a few MB)
    return "lora"


def load_adapter(path: str | Path, spec: dict[str, TensorSpec], lora: LoraSpec | None) -> dict[str, torch.Tensor]:
    """Validate, then load, a stored adapter file of either kind."""
    return load_and_validate_adapter_file(path, expected_tensors(path, spec, lora))
