"""Local training: only adapter layers learn, both methods export valid adapters, runs resume exactly."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from data_owner_client.errors import BadInputError
from data_owner_client.train import (
    DeviceChoice,
    TrainConfig,
    _sam_gradient,
    add_lora,
    freeze_except_adapter,
    lora_targets,
    resolve_device,
    train,
)
from data_owner_client.tune import tune_emulator
from shared.adapter import DTYPE_NAMES, adapter_spec, load_and_validate_adapter_file
from shared.architectures import layer_prefix
from shared.data import collate, load_dataset, pad_id_for, training_examples
from shared.emulator_file import load_emulator
from shared.evaluation import lm_loss
from shared.lora import check_peft_config, file_spec, issue_lora, merge_lora

from .conftest import TRAIN_TEXT
from .fake_server import build_tiny_emulator

CPU = DeviceChoice(torch.device("cpu"), None)


# ---------------------------------------------------------------- device switch


def test_device_auto_picks_cpu_without_cuda_and_no_autocast():
    choice = resolve_device("auto", cuda_available=False)
    assert choice.device.type == "cpu" and choice.autocast_dtype is None
    with choice.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_device_auto_picks_cuda_with_bf16_autocast_when_available():
    choice = resolve_device("auto", cuda_available=True, bf16_supported=True)
    assert choice.device.type == "cuda" and choice.autocast_dtype == torch.bfloat16
    assert resolve_device("cuda:1", cuda_available=True, bf16_supported=False).autocast_dtype is None
    assert resolve_device("cpu", cuda_available=True).autocast_dtype is None  # never autocast on CPU


def test_device_cuda_requested_without_cuda_is_bad_input():
    with pytest.raises(BadInputError, match="CUDA is not available"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(BadInputError):
        resolve_device("tpu", cuda_available=False)


# ---------------------------------------------------------------- training


@pytest.fixture
def emulator(emulator_build):
    return load_emulator(emulator_build[0])


@pytest.fixture
def text_dataset(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(TRAIN_TEXT)
    return load_dataset(p)


def test_training_loss_goes_down(emulator, text_dataset):
    cfg = TrainConfig(
        method="full", max_steps=8, lr=1e-2, batch_size=4, seq_len=64, warmup_ratio=0.0, scheduler="constant"
    )
    examples = training_examples(text_dataset, emulator.tokenizer, cfg.seq_len)
    freeze_except_adapter(emulator.model, emulator.plan.adapter_layers)
    result = train(emulator.model, examples, cfg, CPU, pad_id=pad_id_for(emulator.tokenizer), progress=False)
    assert result.steps == 8
    # A random tiny model starts near uniform (ln 257 = 5.55) and only two layers train: a clear, not huge, drop.
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.1, result.losses


def test_full_exports_whole_adapter_layers_and_trains_only_them(emulator, text_dataset, tmp_path):
    model, plan = emulator.model, emulator.plan
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = adapter_spec(model, plan.adapter_layers)
    cfg = TrainConfig(method="full", max_steps=3, lr=1e-2, batch_size=4, seq_len=64)
    res = tune_emulator(model, emulator.tokenizer, plan, text_dataset, cfg, CPU, tmp_path / "out", progress=False)
    assert res.adapter_file.name == "adapter_layers.safetensors"  # not PEFT's name: these are not PEFT files
    tensors = load_and_validate_adapter_file(res.adapter_file, spec)  # uploadable: names/shapes/dtypes issued
    assert set(tensors) == set(spec)
    changed = {k for k in spec if not torch.equal(before[k], tensors[k])}
    assert any(k.endswith("q_proj.weight") for k in changed)
    final = model.state_dict()  # nothing outside the adapter layers moved (the model was trained in place)
    assert all(torch.equal(before[k], final[k]) for k in before if k not in spec)
    assert res.adapter_config["method"] == "full" and res.adapter_config["adapter_layers"] == plan.adapter_layers


def test_lora_exports_peft_files_of_the_issued_lora(emulator, text_dataset, tmp_path):
    model, plan = emulator.model, emulator.plan
    before, original = copy.deepcopy(model), {k: v.clone() for k, v in model.state_dict().items()}
    lora = issue_lora(model, plan.adapter_layers)
    cfg = TrainConfig(method="lora", max_steps=3, lr=1e-2, batch_size=4, seq_len=64)
    res = tune_emulator(
        model, emulator.tokenizer, plan, text_dataset, cfg, CPU, tmp_path / "out", progress=False, lora=lora
    )
    assert res.adapter_file.name == "adapter_model.safetensors"
    tensors = load_and_validate_adapter_file(res.adapter_file, file_spec(lora))  # only lora_A/lora_B, as issued
    check_peft_config(json.loads((tmp_path / "out" / "adapter_config.json").read_text()), lora)
    # The export is what was trained: merged into the untouched emulator it gives the tuned emulator's weights.
    merge_lora(before, tensors, lora)
    after = model.state_dict()
    for k, v in before.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=1e-6)
    changed = {k for k in original if not torch.equal(original[k], after[k])}
    assert changed and all(k.endswith("proj.weight") and (".layers.0." in k or ".layers.3." in k) for k in changed)
    assert res.adapter_config["method"] == "lora" and res.adapter_config["peft"]["r"] == lora.r


def test_lora_settings_other_than_issued_are_refused_before_training(emulator, text_dataset, tmp_path):
    lora = issue_lora(emulator.model, emulator.plan.adapter_layers, r=4)
    cfg = TrainConfig(method="lora", max_steps=1, lora_r=8)
    with pytest.raises(BadInputError, match="--lora-r 4"):
        tune_emulator(
            emulator.model,
            emulator.tokenizer,
            emulator.plan,
            text_dataset,
            cfg,
            CPU,
            tmp_path / "o",
            progress=False,
            lora=lora,
        )
    assert not (tmp_path / "o").exists()


def test_lora_targets_only_adapter_layer_linears(emulator):
    targets = lora_targets(emulator.model, emulator.plan.adapter_layers)
    assert targets and all(t.startswith(("model.layers.0.", "model.layers.3.")) for t in targets)
    assert "model.layers.0.self_attn.q_proj" in targets and "model.layers.3.mlp.down_proj" in targets
    peft_model = add_lora(emulator.model, emulator.plan.adapter_layers, TrainConfig(method="lora"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".layers.0." in n or ".layers.3." in n) for n in trainable)


def test_lora_on_gpt2_conv1d(tmp_path, text_dataset):
    """GPT-2's Conv1D stores its weight as (in, out): the server's merge of the exported LoRA (B @ A transposed)
    computes what the trained, unmerged LoRA computes, and what the client's own merge computed."""
    from peft import PeftModel

    path = tmp_path / "gpt2.safetensors"
    build_tiny_emulator(path, "emu_gpt2", "gpt2_model", family="gpt2")
    emu = load_emulator(path)
    untouched = copy.deepcopy(emu.model)
    spec = adapter_spec(emu.model, emu.plan.adapter_layers)
    assert spec and all(".h.0." in k or ".h.3." in k for k in spec)
    cfg = TrainConfig(method="lora", max_steps=2, lr=1e-2, batch_size=2, seq_len=32)
    lora = issue_lora(emu.model, emu.plan.adapter_layers)
    # attn.c_proj is a square Conv1D: there a missing transpose keeps the shape and only the values go wrong
    assert any(m.conv1d and m.in_features == m.out_features for m in lora.modules.values())
    res = tune_emulator(
        emu.model, emu.tokenizer, emu.plan, text_dataset, cfg, CPU, tmp_path / "out", progress=False, lora=lora
    )
    tensors = load_and_validate_adapter_file(res.adapter_file, file_spec(lora))
    assert all(tensors[k].abs().max() > 0 for k in tensors if k.endswith("lora_B.weight"))  # B trained off zero

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    unmerged = PeftModel.from_pretrained(copy.deepcopy(untouched), tmp_path / "out")  # PEFT's LoRA forward
    merged = copy.deepcopy(untouched)
    merge_lora(merged, tensors, lora)  # what the server plugs in
    assert not torch.allclose(logits(unmerged), logits(untouched), atol=1e-3)  # the LoRA changes the output
    torch.testing.assert_close(logits(merged), logits(unmerged), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(emu.model), logits(merged), rtol=1e-4, atol=1e-5)  # the client's merge


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_emulator_trains_in_fp32_and_exports_issued_dtype(
    emulator, text_dataset, tmp_path, method, dtype
):
    model = emulator.model.to(dtype)
    spec = adapter_spec(model, emulator.plan.adapter_layers)
    lora = issue_lora(model, emulator.plan.adapter_layers)
    cfg = TrainConfig(method=method, max_steps=4, lr=1e-2, batch_size=2, seq_len=32)
    during: list[set[torch.dtype]] = []  # every parameter's dtype at each optimizer step, LoRA's included

    def on_step(step, loss):
        during.append({p.dtype for p in model.parameters()})

    res = tune_emulator(
        model,
        emulator.tokenizer,
        emulator.plan,
        text_dataset,
        cfg,
        CPU,
        tmp_path / "o",
        progress=False,
        lora=lora if method == "lora" else None,
        on_step=on_step,
    )
    assert during == [{torch.float32}] * 4  # trained in fp32 (CPU): bf16/fp16 AdamW updates would vanish
    assert {s.dtype for s in spec.values()} == {lora.dtype} == {DTYPE_NAMES[dtype]}
    load_and_validate_adapter_file(res.adapter_file, spec if method == "full" else file_spec(lora))
    assert next(model.parameters()).dtype == dtype  # handed back in the issued dtype
    # It learned: 4 steps take the loss down by about 0.13; an optimizer that does nothing leaves it within 0.02.
    assert all(map(math.isfinite, res.train.losses)) and res.train.losses[-1] < res.train.losses[0] - 0.05, (
        res.train.losses
    )


# ---------------------------------------------------------------- checkpoints


def _run(emulator_build, text_dataset, out, *, resume=False, stop_at=None, **overrides):
    emu = load_emulator(emulator_build[0])
    cfg = TrainConfig(
        **{
            "method": "full",
            "max_steps": 4,
            "lr": 5e-3,
            "batch_size": 2,
            "grad_accum": 2,
            "seq_len": 32,
            "save_every": 100,
            "lora_dropout": 0.1,
            **overrides,
        }
    )

    def on_step(step, loss):
        if step == stop_at:
            raise KeyboardInterrupt

    res = tune_emulator(
        emu.model,
        emu.tokenizer,
        emu.plan,
        text_dataset,
        cfg,
        CPU,
        out,
        resume=resume,
        progress=False,
        on_step=on_step,
        identity={"emulator_sha256": "x"},
    )
    return res


@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupted_training_resumes_to_identical_weights(emulator_build, text_dataset, tmp_path, method):
    straight = _run(emulator_build, text_dataset, tmp_path / "a", method=method)
    with pytest.raises(KeyboardInterrupt):
        _run(emulator_build, text_dataset, tmp_path / "b", method=method, stop_at=2)
    ckpt = tmp_path / "b" / "checkpoint"
    assert (ckpt / "trainer_state.json").exists() and not list(ckpt.glob("*.pt"))  # no pickle
    resumed = _run(emulator_build, text_dataset, tmp_path / "b", method=method, resume=True)
    assert resumed.train.resumed_from == 2 and resumed.train.steps == 4
    assert resumed.train.losses == pytest.approx(straight.train.losses)
    a, b = load_file(straight.adapter_file), load_file(resumed.adapter_file)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_different_settings_is_refused(emulator_build, text_dataset, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(emulator_build, text_dataset, tmp_path / "c", stop_at=1)
    with pytest.raises(BadInputError, match="different run"):
        _run(emulator_build, text_dataset, tmp_path / "c", resume=True, batch_size=3)
    with pytest.raises(BadInputError, match="no checkpoint"):
        _run(emulator_build, text_dataset, tmp_path / "d", resume=True)


def test_anchor_decay_keeps_the_adapter_near_the_issued_weights(emulator_build, text_dataset):
    """L2-SP (decay toward the issued weights) moves the adapter layers less than the same run without it."""

    def drift(anchor_decay: float) -> float:
        emu = load_emulator(emulator_build[0])
        layers = emu.plan.adapter_layers
        start = {k: v.clone() for k, v in emu.model.state_dict().items()}
        cfg = TrainConfig(max_steps=6, lr=1e-2, batch_size=4, seq_len=64, anchor_decay=anchor_decay)
        freeze_except_adapter(emu.model, layers)
        examples = training_examples(text_dataset, emu.tokenizer, cfg.seq_len)
        train(emu.model, examples, cfg, CPU, pad_id=pad_id_for(emu.tokenizer), progress=False)
        return sum(float((v - start[k]).norm()) for k, v in emu.model.state_dict().items())

    free, anchored = drift(0.0), drift(50.0)
    assert 0 < anchored < 0.8 * free, (anchored, free)
    with pytest.raises(BadInputError, match="--anchor-decay"):
        TrainConfig(anchor_decay=-1.0)


def test_lr_scales_slow_down_only_the_named_layers(emulator_build, text_dataset):
    """A zero scale on the first adapter layer keeps it exactly as issued while the other adapter layer trains."""
    emu = load_emulator(emulator_build[0])
    first, last = emu.plan.adapter_layers[0], emu.plan.adapter_layers[-1]
    start = {k: v.clone() for k, v in emu.model.state_dict().items()}
    cfg = TrainConfig(max_steps=3, lr=1e-2, batch_size=4, seq_len=64, warmup_ratio=0.0)
    freeze_except_adapter(emu.model, emu.plan.adapter_layers)
    examples = training_examples(text_dataset, emu.tokenizer, cfg.seq_len)
    prefix = layer_prefix(emu.model, first)
    train(emu.model, examples, cfg, CPU, pad_id=pad_id_for(emu.tokenizer), progress=False, lr_scales={prefix: 0.0})
    after = emu.model.state_dict()
    moved = {k for k in start if not torch.equal(start[k], after[k])}
    assert moved and not any(k.startswith(prefix) for k in moved)
    assert any(k.startswith(layer_prefix(emu.model, last)) for k in moved)


def test_in_model_reference_of_a_bf16_model_trains_in_fp32_and_keeps_its_dtype(emulator_build, text_dataset):
    """The benchmarks' reference (the same layers tuned inside M) trains a bf16 M as the client trains a bf16
    emulator: float32 weights during training, M's dtype after. In bf16 directly, AdamW's small updates round
    away and the reference (the transfer ratio's denominator) comes out too weak."""
    from data_owner_client.train import train_layers_in_model

    emu = load_emulator(emulator_build[0])
    layers = emu.plan.adapter_layers
    cfg = TrainConfig(max_steps=3, lr=1e-3, batch_size=4, seq_len=64, warmup_ratio=0.0)
    examples = training_examples(text_dataset, emu.tokenizer, cfg.seq_len)
    pad = pad_id_for(emu.tokenizer)
    bf16 = copy.deepcopy(emu.model).to(torch.bfloat16)
    start = {k: v.clone() for k, v in bf16.state_dict().items()}

    tuned, _ = train_layers_in_model(bf16, layers, examples, cfg, CPU, pad_id=pad)
    expect, _ = train_layers_in_model(copy.deepcopy(bf16).float(), layers, examples, cfg, CPU, pad_id=pad)
    got = tuned.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, start[k]) for k, v in bf16.state_dict().items())
    moved = {k for k in got if not torch.equal(got[k], start[k])}
    assert moved and all(k.startswith(tuple(layer_prefix(tuned, i) for i in layers)) for k in moved)
    assert all(torch.equal(got[k], expect.state_dict()[k].to(torch.bfloat16)) for k in got)


def test_sam_takes_the_gradient_at_the_worst_nearby_point_and_restores_the_weights(emulator_build, text_dataset):
    """SAM (--sam-rho, issue 21): the step's gradient is the one at theta + rho * g / |g| on the same micro-batches,
    computed here by hand, and the weights the optimizer then steps from are theta itself, bit for bit."""
    emu = load_emulator(emulator_build[0])
    freeze_except_adapter(emu.model, emu.plan.adapter_layers)
    cfg = TrainConfig(max_steps=1, batch_size=4, seq_len=64, sam_rho=0.5)
    examples = training_examples(text_dataset, emu.tokenizer, cfg.seq_len)
    batch = collate(examples[:4], pad_id_for(emu.tokenizer))
    params = [p for p in emu.model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    lm_loss(emu.model, batch).backward()
    g = [p.grad.clone() for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g]))
    twin = copy.deepcopy(emu.model)  # the same network moved by hand to the worst nearby point
    with torch.no_grad():
        for p, x in zip((p for p in twin.parameters() if p.requires_grad), g, strict=True):
            p.add_(x * (0.5 / norm))
    lm_loss(twin, batch).backward()
    expected = [p.grad for p in twin.parameters() if p.requires_grad]
    _sam_gradient(emu.model, params, [batch], cfg, CPU)
    assert all(torch.equal(p, t) for p, t in zip(params, theta, strict=True))  # weights restored exactly
    assert all(torch.allclose(p.grad, e, atol=1e-6) for p, e in zip(params, expected, strict=True))
    assert not all(torch.allclose(p.grad, x, atol=1e-6) for p, x in zip(params, g, strict=True))  # not the plain g


def test_sam_is_named_in_the_recipe_only_when_on_and_a_negative_radius_is_refused():
    """Off (the default), the recipe record is what it was before the option, so old checkpoints still resume and
    old benchmark rows keep their keys; on, it is recorded; a negative radius is a clear error."""
    assert "sam_rho" not in TrainConfig().hyperparameters()
    assert TrainConfig(sam_rho=0.5).hyperparameters()["sam_rho"] == 0.5
    with pytest.raises(BadInputError, match="--sam-rho"):
        TrainConfig(sam_rho=-0.1)


def test_sam_point_that_diverges_stops_with_a_clear_error_and_leaves_the_weights_as_they_were(
    emulator_build, text_dataset
):
    """A radius so large that the shifted loss is not finite is a BadInputError naming --sam-rho, raised after the
    weights are restored: the adapter is the one the step started from, not the shifted one."""
    emu = load_emulator(emulator_build[0])
    freeze_except_adapter(emu.model, emu.plan.adapter_layers)
    cfg = TrainConfig(max_steps=1, batch_size=4, seq_len=64, sam_rho=1e38)
    batch = collate(training_examples(text_dataset, emu.tokenizer, cfg.seq_len)[:4], pad_id_for(emu.tokenizer))
    params = [p for p in emu.model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    lm_loss(emu.model, batch).backward()
    with pytest.raises(BadInputError, match="--sam-rho"):
        _sam_gradient(emu.model, params, [batch], cfg, CPU)
    assert all(torch.equal(p, t) for p, t in zip(params, theta, strict=True))
