"""The emulator file: ONE safetensors file <-> (nn.Module, tokenizer, layer plan). No pickle anywhere.

Layout: every tensor of the emulator module (tied weights stored once) + string metadata:
  scaleot_format  "emulator/v1"
  config          the model's transformers config (JSON)
  plan            the LayerPlan (JSON): roles per position and SRC ranks
  tokenizer       the fast tokenizer's tokenizer.json (JSON string)
  tokenizer_extra special tokens and chat template (JSON)
  dtype           storage dtype of the floating tensors
  ...             anything the caller adds (model id, emulator id, sizes)
The data owner rebuilds the module from the config + plan (shapes only) and loads the tensors into it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights as _no_init_weights  # transformers 5.x (pinned)

from shared.architectures import family_for
from shared.emulator_model import apply_plan
from shared.layer_plan import LayerPlan
from shared.modules import count_params
from shared.signing import sha256_file

FORMAT = "emulator/v1"
# Storage dtypes an emulator may be built in: half size for bf16/fp16 (the data owner trains in fp32 anyway).
EMULATOR_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TOKENIZER_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token")


class EmulatorFileError(ValueError):
    """The file is not a readable ScaleOT emulator (wrong format, missing metadata, mismatched tensors)."""


@dataclass
class EmulatorFileInfo:
    path: Path
    sha256: str
    size_bytes: int
    n_params: int
    plan: LayerPlan
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedEmulator:
    model: nn.Module
    tokenizer: PreTrainedTokenizerFast
    plan: LayerPlan
    metadata: dict[str, str]


def emulator_dtype(name: str) -> torch.dtype:
    """The torch dtype for an emulator dtype name; ValueError naming the choices otherwise."""
    if name not in EMULATOR_DTYPES:
        raise ValueError(f"emulator dtype {name!r} is not supported; use one of {', '.join(EMULATOR_DTYPES)}")
    return EMULATOR_DTYPES[name]


def config_json(config) -> str:
    d = config.to_dict()
    d.pop("quantization_config", None)  # GGUF-loaded configs carry it; the emulator is plain weights
    return json.dumps(d, sort_keys=True)


def tokenizer_metadata(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EmulatorFileError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; the emulator file needs tokenizer.json"
        )
    extra: dict[str, Any] = {k: str(getattr(tokenizer, k)) for k in _TOKENIZER_FIELDS if getattr(tokenizer, k, None)}
    if getattr(tokenizer, "chat_template", None):
        extra["chat_template"] = tokenizer.chat_template
    return {"tokenizer": backend.to_str(), "tokenizer_extra": json.dumps(extra, sort_keys=True)}


def tokenizer_from_metadata(meta: dict[str, str]) -> PreTrainedTokenizerFast:
    extra = json.loads(meta.get("tokenizer_extra", "{}"))
    chat_template = extra.pop("chat_template", None)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(meta["tokenizer"]), **extra)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def save_emulator(
    model: nn.Module,
    plan: LayerPlan,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    extra_metadata: dict[str, Any] | None = None,
) -> EmulatorFileInfo:
    """Write the emulator atomically (temp file in the same folder, then rename) and return its digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()}
    metadata = {
        **extra,
        "scaleot_format": FORMAT,
        "config": config_json(model.config),
        "plan": json.dumps(plan.to_dict(), sort_keys=True),
        "dtype": str(dtype).removeprefix("torch."),
        "n_params": str(count_params(model)),
        **tokenizer_metadata(tokenizer),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_model(model, tmp, metadata=metadata)
        sha, _ = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return EmulatorFileInfo(path, sha, path.stat().st_size, int(metadata["n_params"]), plan, extra_metadata or {})


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's metadata from its header only (cheap); raises EmulatorFileError if it is not an emulator."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several error types for garbage input
        raise EmulatorFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("scaleot_format") != FORMAT:
        raise EmulatorFileError(f"{path}: not a ScaleOT emulator file (scaleot_format={meta.get('scaleot_format')!r})")
    missing = [k for k in ("config", "plan", "tokenizer", "dtype") if k not in meta]
    if missing:
        raise EmulatorFileError(f"{path}: emulator metadata lacks {missing}")
    return meta


def build_skeleton(meta: dict[str, str]) -> tuple[nn.Module, LayerPlan]:
    """An emulator-shaped module with uninitialised values, from the file's metadata alone."""
    cfg = json.loads(meta["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    family_for(config)  # clear error for an unsupported family before building anything
    plan = LayerPlan.from_dict(json.loads(meta["plan"]))
    dtype = getattr(torch, meta["dtype"])
    with _no_init_weights():  # every value is overwritten from the file: skip the random init (seconds at 135M)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied embeddings must share storage before loading (the file stores them once)
    return apply_plan(model, plan, compress=False), plan


def load_emulator(path: str | Path, device: str | torch.device = "cpu") -> LoadedEmulator:
    """Rebuild a working emulator module + tokenizer from the file alone."""
    meta = read_metadata(path)
    model, plan = build_skeleton(meta)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:
        raise EmulatorFileError(f"{path}: tensors do not match the emulator described in its metadata ({exc})") from exc
    if missing or unexpected:
        raise EmulatorFileError(
            f"{path}: tensors do not match the plan (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.to(device).eval()
    return LoadedEmulator(model, tokenizer_from_metadata(meta), plan, meta)
