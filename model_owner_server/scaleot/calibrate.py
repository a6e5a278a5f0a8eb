"""Stage 2b [our choice]: calibrate an emulator for its own plan, and measure how well it will transfer.

Stage 1 trains every harmonizer under random configurations; an emulator fixes one. An adapter tuned through
an emulator that is far from M learns to repair the emulator, and that part does not transfer. So after the
plan is fixed, the stand-ins (and optionally the kept frozen layers, as OT's distillation does) are fitted so
that the emulator *with M's own adapter layers* reproduces M: KL to M's logits plus the normalised MSE of the
residual stream after every position. The adapter layers are never touched (they are M's weights, which the
data owner starts from and the server plugs back). What it trains is updated in float32: the harmonizers are
float32 modules (make_emulator), anything else gets a float32 master copy (bf16 would round the updates away).

`measure_fidelity` is the figure stored with every emulator: the perplexity ratio to M and the cosine between
the adapter's gradients under the emulator and under M (GradOT / LLEOT: what transfers is the gradient).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.architectures import decoder_layers
from shared.importance_config import CalibrationConfig  # re-exported: the knobs live there, torch-free
from shared.layer_plan import LayerPlan, Role
from shared.training import optimizer_step, random_batch, train_only_layers, warmup_cosine

from .losses import forward_with_hidden, hidden_nmse, lm_loss, logit_kl


@dataclass
class CalibrationProgress:
    step: int
    total_steps: int
    kl: float
    nmse: float

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


def calibration_params(emu: nn.Module, plan: LayerPlan, cfg: CalibrationConfig) -> list[dict[str, Any]]:
    """Optimizer groups: harmonizer stand-ins at cfg.lr, kept layers at cfg.kept_lr (when > 0)."""
    layers = decoder_layers(emu)
    groups = [{"params": [p for i in plan.layers_with(Role.HARMONIZER) for p in layers[i].parameters()], "lr": cfg.lr}]
    if cfg.kept_lr > 0:
        groups.append(
            {"params": [p for i in plan.layers_with(Role.FROZEN) for p in layers[i].parameters()], "lr": cfg.kept_lr}
        )
    return [g for g in groups if g["params"]]


def float32_masters(
    groups: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[tuple[nn.Parameter, torch.Tensor]]]:
    """The optimizer groups over float32 master copies of the parameters that are not float32, and the
    (parameter, master) pairs. Kept layers of a bf16 M train through these: an update of kept_lr (~1e-5) is
    far below half a bf16 step of their weights and would round away. Float32 parameters (the harmonizers,
    every parameter of a float32 M) are trained as they are."""
    pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
    out = []
    for g in groups:
        params = []
        for p in g["params"]:
            if p.dtype == torch.float32:
                params.append(p)
            else:
                master = p.detach().float().requires_grad_(True)
                pairs.append((p, master))
                params.append(master)
        out.append({**g, "params": params})
    return out, pairs


def calibrate_emulator(
    model: nn.Module,
    emu: nn.Module,
    plan: LayerPlan,
    blocks: torch.Tensor,
    cfg: CalibrationConfig,
    progress: Callable[[CalibrationProgress], None] | None = None,
) -> dict[str, Any]:
    """Fit the emulator's non-adapter parts to M on task-agnostic token blocks (N, T). In place; M untouched."""
    groups = calibration_params(emu, plan, cfg)
    if cfg.steps <= 0 or not groups:
        return {"steps": 0, "seconds": 0.0, "config": cfg.to_dict()}
    t0 = time.perf_counter()
    device = next(emu.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    emu.requires_grad_(False).eval()
    model.eval()
    for p in (p for g in groups for p in g["params"]):
        p.requires_grad_(True)
    groups, masters = float32_masters(groups)
    trainable = [p for g in groups for p in g["params"]]  # what the optimizer updates, all float32
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.steps)  # cosine to 0
    positions = list(range(plan.n_layers))
    kl = nmse = torch.zeros(())
    try:
        for step in range(1, cfg.steps + 1):
            ids = random_batch(blocks, cfg.batch_size, gen, device)
            with torch.no_grad():
                t_logits, t_hidden = forward_with_hidden(model, ids, positions)
            logits, hidden = forward_with_hidden(emu, ids, positions)
            kl = logit_kl(logits, t_logits)
            # The residual stream after every position: where each stand-in rejoins M, it should carry M's state.
            nmse = torch.stack([hidden_nmse(hidden[i], t_hidden[i]) for i in positions]).mean()
            loss = cfg.kl_weight * kl + cfg.hidden_weight * nmse
            if masters:
                _master_step(loss, opt, sched, trainable, masters)
            else:
                optimizer_step(loss, opt, clip=trainable, scheduler=sched)
            if progress is not None:
                progress(CalibrationProgress(step, cfg.steps, float(kl.detach()), float(nmse.detach())))
    finally:
        train_only_layers(emu, plan.adapter_layers)  # as build_emulator left it
    return {
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "final_kl": float(kl.detach()),
        "final_nmse": float(nmse.detach()),
        "config": cfg.to_dict(),
    }


def _master_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[torch.Tensor],
    masters: list[tuple[nn.Parameter, torch.Tensor]],
) -> None:
    """optimizer_step with float32 masters: the low-precision gradients move to the masters, the optimizer
    steps them, and the model's parameters take the masters' values rounded to their own dtype."""
    opt.zero_grad(set_to_none=True)
    for p, _ in masters:
        p.grad = None
    loss.backward()
    for p, m in masters:
        m.grad = None if p.grad is None else p.grad.float()
        p.grad = None
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        for p, m in masters:
            p.copy_(m)


def _adapter_grad(net: nn.Module, layers: list[int], ids: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    blocks = decoder_layers(net)
    params = [[p for p in blocks[i].parameters()] for i in layers]
    flags = [[p.requires_grad for p in ps] for ps in params]
    try:
        for ps in params:
            for p in ps:
                p.requires_grad_(True)
        loss = lm_loss(net(input_ids=ids, use_cache=False).logits, ids)
        grads = torch.autograd.grad(loss, [p for ps in params for p in ps])
    finally:
        for ps, fs in zip(params, flags, strict=True):
            for p, f in zip(ps, fs, strict=True):
                p.requires_grad_(f)
    out, k = [], 0
    for ps in params:
        out.append(torch.cat([g.flatten().double() for g in grads[k : k + len(ps)]]))
        k += len(ps)
    return float(loss.detach()), out


def measure_fidelity(
    model: nn.Module, emu: nn.Module, plan: LayerPlan, blocks: torch.Tensor, n_blocks: int | None = None
) -> dict[str, Any]:
    """Perplexity ratio emulator / M and the adapter-gradient cosine (all adapter layers, and per layer) on the
    first `n_blocks` held-out blocks (None: all of them; the server passes SCALEOT_EMULATOR_FIDELITY_BLOCKS
    blocks); both with M's own adapter weights, i.e. what the data owner starts from."""
    ids = blocks[:n_blocks].to(next(emu.parameters()).device)
    layers = plan.adapter_layers
    was = model.training, emu.training
    model.eval()
    emu.eval()
    try:
        m_loss, m_grads = _adapter_grad(model, layers, ids)
        e_loss, e_grads = _adapter_grad(emu, layers, ids)
    finally:
        model.train(was[0])
        emu.train(was[1])
    cos = torch.nn.functional.cosine_similarity
    per_layer = [float(cos(a, b, dim=0)) for a, b in zip(m_grads, e_grads, strict=True)]
    total = float(cos(torch.cat(m_grads), torch.cat(e_grads), dim=0))
    return {
        "ppl_ratio": round(math.exp(e_loss - m_loss), 4),
        "grad_cosine": round(total, 4),
        "grad_cosine_per_layer": {str(i): round(c, 4) for i, c in zip(layers, per_layer, strict=True)},
        "val_loss_model": round(m_loss, 4),
        "val_loss_emulator": round(e_loss, 4),
        "n_blocks": len(ids),
    }
