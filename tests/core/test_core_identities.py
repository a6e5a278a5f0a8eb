"""Exactness properties of the core on tiny random GPT-2, OPT and LLaMA models."""

import copy

import pytest
import torch

from model_owner_server.scaleot.emulator import build_emulator, scaleot_plan, uniform_layerdrop_plan
from model_owner_server.scaleot.plugin import plug_in
from scaleot_samples.tiny import FAMILIES, byte_tokenizer, tiny_model
from shared.adapter import adapter_spec, extract_adapter
from shared.architectures import UnsupportedArchitectureError, decoder_layers, family_for
from shared.emulator_file import load_emulator, read_metadata, save_emulator
from shared.layer_plan import Role
from shared.modules import Harmonizer

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def layer_inputs(model, ids=IDS) -> dict[int, torch.Tensor]:
    """The hidden states entering each decoder layer (by index) in one forward pass."""
    seen: dict[int, torch.Tensor] = {}

    def grab(i):
        return lambda mod, args, kwargs: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone())

    hooks = [m.register_forward_pre_hook(grab(i), with_kwargs=True) for i, m in enumerate(decoder_layers(model))]
    try:
        logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def fresh_harmonizers(model, bottleneck=8, seed=0):
    torch.manual_seed(seed)
    return {i: Harmonizer(model.config.hidden_size, bottleneck) for i in range(len(decoder_layers(model)))}


def test_fresh_harmonizer_is_identity():
    h = Harmonizer(32, 8)
    x = torch.randn(2, 5, 32)
    assert torch.equal(h(x), x)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_adapter_emulator_reproduces_full_model(family):
    model = tiny_model(family)
    n = len(decoder_layers(model))
    plan = scaleot_plan(torch.zeros(n), n, 0.5, 0.5, model)
    assert plan.roles == [Role.ADAPTER] * n
    emu = build_emulator(model, plan, fresh_harmonizers(model))
    assert torch.equal(logits(emu), logits(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_of_unchanged_adapter_reproduces_model(family):
    model = tiny_model(family)
    layers = [0, 3]
    before = copy.deepcopy(model.state_dict())
    patched = plug_in(model, extract_adapter(model, layers), layers)
    assert torch.equal(logits(patched), logits(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_changes_only_adapter_layers(family):
    model = tiny_model(family)
    adapter = {k: v + 0.01 for k, v in extract_adapter(model, [1]).items()}
    patched = plug_in(model, adapter, [1])
    sd, psd = model.state_dict(), patched.state_dict()
    for k in sd:
        assert torch.equal(sd[k], psd[k]) != (k in adapter), k
    assert not torch.equal(logits(patched), logits(model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5])
def test_emulator_file_round_trip(tmp_path, family, beta):
    model = tiny_model(family, n_layers=6)
    scores = torch.tensor([5.0, 1.0, -1.0, 0.0, -2.0, 3.0])
    plan = scaleot_plan(scores, 2, 0.5, beta, model, bottleneck=8)
    hs = fresh_harmonizers(model)
    for h in hs.values():  # non-trivial harmonizers so the round trip is meaningful
        torch.nn.init.normal_(h.up.weight, std=0.1)
    emu = build_emulator(model, plan, hs)
    info = save_emulator(emu, plan, byte_tokenizer(), tmp_path / "emu.safetensors", {"model_id": "m1"})
    loaded = load_emulator(info.path)
    assert loaded.plan == plan
    assert read_metadata(info.path)["model_id"] == "m1"
    assert torch.equal(logits(loaded.model), logits(emu))
    assert loaded.tokenizer("hello").input_ids == byte_tokenizer()("hello").input_ids
    assert adapter_spec(loaded.model, plan.adapter_layers) == adapter_spec(model, plan.adapter_layers)
    assert plan.summary() == "A{0}H{0}HA".format("F" if beta == 0 else "f")
    assert plan.adapter_layers == [0, 5]
    assert plan.layers_with(Role.HARMONIZER) == [2, 4]  # the 2 least important of the 4 others


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_layerdrop_plan_and_emulator(family):
    model = tiny_model(family, n_layers=8)
    plan = uniform_layerdrop_plan(8, 2)
    assert plan.adapter_layers == [0, 1, 6, 7]
    assert len(plan.layers_with(Role.DROPPED)) == 2
    emu = build_emulator(model, plan)
    assert sum(p.numel() for p in emu.parameters()) < sum(p.numel() for p in model.parameters())
    # A dropped layer is the identity: the residual stream leaves it bit-identical to how it came in, and what
    # comes in at the first drop is exactly the original model's stream there (the layers before it are intact).
    emu_in, model_in = layer_inputs(emu), layer_inputs(model)
    first = plan.layers_with(Role.DROPPED)[0]
    assert torch.equal(emu_in[first], model_in[first])
    for i in plan.layers_with(Role.DROPPED):
        assert torch.equal(emu_in[i + 1], emu_in[i]), f"dropped layer {i} changed the hidden states"
    assert not torch.equal(emu_in[first + 1], model_in[first + 1])  # the original layer does change them
    assert not torch.equal(logits(emu), logits(model))


def test_unsupported_architecture_names_what_is_missing():
    class Cfg:
        model_type = "bert"

    with pytest.raises(UnsupportedArchitectureError, match=r"bert.*shared/architectures\.py"):
        family_for(Cfg())
