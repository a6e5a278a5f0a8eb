"""Gradient checkpointing (issue 22, bounded memory): an option for stage 1, calibration and the client's training
that recomputes each layer's activations in the backward pass. It must change memory, never the result."""

from __future__ import annotations

import copy

import pytest
import torch

from data_owner_client.train import DeviceChoice, TrainConfig, freeze_except_adapter, train
from model_owner_server.core.config import Settings
from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
from scaleot_samples.tiny import tiny_model
from shared.architectures import decoder_layers
from shared.data import Example
from shared.training import gradient_checkpointing

CPU = DeviceChoice(torch.device("cpu"), None)


def _ids(n: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _loss_grads_saved(model: torch.nn.Module, enabled: bool) -> tuple[float, list[torch.Tensor], int]:
    """Loss, every parameter's gradient, and how many tensors autograd kept for the backward pass."""
    model.zero_grad(set_to_none=True)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += 1
        return t

    ids = _ids()
    with gradient_checkpointing(model, enabled), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None], saved


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_same_loss_and_gradients_with_fewer_saved_activations(family):
    model = tiny_model(family, n_layers=3).eval()
    plain_loss, plain_grads, plain_saved = _loss_grads_saved(model, False)
    ckpt_loss, ckpt_grads, ckpt_saved = _loss_grads_saved(model, True)
    assert ckpt_loss == plain_loss
    assert len(ckpt_grads) == len(plain_grads) > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ckpt_grads, plain_grads, strict=True))
    # Only each layer's inputs are kept (the recomputation's own saves happen in backward, after the hook is
    # gone): far fewer tensors than a plain forward keeps.
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)


def test_the_model_is_as_it_was_after_the_block_and_without_grad_nothing_changes():
    model = tiny_model("llama", n_layers=3).eval()
    model.config.use_cache = True
    with gradient_checkpointing(model):
        assert model.config.use_cache is False  # a cache filled twice (forward + recompute) would be wrong
        assert all("forward" in layer.__dict__ for layer in decoder_layers(model))
        with torch.no_grad():
            inside = model(input_ids=_ids()).logits
    assert model.config.use_cache is True
    assert not any("forward" in layer.__dict__ for layer in decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, inside)


def test_client_training_gives_the_same_weights_and_the_option_is_not_part_of_the_recipe():
    examples = [Example(ids, ids.clone()) for ids in _ids(8, 16, seed=3)]

    def run(enabled: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("llama", n_layers=4)
        freeze_except_adapter(model, [0, 3])
        cfg = TrainConfig(max_steps=3, lr=1e-2, batch_size=4, seq_len=16, gradient_checkpointing=enabled)
        train(model, examples, cfg, CPU, pad_id=0, progress=False)
        assert not any("forward" in layer.__dict__ for layer in decoder_layers(model))
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, ckpt = run(False), run(True)
    start = tiny_model("llama", n_layers=4).state_dict()
    assert any(not torch.equal(plain[k], start[k]) for k in plain)  # it trained
    assert all(torch.allclose(plain[k], ckpt[k], rtol=1e-5, atol=1e-6) for k in plain)
    # Memory, not the recipe: a checkpointed run may resume a plain one (the resume fingerprint is the recipe).
    assert "gradient_checkpointing" not in TrainConfig(gradient_checkpointing=True).hyperparameters()


def test_stage1_gives_the_same_scores_under_checkpointing():
    data = _ids(16, 16, seed=5)
    cfg = ImportanceConfig(steps=4, batch_size=4, rl_interval=2, bottleneck=8, seed=0)

    def scores(enabled: bool) -> torch.Tensor:
        model = tiny_model("llama", n_layers=4).eval()
        before = copy.deepcopy(model.state_dict())
        with gradient_checkpointing(model, enabled):
            result = estimate_importance(model, data, data, cfg)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return result.scores

    assert torch.allclose(scores(True), scores(False), rtol=1e-4, atol=1e-5)


def test_the_servers_setting_reads_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALEOT_GRADIENT_CHECKPOINTING", "true")
    assert Settings(data_dir=tmp_path).gradient_checkpointing is True
    monkeypatch.delenv("SCALEOT_GRADIENT_CHECKPOINTING")
    assert Settings(data_dir=tmp_path).gradient_checkpointing is False


@pytest.mark.parametrize(
    "term",
    [{}, {"grad_weight": 10.0, "grad_match": "junction"}, {"grad_weight": 0.0}, {"drift_lr": 1e-2, "drift_reset": 2}],
    ids=["default-adapters-term", "junction-term", "no-term", "drift"],
)
def test_calibration_under_checkpointing_writes_the_same_emulator(tmp_path, term):
    """Also with the gradient term's double backward: its attention kernel and the adapter layers' flags differ
    between the forward and a backward's recompute unless the checkpoint keeps them (shared/training.py)."""
    from safetensors.torch import load_file

    from model_owner_server.scaleot.calibrate import CalibrationConfig
    from model_owner_server.scaleot.emulator import make_emulator
    from model_owner_server.scaleot.importance import ImportanceResult
    from scaleot_samples.tiny import byte_tokenizer
    from shared.modules import Harmonizer

    def build(enabled: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("llama", n_layers=6).eval()
        torch.manual_seed(0)
        hs = {i: Harmonizer(32, 8).requires_grad_(False) for i in range(6)}
        for h in hs.values():  # not the identity, so calibration has something to move
            torch.nn.init.normal_(h.up.weight, std=0.05)
        scores = torch.tensor([0.0, 2.0, -2.0, -1.0, 1.0, 0.0])
        importance = ImportanceResult(scores, hs, ImportanceConfig(steps=1, bottleneck=8), [], 0.0, 0)
        path = tmp_path / f"emu-{enabled}.safetensors"
        info = make_emulator(
            model,
            byte_tokenizer(),
            importance,
            2,
            0.5,
            0.0,
            path,
            calibration=CalibrationConfig(steps=3, batch_size=2, seed=0, **term),
            calibration_blocks=_ids(8, 16, seed=1),
            gradient_checkpointing=enabled,
        )
        assert info.extra["calibration"]["steps"] == 3
        assert not any("forward" in layer.__dict__ for layer in decoder_layers(model))
        return load_file(str(path))

    plain, ckpt = build(False), build(True)
    assert plain.keys() == ckpt.keys()
    assert all(torch.allclose(plain[k], ckpt[k], rtol=1e-5, atol=1e-6) for k in plain)
