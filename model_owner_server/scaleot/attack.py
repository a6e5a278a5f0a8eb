"""Recovery attacks on an emulator: what a data owner could rebuild from the file it holds plus public text.

The emulator ships every kept layer, the harmonizers, the SRC factors and the embeddings. A data owner who
wants the full model for free trains *all* of it on public text to heal what was removed (as pruned LLMs are
healed after pruning), and only then fine-tunes its adapter. The model owner runs the same attacks on its own
emulators (`modelowner-server audit-emulator`, benchmarks/privacy_attack.py) to see how much of the gap to the
full model survives them.

  heal-lora  LoRA on every linear module, trained with the LM loss, then merged (the cheap first try)
  heal-all   every parameter trained with the LM loss
  densify    SRC's low-rank attention factors turned back into dense matrices (full rank to learn into),
             then heal-all: the best undoing of SRC possible from the file alone
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from shared.src import LowRankLinear
from shared.training import optimizer_step, random_batch, warmup_cosine

from .losses import lm_loss

ATTACKS = ("heal-lora", "heal-all", "densify")
DEFAULT_LR = {"heal-lora": 1e-3, "heal-all": 1e-4, "densify": 1e-4}


@dataclass(frozen=True)
class AttackConfig:
    kind: str = "heal-lora"
    steps: int = 64
    batch_size: int = 4
    lr: float | None = None  # None: DEFAULT_LR[kind]
    lora_rank: int = 16
    warmup_steps: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; choose one of {', '.join(ATTACKS)}")
        if self.steps < 1 or self.batch_size < 1 or self.lora_rank < 1:
            raise ValueError("attack steps, batch_size and lora_rank must be at least 1")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]


@dataclass
class AttackResult:
    config: AttackConfig
    tokens: int  # public tokens trained on (steps x batch x block length)
    seconds: float
    loss_before: float  # held-out public text, nats per token
    loss_after: float
    densified: int = 0  # low-rank modules turned dense (densify)
    history: list[float] = field(default_factory=list)  # training loss per step

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "config": asdict(self.config), "history": [round(x, 4) for x in self.history]}


@torch.no_grad()
def mean_lm_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats) over `blocks` (N, T), weighted by tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size].to(device)
        n = ids.numel() - len(ids)
        total += float(lm_loss(model(input_ids=ids, use_cache=False).logits, ids)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def densify(model: nn.Module) -> int:
    """Replace every LowRankLinear by a dense nn.Linear computing the same map; returns how many."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        w = mod.dense_weight().detach()
        dense = nn.Linear(w.shape[1], w.shape[0], bias=mod.up.bias is not None).to(dtype=w.dtype, device=w.device)
        with torch.no_grad():
            dense.weight.copy_(w)
            if mod.up.bias is not None:
                dense.bias.copy_(mod.up.bias)
        setattr(parent, child, dense)
    return len(targets)


def _with_lora(model: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # every nn.Linear (and GPT-2's Conv1D), the kept layers', the harmonizers' and the SRC factors' alike
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"))


def heal(
    model: nn.Module,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    cfg: AttackConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[nn.Module, AttackResult]:
    """Train the emulator on public text with the LM loss; returns the healed model (LoRA merged) and figures.

    train_blocks / val_blocks: token ids (N, T) of public text the attacker holds, disjoint from the model
    owner's stage-1 corpus and from the task. The model is changed in place (heal-all, densify) or
    returned merged (heal-lora); it comes back in eval mode with every parameter frozen.
    """
    if len(train_blocks) == 0 or len(val_blocks) == 0:
        raise ValueError("the attack needs public text: no training or validation blocks")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    loss_before = mean_lm_loss(model, val_blocks, cfg.batch_size)
    n_dense = densify(model) if cfg.kind == "densify" else 0
    if cfg.kind == "heal-lora":
        model.requires_grad_(False)
        model = _with_lora(model, cfg.lora_rank)
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)

    sched = warmup_cosine(opt, cfg.steps, cfg.warmup_steps, floor=0.1)  # linear warm-up, then cosine to 10%
    model.train()
    history: list[float] = []
    for step in range(cfg.steps):
        ids = random_batch(train_blocks, cfg.batch_size, gen, device)
        loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        optimizer_step(loss, opt, clip=params, scheduler=sched)
        history.append(float(loss.detach()))
        if progress:
            progress(step + 1, cfg.steps, history[-1])
    if cfg.kind == "heal-lora":
        model = cast(Any, model).merge_and_unload()  # a PeftModel here: the LoRA deltas go into the weights
    model.requires_grad_(False)
    model.eval()
    result = AttackResult(
        cfg,
        tokens=cfg.steps * min(cfg.batch_size, len(train_blocks)) * train_blocks.shape[1],
        seconds=time.perf_counter() - t0,
        loss_before=loss_before,
        loss_after=mean_lm_loss(model, val_blocks, cfg.batch_size),
        densified=n_dense,
        history=history,
    )
    return model, result
