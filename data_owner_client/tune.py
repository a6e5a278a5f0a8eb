"""The tune recipe a data owner runs on a verified emulator: score it zero-shot, train only the adapter layers
(train.py), score again, export exactly what was issued (whole layers, or PEFT's LoRA pair) and check the
export as the server will. Everything but the adapter layers stays frozen and never leaves the machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from tqdm import tqdm

from shared.adapter import (
    TensorSpec,
    adapter_spec,
    extract_adapter,
    load_and_validate_adapter_file,
    validate_adapter,
)
from shared.data import Dataset, pad_id_for, training_examples
from shared.device import DeviceChoice
from shared.eval_settings import EVAL_SETTINGS_KEY, EvalSettings
from shared.evaluation import evaluate
from shared.layer_plan import LayerPlan
from shared.lora import LoraSpec, file_spec, issue_lora, linear_modules
from shared.signing import sha256_file

if TYPE_CHECKING:
    from peft import PeftModel

from .errors import BadInputError, ServerError
from .export import ADAPTER_FORMAT, save_layers, save_peft_lora, write_record
from .train import (
    CHECKPOINT_DIR,
    StepCallback,
    TrainConfig,
    TrainResult,
    add_lora,
    freeze_except_adapter,
    merge_lora,
    set_seed,
    train,
)

# ---------------------------------------------------------------- the recipe


@dataclass
class TuneResult:
    out_dir: Path
    adapter_file: Path
    config_file: Path
    adapter_config: dict[str, Any]
    # emulator_zero_shot / emulator_fine_tuned and the eval_settings they were scored with (when eval data)
    metrics: dict[str, dict[str, Any]]
    train: TrainResult
    n_adapter_params: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def _eval(
    model: nn.Module,
    tokenizer: Any,
    dataset: Dataset,
    cfg: TrainConfig,
    choice: DeviceChoice,
    max_examples: int | None,
    progress: bool,
    desc: str,
) -> dict[str, float]:
    bar = tqdm(desc=desc, disable=not progress, leave=False)

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        with choice.autocast():
            return evaluate(
                model,
                tokenizer,
                dataset,
                seq_len=cfg.seq_len,
                batch_size=cfg.batch_size,
                device=choice.device,
                max_examples=max_examples,
                progress=tick,
            )
    finally:
        bar.close()


def _issued_lora(
    model: nn.Module, layers: list[int], cfg: TrainConfig, storage_dtype: torch.dtype, issued: LoraSpec | None
) -> LoraSpec:
    """The LoRA to export: the one the server issued (checked against the verified emulator and the
    settings), or, offline, one from the settings in the emulator's dtype."""
    if issued is None:
        return issue_lora(model, layers, cfg.lora_r, cfg.lora_alpha, storage_dtype)
    if issued.modules != linear_modules(model, layers):
        raise ServerError("the server's LoRA spec disagrees with the verified emulator file; ask the model owner")
    if (issued.r, issued.alpha) != (cfg.lora_r, cfg.lora_alpha):
        raise BadInputError(
            f"the emulator accepts LoRA r={issued.r}, alpha={issued.alpha:g}; pass "
            f"--lora-r {issued.r} --lora-alpha {issued.alpha:g} (or leave them out)"
        )
    return issued


def tune_emulator(
    model: nn.Module,
    tokenizer: Any,
    plan: LayerPlan,
    data: Dataset,
    cfg: TrainConfig,
    choice: DeviceChoice,
    out_dir: Path,
    *,
    eval_data: Dataset | None = None,
    eval_max_examples: int | None = None,
    eval_seq_len: int | None = None,
    resume: bool = False,
    identity: dict[str, Any] | None = None,
    expected_spec: dict[str, TensorSpec] | None = None,
    lora: LoraSpec | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> TuneResult:
    """Evaluate zero-shot, train the adapter layers, evaluate again, export + validate the adapter.

    `identity` (emulator id/sha256, model id) goes into the training record and the resume fingerprint;
    `expected_spec` / `lora` are what the server issued (checked against the verified emulator file).
    `eval_seq_len` / `eval_max_examples` score `eval_data` (default seq_len: the training one); they are returned in
    `metrics["eval_settings"]`, which the upload carries so that the server scores M and the plug-in the same way.
    """
    identity = identity or {}
    layers = plan.adapter_layers
    if not layers:
        raise BadInputError("the emulator has no adapter layers to train")
    spec = adapter_spec(model, layers)  # from the verified file: the shapes/dtypes we must return
    if expected_spec is not None and expected_spec != spec:
        raise ServerError("the server's adapter_spec disagrees with the verified emulator file; ask the model owner")
    # Low-precision storage (bf16/fp16 emulators) would make AdamW updates vanish: train in fp32,
    # export in the issued dtype.
    storage_dtype = next(model.parameters()).dtype
    lora_spec = _issued_lora(model, layers, cfg, storage_dtype, lora) if cfg.method == "lora" else None
    set_seed(cfg.seed)
    examples = training_examples(data, tokenizer, cfg.seq_len, log=log)
    if not examples:
        raise BadInputError(f"{data.path}: produced no training examples")
    model.to(choice.device)
    if storage_dtype != torch.float32:
        model.float()
    metrics: dict[str, dict[str, Any]] = {}
    # The server scores M and the plug-in with the same settings when they travel with the upload (one measurement).
    eval_cfg = cfg if eval_seq_len is None else dataclasses.replace(cfg, seq_len=eval_seq_len)
    if eval_data is not None:
        metrics[EVAL_SETTINGS_KEY] = EvalSettings(eval_cfg.seq_len, eval_max_examples).to_json()
        metrics["emulator_zero_shot"] = _eval(
            model, tokenizer, eval_data, eval_cfg, choice, eval_max_examples, progress, "eval zero-shot"
        )
        log(f"emulator zero-shot: {_fmt_metrics(metrics['emulator_zero_shot'])}")

    if cfg.method == "lora":
        model = add_lora(model, layers, cfg)
    else:
        freeze_except_adapter(model, layers)
    fingerprint = {
        "emulator_sha256": identity.get("emulator_sha256"),
        "data_sha256": sha256_file(data.path)[0],
        "n_examples": len(examples),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume and (out_dir / CHECKPOINT_DIR / "trainer_state.json").exists():
        log(
            f"note: starting over; the checkpoint in {out_dir / CHECKPOINT_DIR} will be replaced "
            "(pass --resume to continue it)"
        )
    result = train(
        model,
        examples,
        cfg,
        choice,
        pad_id=pad_id_for(tokenizer),
        checkpoint_dir=out_dir / CHECKPOINT_DIR,
        resume=resume,
        fingerprint=fingerprint,
        progress=progress,
        on_step=on_step,
    )
    log(f"trained {result.steps} steps: loss {result.first_loss:.4f} -> {result.final_loss:.4f}")
    if lora_spec is not None:  # PEFT's files before the merge (the merge is for the local evaluation)
        adapter_file, peft_config = save_peft_lora(cast("PeftModel", model), lora_spec, out_dir)  # with_lora's wrap
        tensors = load_and_validate_adapter_file(adapter_file, file_spec(lora_spec))
    model = merge_lora(model)
    model.requires_grad_(False)
    if storage_dtype != torch.float32:
        model.to(storage_dtype)
    if eval_data is not None:
        metrics["emulator_fine_tuned"] = _eval(
            model, tokenizer, eval_data, eval_cfg, choice, eval_max_examples, progress, "eval fine-tuned"
        )
        log(f"emulator fine-tuned: {_fmt_metrics(metrics['emulator_fine_tuned'])}")
    if lora_spec is None:
        tensors = extract_adapter(model, layers)
        validate_adapter(tensors, spec)
        adapter_file = save_layers(tensors, out_dir)
        load_and_validate_adapter_file(adapter_file, spec)  # exactly what the server will check
    exported = spec if lora_spec is None else file_spec(lora_spec)
    record = {
        "format": ADAPTER_FORMAT,
        **{k: identity.get(k) for k in ("emulator_id", "model_id", "emulator_sha256", "server")},
        "adapter_layers": layers,
        "method": cfg.method,
        "file": adapter_file.name,  # whole layers, or PEFT's LoRA (with PEFT's adapter_config.json beside it)
        "lora": lora_spec.to_json() if lora_spec is not None else None,
        "hyperparameters": cfg.hyperparameters(),
        "device": str(choice.device),
        "autocast": str(choice.autocast_dtype).removeprefix("torch.") if choice.autocast_dtype else None,
        "training": {
            "steps": result.steps,
            "examples": len(examples),
            "first_loss": result.first_loss,
            "final_loss": result.final_loss,
            "seconds": round(result.seconds, 3),
            "resumed_from": result.resumed_from,
            "data_kind": data.kind,
        },
        "metrics": metrics,
        "tensors": {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in exported.items()},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    config_file = write_record(out_dir, record)
    upload_config = record if lora_spec is None else {**record, "peft": peft_config}
    return TuneResult(
        out_dir,
        adapter_file,
        config_file,
        upload_config,
        metrics,
        result,
        sum(t.numel() for t in tensors.values()),
        tensors,
    )


def _fmt_metrics(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float))
