"""PEFT LoRA uploads and half-precision emulators through the API: what was issued is accepted and plugged
in; a LoRA of other layers, another rank or other target modules is refused with a message saying why."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
import torch
from server_helpers import adapter_bytes, auth

from shared.lora import LoraModule, LoraSpec, file_spec


def _issued(world) -> LoraSpec:
    return LoraSpec.from_json(world.emulator["build_info"]["lora"])


def _lora_tensors(lora: LoraSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(s.shape, generator=gen) for k, s in file_spec(lora).items()}


def _peft_config(lora: LoraSpec) -> dict[str, Any]:
    """The fields PEFT writes that the server checks (a real adapter_config.json has more)."""
    return {
        "peft_type": "LORA",
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "target_modules": sorted(lora.modules),
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "task_type": "CAUSAL_LM",
    }


def _upload(world, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None, emulator_id: str | None = None):
    data = {"adapter_config": json.dumps(config)} if config is not None else {}
    return world.client.post(
        f"/v1/emulators/{emulator_id or world.emulator['id']}/adapters",
        headers=auth(world.keys["alice"]),
        files={"adapter": ("adapter_model.safetensors", io.BytesIO(adapter_bytes(tensors)))},
        data=data,
    )


def test_emulator_issues_a_lora_of_its_adapter_layers_in_the_signed_manifest(world):
    lora, layers = _issued(world), world.emulator["adapter_layers"]
    assert lora.r == 8 and lora.alpha == 16 and lora.dtype == "F32"
    assert lora.modules and {int(re.search(r"layers\.(\d+)\.", m).group(1)) for m in lora.modules} == set(layers)
    signed = world.client.get(
        f"/v1/emulators/{world.emulator['id']}/signature", headers=auth(world.keys["alice"])
    ).json()
    assert signed["manifest"]["lora"] == world.emulator["build_info"]["lora"]
    assert signed["manifest"]["dtype"] == world.emulator["build_info"]["dtype"] == "float32"


def test_issued_lora_upload_is_merged_and_evaluated(world):
    lora = _issued(world)
    r = _upload(world, _lora_tensors(lora), {"method": "lora", "peft": _peft_config(lora)})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["job"]["status"] == "succeeded", body["job"]
    assert body["adapter"]["method"] == "lora" and body["adapter"]["size_bytes"] < world.emulator["max_adapter_bytes"]
    h = auth(world.keys["alice"])
    evaluation = world.client.get(f"/v1/adapters/{body['adapter']['id']}", headers=h).json()["evaluation"]
    assert evaluation["plug_in"]["loss"] != pytest.approx(evaluation["zero_shot"]["loss"], rel=1e-6)
    g = world.client.post(
        f"/v1/adapters/{body['adapter']['id']}/generate", headers=h, json={"prompt": "the quick", "max_new_tokens": 3}
    )
    assert g.status_code == 200, g.text


def test_plain_peft_config_as_the_config_part_is_accepted(world):
    lora = _issued(world)  # a curl user sends PEFT's adapter_config.json as it is
    r = _upload(world, _lora_tensors(lora, seed=1), _peft_config(lora))
    assert r.status_code == 202 and r.json()["adapter"]["method"] == "lora", r.text


def _other_layers(lora: LoraSpec, world) -> LoraSpec:
    layers = world.emulator["adapter_layers"]
    others = [i for i in range(max(layers) + 2) if i not in layers]
    swap = dict(zip(layers, others[: len(layers)], strict=True))
    modules = {
        re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{swap[int(m.group(1))]}.", k): v for k, v in lora.modules.items()
    }
    return LoraSpec(lora.r, lora.alpha, lora.dtype, modules)


def _refusals(world) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]]:
    lora = _issued(world)
    other = _other_layers(lora, world)
    rank4 = LoraSpec(4, lora.alpha, lora.dtype, lora.modules)
    qv = LoraSpec(
        lora.r, lora.alpha, lora.dtype, {k: m for k, m in lora.modules.items() if k.endswith(("q_proj", "v_proj"))}
    )
    extra = LoraSpec(lora.r, lora.alpha, lora.dtype, {**lora.modules, "lm_head": LoraModule(32, 257, False)})
    return {
        "another emulator's layers": (_lora_tensors(other), _peft_config(other), "target modules were not issued"),
        "other layers, issued config": (_lora_tensors(other), _peft_config(lora), "unexpected"),
        "rank not issued": (_lora_tensors(rank4), _peft_config(rank4), "rank r=4 was not issued"),
        "rank not issued, config claims it": (_lora_tensors(rank4), _peft_config(lora), "shape"),
        "alpha not issued": (_lora_tensors(lora), {**_peft_config(lora), "lora_alpha": 32}, "lora_alpha=32"),
        "target modules not issued": (_lora_tensors(qv), _peft_config(qv), "target modules were not issued"),
        "module outside the layers": (_lora_tensors(extra), _peft_config(extra), "target modules were not issued"),
        "DoRA": (_lora_tensors(lora), {**_peft_config(lora), "use_dora": True}, "use_dora"),
        "per-module alpha": (
            _lora_tensors(lora),
            {**_peft_config(lora), "alpha_pattern": {"q_proj": 64}},
            "alpha_pattern",
        ),
        "alpha not a number": (_lora_tensors(lora), {**_peft_config(lora), "lora_alpha": "16"}, "lora_alpha=16"),
        "no PEFT config": (_lora_tensors(lora), {"method": "lora"}, "adapter_config.json"),
        "wrong dtype": ({k: v.half() for k, v in _lora_tensors(lora).items()}, _peft_config(lora), "dtype F16"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "another emulator's layers",
        "other layers, issued config",
        "rank not issued",
        "rank not issued, config claims it",
        "alpha not issued",
        "target modules not issued",
        "module outside the layers",
        "DoRA",
        "per-module alpha",
        "alpha not a number",
        "no PEFT config",
        "wrong dtype",
    ],
)
def test_lora_not_as_issued_is_refused_with_a_clear_error(world, case):
    tensors, config, message = _refusals(world)[case]
    before = world.client.get("/v1/adapters", headers=auth(world.keys["alice"])).json()["adapters"]
    r = _upload(world, tensors, config)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_adapter" and message in error["message"], error
    after = world.client.get("/v1/adapters", headers=auth(world.keys["alice"])).json()["adapters"]
    assert len(after) == len(before)  # nothing stored


def test_half_precision_emulator_issues_and_checks_its_dtype(world):
    h = auth(world.keys["alice"])
    r = world.client.post(
        "/v1/emulators",
        headers=h,
        json={"model_id": world.model_id, "n_adapter": 1, "alpha": 0.5, "beta": 0.0, "dtype": "bfloat16"},
    )
    assert r.status_code in (200, 202), r.text
    emu = r.json()["emulator"]
    assert emu["status"] == "ready" and emu["build_info"]["dtype"] == "bfloat16"
    assert {s["dtype"] for s in emu["adapter_spec"].values()} == {"BF16"}
    assert emu["build_info"]["lora"]["dtype"] == "BF16"
    signed = world.client.get(f"/v1/emulators/{emu['id']}/signature", headers=h).json()
    assert signed["manifest"]["dtype"] == "bfloat16"
    # half the bytes of the float32 emulator's adapter layers... and the file is bf16 throughout
    from safetensors import safe_open

    path = world.settings.resolved_data_dir / "emulators" / f"{emu['id']}.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["dtype"] == "bfloat16"
    lora = LoraSpec.from_json(emu["build_info"]["lora"])
    fp32 = {k: v.float() for k, v in _lora_tensors(lora).items()}
    r = _upload(world, fp32, _peft_config(lora), emulator_id=emu["id"])
    assert (
        r.status_code == 422
        and "dtype F32 but the emulator issued BF16; cast before upload" in r.json()["error"]["message"]
    )
    r = _upload(world, {k: v.bfloat16() for k, v in fp32.items()}, _peft_config(lora), emulator_id=emu["id"])
    assert r.status_code == 202 and r.json()["job"]["status"] == "succeeded", r.text
    # the same parameters in another dtype: one emulator per parameter set, said so
    r = world.client.post(
        "/v1/emulators",
        headers=h,
        json={"model_id": world.model_id, "n_adapter": 1, "alpha": 0.5, "beta": 0.0, "dtype": "float16"},
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "dtype_conflict", r.text
