#!/usr/bin/env python
"""The data owner's side of transfer (issue 21): which training recipe on the emulator makes the *full* model
better, at 32 and 128 steps, on Task A with the benchmark's alpha = 0.5 ScaleOT emulator.

Every variant is the client's training loop (data_owner_client.train.train) on the emulator file that
benchmarks/transfer.py builds (same stage 1, same calibration, the same cache), then the server's plug_in and
the benchmark's evaluation. What a variant changes is only the data owner's recipe: learning rate, LoRA vs
whole layers, decay toward the issued weights (L2-SP), which adapter layers train. The reference (the same
four layers tuned in M) uses the client's default recipe, so r compares every variant against one fixed
in-M gain: a recipe that makes the reference worse cannot raise its own r that way.

  .venv/bin/python benchmarks/transfer_recipes.py                      # stage 1 + emulator (cached)
  .venv/bin/python benchmarks/transfer_recipes.py top2:32:0 top2:128:0  # rows (variant:steps:seed)
  .venv/bin/python benchmarks/transfer_recipes.py --tiny default:3:0     # random tiny LLaMA, seconds (tests)
  .venv/bin/python benchmarks/transfer_recipes.py --calibration grad1 default:32:0  # another calibration

`--alpha`, `--beta`, `--placement`, `--n-adapter` build another plan's emulator and `--task instruction` scores
Task C instead of Task A; their rows are tagged with the plan (and task), and the in-M reference is the one of
their adapter layers (the same for another α or β).

`--calibration NAME` (harness.CALIBRATIONS; default: the library's, adapters10) builds the same plan's emulator
with those calibration knobs (its own cache entry; the stand-ins start from the same stage-1 harmonizers) and
tags its rows with NAME (rows without a tag were measured on "outputs", the default before issue 21); the data
owner's side is unchanged, so rows of two calibrations compare row for row.

Two recipes reach past the data owner's side (measured for issue 21, docs/benchmarks.md): `ensemble_*` trains the
adapters through several emulators of the same plan in turn (their stand-ins from other calibrations), and
`refresh*` has the model owner re-fit the stand-ins to M carrying the data owner's current adapters every N steps
(rounds). `--calibration adapters10_domain` / `outputs_domain` calibrate on other Shakespeare works than the task's.

Rows are cached under --work-dir like the benchmark's (benchmarks/harness.py: the same setup, budget and
caches as transfer.py); the table goes to benchmarks/results/transfer_recipes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO  # first: sets the thread and offline environment before torch loads

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
    cached_file,
    cached_reference,
    cached_zero_shot,
    data_key,
    digest,
    evaluate_task,
    log,
    make_tasks,
    profile_of,
    quality,
    stage1,
    start_run,
    write_json,
)
from benchmarks.results import result_paths
from benchmarks.transfer import PROFILES
from data_owner_client.train import (
    TrainConfig,
    add_lora,
    freeze_except_adapter,
    merge_lora,
    set_seed,
    train,
)
from model_owner_server.scaleot.calibrate import CalibrationConfig, calibrate_emulator
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.emulator import PLACEMENTS
from model_owner_server.scaleot.importance import ImportanceConfig, ImportanceResult
from model_owner_server.scaleot.plugin import plug_in
from shared.adapter import extract_adapter
from shared.architectures import layer_prefix
from shared.data import load_dataset, pad_id_for, training_examples
from shared.emulator_file import load_emulator
from shared.modules import Harmonizer

EMULATOR = "scaleot_a0.5"
RESULT_NAME = "transfer_recipes"

# name -> (TrainConfig overrides, which adapter positions train: None = all four, else indices into the plan's
# adapter_layers, e.g. (2, 3) = the top two)
VARIANTS: dict[str, tuple[dict[str, Any], tuple[int, ...] | None]] = {
    "default": ({}, None),
    "lr3e-5": ({"lr": 3e-5}, None),
    "lr1e-5": ({"lr": 1e-5}, None),
    "lora": ({"method": "lora"}, None),
    "l2sp100": ({"anchor_decay": 100.0}, None),
    "l2sp1000": ({"anchor_decay": 1000.0}, None),
    "top2": ({}, (2, 3)),
    "top2_lr3e-4": ({"lr": 3e-4}, (2, 3)),
    "bottom_lr0.1": ({"bottom_lr_scale": 0.1}, None),
    # A diagnostic of the plateau, not a recipe: the default run, then M scored with the upload's change from the
    # issued weights scaled (x0.5, x1.5, x2) and with only the bottom or only the top adapters' change. Is what
    # stops transferring a direction (scaling cannot help) or a size, and in which layers does it sit?
    "probe": ({"probe": True}, None),
    # Sharpness-aware minimisation (TrainConfig.sam_rho): a flat minimum on the emulator should sit lower in M's
    # landscape, which differs from the emulator's by a smooth shift, than a sharp one. One Adam step at lr 1e-4
    # moves the four adapter layers (14 M parameters) by about 0.4 in norm, but the SAM shift follows g / |g| and
    # so sits in the few coordinates with large gradients: 0.5 and 2 already stop the training (measured).
    "sam0.01": ({"sam_rho": 0.01}, None),
    "sam0.05": ({"sam_rho": 0.05}, None),
    "sam0.5": ({"sam_rho": 0.5}, None),
    "sam2": ({"sam_rho": 2.0}, None),
    # "Repair first": the adapters are first trained through the emulator on public text (the benchmark's Wikipedia
    # excerpt) for that many steps, then on the task. `derepair`: the upload is the issued weights plus only the
    # task's part of the change (W_task - W_repaired): what the adapters learnt to repair the emulator never
    # reaches M. `repair`: the same start, the final weights uploaded as they are (separates the two effects).
    "derepair128": ({"repair_steps": 128, "subtract_repair": True}, None),
    "repair128": ({"repair_steps": 128, "subtract_repair": False}, None),
    "derepair32": ({"repair_steps": 32, "subtract_repair": True}, None),
    # Ensembles: the adapters train through several emulators of the same plan in turn (one per step); the others'
    # stand-ins are those of the named calibrations (same kept layers, so the data owner learns nothing more of M).
    # What an adapter learns to repair one emulator's stand-ins is not what repairs another's; the task is shared.
    "ensemble_seed1": ({"ensemble": ("adapters10_seed1",)}, None),
    "ensemble_seed12": ({"ensemble": ("adapters10_seed1", "adapters10_seed2")}, None),
    "ensemble_outputs": ({"ensemble": ("outputs",)}, None),
    # Refreshed emulators (rounds): every N data-owner steps the model owner re-fits the stand-ins (the default
    # calibration, warm-started, that many steps on its public text) so that the emulator carrying the data owner's
    # *current* adapter weights reproduces M carrying them. Calibration fits the emulator at one point, the issued
    # weights; the plug-in stops improving once the adapters have moved away from it (docs/benchmarks.md).
    "refresh8": ({"refresh_every": 8, "refresh_steps": 12}, None),
    "refresh32": ({"refresh_every": 32, "refresh_steps": 12}, None),
}


def committed_stage1(model, stage1_seed: int = 0, scores: list[float] | None = None) -> tuple[ImportanceResult, str]:
    """Stage 1's scores of seed `stage1_seed` as benchmarks/results/transfer.json holds them (seed 0's are the
    table's plan), with fresh (identity) harmonizers: the same plan without re-running stage 1 (about 7 min on an
    idle 2-core machine); calibration then starts from the identity instead of stage 1's harmonizers. Its own
    cache key, so the benchmark's real stage-1 emulator is never confused with it. Another stage-1 seed changes
    only the scores, hence which layers are replaced: the stand-ins start from the same seeded draw; so do
    `scores` given outright (--plan-scores: e.g. the leave-one-out costs of benchmarks/stage1_stability.py)."""
    rec = json.loads((REPO / "benchmarks" / "results" / "transfer.json").read_text())["stage1"]
    by_seed = rec["scores_by_seed"]
    if not 0 <= stage1_seed < len(by_seed):
        raise ValueError(f"transfer.json holds stage-1 scores of seeds 0..{len(by_seed) - 1}, not {stage1_seed}")
    scores = by_seed[stage1_seed] if scores is None else scores
    if len(scores) != len(by_seed[0]):
        raise ValueError(f"{len(scores)} plan scores for a model of {len(by_seed[0])} layers")
    cfg = ImportanceConfig.from_dict(rec["config"])
    hidden = model.config.hidden_size
    # Seeded as stage 1 seeds them: the down projections are random (the up ones zero, so the function is the
    # identity either way), and calibration's first gradients depend on them. Unseeded, two builds of the "same"
    # emulator differed (ppl ratio 13.0 vs 14.9); the key names the seeded form so old files are not reused.
    torch.manual_seed(cfg.seed)
    harmonizers = {i: Harmonizer(hidden, cfg.bottleneck).requires_grad_(False) for i in range(len(scores))}
    result = ImportanceResult(torch.tensor(scores, dtype=torch.float32), harmonizers, cfg)
    return result, digest(scores) + "-identity-harmonizers-seeded"


def setup(args: argparse.Namespace) -> tuple[Run, Task, dict, Budget]:
    """transfer.py's full budget, M, the task (Task A unless --task) and its ScaleOT emulator (α = 0.5, β = 0 unless
    asked; all from the shared caches)."""
    budget = PROFILES[profile_of(args)]
    if args.n_adapter is not None:
        budget = replace(budget, n_adapter=args.n_adapter)
    run = start_run(args, budget)
    (task,) = [t for t in make_tasks(run.files, budget, [args.task]) if t.name == args.task]
    emu = build_emulator(run, budget, args, args.calibration)
    emu["plan_name"] = plan_name(
        args.placement, budget.n_adapter, args.alpha, args.beta, args.stage1_seed, args.plan_scores
    )
    if task.name != "shakespeare":  # rows of another task are tagged with it like those of another plan
        emu["plan_name"] += f", task {task.name}"
    zs = cached_zero_shot(run, task, budget)
    log(f"emulator {emu['plan']} sha {emu['sha256'][:12]} fidelity {emu['fidelity']}; zero-shot {zs}")
    log(f"calibration {args.calibration}: {emu.get('calibration')}")
    return run, task, emu, budget


def plan_scores(path: str | None) -> list[float] | None:
    """--plan-scores: a JSON file holding a list of per-layer scores, or an object with one under "scores" or
    "loo_costs" (benchmarks/results/stage1_stability.json)."""
    if path is None:
        return None
    obj = json.loads(Path(path).read_text())
    if isinstance(obj, dict):
        obj = obj.get("scores", obj.get("loo_costs"))
    if not isinstance(obj, list) or not all(isinstance(x, int | float) for x in obj):
        raise SystemExit(f"--plan-scores {path}: expected a list of numbers, or one under 'scores' or 'loo_costs'")
    return [float(x) for x in obj]


def build_emulator(run: Run, budget: Budget, args: argparse.Namespace, name: str) -> dict:
    """The plan's ScaleOT emulator calibrated as CALIBRATIONS[name] (cached; the stand-ins start from the same
    stage-1 harmonizers whatever the calibration, its own `seed` included)."""
    # α = 0.5, β = 0 key as they always did
    emu_name = EMULATOR if args.alpha == 0.5 else f"scaleot_a{args.alpha:g}"
    emu_name += f"_b{args.beta:g}" if args.beta else ""
    label = f"ScaleOT α={args.alpha:g}" + (f" β={args.beta:g}" if args.beta else "")
    spec = EmuSpec(emu_name, label, "scaleot", args.alpha, args.beta, placement=args.placement)
    if args.committed_stage1:
        importance, key = committed_stage1(run.model, args.stage1_seed, plan_scores(args.plan_scores))
    elif args.stage1_seed or args.plan_scores:
        raise SystemExit("--stage1-seed and --plan-scores need --committed-stage1 (they do not run stage 1)")
    else:
        importance, info = stage1(run.model, run.tok, run.model_id, run.files, budget, budget.stage1_seeds[0], run.work)
        key = digest(info["scores"])

    def every_5_steps(p) -> None:
        if p.step % 5 == 0:
            log(f"  calibration {name} {p}")

    emu = build_emulators(
        run.model, run.tok, importance, key, [spec], run.files, budget, run.work, CALIBRATIONS[name], every_5_steps
    )[emu_name]
    emu["calibration_name"] = name
    return emu


def standin_swapper(
    net: torch.nn.Module, adapter_layers: list[int], others: list[dict], device
) -> Callable[[int], None]:
    """For an ensemble: `use(i)` loads member i's stand-ins into `net` (0: net's own). Only the tensors in which
    the members differ are held; they must share the plan and the kept layers, never the trained ones."""
    live = net.state_dict(keep_vars=True)
    members = []
    for o in others:
        loaded = load_emulator(o["path"], device=device)
        if loaded.plan.adapter_layers != adapter_layers or set(loaded.model.state_dict()) != set(live):
            raise ValueError(f"ensemble member {o['path']} has another plan")
        members.append(loaded.model.state_dict())
    keys = {k for sd in members for k, v in sd.items() if not torch.equal(v, live[k])}
    trained = tuple(layer_prefix(net, i) for i in adapter_layers)
    if any(k.startswith(trained) for k in keys):
        raise ValueError("ensemble members differ in the adapter layers")
    states = [{k: live[k].detach().clone() for k in keys}] + [{k: sd[k] for k in keys} for sd in members]

    def use(i: int) -> None:
        with torch.no_grad():
            for k, v in states[i].items():
                live[k].copy_(v)

    return use


def run_variant(
    model,
    tok,
    task,
    emu: dict,
    budget,
    choice,
    name: str,
    steps: int,
    seed: int,
    public: Path | None = None,
    others: list[dict] | None = None,
) -> dict:
    overrides, train_positions = VARIANTS[name]
    overrides = dict(overrides)
    overrides.pop("ensemble", None)  # its members come as `others`
    refresh_every = overrides.pop("refresh_every", 0)
    refresh_steps = overrides.pop("refresh_steps", 0)
    bottom_scale = overrides.pop("bottom_lr_scale", None)
    repair_steps = overrides.pop("repair_steps", 0)
    subtract_repair = overrides.pop("subtract_repair", False)
    probe = overrides.pop("probe", False)
    cfg = TrainConfig(
        **{
            "method": "full",
            "max_steps": steps,
            "batch_size": task.batch,
            "seq_len": budget.seq_len,
            "seed": seed,
            "save_every": 10**9,
            **overrides,
        }
    )
    loaded = load_emulator(emu["path"], device=choice.device)
    net, layers = loaded.model, loaded.plan.adapter_layers
    train_layers = layers if train_positions is None else [layers[i] for i in train_positions]
    set_seed(seed)
    examples = training_examples(task.train, tok, cfg.seq_len)
    if cfg.method == "lora":
        net = add_lora(net, train_layers, cfg)
    else:
        freeze_except_adapter(net, train_layers)
    use = standin_swapper(net, layers, others, choice.device) if others else None
    refreshes: list[dict] = []
    if refresh_every:
        if public is None:
            raise ValueError(f"{name} needs public text")
        blocks = corpus_blocks(tok, public, budget.seq_len)[0]
        base = CalibrationConfig(**{**CALIBRATIONS[DEFAULT_CALIBRATION], "steps": refresh_steps})

    def refresh(step: int) -> None:
        """The model owner's round: M carrying the current adapter weights teaches the emulator carrying them."""
        teacher = plug_in(model, extract_adapter(net, layers), layers)
        info = calibrate_emulator(teacher, net, loaded.plan, blocks, replace(base, seed=step))
        refreshes.append({"step": step, **{k: info[k] for k in ("seconds", "final_kl", "final_nmse")}})
        log(f"  refresh at step {step}: {refreshes[-1]}")
        del teacher

    curve: dict[int, float] = {}
    marks = {s for s in (8, 16, 32, 64, 128, 256, 512) if s < steps}
    issued = extract_adapter(net, layers)
    repaired = issued
    if repair_steps:
        if public is None:
            raise ValueError(f"{name} needs public text")
        public_examples = training_examples(load_dataset(public), tok, cfg.seq_len)
        train(
            net, public_examples, replace(cfg, max_steps=repair_steps), choice, pad_id=pad_id_for(tok), progress=False
        )
        repaired = extract_adapter(net, layers)

    def upload(m) -> dict[str, torch.Tensor]:
        tensors = extract_adapter(merge_lora(m) if cfg.method == "lora" else m, layers)
        if subtract_repair:
            tensors = {k: issued[k] + (v - repaired[k]) for k, v in tensors.items()}
        return tensors

    def plug_loss(m) -> float:
        return -quality(task, evaluate_task(plug_in(model, upload(m), layers), tok, task, budget, choice))

    def on_step(step: int, _loss: float) -> None:
        if step in marks and cfg.method != "lora":  # merging LoRA mid-run would end it
            curve[step] = round(plug_loss(net), 4)
            net.train()
        if use is not None:  # the next step through the next member
            use(step % (len(others or []) + 1))
        if refresh_every and step % refresh_every == 0 and step < steps:
            refresh(step)
            net.train()

    layer_scale = None
    if bottom_scale is not None:  # the two bottom adapter layers, whose gradients disagree with M's
        layer_scale = {layer_prefix(net, i): bottom_scale for i in layers[:2]}
    t0 = time.perf_counter()
    res = train(
        net,
        examples,
        cfg,
        choice,
        pad_id=pad_id_for(tok),
        progress=False,
        on_step=on_step,
        lr_scales=layer_scale,
    )
    if use is not None:
        use(0)  # the data owner's copy is measured on the emulator it was issued
    net = merge_lora(net)
    net.requires_grad_(False)
    tensors = upload(net)
    plugged = evaluate_task(plug_in(model, tensors, layers), tok, task, budget, choice)
    emu_ft = evaluate_task(net, tok, task, budget, choice)
    curve[steps] = round(-quality(task, plugged), 4)
    probes = probe_upload(model, tok, task, budget, choice, layers, issued, tensors) if probe else None
    return {
        "plug_in": plugged,
        "emulator_ft": emu_ft,
        "curve": curve,
        "train_seconds": round(res.seconds, 1),
        "final_train_loss": res.final_loss,
        "hyperparameters": cfg.hyperparameters(),
        "train_layers": train_layers,
        "wall": round(time.perf_counter() - t0, 1),
        **({"refreshes": refreshes} if refreshes else {}),
        **({"probes": probes} if probes else {}),
    }


def probe_upload(model, tok, task, budget, choice, layers: list[int], issued: dict, tensors: dict) -> dict[str, float]:
    """The task's loss of M carrying variations of the upload: its change from the issued weights scaled, and the
    change of the bottom or of the top half of the adapter layers alone (the other half as issued)."""
    half = len(layers) // 2
    prefixes = {
        "bottom_only": tuple(layer_prefix(model, i) for i in layers[:half]),
        "top_only": tuple(layer_prefix(model, i) for i in layers[half:]),
    }
    variants = {
        f"scale_{lam:g}": {k: issued[k] + lam * (v - issued[k]) for k, v in tensors.items()} for lam in (0.5, 1.5, 2.0)
    }
    for name, keep in prefixes.items():
        variants[name] = {k: v if k.startswith(keep) else issued[k] for k, v in tensors.items()}
    out = {}
    for name, t in variants.items():
        out[name] = round(-quality(task, evaluate_task(plug_in(model, t, layers), tok, task, budget, choice)), 4)
        log(f"  probe {name}: {out[name]}")
    return out


def run_row(
    run: Run,
    task: Task,
    emu: dict,
    budget: Budget,
    results: Path,
    name: str,
    steps: int,
    seed: int,
    others: list[dict] | None = None,
) -> None:
    zs = {"zero_shot": cached_zero_shot(run, task, budget)}
    ref = cached_reference(run, task, budget, emu["adapter_layers"], seed, steps)
    if name == "ref":
        log(f"reference {steps} steps seed {seed}: {ref['reference']}")
        return
    cal = emu.get("calibration_name", DEFAULT_CALIBRATION)
    plan = emu.get("plan_name", DEFAULT_PLAN)
    key = ["recipe", emu["sha256"], data_key(task), name, VARIANTS[name], seed, steps, 1]
    if others:  # an ensemble's row names its members' files too
        key.append([o["sha256"] for o in others])
    m = cached_file(
        run.work / "rows" / f"{digest(key)}.json",
        lambda: run_variant(
            run.model, run.tok, task, emu, budget, run.choice, name, steps, seed, run.files.get("wiki_train"), others
        ),
    )
    q0, qp, qr = quality(task, zs["zero_shot"]), quality(task, m["plug_in"]), quality(task, ref["reference"])
    figure = "perplexity" if task.metric == "perplexity" else "accuracy"  # Task B: accuracy (higher is better)
    row = {
        "variant": name,
        "steps": steps,
        "seed": seed,
        "r": (qp - q0) / (qr - q0),
        "plug_in": m["plug_in"][figure],
        "plug_in_loss": -qp,
        "reference": ref["reference"][figure],
        "zero_shot": zs["zero_shot"][figure],
        "emulator_ft": m["emulator_ft"][figure],
        "privacy_gap": qp - quality(task, m["emulator_ft"]),
        "curve": m["curve"],
        "hyperparameters": m["hyperparameters"],
        "train_layers": m["train_layers"],
        "seconds": m["seconds"],
    }
    if figure == "accuracy":  # plug_in_loss, privacy_gap and the curve hold -accuracy / accuracy differences
        row["metric"] = "accuracy"
    if "refreshes" in m:  # the model owner's rounds: when, and what each cost
        row["refreshes"] = m["refreshes"]
    if "probes" in m:  # the task's loss of M with variations of the upload (the `probe` diagnostic)
        row["probes"] = m["probes"]
    row["calibration"] = cal  # every row names its emulator's calibration and carries its figures
    row["emulator"] = {k: emu.get(k) for k in ("sha256", "fidelity", "calibration", "plan", "adapter_layers")}
    if others:
        row["ensemble"] = [
            {"calibration": o["calibration_name"], "sha256": o["sha256"], "fidelity": o["fidelity"]} for o in others
        ]
    if plan != DEFAULT_PLAN:  # rows without it are the default plan's
        row["plan"] = plan
    if "exact_match" in m["plug_in"]:  # Task C: greedy answers of held-out trivia prompts
        row["exact_match"] = {
            "zero_shot": zs["zero_shot"].get("exact_match"),
            "plug_in": m["plug_in"]["exact_match"],
            "reference": ref["reference"].get("exact_match"),
            "emulator_ft": m["emulator_ft"].get("exact_match"),
        }
    log(
        f"[calibration {cal}] {name} {steps} steps seed {seed}: plug-in {row['plug_in']:.2f} ref {row['reference']:.2f} "
        f"zs {row['zero_shot']:.2f} emu FT {row['emulator_ft']:.1f} -> r {row['r']:.3f}; curve {row['curve']}"
    )
    # other processes add rows too: read, replace this one, write
    old = json.loads(results.read_text()) if results.is_file() else {"emulator": None, "rows": []}
    rows = [
        r
        for r in old["rows"]
        if (r["variant"], r["steps"], r["seed"], calibration_of(r), plan_of(r)) != (name, steps, seed, cal, plan)
    ]
    rows.append(row)
    rows.sort(key=lambda r: (plan_of(r), calibration_of(r), r["variant"], r["steps"], r["seed"]))
    header = old["emulator"]  # the default plan's (other plans' rows carry their own)
    if header is None or plan == DEFAULT_PLAN:
        header = {k: emu[k] for k in ("plan", "adapter_layers")}
    write_json(results, {"emulator": header, "rows": rows})


def plan_name(
    placement: str,
    n_adapter: int,
    alpha: float = 0.5,
    beta: float = 0.0,
    stage1_seed: int = 0,
    scores_file: str | None = None,
) -> str:
    """The plan a row was measured on; α, β, the stage-1 seed and a --plan-scores file (by its name) are named
    only where they are not the benchmark's 0.5, 0, 0 and none (the rows written before they varied)."""
    return (
        f"{placement}, N_a {n_adapter}"
        + (f", α {alpha:g}" if alpha != 0.5 else "")
        + (f", β {beta:g}" if beta else "")
        + (f", stage-1 seed {stage1_seed}" if stage1_seed else "")
        + (f", scores {Path(scores_file).stem}" if scores_file else "")
    )


DEFAULT_PLAN = plan_name("sandwich", 4)


def plan_of(row: dict) -> str:
    """A row's plan (placement, N_a); rows without the tag are the default plan's."""
    return row.get("plan", DEFAULT_PLAN)


def calibration_of(row: dict) -> str:
    """A row's calibration name; rows from before the tag were measured on the "outputs" emulator."""
    return row.get("calibration", "outputs")


def markdown(result: dict) -> str:
    """The recipe table: one line per (variant, steps), r's mean and spread over seeds (half the range); rows on
    each emulator's calibration are named `variant (calibration NAME)`."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in result["rows"]:
        plan = "" if plan_of(r) == DEFAULT_PLAN else f"; {plan_of(r)}"
        label = f"{r['variant']} (calibration {calibration_of(r)}{plan})"
        groups.setdefault((label, r["steps"]), []).append(r)
    lines = [
        "| Recipe | Steps | Seeds | r | Plug-in ppl | Emulator FT ppl | Privacy gap | Plug-in ppl along the run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rv = [r["r"] for r in rs]
        mean = sum(rv) / len(rv)
        r_txt = f"{mean:.2f} ± {(max(rv) - min(rv)) / 2:.2f}" if len(rv) > 1 else f"{mean:.2f}"
        avg = {k: sum(r[k] for r in rs) / len(rs) for k in ("plug_in", "emulator_ft", "privacy_gap")}
        curve = rs[0]["curve"]
        accuracy = rs[0].get("metric") == "accuracy"  # the curve holds -accuracy, not a loss
        shown = (lambda v: -v) if accuracy else math.exp
        along = ", ".join(f"{k}: {shown(v):.2f}" for k, v in sorted(curve.items(), key=lambda kv: int(kv[0])))
        gap = f"{avg['privacy_gap']:.2f} accuracy" if accuracy else f"{avg['privacy_gap']:.2f} nats"
        lines.append(
            f"| {name} | {steps} | {len(rs)} | {r_txt} | {avg['plug_in']:.2f} | {avg['emulator_ft']:.1f} | "
            f"{gap} | {along} (seed {rs[0]['seed']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, {"tiny": PROFILE_HELP["tiny"]})
    p.add_argument("jobs", nargs="*", help="NAME:STEPS:SEED (NAME a variant or 'ref'); none: only the setup")
    p.add_argument(
        "--committed-stage1",
        action="store_true",
        help="use the seed-0 stage-1 scores stored in benchmarks/results/transfer.json (identity harmonizers)",
    )
    p.add_argument(
        "--stage1-seed",
        type=int,
        default=0,
        help="with --committed-stage1: the plan from that stage-1 seed's stored scores (rows are tagged with it)",
    )
    p.add_argument(
        "--plan-scores",
        default=None,
        help="with --committed-stage1: the plan from these per-layer scores (a JSON list, or a file with 'scores' or "
        "'loo_costs', e.g. benchmarks/results/stage1_stability.json); rows are tagged with the file's name",
    )
    p.add_argument(
        "--calibration",
        choices=sorted(CALIBRATIONS),
        default=DEFAULT_CALIBRATION,
        help="the emulator's calibration (harness.CALIBRATIONS; default: the library's; rows are tagged with it)",
    )
    p.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="sandwich",
        help="where the adapter layers go (make_emulator's placement; rows of another plan are tagged with it)",
    )
    p.add_argument("--n-adapter", type=int, default=None, help="adapter layers N_a (default: the budget's, 4)")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="share of the non-adapter layers replaced (rows of another α are tagged)",
    )
    p.add_argument(
        "--task",
        choices=["shakespeare", "analogy", "instruction"],
        default="shakespeare",
        help="Task A (default), Task B (analogies, r on accuracy) or Task C, instruction tuning (r on the responses' "
        "loss); rows of another task are tagged",
    )
    p.add_argument(
        "--beta", type=float, default=0.0, help="SRC: share of attention rank removed in frozen layers (tagged too)"
    )
    p.add_argument("--report", action="store_true", help="only write the markdown table from the results JSON")
    args = p.parse_args(argv)
    results = result_paths(Path(args.results_dir), RESULT_NAME, profile_of(args))[0]
    if not args.report:
        run, task, emu, budget = setup(args)
        built: dict[str, dict] = {}  # ensemble members, built (or read from the cache) once per run
        for job in args.jobs:
            name, steps, seed = job.split(":")
            members = VARIANTS[name][0].get("ensemble", ()) if name != "ref" else ()
            for m in members:
                if m not in built:
                    built[m] = build_emulator(run, budget, args, m)
            others = [built[m] for m in members]
            run_row(run, task, emu, budget, results, name, int(steps), int(seed), others)
    if results.is_file():
        results.with_suffix(".md").write_text(markdown(json.loads(results.read_text())))


if __name__ == "__main__":
    main()
