"""What `tune` writes and `upload` sends: the adapter files in an output folder.

- `--method full`: the adapter layers' weights, `adapter_layers.safetensors` (full-model names, issued dtype).
- `--method lora`: PEFT's own pair, `adapter_model.safetensors` + `adapter_config.json`, loadable with
  `PeftModel.from_pretrained(full_model, folder)` on the model owner's full model.
- both: `scaleot_adapter.json`, the training record (emulator, hyperparameters, losses, metrics).
Folders written before these names (`adapter_model.safetensors` holding whole layers, our record in
`adapter_config.json`) are still read and uploaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from shared.adapter import load_and_validate_adapter_file, read_safetensors_header
from shared.lora import LoraSpec, check_peft_config, file_spec, is_lora

from .errors import BadInputError

if TYPE_CHECKING:
    from peft import PeftModel

LAYERS_FILE = "adapter_layers.safetensors"
LORA_FILE = "adapter_model.safetensors"  # PEFT's names: only ever a PEFT LoRA
PEFT_CONFIG_FILE = "adapter_config.json"
RECORD_FILE = "scaleot_adapter.json"
ADAPTER_FORMAT = "scaleot-adapter/v1"
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_layers(tensors: dict[str, torch.Tensor], out_dir: Path) -> Path:
    path = out_dir / LAYERS_FILE
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def save_peft_lora(peft_model: PeftModel, lora: LoraSpec, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """PEFT's adapter_model.safetensors (in the issued dtype) + adapter_config.json, checked against `lora`
    exactly as the server will. Returns the tensor file and PEFT's config."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    dtype = _TORCH_DTYPES[lora.dtype]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    path = out_dir / LORA_FILE
    save_file(tensors, path, metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(out_dir))
    config = json.loads((out_dir / PEFT_CONFIG_FILE).read_text())
    load_and_validate_adapter_file(path, file_spec(lora))
    check_peft_config(config, lora)
    return path, config


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    path = out_dir / RECORD_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return value


def read_adapter(adapter: Path) -> tuple[Path, dict[str, Any] | None]:
    """The tensor file and the upload's adapter_config part for an adapter folder (or a tensor file beside
    its JSON files): our record, with PEFT's config under 'peft' when the tensors are a LoRA."""
    if adapter.is_dir():
        found = [adapter / n for n in (LORA_FILE, LAYERS_FILE) if (adapter / n).is_file()]
        if not found:
            raise BadInputError(f"{adapter}: holds neither {LORA_FILE} (LoRA) nor {LAYERS_FILE} (whole layers)")
        adapter = found[0]
    if not adapter.is_file():
        raise BadInputError(f"{adapter}: no such adapter file")
    folder = adapter.parent
    record = read_json(folder / RECORD_FILE) if (folder / RECORD_FILE).is_file() else None
    peft = read_json(folder / PEFT_CONFIG_FILE) if (folder / PEFT_CONFIG_FILE).is_file() else None
    if peft is not None and "peft_type" not in peft:  # an older client's record under PEFT's name
        record, peft = record or peft, None
    try:
        lora = is_lora(read_safetensors_header(adapter))
    except ValueError as exc:
        raise BadInputError(f"{adapter}: {exc}") from None
    if lora and peft is not None:
        record = {**(record or {}), "peft": peft}
    return adapter, record
