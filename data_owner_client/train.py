"""Training the adapter layers: the config, freezing, LoRA wrapping, the seeded and resumable training loop.
The recipe around it (evaluate, train, export, check) is tune.py.

Only `plan.adapter_layers` ever receive gradients; everything else is frozen and never leaves the
machine. `full` trains those layers' weights directly and exports them (`shared.adapter.extract_adapter`);
`lora` puts PEFT LoRA on their linear modules, as the emulator's LoRA spec issued, and exports PEFT's own
adapter files (`export.py`), which the model owner loads with PEFT or merges. Either way the export has
exactly the issued names, shapes and dtypes. Low-precision emulators train in fp32 (autocast on CUDA).

Checkpoints (`checkpoint.py`) hold no pickle, so an interrupted run continues bit-for-bit with `--resume`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import get_scheduler

from shared.data import Example, collate
from shared.device import DeviceChoice, DeviceError
from shared.device import resolve_device as _resolve_device
from shared.evaluation import lm_loss
from shared.lora import linear_modules
from shared.training import gradient_checkpointing, train_only_layers

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import BadInputError
from .train_config import Method as Method  # re-exported: callers import the recipe with its loop
from .train_config import TrainConfig as TrainConfig

CHECKPOINT_DIR = "checkpoint"


# ---------------------------------------------------------------- device


def resolve_device(
    requested: str = "auto", *, cuda_available: bool | None = None, bf16_supported: bool | None = None
) -> DeviceChoice:
    """shared.device.resolve_device for the client's --device, a bad choice reported as bad input (exit code 2)."""
    try:
        return _resolve_device(
            requested, setting="--device", cuda_available=cuda_available, bf16_supported=bf16_supported
        )
    except DeviceError as exc:
        raise BadInputError(str(exc)) from None


# ---------------------------------------------------------------- config


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------- what trains


def freeze_except_adapter(model: nn.Module, layers: list[int]) -> list[str]:
    """requires_grad only on the adapter layers' parameters; returns their names (shared.training)."""
    return train_only_layers(model, layers)


def lora_targets(model: nn.Module, layers: list[int]) -> list[str]:
    """Full module names of every linear inside the adapter layers (shared.lora.linear_modules)."""
    names = list(linear_modules(model, layers))
    if not names:
        raise BadInputError(f"adapter layers {layers} contain no linear modules for LoRA; use --method full")
    return names


def add_lora(model: nn.Module, layers: list[int], cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, layers)
    conv1d = any(m.conv1d for m in linear_modules(model, layers).values())
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=targets,
        fan_in_fan_out=conv1d,
    )  # Conv1D stores weights transposed
    model.requires_grad_(False)
    return get_peft_model(model, lora)  # only lora_A / lora_B train


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and drop the PEFT wrapper (no-op for a plain model)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


# ---------------------------------------------------------------- batches


def _batches(
    examples: list[Example], cfg: TrainConfig, pad_id: int, start_micro: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches, reshuffled per epoch from (seed, epoch) so any position can be resumed."""
    n = len(examples)
    per_epoch = math.ceil(n / cfg.batch_size)
    micro = start_micro
    while True:
        epoch, pos = divmod(micro, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        idx = order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size].tolist()
        yield collate([examples[i] for i in idx], pad_id)
        micro += 1


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum))


# ---------------------------------------------------------------- training loop


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # one mean loss per optimizer step (including resumed ones)
    seconds: float
    resumed_from: int = 0

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


StepCallback = Callable[[int, float], None]


def train(
    model: nn.Module,
    examples: list[Example],
    cfg: TrainConfig,
    choice: DeviceChoice,
    *,
    pad_id: int,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
    lr_scales: dict[str, float] | None = None,
) -> TrainResult:
    """Train the parameters that require grad (prepared by the caller); checkpoint; resume.

    `lr_scales` multiplies the learning rate of every parameter whose name starts with a key (e.g. one adapter
    layer's prefix); the rest train at cfg's rate.

    Ctrl-C (KeyboardInterrupt) saves a checkpoint at the last finished step before re-raising.
    """
    if not examples:
        raise BadInputError("no training examples: the data file produced no tokens")
    fingerprint = {**(fingerprint or {}), **cfg.hyperparameters()}
    fingerprint.pop("save_every", None)  # saving more or less often does not change the run
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def scale(name: str) -> float:
        return next((v for k, v in (lr_scales or {}).items() if name.startswith(k)), 1.0)

    by_scale: dict[float, list[nn.Parameter]] = {}
    for n, p in named:
        by_scale.setdefault(scale(n), []).append(p)
    groups = [{"params": ps, "lr": cfg.learning_rate * s} for s, ps in by_scale.items()]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # The issued weights, for the decay toward them (L2-SP): taken before a resume loads the checkpoint's weights.
    anchors = [p.detach().clone() for p in params] if cfg.anchor_decay > 0 else []
    n_steps = total_steps(len(examples), cfg)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * n_steps), num_training_steps=n_steps
    )
    step, losses = 0, list[float]()
    if resume and checkpoint_dir is not None and (checkpoint_dir / "trainer_state.json").exists():
        step, losses = load_checkpoint(checkpoint_dir, model, optimizer, fingerprint)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended fast-forward
            warnings.simplefilter("ignore")
            for _ in range(step):
                scheduler.step()
    elif resume:
        raise BadInputError(f"--resume: no checkpoint in {checkpoint_dir}; run without --resume to start")
    resumed_from = step
    batches = _batches(examples, cfg, pad_id, step * cfg.grad_accum)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, initial=step, desc=f"train ({cfg.method})", disable=not progress, leave=False)
    with gradient_checkpointing(model, cfg.gradient_checkpointing):  # a no-op unless asked for
        try:
            while step < n_steps:
                step_loss = 0.0
                micro = [{k: v.to(choice.device) for k, v in next(batches).items()} for _ in range(cfg.grad_accum)]
                for batch in micro:
                    with choice.autocast():
                        loss = lm_loss(model, batch)
                    (loss / cfg.grad_accum).backward()
                    step_loss += float(loss.detach()) / cfg.grad_accum
                if not math.isfinite(step_loss):
                    raise BadInputError(f"training diverged at step {step + 1} (loss {step_loss}); lower --lr")
                if cfg.sam_rho > 0:
                    _sam_gradient(model, params, micro, cfg, choice)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if anchors:
                    with torch.no_grad():
                        for p, p0, lr in zip(params, anchors, _param_lrs(optimizer, params), strict=True):
                            p.sub_(p - p0, alpha=lr * cfg.anchor_decay)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if checkpoint_dir is not None and (step % cfg.save_every == 0 or step == n_steps):
                    save_checkpoint(checkpoint_dir, model, optimizer, step, losses, fingerprint)
                if on_step is not None:
                    on_step(step, step_loss)
        except KeyboardInterrupt:
            if checkpoint_dir is not None and step > resumed_from:
                save_checkpoint(checkpoint_dir, model, optimizer, step, losses, fingerprint)
            raise
        finally:
            bar.close()
            model.eval()
    return TrainResult(step, losses, time.perf_counter() - t0, resumed_from)


def _sam_gradient(
    model: nn.Module,
    params: list[nn.Parameter],
    micro: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    choice: DeviceChoice,
) -> None:
    """Replace the gradients in `params` (taken at theta) by those at theta + rho * g / |g| on the same
    micro-batches (Foret et al., 2021); the weights are restored before the optimizer steps."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = cfg.sam_rho / (float(norm) + 1e-12)
    theta = [p.detach().clone() for p in params]  # restored by copy: adding and subtracting the shift rounds
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=scale)
    for p in params:
        p.grad = None
    shifted_loss = 0.0
    for batch in micro:
        with choice.autocast():
            loss = lm_loss(model, batch)
        (loss / cfg.grad_accum).backward()
        shifted_loss += float(loss.detach())
    with torch.no_grad():
        for p, t in zip(params, theta, strict=True):
            p.copy_(t)
    if not math.isfinite(shifted_loss):
        raise BadInputError(f"training diverged at the SAM point (loss {shifted_loss}); lower --sam-rho or --lr")


def _param_lrs(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[float]:
    """The current learning rate of each of `params` (after the scheduler's scaling), in their order."""
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return [lr[id(p)] for p in params]


def train_layers_in_model(
    model: nn.Module, layers: list[int], examples: list[Example], cfg: TrainConfig, choice: DeviceChoice, *, pad_id: int
) -> tuple[nn.Module, TrainResult]:
    """The same recipe on `layers` of a copy of a full model (M untouched): the reference an emulator's plug-in
    is measured against (the transfer ratio), used by the benchmarks, the demo and the utility test. Trained in
    float32 and returned in M's dtype, as the client trains a low-precision emulator."""
    tuned = copy.deepcopy(model)
    dtype = next(tuned.parameters()).dtype
    if dtype != torch.float32:  # as tune_emulator: bf16/fp16 weights would round AdamW's updates away
        tuned.float()
    freeze_except_adapter(tuned, layers)
    set_seed(cfg.seed)
    result = train(tuned, examples, cfg, choice, pad_id=pad_id, progress=False)
    tuned.requires_grad_(False)
    return tuned.to(dtype), result
