#!/usr/bin/env python
"""Utility transfer benchmark: does an adapter tuned through our emulator make the *full* model better?

Transfer ratio r = (zero-shot - plug-in) / (zero-shot - reference), where the reference is the same adapter
layers tuned directly inside M with the same recipe, data, steps and seed (for perplexity the differences are
taken in eval loss, i.e. nats; for accuracy in points). Every emulator row is run for each data-owner seed;
the tables give the mean and the spread (half the max-min range over seeds), so a difference smaller than the
spread is not claimed as a win.

Compared at the same depth (N_a = 4, the same number of non-adapter layers removed):
  ScaleOT (this project: stage-1 importance picks what is replaced, the stand-ins are calibrated for the plan)
  OT uniform LayerDrop (first/last 2 layers adapter, evenly spaced middle layers dropped)
  CRaSh-style layer sharing (the same slots run the nearest kept layer again; training-free)
plus ablations (adapter placement, calibration off, SRC beta), a 128-step data owner, the fidelity figures
stored with each emulator (perplexity ratio, adapter-gradient cosine) and which of them predicts r, and the
stage-1 ranking's stability across two seeds. Tasks: A, Shakespeare perplexity; B, 4-choice analogies; C,
instruction tuning on chatterbot-corpus's prompt -> response pairs (r on the responses' loss, plus exact match of
greedy answers to held-out trivia; needs `pip install --no-deps chatterbot-corpus==1.3.3`).

  .venv/bin/python benchmarks/transfer.py            # full run (docs/benchmarks.md)
  .venv/bin/python benchmarks/transfer.py --quick    # fewer rows, smaller budgets
  .venv/bin/python benchmarks/transfer.py --tiny     # random tiny LLaMA, seconds (tests)
  .venv/bin/python benchmarks/transfer.py --gemma270m --model-dir DIR --threads 1   # a second real model
      (Gemma-3-270M from `modelowner-server import-gguf`: ScaleOT alpha = 0.5 on Task A, a budget a shared 2-core
      CPU can afford; results in benchmarks/results/transfer_gemma270m.{json,md})

Everything is cached under --work-dir (stage 1, emulator files, rows), keyed by what produces it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.harness  # noqa: F401 - first: sets the thread and offline environment before torch loads

# isort: split
import torch

from benchmarks.harness import (
    PROFILE_HELP,
    Budget,
    EmuSpec,
    Run,
    Task,
    add_run_args,
    block_start,
    build_emulators,
    cached_emulator_run,
    cached_reference,
    cached_zero_shot,
    digest,
    log,
    make_tasks,
    profile_of,
    quality,
    stage1,
    start_run,
    write_json,
)
from benchmarks.results import result_paths
from benchmarks.transfer_report import markdown, spearman, summarise, targets

RESULT_NAME = "transfer"


PROFILES = {
    "full": Budget("full"),  # the defaults: Budget's are this benchmark's settings
    "quick": Budget(
        "quick",
        stage1_steps=16,
        stage1_warmup=4,
        stage1_seeds=(0,),
        calibration_steps=10,
        ft_steps=8,
        long_ft_steps=16,
        seeds=(0,),
        text_eval_blocks=8,
        mc_eval_questions=24,
        mc_train_questions=400,
        wiki_train_chars=120_000,
        wiki_val_chars=20_000,
        rows="quick",
    ),
    "tiny": Budget(
        "tiny",
        seq_len=32,
        stage1_steps=6,
        stage1_warmup=2,
        stage1_seeds=(0, 1),
        calibration_steps=3,
        ft_steps=3,
        long_ft_steps=6,
        seeds=(0, 1),
        text_batch=2,
        mc_batch=4,
        text_eval_blocks=4,
        mc_eval_questions=8,
        mc_train_questions=24,
        wiki_train_chars=0,
        wiki_val_chars=0,
        bottleneck=8,
        instruction_batch=4,
        instruction_eval_max=16,
        exact_match_prompts=4,
        exact_match_new_tokens=6,
        rows="tiny",
    ),
    # A second real model, Gemma-3-270M (--model-dir: its import-gguf folder, float32): about 2x SmolLM2's
    # parameters and a 262k-token vocabulary (a 168M-parameter embedding / head); on a shared 2-core CPU one
    # stage-1 step takes ~1 min, so it gets a reduced budget. Kept as in `full`: the data (the same Wikipedia
    # excerpt, Shakespeare split, seq_len 128), N_a = 4, alpha = 0.5, beta = 0, the data owner's recipe and 32
    # steps, seeds 0 and 1, the in-M reference with the same recipe. Reduced: stage 1 (one seed, 2 warm-up + 8
    # DL steps instead of 10 + 64), calibration (8 steps instead of 50), the data owner's batch (2 instead of 4)
    # and the held-out blocks scored (8 instead of 24); only ScaleOT alpha = 0.5 runs, on Task A, and no long
    # (128-step) row (long_ft_steps 0: no row longer than ft_steps).
    "gemma270m": Budget(
        "gemma270m",
        stage1_steps=8,
        stage1_warmup=2,
        stage1_seeds=(0,),
        calibration_steps=8,
        ft_steps=32,
        long_ft_steps=0,
        seeds=(0, 1),
        text_batch=2,
        text_eval_blocks=8,
        rows="alpha0.5",
    ),
}
# The profiles the command line offers besides full (--quick, --tiny, --gemma270m), and the tasks each runs by
# default (--tasks overrides).
PROFILE_FLAGS = {
    **PROFILE_HELP,
    "gemma270m": "Gemma-3-270M (needs --model-dir): ScaleOT alpha = 0.5 on Task A, a budget for a shared CPU",
}
DEFAULT_TASKS = {"gemma270m": "shakespeare"}


def emulator_specs(budget: Budget) -> list[EmuSpec]:
    if budget.rows == "alpha0.5":  # the second-model profile: the default ScaleOT emulator only
        return [EmuSpec("scaleot_a0.5", "ScaleOT α=0.5", "scaleot", 0.5)]
    specs = [
        EmuSpec("scaleot_a0.5", "ScaleOT α=0.5", "scaleot", 0.5),
        EmuSpec("ot_a0.5", "OT LayerDrop α=0.5", "uniform_layerdrop", 0.5),
        EmuSpec("crash_a0.5", "CRaSh sharing α=0.5", "layer_sharing", 0.5),
        EmuSpec("scaleot_a0.25", "ScaleOT α=0.25", "scaleot", 0.25),
        EmuSpec("ot_a0.25", "OT LayerDrop α=0.25", "uniform_layerdrop", 0.25),
        EmuSpec("crash_a0.25", "CRaSh sharing α=0.25", "layer_sharing", 0.25),
    ]
    if budget.rows != "quick":
        specs += [
            EmuSpec("scaleot_a0.5_nocal", "ScaleOT α=0.5, no calibration", "scaleot", 0.5, calibrate=False),
            EmuSpec(
                "scaleot_a0.5_importance",
                "ScaleOT α=0.5, adapters by importance",
                "scaleot",
                0.5,
                placement="importance",
            ),
            EmuSpec("scaleot_a0.5_spread", "ScaleOT α=0.5, adapters spread", "scaleot", 0.5, placement="spread"),
            EmuSpec("scaleot_a0.5_b0.5", "ScaleOT α=0.5 β=0.5", "scaleot", 0.5, 0.5),
            EmuSpec("scaleot_a0.5_b0.8", "ScaleOT α=0.5 β=0.8", "scaleot", 0.5, 0.8),
        ]
    return specs


# Which rows run with every seed / with the long budget / on which task (the rest: seed 0, Task A only; Task B
# and Task C rows run with the first seed: a 2-core machine's budget).
MAIN = {"scaleot_a0.5", "ot_a0.5", "scaleot_a0.25"}
LONG = {"scaleot_a0.5", "scaleot_a0.25"}
TASK_B = {"scaleot_a0.5", "ot_a0.5", "crash_a0.5"}


# ---------------------------------------------------------------- rows (data owner + server)


def run_all(run: Run, emulators: dict[str, dict], tasks: list[Task], budget: Budget, save) -> list[dict]:
    rows: list[dict] = []
    for task in tasks:
        zs = cached_zero_shot(run, task, budget)
        log(f"== {task.name}: zero-shot {task.metric} {zs[task.metric]:.4g}")
        plan_rows = [
            (name, seed, budget.ft_steps)
            for name in emulators
            for seed in (budget.seeds if name in MAIN else budget.seeds[:1])
        ]
        if budget.long_ft_steps > budget.ft_steps:  # a "long" budget no longer than the main one: no long rows
            plan_rows += [(name, budget.seeds[0], budget.long_ft_steps) for name in emulators if name in LONG]
        if task.name != "shakespeare":
            plan_rows = [p for p in plan_rows if p[0] in TASK_B and p[2] == budget.ft_steps and p[1] == budget.seeds[0]]
        for name, seed, steps in plan_rows:
            emu = emulators[name]
            layers = emu["adapter_layers"]
            ref = cached_reference(run, task, budget, layers, seed, steps)
            m = cached_emulator_run(run, task, budget, emu, seed, steps)
            q0, qp, qr = quality(task, zs), quality(task, m["plug_in"]), quality(task, ref["reference"])
            em = {
                k: v["exact_match"]
                for k, v in (
                    ("zero_shot", zs),
                    ("plug_in", m["plug_in"]),
                    ("reference", ref["reference"]),
                    ("emulator_ft", m["emulator_ft"]),
                )
                if "exact_match" in v
            }
            r = (qp - q0) / (qr - q0) if abs(qr - q0) > 1e-9 else None
            qe = quality(task, m["emulator_ft"])
            row = {
                "task": task.name,
                "metric": task.metric,
                "emulator": name,
                "seed": seed,
                "steps": steps,
                "adapter_layers": layers,
                "plan": emu["plan"],
                "size_ratio": emu["bytes"] / emu["full_model_bytes"],
                "fidelity": emu["fidelity"],
                "zero_shot": zs[task.metric],
                "emulator_zero_shot": m["emulator_zero_shot"][task.metric],
                "emulator_ft": m["emulator_ft"][task.metric],
                "plug_in": m["plug_in"][task.metric],
                "reference": ref["reference"][task.metric],
                "r": r,
                # privacy gap: plug-in quality minus the data owner's (nats for text, points for accuracy)
                "privacy_gap": (qp - qe) * (100 if task.metric == "accuracy" else 1),
                "seconds": m["seconds"] + ref["seconds"],
            }
            if em:  # Task C: greedy answers to held-out short-answer prompts, scored by exact match
                row["exact_match"] = em
            rows.append(row)
            log(
                f"  {name} seed {seed} {steps} steps: plug-in {row['plug_in']:.4g} ref {row['reference']:.4g} "
                f"emu FT {row['emulator_ft']:.4g} -> r {r if r is None else round(r, 3)}"
            )
            save(rows)
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, PROFILE_FLAGS)
    p.add_argument(
        "--tasks",
        default=None,
        help="of shakespeare, analogy, instruction (default: all three; --gemma270m: shakespeare)",
    )
    p.add_argument("--emulators", default=None, help="only these emulator rows (names as in emulator_specs)")
    p.add_argument("--stage1-seeds", default=None, help="stage-1 seeds, e.g. 0 (default: the profile's)")
    p.add_argument("--stage1-steps", type=int, default=None, help="stage-1 DL steps (default: the profile's)")
    p.add_argument("--stage1-warmup", type=int, default=None, help="stage-1 warm-up steps (default: the profile's)")
    p.add_argument("--calibration-steps", type=int, default=None, help="emulator calibration (default: the profile's)")
    args = p.parse_args(argv)
    profile = "gemma270m" if getattr(args, "gemma270m", False) else profile_of(args)
    if profile == "gemma270m" and not args.model_dir:
        p.error("--gemma270m needs --model-dir (the Gemma-3-270M folder written by `modelowner-server import-gguf`)")
    if args.tasks is None:
        args.tasks = DEFAULT_TASKS.get(profile, "shakespeare,analogy,instruction")
    budget = PROFILES[profile]
    if args.stage1_seeds:
        budget = replace(budget, stage1_seeds=tuple(int(x) for x in args.stage1_seeds.split(",")))
    for field in ("stage1_steps", "stage1_warmup", "calibration_steps"):  # part of the cache keys they shape
        if getattr(args, field) is not None:
            budget = replace(budget, **{field: getattr(args, field)})
    specs = emulator_specs(budget)
    if args.emulators:
        wanted = {x.strip() for x in args.emulators.split(",") if x.strip()}
        if wanted - {s.name for s in specs}:
            p.error(f"unknown emulator(s) {sorted(wanted - {s.name for s in specs})}")
        specs = [s for s in specs if s.name in wanted]
    json_path, md_path, _ = result_paths(Path(args.results_dir), RESULT_NAME, profile)
    t0 = time.perf_counter()
    run = start_run(args, budget)
    model, tok, model_id, files, work = run.model, run.tok, run.model_id, run.files, run.work
    tasks = make_tasks(files, budget, [t.strip() for t in args.tasks.split(",") if t.strip()])

    runs = [stage1(model, tok, model_id, files, budget, s, work) for s in budget.stage1_seeds]
    importance, info = runs[0]
    scores = [r[1]["scores"] for r in runs]
    s0 = torch.tensor(scores[0])
    pair = (s0[:, None] + s0[None, :]).abs() + torch.eye(len(s0)) * 1e9
    stage1_rec = {
        **{
            k: info[k]
            for k in (
                "config",
                "scores",
                "ranking",
                "seconds",
                "harmonizer_fraction",
                "n_harmonizer_params",
                "n_model_params",
            )
        },
        "spearman_between_seeds": spearman(scores[0], scores[1]) if len(scores) > 1 else None,
        "scores_by_seed": scores,
        "min_pair_sum": round(float(pair.min()), 5),
    }
    emulators = build_emulators(model, tok, importance, digest(info["scores"]), specs, files, budget, work)
    meta = {
        "profile": profile,
        "model": model_id,
        "model_dir": args.model_dir,
        # whether the data owner's blocks start with BOS where the tokenizer expects one (shared/tokens.py)
        "block_start": block_start(tok, tasks[0].train, budget.seq_len),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "budget": asdict(budget),
        "torch_threads": torch.get_num_threads(),
        "device": str(run.choice.device),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result: dict[str, Any] = {"meta": meta, "stage1": stage1_rec, "emulators": emulators, "rows": [], "complete": False}

    def save(rows: list[dict]) -> None:
        result["rows"] = rows
        meta["seconds"] = time.perf_counter() - t0
        write_json(json_path, result)

    rows = run_all(run, emulators, tasks, budget, save)
    summary = summarise(rows, budget)
    main_a = [
        x
        for x in summary
        if x["task"] == "shakespeare" and x["steps"] == budget.ft_steps and x["r_mean"] is not None and x["fidelity"]
    ]
    result["summary"] = summary
    result["fidelity_predicts_r"] = {
        k: spearman([x["fidelity"][k] for x in main_a], [x["r_mean"] for x in main_a])
        for k in ("ppl_ratio", "grad_cosine")
    }
    result["targets"] = targets(summary, stage1_rec["spearman_between_seeds"], info["seconds"], budget)
    meta["seconds"] = time.perf_counter() - t0
    meta["compute_seconds"] = (
        sum(r[1]["seconds"] for r in runs)
        + sum(e.get("seconds", 0) for e in emulators.values())
        + sum(r["seconds"] for r in rows)
    )
    meta["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["complete"] = True
    write_json(json_path, result)
    md = markdown(result)
    md_path.write_text(md)
    print("\n" + md, flush=True)
    log(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
