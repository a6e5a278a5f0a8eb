"""The one CPU/GPU switch, with the CUDA probes faked (CI has no GPU), and every party's device setting on it."""

import pytest
import torch
from pydantic import ValidationError

from data_owner_client.errors import BadInputError
from data_owner_client.train import resolve_device as client_device
from model_owner_server.core.config import Settings
from model_owner_server.scaleot.model_io import ModelLoadError
from model_owner_server.scaleot.model_io import resolve_device as server_device
from shared.device import DeviceError, resolve_device

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_cpu_without_cuda_and_never_autocasts_there():
    choice = resolve_device("auto", cuda_available=False)
    assert choice.device == torch.device("cpu") and choice.autocast_dtype is None
    with choice.autocast():
        assert not torch.is_autocast_enabled()


def test_auto_is_cuda_with_bf16_when_present():
    choice = resolve_device("auto", cuda_available=True, bf16_supported=True)
    assert choice.device.type == "cuda" and choice.autocast_dtype == torch.bfloat16
    assert resolve_device("cuda:1", cuda_available=True, device_count=2, bf16_supported=False).autocast_dtype is None
    assert resolve_device(" CPU ", cuda_available=True).device == torch.device("cpu")


@pytest.mark.parametrize("bad", ["cuda", "cuda:0", "tpu", "gpu!", "mps", "cuda:x"])
def test_missing_or_unknown_device_is_a_clear_error(bad):
    with pytest.raises(DeviceError, match="cpu"):
        resolve_device(bad, cuda_available=False)


def test_cuda_without_cuda_names_the_setting_and_what_to_set():
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda", setting="SCALEOT_DEVICE", cuda_available=False)
    message = str(err.value)
    assert "SCALEOT_DEVICE=cuda" in message and "CUDA is not available" in message
    assert "SCALEOT_DEVICE=cpu" in message  # what to do instead
    with pytest.raises(DeviceError, match=r"--device cuda .*CUDA is not available.*--device cpu"):
        resolve_device("cuda", setting="--device", cuda_available=False)


def test_a_gpu_index_the_machine_does_not_have_is_refused():
    with pytest.raises(
        DeviceError, match=r"--device cuda:2 asks for GPU 2, but this machine has 2 \(cuda:0 to cuda:1\)"
    ):
        resolve_device("cuda:2", setting="--device", cuda_available=True, device_count=2, bf16_supported=True)
    assert resolve_device("cuda:1", cuda_available=True, device_count=2, bf16_supported=True).device.index == 1


def test_the_servers_setting_checks_its_form_and_keeps_its_name():
    assert Settings(device="CUDA:1").device == "cuda:1"
    with pytest.raises(ValidationError, match="SCALEOT_DEVICE='gpu' is not a device"):
        Settings(device="gpu")
    assert Settings(device="cpu").resolved_device() == "cpu"
    assert Settings().resolved_device() == ("cpu" if NO_CUDA else "cuda")


def test_the_servers_setting_comes_from_scaleot_device(monkeypatch):
    monkeypatch.setenv("SCALEOT_DEVICE", "cpu")
    assert Settings().device == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_every_party_refuses_cuda_without_cuda_naming_its_own_setting():
    with pytest.raises(DeviceError, match=r"SCALEOT_DEVICE=cuda .*CUDA is not available.*SCALEOT_DEVICE=cpu"):
        Settings(device="cuda").resolved_device()  # what serve, the worker's jobs and the admin commands use
    with pytest.raises(ModelLoadError, match=r"--device cuda .*CUDA is not available"):
        server_device("cuda")  # modelowner-server estimate-importance --device
    with pytest.raises(BadInputError, match=r"--device cuda .*CUDA is not available.*--device cpu"):
        client_device("cuda")  # dataowner-client tune --device


def test_server_side_uses_the_same_switch():
    assert server_device("cpu") == torch.device("cpu")
