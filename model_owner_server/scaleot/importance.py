"""Stage 1: importance estimation with Dynamic LayerReplace (ScaleOT §2 of docs/scaleot-spec.md).

Every decoder layer i gets a harmonizer H_i and an importance score S_i (start 0). Each DL step samples a
grouped LayerReplace configuration (in every group of consecutive layers about half are swapped for their
harmonizers, less important layers more likely) and trains ONLY the harmonizers on the LM loss. Every
`rl_interval` DL steps an RL step samples `n_candidates` configurations, scores each on a validation batch
(reward exp(-loss), baseline-subtracted), and moves S by REINFORCE: up for layers a better-than-average
configuration kept, down for layers it replaced. Layers whose replacement hurts end with high S.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from shared.architectures import decoder_layers
from shared.emulator_file import count_params
from shared.modules import Harmonizer, HarmonizerLayer


@dataclass
class ImportanceConfig:
    steps: int = 100  # DL steps (the budget); RL steps come on top, every rl_interval
    batch_size: int = 4
    group_size: int = 2
    replace_fraction: float = 0.5  # share of each group replaced per configuration
    rl_interval: int = 10
    n_candidates: int = 3
    lr: float = 1e-3  # harmonizer AdamW learning rate
    score_lr: float = 10.0  # eta, the REINFORCE step on the scores
    # [our choice] rewards are exp(-loss) divided by the best candidate's: a positive per-step rescale that
    # leaves the policy-gradient direction alone but makes eta meaningful when losses are large (small
    # models with half their layers replaced sit at loss ~10, where raw exp(-loss) is ~1e-5).
    relative_reward: bool = True
    bottleneck: int = 64
    distill_weight: float = 0.0  # optional KL(full model || mixed model) on logits, added to the LM loss
    distill_temperature: float = 1.0
    warmup_steps: int = 0  # optional local-regression warm start: each H_i fits its own layer's output
    seed: int = 0
    device: str = "cpu"


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
        """Layer indices, most important first."""
        return sorted(range(len(self.scores)), key=lambda i: -float(self.scores[i]))


def sample_replacement(scores: torch.Tensor, group_size: int, fraction: float, gen: torch.Generator) -> list[bool]:
    """Grouped LayerReplace: True = replace. In each group of consecutive layers, about `fraction` of them
    (stochastic rounding) are drawn without replacement with probability ∝ sigmoid(-S_i)."""
    n = len(scores)
    replaced = [False] * n
    for start in range(0, n, group_size):
        idx = list(range(start, min(start + group_size, n)))
        want = fraction * len(idx)
        k = int(want) + int(torch.rand((), generator=gen).item() < want - int(want))
        if k == 0:
            continue
        weights = torch.sigmoid(-scores[idx].float())
        for j in torch.multinomial(weights, k, replacement=False, generator=gen).tolist():
            replaced[idx[j]] = True
    return replaced


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


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _batch(blocks: torch.Tensor, size: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    idx = torch.randint(len(blocks), (min(size, len(blocks)),), generator=gen)
    return blocks[idx].to(device)


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
    loss = sum(F.mse_loss(stand_ins[i](x), y) / y.var().clamp_min(1e-6) for i, (x, y) in captured.items()) / len(captured)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def estimate_importance(
    model: nn.Module,
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
    dtype = next(model.parameters()).dtype
    harmonizers = {i: Harmonizer(model.config.hidden_size, cfg.bottleneck).to(device=device, dtype=dtype)
                   for i in range(n_layers)}
    stand_ins = {i: HarmonizerLayer(h) for i, h in harmonizers.items()}
    scores = torch.zeros(n_layers)
    params = [p for h in harmonizers.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # no decay: unused harmonizers stay put
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False).eval()
    history: list[dict] = []

    warmup_done = 0

    def report(step: int, phase: str, loss: float, reward_mean: float | None = None) -> None:
        rec = ImportanceProgress(step, cfg.steps, phase, loss, scores.tolist(), reward_mean, warmup_done,
                                 cfg.warmup_steps)
        history.append({"step": step, "phase": phase, "loss": loss, "reward_mean": reward_mean})
        if progress is not None:
            progress(rec)

    try:
        for warmup_done in range(1, cfg.warmup_steps + 1):
            report(0, "warmup", _local_regression_step(model, stand_ins, _batch(train_blocks, cfg.batch_size, gen, device), opt))
        for step in range(1, cfg.steps + 1):
            # DL step: train the harmonizers of a sampled configuration through the frozen LLM.
            replaced = sample_replacement(scores, cfg.group_size, cfg.replace_fraction, gen)
            ids = _batch(train_blocks, cfg.batch_size, gen, device)
            teacher = None
            if cfg.distill_weight > 0:
                with torch.no_grad():
                    teacher = model(input_ids=ids, use_cache=False).logits
            with swapped_layers(model, {i: stand_ins[i] for i, r in enumerate(replaced) if r}):
                logits = model(input_ids=ids, use_cache=False).logits
            loss = _lm_loss(logits, ids)
            if teacher is not None:
                t = cfg.distill_temperature
                kl = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                              log_target=True, reduction="batchmean") * t * t / ids.shape[1]
                loss = loss + cfg.distill_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
    """REINFORCE on the scores: S_i += eta * a_k * sigma(S_i)(1 - sigma(S_i)) * (+1 kept / -1 replaced)."""
    ids = _batch(val_blocks, cfg.batch_size, gen, device)  # one batch for all candidates: a fair comparison
    configs, losses = [], []
    for _ in range(cfg.n_candidates):
        replaced = sample_replacement(scores, cfg.group_size, cfg.replace_fraction, gen)
        with swapped_layers(model, {i: stand_ins[i] for i, r in enumerate(replaced) if r}):
            losses.append(float(_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)))
        configs.append(replaced)
    loss_t = torch.tensor(losses, dtype=torch.float64)
    rewards = torch.exp(-(loss_t - loss_t.min())) if cfg.relative_reward else torch.exp(-loss_t)
    adv = rewards - rewards.mean()
    sig = torch.sigmoid(scores.double())
    grad = sig * (1 - sig)
    for a, replaced in zip(adv.tolist(), configs):
        sign = torch.tensor([-1.0 if r else 1.0 for r in replaced], dtype=torch.float64)
        scores += (cfg.score_lr * a * grad * sign).float()
    return float(loss_t.mean()), float(rewards.mean())


# ---- persistence: safetensors for tensors, JSON for settings; nothing pickled ----

def save_importance(result: ImportanceResult, out_dir: str | Path, extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"scores": result.scores.float().contiguous()}
    for i, h in result.harmonizers.items():
        for name, t in h.state_dict().items():
            tensors[f"harmonizers.{i}.{name}"] = t.detach().float().cpu().contiguous()
    n_layers = len(result.scores)
    hidden = next(iter(result.harmonizers.values())).norm.normalized_shape[0]
    record = {
        "format": "scaleot-importance/v1",
        "config": asdict(result.config),
        "n_layers": n_layers,
        "hidden_size": hidden,
        "scores": result.scores.tolist(),
        "ranking": result.ranking(),
        "seconds": round(result.seconds, 3),
        "n_model_params": result.n_model_params,
        "n_harmonizer_params": result.n_harmonizer_params,
        "harmonizer_fraction": result.n_harmonizer_params / max(1, result.n_model_params),
        "final_loss": next((h["loss"] for h in reversed(result.history) if h["phase"] == "dl"), None),
        **(extra or {}),
    }
    tmp = out / ".importance.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / "importance.safetensors")
    tmp_json = out / ".importance.json.tmp"
    tmp_json.write_text(json.dumps(record, indent=2))
    tmp_json.replace(out / "importance.json")
    return out


def load_importance(out_dir: str | Path) -> ImportanceResult:
    out = Path(out_dir)
    try:
        record = json.loads((out / "importance.json").read_text())
        tensors = load_file(str(out / "importance.safetensors"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{out} holds no importance run (importance.json + importance.safetensors); "
                                "run `modelowner-server estimate-importance` first") from exc
    cfg = ImportanceConfig(**record["config"])
    harmonizers = {}
    for i in range(record["n_layers"]):
        h = Harmonizer(record["hidden_size"], cfg.bottleneck)
        h.load_state_dict({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"harmonizers.{i}.")})
        harmonizers[i] = h.requires_grad_(False)
    return ImportanceResult(tensors["scores"], harmonizers, cfg, [], record.get("seconds", 0.0),
                            record.get("n_model_params", 0))


def corpus_blocks(tokenizer, corpus: str | Path, seq_len: int = 256, val_fraction: float = 0.1,
                  val_corpus: str | Path | None = None, max_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 data: a task-agnostic text file cut into D^T / D^V token blocks (N, seq_len).

    Without a separate validation file, the last `val_fraction` of the blocks is D^V (contiguous, so no text
    is shared between the two)."""
    from shared.data import load_dataset, pack_text_blocks  # text files only; DataError names the file

    def blocks(path) -> torch.Tensor:
        ds = load_dataset(path)
        if ds.kind != "text":
            raise ValueError(f"{path}: the stage-1 corpus must be plain text (.txt or JSONL {{\"text\"}}), got {ds.kind}")
        return pack_text_blocks(tokenizer, ds.records, seq_len)

    train = blocks(corpus)
    if val_corpus is not None:
        val = blocks(val_corpus)
    else:
        if len(train) < 2:
            raise ValueError(f"{corpus}: too little text for a train/validation split at seq_len {seq_len}; "
                             "give a longer corpus, a smaller --seq-len or a --val-corpus")
        n_val = max(1, int(len(train) * val_fraction))
        train, val = train[:-n_val], train[-n_val:]
    if max_blocks:
        train = train[:max_blocks]
    return train, val
