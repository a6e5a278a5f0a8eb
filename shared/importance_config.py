"""The algorithm's knobs and their defaults: stage 1 (`ImportanceConfig`), emulator calibration
(`CalibrationConfig`) and the issued LoRA's rank and alpha (`LORA_R`, `LORA_ALPHA`). The one place the CLI (`estimate-importance`, `make-emulator`), the API schema
(shared/schemas.py ImportanceRequest), the server's Settings and the library (model_owner_server.scaleot.importance
and .calibrate, which re-export these classes) take them from. No torch here, so the CLI, the schema and the
settings read it without loading the model stack; tests/core/test_defaults.py checks that they all agree."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# The LoRA an emulator issues (and the client's --method lora) when nobody names a rank: PEFT's own defaults.
LORA_R = 8
LORA_ALPHA = 16


@dataclass
class ImportanceConfig:
    steps: int = 100  # DL steps (the budget); RL steps come on top, every rl_interval
    batch_size: int = 4
    # [our choice] The paper replaces about half; on a 135M model half the layers gone (or any of the few
    # critical ones) puts every configuration near loss 10-17 nats, where rewards carry no ranking signal.
    replace_fraction: float = 0.25  # share of layers a fresh policy (all S = 0) replaces
    rl_interval: int = 2
    n_candidates: int = 8  # configurations per RL step (>= 2: the baseline is the others' mean reward)
    val_batch_size: int = 4  # D^V blocks every RL candidate is scored on (the same blocks for all of them)
    lr: float = 1e-3  # harmonizer AdamW learning rate
    score_lr: float = 1.0  # eta, the REINFORCE step on the scores (advantages are standardised per RL step)
    bottleneck: int = 64
    distill_weight: float = 1.0  # KL(full model || mixed model) on logits, added to the LM loss
    hidden_weight: float = 1.0  # normalised MSE of the final hidden state against the full model's
    distill_temperature: float = 1.0
    warmup_steps: int = 0  # optional local-regression warm start: each H_i fits its own layer's output
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.n_candidates < 2:
            raise ValueError("n_candidates must be at least 2 (each candidate's baseline is the others' mean reward)")
        if not 0.0 < self.replace_fraction < 1.0:
            raise ValueError(f"replace_fraction must be in (0, 1), got {self.replace_fraction}")
        if self.steps < 1 or self.rl_interval < 1 or self.batch_size < 1 or self.val_batch_size < 1:
            raise ValueError("steps, rl_interval, batch_size and val_batch_size must be at least 1")

    @classmethod
    def from_dict(cls, d: dict) -> ImportanceConfig:
        """Tolerant of records written by older versions (unknown keys such as group_size are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class CalibrationConfig:
    """Stage 2b: fitting an emulator's stand-ins (and optionally its kept layers) to M for its own plan."""

    steps: int = 50  # 0 = no calibration
    batch_size: int = ImportanceConfig.batch_size  # the server uses SCALEOT_IMPORTANCE_BATCH_SIZE for both
    lr: float = 1e-3  # harmonizers
    kept_lr: float = 0.0  # > 0: also adjust the kept (frozen / SRC) layers at this rate (OT-style compensation)
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    # > 0: also match M's backward signal (calibrate.py says why): "adapters", each adapter layer's parameter
    # gradient (cosine per layer), or "junction", the LM loss's gradient w.r.t. the residual stream where the
    # bottom adapters hand over (per token). The default (issue 21, docs/benchmarks.md) raised r on SmolLM2 from
    # 0.60 to 0.66 at 32 data-owner steps and 0.34 to 0.47 at 128, for ~2.4x the calibration time; 0 = off.
    grad_weight: float = 10.0
    grad_match: str = "adapters"
    # > 0: calibrate along the data owner's trajectory, not only at M's adapter weights (calibrate.py says why):
    # between calibration steps the adapter layers take a fine-tuning step at this AdamW rate through the
    # emulator (on the calibration text), and the stand-ins are fitted to M *with those adapter weights*; every
    # `drift_reset` steps the adapters go back to M's. M's own weights are never written. 0 = off: on SmolLM2 it
    # lowered r at 32 steps from 0.66 to 0.37 (docs/benchmarks.md), so it is a measured ablation, not a setting.
    drift_lr: float = 0.0
    drift_reset: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.drift_lr < 0 or self.drift_reset < 1:
            raise ValueError(f"drift_lr must be >= 0 and drift_reset >= 1, got {self.drift_lr}, {self.drift_reset}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["grad_weight"] == 0.0:  # records (and so emulator files) without the term read as before it existed
            del d["grad_weight"], d["grad_match"]
        if d["drift_lr"] == 0.0:  # likewise without the drift
            del d["drift_lr"], d["drift_reset"]
        return d
