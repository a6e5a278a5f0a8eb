"""GGUF (llama.cpp) checkpoints -> a plain local Hugging Face safetensors folder the service can register.

transformers reads the GGUF file and DEQUANTISES every tensor (Q4_K, Q8_0, ... become float32): the folder
holds ordinary float weights, as large as the unquantised model, and the emulator is built from those.
A GGUF-loaded model does not save_pretrained cleanly (its config carries quantization_config), so we rebuild a
plain config, load the dequantised state dict into a fresh model, and save that once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from model_owner_server.scaleot.model_io import ModelLoadError
from shared.architectures import UnsupportedArchitectureError, family_for

SOURCE_FILE = "scaleot_source.json"  # written last-but-one (before the rename): what the folder was made from
_GGUF_MAGIC = b"GGUF"


def _gguf_facts(path: Path) -> dict[str, Any]:
    """Architecture and tensor types from the file's header (memory-mapped: no weights are read)."""
    from gguf import GGUFReader

    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: unreadable GGUF header ({exc})") from exc
    return {"architecture": arch, "tensor_types": sorted({t.tensor_type.name for t in reader.tensors})}


def _plain_config(path: Path, arch: str):
    """The GGUF's model config as transformers builds it, checked against our family registry before any
    weight is dequantised."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(
            f"{path}: transformers cannot read a GGUF of architecture {arch!r} ({exc}); convert "
            "the original Hugging Face checkpoint instead and register that folder"
        ) from exc
    try:
        family_for(config)
    except UnsupportedArchitectureError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def import_gguf(
    gguf_file: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    source: dict[str, Any] | None = None,
) -> Path:
    """Convert `gguf_file` (any architecture of a supported family that transformers reads) into `out_dir`:
    config.json, model.safetensors (dequantised, stored in `dtype`), the tokenizer and scaleot_source.json.

    Idempotent: an `out_dir` already converted from a file of the same name and size is returned as is; any
    other non-empty `out_dir` is refused rather than overwritten."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = Path(gguf_file), Path(out_dir)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)[:300]!r} does not exist")
    if (out / SOURCE_FILE).is_file() and (out / "config.json").is_file():
        done = json.loads((out / SOURCE_FILE).read_text())
        if done.get("file") == path.name and done.get("bytes", path.stat().st_size) == path.stat().st_size:
            return out
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(
            f"{out} already exists and is not a conversion of {path.name}; choose another --output or remove it"
        )
    facts = _gguf_facts(path)
    config = _plain_config(path, facts["architecture"])
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion interrupted earlier
    model.to(dtype).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        **(source or {}),
        "file": path.name,
        "bytes": path.stat().st_size,
        **facts,
        "dequantised_to": str(dtype).removeprefix("torch."),
    }
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return out
