"""The one CPU/GPU switch for both parties: which device, and whether to autocast to bf16.

Every device choice in the project goes through `resolve_device`: the server's SCALEOT_DEVICE
(`Settings.resolved_device`), the model owner's `--device` (`scaleot.model_io.resolve_device`) and the data
owner's `--device` (`data_owner_client.train.resolve_device`); those only turn `DeviceError` into their own
error type. Accepted: `auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:N`.

Kept thin on purpose: CI has no GPU, so the availability probes are parameters and the switch is unit-tested
with them faked; the real CUDA path is exercised only on a machine that has one. torch is imported only when a
device is resolved, so the server's Settings can check a setting's form without loading it.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# What a device setting may say (checked without importing torch's CUDA probes, e.g. by the server's Settings).
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """The requested device does not exist here; the message names the setting and what to use instead."""


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA; None = plain fp32 (CPU autocast is slow and lossy)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        import torch

        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def _said(setting: str, value: str) -> str:
    """How the user wrote it: `SCALEOT_DEVICE=cuda` for an environment variable, `--device cuda` for an option."""
    return f"{setting} {value}" if setting.startswith("-") else f"{setting}={value}"


def resolve_device(
    requested: str = "auto",
    *,
    setting: str = "device",
    cuda_available: bool | None = None,
    device_count: int | None = None,
    bf16_supported: bool | None = None,
) -> DeviceChoice:
    """`auto` -> cuda when available else cpu; `cuda[:N]` must exist (no silent fallback). bf16 only on CUDA.

    `setting` names where the value came from (`SCALEOT_DEVICE`, `--device`), so an error says what to change.
    The probes (`cuda_available`, `device_count`, `bf16_supported`) default to asking torch; tests fake them (a
    faked `cuda_available` without a `device_count` skips the GPU-count check)."""
    import torch

    requested = (requested or "auto").strip().lower()
    if not DEVICE_PATTERN.match(requested):
        raise DeviceError(f"{_said(setting, repr(requested))} is not a device; use {DEVICE_CHOICES}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
        if device_count is None:
            device_count = torch.cuda.device_count() if cuda_available else 0
    if requested == "auto":
        requested = "cuda" if cuda_available else "cpu"
    device = torch.device(requested)
    if device.type == "cpu":
        return DeviceChoice(device, None)
    if not cuda_available:
        raise DeviceError(
            f"{_said(setting, requested)} asks for a GPU, but CUDA is not available on this machine (no NVIDIA "
            f"driver, or a CPU-only PyTorch build); set {_said(setting, 'cpu')} (or auto, which picks the GPU "
            "when there is one)"
        )
    if device.index is not None and device_count is not None and device.index >= device_count:
        raise DeviceError(
            f"{_said(setting, requested)} asks for GPU {device.index}, but this machine has {device_count} "
            f"(cuda:0 to cuda:{device_count - 1}); set {_said(setting, 'cuda:0')} or another existing index"
        )
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return DeviceChoice(device, torch.bfloat16 if bf16_supported else None)
