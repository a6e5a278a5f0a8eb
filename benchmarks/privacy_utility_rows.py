"""The privacy-utility benchmark's rows on one task: zero-shot M, full fine-tuning, the adapter layers tuned on M
(diagnostic), an emulator row (the client's tune recipe on the emulator file, then the server's plug-in), the
privacy gap, the OT distillation cost probe, and the stage-1 record of the result. Each runs the product's
own functions."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import SEED, Task, digest, evaluate_task, log, tune_on_task, write_json
from data_owner_client.train import (
    TrainConfig,
    set_seed,
    train,
    train_layers_in_model,
)
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.plugin import plug_in
from shared.architectures import decoder_layers
from shared.data import pad_id_for, training_examples
from shared.emulator_file import count_params, load_emulator
from shared.layer_plan import Role


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def metric_of(task: Task, metrics: dict[str, float]) -> float:
    return float(metrics[task.metric])


def train_config(task: Task, budget: Any) -> TrainConfig:
    # The client's recipe (TrainConfig defaults: AdamW, cosine, 5% warmup, clip 1.0), one budget for every row.
    return TrainConfig(
        method="full",
        max_steps=budget.ft_steps,
        lr=budget.lr,
        batch_size=task.batch,
        seq_len=budget.seq_len,
        seed=SEED,
        save_every=10**9,
    )


def run_zero_shot(model, tok, task: Task, budget: Any, choice) -> dict:
    m = evaluate_task(model, tok, task, budget, choice)
    return {"zero_shot": metric_of(task, m), "zero_shot_metrics": m}


def run_full_ft(model, tok, task: Task, budget: Any, choice, work: Path) -> dict:
    cfg = train_config(task, budget)
    ft = copy.deepcopy(model)
    ft.requires_grad_(True)  # full fine-tuning: every parameter of M
    set_seed(cfg.seed)
    examples = training_examples(task.train, tok, cfg.seq_len)
    res = train(ft, examples, cfg, choice, pad_id=pad_id_for(tok), progress=False)
    ft.requires_grad_(False)
    m = evaluate_task(ft, tok, task, budget, choice)
    out = {
        "full_ft": metric_of(task, m),
        "full_ft_metrics": m,
        "trainable_params": count_params(ft),
        "train_steps": res.steps,
        "train_seconds": res.seconds,
        "first_loss": res.first_loss,
        "final_loss": res.final_loss,
        "hyperparameters": cfg.hyperparameters(),
    }
    del ft
    return out


def run_adapter_on_m(model, tok, task: Task, budget: Any, choice, layers: list[int]) -> dict:
    """Diagnostic: the client's recipe on the same adapter layers, but inside M itself (a perfect emulator)."""
    cfg = train_config(task, budget)
    m, res = train_layers_in_model(
        model, layers, training_examples(task.train, tok, cfg.seq_len), cfg, choice, pad_id=pad_id_for(tok)
    )
    pm = evaluate_task(m, tok, task, budget, choice)
    out = {
        "plug_in": metric_of(task, pm),
        "plug_in_metrics": pm,
        "trainable_params": sum(p.numel() for i in layers for p in decoder_layers(m)[i].parameters()),
        "train_steps": res.steps,
        "train_seconds": res.seconds,
        "first_loss": res.first_loss,
        "final_loss": res.final_loss,
        "hyperparameters": cfg.hyperparameters(),
    }
    del m
    return out


def run_emulator_row(model, tok, task: Task, budget: Any, choice, emu: dict, work: Path) -> dict:
    """The client's tune recipe on the emulator file, then the server's plug-in and evaluation."""
    cfg = train_config(task, budget)
    loaded = load_emulator(emu["path"], device=choice.device)  # the client rebuilds it from the file alone
    out_dir = work / "runs" / f"{budget.profile}-{task.name}-{Path(emu['path']).stem}"
    tr = tune_on_task(loaded.model, loaded, task, cfg, choice, out_dir, log=lambda m: log(f"    client: {m}"))
    plugged = plug_in(model, tr.tensors, loaded.plan.adapter_layers)  # validates against the full model
    pm = evaluate_task(plugged, tok, task, budget, choice)
    log(f"    server: plug-in {task.metric} {metric_of(task, pm):.4g}")
    out = {
        "emulator_zero_shot": metric_of(task, tr.metrics["emulator_zero_shot"]),
        "emulator_ft": metric_of(task, tr.metrics["emulator_fine_tuned"]),
        "plug_in": metric_of(task, pm),
        "emulator_zero_shot_metrics": tr.metrics["emulator_zero_shot"],
        "emulator_ft_metrics": tr.metrics["emulator_fine_tuned"],
        "plug_in_metrics": pm,
        "trainable_params": tr.n_adapter_params,
        "train_steps": tr.train.steps,
        "train_seconds": tr.train.seconds,
        "first_loss": tr.train.first_loss,
        "final_loss": tr.train.final_loss,
        "hyperparameters": cfg.hyperparameters(),
    }
    del plugged, loaded, tr
    return out


def privacy_gap(task: Task, rec: dict) -> float | None:
    """Plug-in quality minus emulator-fine-tuned quality, in quality units: nats of eval loss for perplexity
    (log emulator_ft - log plug_in), accuracy points (fraction) for accuracy. Positive = the plug-in is better."""
    e, p = rec.get("emulator_ft"), rec.get("plug_in")
    if e is None or p is None:
        return None
    if task.higher_is_better:
        return p - e
    return _finite(math.log(e) - math.log(p)) if e > 0 and p > 0 else None


# ---------------------------------------------------------------- OT distillation cost probe


def ot_distillation_cost(model, tok, files, budget: Any, emu: dict, args, choice) -> dict:
    """A few steps of OT-style emulator distillation (what ScaleOT avoids): the LayerDrop emulator's kept middle
    layers are trained to match the full model's logits (KL) on the stage-1 corpus. Not part of the project's
    pipeline (the project never distils); measured here only for its cost on this machine."""
    cache = (
        Path(args.work_dir)
        / "rows"
        / f"{budget.profile}-ot_kd_cost-{digest([emu['sha256'], budget.kd_steps, budget.seq_len, budget.stage1_batch])}.json"
    )
    if cache.is_file() and not args.fresh:
        log("OT distillation cost: cached")
        return json.loads(cache.read_text())
    loaded = load_emulator(emu["path"], device=choice.device)
    student = loaded.model.float()
    student.requires_grad_(False)
    for i in loaded.plan.layers_with(Role.FROZEN):
        decoder_layers(student)[i].requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    blocks, _ = corpus_blocks(tok, files["wiki_train"], budget.seq_len, val_corpus=files["wiki_val"])
    bs = budget.stage1_batch
    student.train()
    times, losses = [], []
    for step in range(budget.kd_steps + 1):  # step 0 is a warm-up, not timed
        ids = blocks[(step * bs) % len(blocks) :][:bs].to(choice.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher = model(input_ids=ids, use_cache=False).logits.float()
        logits = student(input_ids=ids, use_cache=False).logits.float()
        loss = F.kl_div(
            F.log_softmax(logits, -1).flatten(0, 1),
            F.log_softmax(teacher, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    rec = {
        "seconds_per_step": sum(times) / len(times),
        "steps_timed": len(times),
        "batch_size": bs,
        "seq_len": budget.seq_len,
        "trainable_params": sum(p.numel() for p in params),
        "model_params": count_params(model),
        "kl": losses,
    }
    write_json(cache, rec)
    log(
        f"OT distillation: {rec['seconds_per_step']:.2f} s/step, {rec['trainable_params'] / 1e6:.1f} M trainable params"
    )
    del loaded, student, opt
    return rec


def stage1_record(info: dict, budget: Any) -> dict:
    return {
        "corpus": "English Wikipedia excerpt (gensim test data), disjoint D^T/D^V articles",
        "seq_len": budget.seq_len,
        "batch_size": info["config"]["batch_size"],
        "dl_steps": info["config"]["steps"],
        "warmup_steps": info["config"]["warmup_steps"],
        "rl_interval": info["config"]["rl_interval"],
        "n_candidates": info["config"]["n_candidates"],
        "bottleneck": info["config"]["bottleneck"],
        "seconds": info["seconds"],
        "dl_seconds_per_step": info.get("dl_seconds_per_step"),
        "trainable_params": info["n_harmonizer_params"],
        "model_params": info["n_model_params"],
        "trainable_fraction": info["harmonizer_fraction"],
        "final_dl_loss": info.get("final_loss"),
        "scores": info["scores"],
        "ranking": info["ranking"],
    }
