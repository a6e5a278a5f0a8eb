#!/usr/bin/env python
"""Privacy under attack: can a data owner rebuild the model from the emulator it holds?

For each emulator the service builds (OT uniform LayerDrop and ScaleOT at several alpha / beta), the honest
data owner fine-tunes its adapter on the emulator (emulator FT) and the model owner plugs it in (plug-in).
An attacker first trains the emulator on public text it holds (--public pydoc: Python's pydoc topics, far
from every task; --public shakespeare: the Shakespeare works the task does not use, in the task's own domain;
both disjoint from the stage-1 Wikipedia excerpt and from the task's data), with the attacks of
model_owner_server/scaleot/attack.py (heal-lora, heal-all, densify), and then fine-tunes the adapter exactly
as the data owner does.

  residual privacy gap = attacker - plug-in: eval loss difference in nats (perplexity tasks; positive: the
                         attacker stays worse than the plug-in) or plug-in - attacker accuracy in points
  share of the gain    = how much of the plug-in's gain over zero-shot M the attacker reaches

  .venv/bin/python benchmarks/privacy_attack.py            # the sweep (docs/benchmarks.md)
  .venv/bin/python benchmarks/privacy_attack.py --quick    # OT and ScaleOT at alpha 0.5, beta 0, small budgets
  .venv/bin/python benchmarks/privacy_attack.py --tiny     # random tiny LLaMA, seconds (tests)
  .venv/bin/python benchmarks/privacy_attack.py --public shakespeare --emulators ot_a0.5,scaleot_a0.5
  .venv/bin/python benchmarks/privacy_attack.py --longer 16,32   # the best attack with more text on one emulator

Caches (stage 1, emulator files, rows) are shared with benchmarks/transfer.py through benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO, SEED  # first: sets the thread and offline environment before torch loads

# isort: split
import torch

from benchmarks.harness import (
    CALIBRATIONS,
    DEFAULT_CALIBRATION,
    PROFILE_HELP,
    Budget,
    EmuSpec,
    Run,
    Task,
    add_run_args,
    build_emulators,
    cached,
    cached_zero_shot,
    data_key,
    digest,
    log,
    make_tasks,
    profile_of,
    quality,
    run_emulator,
    stage1,
    start_run,
    train_config,
    tune_on_task,
    write_json,
)
from benchmarks.privacy_attack_report import render, spread
from benchmarks.results import environment, result_paths
from model_owner_server.scaleot.attack import AttackConfig, heal
from model_owner_server.scaleot.corpus import corpus_blocks
from shared.emulator_file import load_emulator
from shared.src import LowRankLinear

RESULT_NAME = "privacy_attack"
PUBLIC_CORPORA = {
    "pydoc": "pydoc (Python's documentation topics)",
    "shakespeare": "other Shakespeare works (the 37 of 42 the task uses neither for training nor for eval)",
}
DOCS = REPO / "docs" / "benchmarks.md"


# Stage 1 and the emulators: transfer.py's settings (Budget's defaults), so both share the caches. The data
# owner's seed is seeds[0]; the other seeds rerun ScaleOT alpha 0.5 for the run-to-run spread of the figures.
PROFILES = {
    "full": Budget("full", ft_steps=12, text_eval_blocks=16),
    "quick": Budget(  # an end-to-end check under 10 min: OT and ScaleOT at alpha 0.5 (densify needs beta > 0: full)
        "quick",
        alphas=(0.5,),
        betas=(0.0,),
        attacks=("heal-lora", "heal-all"),
        stage1_steps=16,
        stage1_warmup=4,
        calibration_steps=10,
        ft_steps=8,
        attack_steps=32,
        public_train_chars=120_000,
        public_val_blocks=8,
        text_eval_blocks=8,
        mc_eval_questions=24,
        mc_train_questions=400,
        wiki_train_chars=120_000,
        wiki_val_chars=20_000,
        seeds=(0,),
    ),
    "tiny": Budget(
        "tiny",
        alphas=(0.5,),
        betas=(0.0, 0.8),
        seq_len=32,
        stage1_steps=4,
        stage1_warmup=2,
        calibration_steps=2,
        bottleneck=8,
        ft_steps=2,
        attack_steps=8,
        attack_batch=2,
        public_train_chars=20_000,
        public_val_blocks=4,
        text_batch=2,
        mc_batch=4,
        text_eval_blocks=4,
        mc_eval_questions=8,
        mc_train_questions=24,
        wiki_train_chars=0,
        wiki_val_chars=0,
    ),
}


def emulator_specs(budget: Budget) -> list[EmuSpec]:
    specs = [EmuSpec(f"ot_a{a:g}", f"OT LayerDrop α={a:g}", "uniform_layerdrop", a) for a in budget.alphas]
    specs += [
        EmuSpec(f"scaleot_a{a:g}" + (f"_b{b:g}" if b else ""), f"ScaleOT α={a:g} β={b:g}", "scaleot", a, b)
        for a in budget.alphas
        for b in budget.betas
    ]
    return specs


def attacks_for(emu: dict, budget: Budget) -> list[str]:
    """densify differs from heal-all only where SRC stored low-rank factors (else it is the same attack)."""
    loaded = load_emulator(emu["path"])
    low_rank = any(isinstance(m, LowRankLinear) for m in loaded.model.modules())
    return [a for a in budget.attacks if a != "densify" or low_rank]


# ---------------------------------------------------------------- the attacker


def public_blocks(tok, work: Path, budget: Budget, source: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train blocks, held-out blocks, source name): the attacker's public text, tokenized."""
    from scaleot_samples.corpora import write_public_files

    out = work / "data" / budget.profile / ("" if source == "pydoc" else f"public-{source}")
    files = write_public_files(out, budget.public_train_chars, 40_000, source=source, task_seed=SEED)
    train_b, val_b = corpus_blocks(tok, files["public_train"], budget.seq_len, val_corpus=files["public_val"])
    return train_b, val_b[: budget.public_val_blocks], source


def run_attack(task: Task, budget: Budget, choice, emu: dict, kind: str, seed: int, public: tuple, work: Path) -> dict:
    """Heal the emulator on public text, then fine-tune the adapter on the task as the data owner would."""
    loaded = load_emulator(emu["path"], device=choice.device)
    cfg = AttackConfig(kind=kind, steps=budget.attack_steps, batch_size=budget.attack_batch, seed=seed)
    healed, res = heal(loaded.model, public[0], public[1], cfg)
    out_dir = work / "runs" / f"attack-{task.name}-{Path(emu['path']).stem}-{kind}-{seed}"
    tr = tune_on_task(healed, loaded, task, train_config(task, budget, seed, budget.ft_steps), choice, out_dir)
    rec = {
        "heal": {k: v for k, v in res.to_dict().items() if k != "history"},
        "healed_zero_shot": tr.metrics["emulator_zero_shot"],
        "attacker": tr.metrics["emulator_fine_tuned"],
    }
    del healed, loaded, tr
    gc.collect()
    return rec


def cached_attack(
    task: Task, budget: Budget, choice, emu: dict, kind: str, seed: int, public: tuple, work: Path
) -> dict:
    key = [
        "attack",
        emu["sha256"],
        kind,
        budget.attack_steps,
        budget.attack_batch,
        [budget.public_train_chars, budget.public_val_blocks, tuple(public[0].shape)]
        + ([] if public[2] == "pydoc" else [public[2]]),  # pydoc's keys predate --public: kept, so caches hold
        data_key(task),
        seed,
        budget.ft_steps,
        budget.seq_len,
    ]
    return cached(work, key, run_attack, task, budget, choice, emu, kind, seed, public, work)


# ---------------------------------------------------------------- rows


def gap(task: Task, attacker: dict, plug: dict) -> float:
    """attacker - plug-in in nats (text) or plug-in - attacker in points (accuracy): > 0 means privacy holds."""
    scale = 100 if task.metric == "accuracy" else 1
    return (quality(task, plug) - quality(task, attacker)) * scale


def share_of_gain(task: Task, attacker: dict, plug: dict, zero_shot: dict) -> float | None:
    g = quality(task, plug) - quality(task, zero_shot)
    return None if abs(g) < 1e-9 else (quality(task, attacker) - quality(task, zero_shot)) / g


def run_rows(
    run: Run,
    emulators: dict[str, dict],
    tasks: list[Task],
    budget: Budget,
    public: tuple,
    save,
    longer_multiples: tuple[int, ...] = (),
    longer_on: str = "scaleot_a0.5",
) -> list[dict]:
    rows: list[dict] = []
    model, tok, choice, work = run.model, run.tok, run.choice, run.work
    seed0 = budget.seeds[0]
    for task in tasks:
        zs = cached_zero_shot(run, task, budget)
        log(f"== {task.name}: zero-shot {task.metric} {zs[task.metric]:.4g}")
        plan = [(name, seed0) for name in emulators]
        plan += [("scaleot_a0.5", s) for s in budget.seeds[1:] if "scaleot_a0.5" in emulators]
        for name, seed in plan:
            emu = emulators[name]
            base = cached(
                work,
                ["emu", emu["sha256"], data_key(task), seed, budget.ft_steps, budget.seq_len],
                run_emulator,
                model,
                tok,
                task,
                budget,
                choice,
                emu,
                seed,
                budget.ft_steps,
                work,
            )
            attacks = {
                kind: cached_attack(task, budget, choice, emu, kind, seed, public, work)
                for kind in attacks_for(emu, budget)
            }
            best_kind = max(attacks, key=lambda k: quality(task, attacks[k]["attacker"]))
            plug, eft = base["plug_in"], base["emulator_ft"]
            # The attacker keeps whichever is better: a healed copy, or no healing at all (healing on text far from
            # the task can hurt it); so the residual gap is never wider than the gap before the attack.
            helped = quality(task, attacks[best_kind]["attacker"]) > quality(task, eft)
            best = attacks[best_kind]["attacker"] if helped else eft
            longer = []  # the best attack again with more public text: does the gap shrink as the attacker spends?
            for m in longer_multiples if (name, seed) == (longer_on, seed0) else ():
                steps = m * budget.ft_steps * budget.text_batch // budget.attack_batch
                a = cached_attack(task, replace(budget, attack_steps=steps), choice, emu, best_kind, seed, public, work)
                longer.append(
                    {
                        "attack": best_kind,
                        "multiple_of_task_tokens": m,
                        "steps": steps,
                        "tokens": a["heal"]["tokens"],
                        "heal_loss_after": a["heal"]["loss_after"],
                        "attacker": a["attacker"][task.metric],
                        "residual_gap": gap(task, a["attacker"], plug),
                        "share_of_gain": share_of_gain(task, a["attacker"], plug, zs),
                        "seconds": a["seconds"],
                    }
                )
                log(f"  {name} {best_kind} at {m}x the task tokens: residual gap {longer[-1]['residual_gap']:+.3f}")
            row = {
                "task": task.name,
                "metric": task.metric,
                "emulator": name,
                "seed": seed,
                "size_ratio": emu["bytes"] / emu["full_model_bytes"],
                "plan": emu["plan"],
                "fidelity": emu["fidelity"],
                "zero_shot": zs[task.metric],
                "plug_in": plug[task.metric],
                "emulator_ft": eft[task.metric],
                "attackers": {
                    k: {
                        "attacker": a["attacker"][task.metric],
                        "healed_zero_shot": a["healed_zero_shot"][task.metric],
                        "heal": a["heal"],
                        "residual_gap": gap(task, a["attacker"], plug),
                        "seconds": a["seconds"],
                    }
                    for k, a in attacks.items()
                },
                "best_attack": best_kind,
                "attack_helped": helped,
                "attacker": best[task.metric],
                "gap_before_attack": gap(task, eft, plug),
                "residual_gap": gap(task, best, plug),
                "share_of_gain": share_of_gain(task, best, plug, zs),
                "base_seconds": base["seconds"],
                "plug_in_gain": quality(task, plug) - quality(task, zs),
                "longer_attacks": longer,
            }
            rows.append(row)
            log(
                f"  {name} seed {seed}: plug-in {row['plug_in']:.4g}  emulator FT {row['emulator_ft']:.4g}  "
                f"best attack {best_kind} {attacks[best_kind]['attacker'][task.metric]:.4g}"
                + ("" if helped else " (no better than no healing)")
                + f"  residual gap {row['residual_gap']:+.3f}"
            )
            save(rows)
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(
        p,
        {
            "quick": "OT and ScaleOT at alpha 0.5, beta 0, small budgets (<10 min on 2 cores)",
            "tiny": PROFILE_HELP["tiny"],
        },
    )
    p.add_argument("--tasks", default="shakespeare", help="shakespeare and/or analogy (comma-separated)")
    p.add_argument("--docs", action="store_true", help="also write the table into docs/benchmarks.md")
    p.add_argument(
        "--longer",
        default="",
        help="also rerun the best attack on --longer-on with this many times the task's tokens (e.g. 16,32)",
    )
    p.add_argument("--longer-on", default="scaleot_a0.5", help="the emulator the longer attacks run on")
    p.add_argument(
        "--public",
        choices=("pydoc", "shakespeare"),
        default="pydoc",
        help="the attacker's public text: pydoc (far from the task) or the Shakespeare works the task does not use",
    )
    p.add_argument("--emulators", default="", help="only these emulators (comma-separated names; default all)")
    p.add_argument(
        "--calibration",
        choices=sorted(CALIBRATIONS),
        default=DEFAULT_CALIBRATION,
        help="the ScaleOT emulators' calibration (harness.CALIBRATIONS; default: the library's); another one's "
        "results get a _cal_NAME suffix",
    )
    args = p.parse_args(argv)
    profile = profile_of(args)
    budget = PROFILES[profile]
    specs = emulator_specs(budget)
    names = [spec.name for spec in specs]
    only = [n.strip() for n in args.emulators.split(",") if n.strip()]
    if unknown := sorted(set(only) - set(names)):
        p.error(f"--emulators: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.public != "pydoc" and profile == "tiny":
        p.error("--tiny runs on synthetic text: use --public pydoc (the default)")
    specs = [spec for spec in specs if not only or spec.name in only]
    try:
        multiples = tuple(int(m) for m in args.longer.split(",") if m.strip())
    except ValueError:
        multiples = (0,)
    if any(m < 1 for m in multiples) or args.longer_on not in names:
        p.error(f"--longer takes positive integers (e.g. 16,32); --longer-on one of {', '.join(names)}")
    name = RESULT_NAME if args.public == "pydoc" else f"{RESULT_NAME}_public_{args.public}"
    if args.calibration != DEFAULT_CALIBRATION:  # a variant's table beside the default's, never over it
        name += f"_cal_{args.calibration}"
    json_path, md_path, png_path = result_paths(Path(args.results_dir), name, profile)
    t0 = time.perf_counter()
    run = start_run(args, budget)
    model, tok, model_id, files, work = run.model, run.tok, run.model_id, run.files, run.work
    tasks = make_tasks(files, budget, [t.strip() for t in args.tasks.split(",") if t.strip()])
    importance, info = stage1(model, tok, model_id, files, budget, budget.stage1_seeds[0], work)
    emulators = build_emulators(
        model, tok, importance, digest(info["scores"]), specs, files, budget, work, CALIBRATIONS[args.calibration]
    )
    for emu in emulators.values():
        emu["calibration_name"] = args.calibration
    public = public_blocks(tok, work, budget, args.public)
    icfg = info["config"]
    stage1_tokens = (icfg["warmup_steps"] + icfg["steps"]) * icfg["batch_size"] * budget.seq_len
    attack_tokens = budget.attack_steps * budget.attack_batch * budget.seq_len
    result: dict[str, Any] = {
        "meta": environment(profile, model_id, budget, run.choice.device),
        "budgets": {
            "task_tokens": budget.ft_steps * budget.text_batch * budget.seq_len,
            "attack_tokens": attack_tokens,
            "stage1_tokens": stage1_tokens,
            "attack_share_of_stage1_tokens": attack_tokens / stage1_tokens,
            "stage1_seconds": info["seconds"],
            "public_corpus": PUBLIC_CORPORA[args.public],
            "public_train_blocks": len(public[0]),
            "public_val_blocks": len(public[1]),
        },
        "emulators": emulators,
        "rows": [],
        "complete": False,
    }

    def save(rows: list[dict]) -> None:
        result["rows"] = rows
        result["meta"]["seconds"] = time.perf_counter() - t0
        write_json(json_path, result)

    rows = run_rows(run, emulators, tasks, budget, public, save, multiples, args.longer_on)
    result["spread"] = spread(rows)
    result["noise"] = max(0.02, 2 * result["spread"]["residual_gap"]) if result["spread"] else 0.02
    for r in rows:
        for a in r["attackers"].values():
            a["share_of_stage1_seconds"] = a["seconds"] / max(info["seconds"], 1e-9)
    result["meta"]["seconds"] = time.perf_counter() - t0
    result["meta"]["load_average"] = os.getloadavg()[0]
    # What the sweep costs from scratch: each step's own wall time, also when it came from the cache now.
    result["meta"]["compute_seconds"] = (
        info["seconds"]
        + sum(e.get("seconds", 0) for e in emulators.values())
        + sum(r["base_seconds"] + sum(a["seconds"] for a in r["attackers"].values()) for r in rows)
    )
    result["meta"]["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["complete"] = True
    marker = "privacy-attack" if args.public == "pydoc" else f"privacy-attack-public-{args.public}"
    md = render(result, json_path, DOCS if args.docs else None, marker)
    write_json(json_path, result)
    print("\n" + md, flush=True)
    log(f"wrote {json_path}, {md_path}" + (f", {png_path}" if result["plot"] else ""))
    return result


if __name__ == "__main__":
    main()
