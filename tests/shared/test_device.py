"""The one CPU/GPU switch, with the CUDA probes faked (CI has no GPU)."""

import pytest
import torch

from model_owner_server.scaleot.model_io import ModelLoadError
from model_owner_server.scaleot.model_io import resolve_device as server_device
from shared.device import DeviceError, resolve_device


def test_auto_is_cpu_without_cuda_and_never_autocasts_there():
    choice = resolve_device("auto", cuda_available=False)
    assert choice.device == torch.device("cpu") and choice.autocast_dtype is None
    with choice.autocast():
        assert not torch.is_autocast_enabled()


def test_auto_is_cuda_with_bf16_when_present():
    choice = resolve_device("auto", cuda_available=True, bf16_supported=True)
    assert choice.device.type == "cuda" and choice.autocast_dtype == torch.bfloat16
    assert resolve_device("cuda:1", cuda_available=True, bf16_supported=False).autocast_dtype is None


@pytest.mark.parametrize("bad", ["cuda", "tpu", "gpu!"])
def test_missing_or_unknown_device_is_a_clear_error(bad):
    with pytest.raises(DeviceError, match="cpu"):
        resolve_device(bad, cuda_available=False)


def test_server_side_uses_the_same_switch():
    assert server_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            server_device("cuda")
