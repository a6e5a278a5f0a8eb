"""The one CPU/GPU switch for both parties: which device, and whether to autocast to bf16.

Kept thin on purpose: CI has no GPU, so the availability probes are parameters and the switch is unit-tested
with them faked; the real CUDA path is exercised only on a machine that has one.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch


class DeviceError(ValueError):
    """The requested device does not exist here; the message says what to use instead."""


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA; None = plain fp32 (CPU autocast is slow and lossy)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_device(
    requested: str = "auto", *, cuda_available: bool | None = None, bf16_supported: bool | None = None
) -> DeviceChoice:
    """`auto` -> cuda when available else cpu; `cuda[:N]` must exist (no silent fallback). bf16 only on CUDA."""
    requested = (requested or "auto").strip().lower()
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        requested = "cuda" if cuda_available else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"device {requested!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cpu":
        return DeviceChoice(device, None)
    if device.type != "cuda":
        raise DeviceError(f"device {requested!r} is not supported; use auto, cpu or cuda[:N]")
    if not cuda_available:
        raise DeviceError("device cuda was requested but CUDA is not available on this machine; use cpu (or auto)")
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return DeviceChoice(device, torch.bfloat16 if bf16_supported else None)
