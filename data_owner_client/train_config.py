"""The data owner's training recipe and its defaults (`TrainConfig`): torch-free, so `dataowner-client tune --help`
reads its option defaults from here without loading the model stack (data_owner_client/cmd_tune.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from shared.importance_config import LORA_ALPHA, LORA_R

from .errors import BadInputError

Method = Literal["full", "lora"]
LR_FULL, LR_LORA = 1e-4, 1e-3  # the peak learning rate when --lr is not given


@dataclass
class TrainConfig:
    method: Method = "full"
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float | None = None  # None: 1e-4 for full, 1e-3 for lora
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    seed: int = 0
    scheduler: str = "cosine"  # any transformers.get_scheduler name: cosine, linear, constant_with_warmup, ...
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    # L2-SP: decoupled decay toward the issued (starting) weights, theta -= lr * anchor_decay * (theta - theta0)
    anchor_decay: float = 0.0
    # SAM (sharpness-aware minimisation): each step takes the gradient at theta + sam_rho * g / |g|, the worst
    # nearby point, so the adapter settles where the loss is flat; 0: off (one backward per micro-batch, not two).
    # Measured for issue 21: no radius transferred better than off, so off is the default.
    sam_rho: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = LORA_R
    lora_alpha: int = LORA_ALPHA
    lora_dropout: float = 0.0
    save_every: int = 50  # checkpoint every N optimizer steps (and on Ctrl-C)
    # Recompute each layer's activations in the backward pass (less memory, ~1 more forward); same result.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.method in ("full", "lora"), f"--method must be full or lora, not {self.method!r}"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.seq_len >= 2, "--seq-len must be >= 2"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.lr is None or self.lr > 0, "--lr must be > 0"),
            (self.anchor_decay >= 0, "--anchor-decay must be >= 0"),
            (self.sam_rho >= 0, "--sam-rho must be >= 0"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.lora_r >= 1, "--lora-r must be >= 1"),
            (self.save_every >= 1, "--save-every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(message)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (LR_LORA if self.method == "lora" else LR_FULL)

    def hyperparameters(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("gradient_checkpointing")  # memory, not the recipe: a run may resume with or without it
        if not self.sam_rho:  # off: named only when on, so records and checkpoints from before it stay valid
            d.pop("sam_rho")
        d["lr"] = self.learning_rate
        if self.method != "lora":
            for k in ("lora_r", "lora_alpha", "lora_dropout"):
                d.pop(k)
        return d
