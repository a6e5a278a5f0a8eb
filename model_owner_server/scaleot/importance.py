"""Stage 1: importance estimation with Dynamic LayerReplace (docs/algorithm.md, "Stage 1").

Every decoder layer i gets a harmonizer H_i and an importance score S_i (start 0). The LayerReplace policy
replaces each layer independently with probability q_i = sigmoid(logit(f) - S_i) (f = `replace_fraction`, so
fresh scores replace a share f of the layers), which gives every configuration a real log-probability.

- DL step: sample a configuration, run the mixed network on a D^T batch, update ONLY the harmonizers on the
  LM loss plus a fidelity term (KL to the full model's logits and normalised MSE of the final hidden state,
  [our choice]: without it nothing asks a harmonizer to reproduce what its layer did).
- RL step (every `rl_interval` DL steps): sample `n_candidates` configurations, score each on the same D^V
  batch (reward exp(-loss)), and move S by REINFORCE with a leave-one-out baseline:
  S_i += eta * mean_k(a_k * d log pi(c_k) / d S_i), where d log pi / d S_i = q_i if c_k kept layer i and
  -(1 - q_i) if it replaced it. Layers whose replacement hurts end with high S. Scores are re-centred to
  mean 0 after each RL step, so the replaced share stays near `replace_fraction`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from shared.architectures import decoder_layers
from shared.importance_config import ImportanceConfig  # re-exported: the knobs live there, torch-free
from shared.layer_plan import importance_order
from shared.modules import Harmonizer, HarmonizerLayer, count_params
from shared.training import optimizer_step, random_batch

from .losses import fidelity_loss, forward_with_hidden, lm_loss


@dataclass
class ImportanceProgress:
    step: int  # DL steps done
    total_steps: int
    phase: str  # "warmup" | "dl" | "rl"
    loss: float
    scores: list[float]
    reward_mean: float | None = None
    warmup_done: int = 0  # warm-start steps done (they come before the DL steps)
    total_warmup: int = 0

    @property
    def fraction(self) -> float:
        """Share of all the work done, warm-start included (for progress bars and job progress)."""
        return (self.warmup_done + self.step) / max(1, self.total_warmup + self.total_steps)

    @property
    def label(self) -> str:
        if self.phase == "warmup":
            return f"warmup step {self.warmup_done}/{self.total_warmup}"
        return f"{self.phase} step {self.step}/{self.total_steps}"


@dataclass
class ImportanceResult:
    scores: torch.Tensor  # (L,) float32
    harmonizers: dict[int, Harmonizer]
    config: ImportanceConfig
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    n_model_params: int = 0

    @property
    def n_harmonizer_params(self) -> int:
        return sum(p.numel() for h in self.harmonizers.values() for p in h.parameters())

    def ranking(self) -> list[int]:
        """Layer indices, most important first; ties broken by position."""
        return importance_order(self.scores)


def replace_probabilities(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """q_i = P(layer i replaced) = sigmoid(logit(fraction) - S_i)."""
    f = min(max(fraction, 1e-4), 1 - 1e-4)
    return torch.sigmoid(math.log(f / (1 - f)) - scores.double())


def sample_replacement(scores: torch.Tensor, fraction: float, gen: torch.Generator) -> list[bool]:
    """One LayerReplace configuration: True = replace layer i (independently, with probability q_i)."""
    q = replace_probabilities(scores, fraction)
    return (torch.rand(len(scores), generator=gen, dtype=torch.float64) < q).tolist()


def log_prob_grad(scores: torch.Tensor, fraction: float, replaced: list[bool]) -> torch.Tensor:
    """d log pi(configuration) / d S: q_i where layer i was kept, -(1 - q_i) where it was replaced."""
    q = replace_probabilities(scores, fraction)
    r = torch.tensor(replaced, dtype=torch.bool)
    return torch.where(r, -(1 - q), q)


@contextlib.contextmanager
def swapped_layers(model: nn.Module, replacements: dict[int, nn.Module]) -> Iterator[None]:
    """Temporarily put stand-ins at some decoder positions; always restores the originals."""
    layers = decoder_layers(model)
    originals = {i: layers[i] for i in replacements}
    try:
        for i, mod in replacements.items():
            layers[i] = mod
        yield
    finally:
        for i, mod in originals.items():
            layers[i] = mod


def _local_regression_step(model, stand_ins, ids, opt) -> float:
    """Warm start: capture each layer's input/output in one frozen forward, fit every H_i to its layer."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(decoder_layers(model)):

        def hook(mod, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            captured[i] = (h_in.detach(), (out[0] if isinstance(out, tuple) else out).detach())

        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    # Normalised MSE so layers with large activations do not dominate.
    # In float32 (a no-op for a float32 M): the fit of a bf16 M's layers is measured without bf16 rounding.
    loss = torch.stack(
        [
            F.mse_loss(stand_ins[i](x).float(), y.float()) / y.float().var().clamp_min(1e-6)
            for i, (x, y) in captured.items()
        ]
    ).mean()
    optimizer_step(loss, opt)
    return float(loss.detach())


def estimate_importance(
    model: PreTrainedModel,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    cfg: ImportanceConfig,
    progress: Callable[[ImportanceProgress], None] | None = None,
) -> ImportanceResult:
    """Run Dynamic LayerReplace on a frozen `model` over token blocks (N, T). The model is left as it was."""
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n_layers = len(decoder_layers(model))
    # float32 whatever M's dtype: in bf16 the harmonizers' small updates round away (a LayerNorm weight of 1.0
    # never moves); Harmonizer.forward computes in float32 and hands M back its own dtype. Saved as float32.
    harmonizers = {
        i: Harmonizer(model.config.hidden_size, cfg.bottleneck).to(device=device, dtype=torch.float32)
        for i in range(n_layers)
    }
    stand_ins = {i: HarmonizerLayer(h) for i, h in harmonizers.items()}
    scores = torch.zeros(n_layers)
    params = [p for h in harmonizers.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # no decay: unused harmonizers stay put
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False).eval()
    history: list[dict] = []

    def report(step: int, phase: str, loss: float, reward_mean: float | None = None, warmup_done: int = 0) -> None:
        done = warmup_done if phase == "warmup" else cfg.warmup_steps  # the warm start precedes every DL step
        rec = ImportanceProgress(step, cfg.steps, phase, loss, scores.tolist(), reward_mean, done, cfg.warmup_steps)
        history.append({"step": step, "phase": phase, "loss": loss, "reward_mean": reward_mean})
        if progress is not None:
            progress(rec)

    try:
        for warmup_done in range(1, cfg.warmup_steps + 1):
            fit = _local_regression_step(model, stand_ins, random_batch(train_blocks, cfg.batch_size, gen, device), opt)
            report(0, "warmup", fit, warmup_done=warmup_done)
        distill = cfg.distill_weight > 0 or cfg.hidden_weight > 0
        for step in range(1, cfg.steps + 1):
            # DL step: train the harmonizers of a sampled configuration through the frozen LLM.
            replaced = sample_replacement(scores, cfg.replace_fraction, gen)
            ids = random_batch(train_blocks, cfg.batch_size, gen, device)
            if distill:
                with torch.no_grad():
                    t_logits, t_hidden = forward_with_hidden(model, ids)
            with swapped_layers(model, {i: stand_ins[i] for i, r in enumerate(replaced) if r}):
                logits, hidden = forward_with_hidden(model, ids)
            loss = lm_loss(logits, ids)
            if distill:
                last = n_layers - 1
                kl, nmse = fidelity_loss(logits, hidden[last], t_logits, t_hidden[last], cfg.distill_temperature)
                loss = loss + cfg.distill_weight * kl + cfg.hidden_weight * nmse
            if any(replaced):  # a configuration that replaced nothing has no harmonizer to train
                optimizer_step(loss, opt)
            report(step, "dl", float(loss.detach()))

            if step % cfg.rl_interval == 0:
                report(step, "rl", *_rl_step(model, stand_ins, scores, val_blocks, cfg, gen, device))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        model.train(was_training)
    for h in harmonizers.values():
        h.requires_grad_(False)
    return ImportanceResult(scores, harmonizers, cfg, history, time.perf_counter() - t0, count_params(model))


@torch.no_grad()
def _rl_step(model, stand_ins, scores, val_blocks, cfg, gen, device) -> tuple[float, float]:
    """REINFORCE with a leave-one-out baseline on the scores (see the module docstring)."""
    ids = random_batch(val_blocks, cfg.val_batch_size, gen, device)  # one batch for all candidates: a fair comparison
    configs, losses = [], []
    for _ in range(cfg.n_candidates):
        replaced = sample_replacement(scores, cfg.replace_fraction, gen)
        with swapped_layers(model, {i: stand_ins[i] for i, r in enumerate(replaced) if r}):
            losses.append(float(lm_loss(model(input_ids=ids, use_cache=False).logits, ids)))
        configs.append(replaced)
    loss_t = torch.tensor(losses, dtype=torch.float64)
    # exp(-loss) relative to the best candidate: a positive rescale per step (raw exp(-10) would be ~0).
    rewards = torch.exp(-(loss_t - loss_t.min()))
    k = len(losses)
    adv = rewards - (rewards.sum() - rewards) / (k - 1)  # leave-one-out baseline: unbiased
    adv = adv / adv.std().clamp_min(1e-8) if k > 2 else adv / adv.abs().max().clamp_min(1e-8)
    step = torch.zeros(len(scores), dtype=torch.float64)
    for a, replaced in zip(adv.tolist(), configs, strict=True):
        step += a * log_prob_grad(scores, cfg.replace_fraction, replaced)
    scores += (cfg.score_lr * step / k).float()
    # [our choice] Scores are relative: centring keeps the replaced share near replace_fraction (a policy that
    # learns "replace fewer layers" would stop training harmonizers) without changing the ranking.
    scores -= scores.mean()
    return float(loss_t.mean()), float(rewards.mean())
