#!/usr/bin/env python
"""bf16 vs float32 on SmolLM2 (issue 22): the same transfer pipeline run in each compute dtype, as a model owner
who registers the model with `register-model --compute-dtype bfloat16` (or float32) would get it.

Per dtype (ScaleOT alpha = 0.5, N_a = 4, beta = 0; the plan from the committed stage-1 scores, as
`transfer_recipes.py --committed-stage1`: stage 1 itself is not re-run, in either dtype):
  M            loaded in the compute dtype (load_causal_lm(dtype=...), as the server's full_model does)
  emulator     harness.build_emulators on that M: calibration and the fidelity figure run in the compute dtype
               (float32 stand-ins, float32 masters for whatever else trains), the file is issued in the compute
               dtype (make_emulator's default, as the server's emulator job with issued dtype = compute dtype)
  data owner   harness.run_emulator: the client's tune_emulator on that file (a bf16 file is upcast to float32
               on CPU: scored zero-shot and trained in float32, cast back to bf16, scored fine-tuned in bf16,
               exported in bf16), then plug_in into M in the compute dtype, scored in the compute dtype
  reference    harness.cached_reference: the same adapter layers tuned inside M with the same recipe and seed,
               as the client tunes a low-precision file (train_layers_in_model: float32 weights during
               training, cast back to the compute dtype and scored in it)
  zero-shot    M in the compute dtype on the Task A eval blocks
r = (zero-shot loss - plug-in loss) / (zero-shot loss - reference loss); privacy gap = emulator fine-tuned loss
- plug-in loss (nats). Each part's wall time is kept (a row reused from the shared cache keeps the seconds of the
run that made it, and says so).

  .venv/bin/python benchmarks/transfer_precision.py --threads 1                    # float32, then bfloat16
  .venv/bin/python benchmarks/transfer_precision.py --threads 1 --seeds 0,1        # a second data-owner seed
  .venv/bin/python benchmarks/transfer_precision.py --threads 1 --eval-blocks 12   # fewer eval blocks (both)
  .venv/bin/python benchmarks/transfer_precision.py --tiny                         # random tiny LLaMA (tests)

Caches: the shared --work-dir (harness.py). float32 reuses transfer.py's / transfer_recipes.py's entries (same
keys); the bf16 entries carry the dtype in their keys (harness.build_emulators and cached_* key by model id and
stage-1 key, not by dtype, so the dtype goes into those). Results: benchmarks/results/transfer_precision.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
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
    build_emulators,
    cached_emulator_run,
    cached_reference,
    digest,
    log,
    make_tasks,
    profile_of,
    stage1,
    start_run,
    zero_shot_record,
)
from benchmarks.results import environment, markdown_table, publish, result_paths
from benchmarks.transfer import PROFILES
from benchmarks.transfer_recipes import EMULATOR, committed_stage1
from shared.emulator_file import EMULATOR_DTYPES

RESULT_NAME = "transfer_precision"
SPEC = EmuSpec(EMULATOR, "ScaleOT α=0.5", "scaleot", 0.5)
# float32's data-owner seed spread at 32 steps on this emulator (docs/benchmarks.md, transfer recipes)
FP32_SPREAD = {"r": 0.03, "ppl": 0.12}


def model_in(run: Run, args: argparse.Namespace, dtype: torch.dtype) -> Run:
    """`run` with M in `dtype`: loaded in it from the model folder as the server loads a model registered with
    that compute dtype (the tiny model: cast). float32 keeps run's M and id, so it shares the cached rows of
    transfer.py / transfer_recipes.py; any other dtype gets its own model id (its own cache keys)."""
    if dtype == torch.float32:
        return run
    if run.model_id.startswith("tiny"):
        model = copy.deepcopy(run.model).to(dtype)
    else:
        from model_owner_server.scaleot.model_io import load_causal_lm

        model_dir = Path(args.model_dir) if args.model_dir else run.work / "smollm2"
        model, _ = load_causal_lm(model_dir, device=run.choice.device, dtype=dtype)
    model.requires_grad_(False)
    return replace(run, model=model, model_id=f"{run.model_id}@{str(dtype).removeprefix('torch.')}")


def _was_cached(t0: float, rec: dict) -> bool:
    """Whether `rec` came from the cache: fetching it took far less than the seconds it records."""
    return time.perf_counter() - t0 < 0.5 * rec.get("seconds", 0)


def run_dtype(run: Run, task: Task, budget: Budget, importance, key: str, seeds: list[int]) -> dict:
    dtype = next(run.model.parameters()).dtype
    name = str(dtype).removeprefix("torch.")
    steps = budget.ft_steps
    parts: dict[str, Any] = {}
    # 1. zero-shot M (the record harness.cached_zero_shot reads, for its seconds)
    t0 = time.perf_counter()
    zs_rec = zero_shot_record(run, task, budget)
    zs = zs_rec["zero_shot"]
    parts["zero_shot"] = {"seconds": zs_rec["seconds"], "cached": _was_cached(t0, zs_rec)}
    log(f"[{name}] zero-shot loss {zs['loss']:.4f} ppl {zs['perplexity']:.3f} ({zs_rec['seconds']:.0f} s)")
    # 2. the emulator, built and calibrated in the compute dtype, issued in it
    stage1_key = key if dtype == torch.float32 else f"{key}@{name}"
    t0 = time.perf_counter()
    emu = build_emulators(run.model, run.tok, importance, stage1_key, [SPEC], run.files, budget, run.work)[EMULATOR]
    parts["emulator_build"] = {"seconds": emu["seconds"], "cached": _was_cached(t0, emu)}
    if emu["calibration"]:
        parts["calibration"] = {"seconds": emu["calibration"].get("seconds")}
    file_dtype = _file_dtype(emu["path"])
    log(f"[{name}] emulator {emu['plan']} ({file_dtype}, {emu['bytes'] / 1e6:.0f} MB) fidelity {emu['fidelity']}")
    # 3. per seed: the data owner's tune + plug-in (harness.run_emulator under transfer.py's key), the reference
    out_seeds: dict[str, Any] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        m = cached_emulator_run(run, task, budget, emu, seed, steps)
        c_emu = _was_cached(t0, m)
        t0 = time.perf_counter()
        ref = cached_reference(run, task, budget, emu["adapter_layers"], seed, steps)
        c_ref = _was_cached(t0, ref)
        row = _row(zs, m, ref["reference"])
        row["seconds"] = {
            "tune_and_plug_in": {
                "seconds": m["seconds"],
                "train_seconds": round(m["train_seconds"], 1),
                "cached": c_emu,
            },
            "reference": {"seconds": ref["seconds"], "train_seconds": round(ref["train_seconds"], 1), "cached": c_ref},
        }
        log(
            f"[{name}] seed {seed}: plug-in {row['plug_in_ppl']:.3f} ref {row['reference_ppl']:.3f} zs "
            f"{row['zero_shot_ppl']:.3f} emu zs {row['emulator_zero_shot_ppl']:.1f} -> FT "
            f"{row['emulator_ft_ppl']:.2f}; r {row['r']:.3f}, privacy gap {row['privacy_gap']:.3f} nats"
        )
        out_seeds[str(seed)] = row
    rec: dict[str, Any] = {
        "dtype": name,
        "emulator_file_dtype": file_dtype,
        "emulator": {
            k: emu[k]
            for k in ("sha256", "bytes", "full_model_bytes", "plan", "adapter_layers", "fidelity", "calibration")
        },
        "zero_shot": zs,
        "seeds": out_seeds,
        "parts": parts,
    }
    return rec


def _file_dtype(path: str) -> str:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    return ",".join(sorted(dtypes))


def _r(q0: float, qp: float, qr: float) -> float | None:
    return (q0 - qp) / (q0 - qr) if abs(q0 - qr) > 1e-9 else None


def _row(zs: dict, m: dict, ref: dict) -> dict[str, Any]:
    return {
        "zero_shot_loss": zs["loss"],
        "zero_shot_ppl": zs["perplexity"],
        "plug_in_loss": m["plug_in"]["loss"],
        "plug_in_ppl": m["plug_in"]["perplexity"],
        "reference_loss": ref["loss"],
        "reference_ppl": ref["perplexity"],
        "emulator_zero_shot_loss": m["emulator_zero_shot"]["loss"],
        "emulator_zero_shot_ppl": m["emulator_zero_shot"]["perplexity"],
        "emulator_ft_loss": m["emulator_ft"]["loss"],
        "emulator_ft_ppl": m["emulator_ft"]["perplexity"],
        "r": _r(zs["loss"], m["plug_in"]["loss"], ref["loss"]),
        "privacy_gap": m["emulator_ft"]["loss"] - m["plug_in"]["loss"],
    }


def _mean(rows: list[dict], k: str) -> float | None:
    vals = [r[k] for r in rows if r[k] is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _secs(p: dict) -> str:
    return f"{p['seconds']:.0f} s" + (" (cached)" if p.get("cached") else "")


def markdown(doc: dict) -> str:
    recs = doc["dtypes"]
    names = list(recs)
    meta = doc["meta"]
    b = meta["budget"]

    def per_seed(name: str, k: str, nd: int = 3) -> str:
        rows = list(recs[name]["seeds"].values())
        vals = [r[k] for r in rows]
        txt = " / ".join(_fmt(v, nd) for v in vals)
        return txt if len(vals) == 1 else f"{txt} (mean {_fmt(_mean(rows, k), nd)})"

    def emu(name: str, *path: str) -> Any:
        v: Any = recs[name]["emulator"]
        for p in path:
            v = (v or {}).get(p)
        return v

    seeds = ", ".join(next(iter(recs.values()))["seeds"])
    lines = [
        ("Zero-shot M: loss / ppl", lambda n: f"{recs[n]['zero_shot']['loss']:.4f} / {recs[n]['zero_shot']['perplexity']:.3f}"),
        ("Plug-in ppl", lambda n: per_seed(n, "plug_in_ppl")),
        ("Plug-in loss", lambda n: per_seed(n, "plug_in_loss", 4)),
        ("Reference (in M) ppl", lambda n: per_seed(n, "reference_ppl")),
        ("Emulator zero-shot ppl", lambda n: per_seed(n, "emulator_zero_shot_ppl", 1)),
        ("Emulator after tuning ppl", lambda n: per_seed(n, "emulator_ft_ppl", 2)),
        ("r", lambda n: per_seed(n, "r")),
        ("Privacy gap (nats)", lambda n: per_seed(n, "privacy_gap")),
        ("Calibration final KL / NMSE", lambda n: f"{_fmt(emu(n, 'calibration', 'final_kl'), 4)} / {_fmt(emu(n, 'calibration', 'final_nmse'), 4)}"),
        ("Fidelity ppl ratio (grad cosine)", lambda n: f"{_fmt(emu(n, 'fidelity', 'ppl_ratio'))} ({_fmt(emu(n, 'fidelity', 'grad_cosine'))})"),
        ("Emulator file", lambda n: f"{recs[n]['emulator_file_dtype']}, {emu(n, 'bytes') / 1e6:.0f} MB"),
        ("Time: zero-shot eval", lambda n: _secs(recs[n]["parts"]["zero_shot"])),
        ("Time: emulator build (of which calibration)", lambda n: _secs(recs[n]["parts"]["emulator_build"]) + f" ({_fmt((recs[n]['parts'].get('calibration') or {}).get('seconds'), 0)} s)"),
        ("Time: data owner tune + evals + plug-in (of which training)", lambda n: " / ".join(_secs(s["seconds"]["tune_and_plug_in"]) + f" ({s['seconds']['tune_and_plug_in']['train_seconds']:.0f} s)" for s in recs[n]["seeds"].values())),
        ("Time: reference (of which training)", lambda n: " / ".join(_secs(s["seconds"]["reference"]) + f" ({s['seconds']['reference']['train_seconds']:.0f} s)" for s in recs[n]["seeds"].values())),
    ]  # fmt: skip
    table = markdown_table(["", *names], [[label, *(f(n) for n in names)] for label, f in lines])
    extra = []
    for n in names:
        nat = recs[n].get("native_reference")
        if nat:
            extra.append(
                f"- {n} reference trained natively in {n} (before 1e3464a, train_layers_in_model on a {n} M: AdamW on "
                f"{n} weights, no float32 masters), seed {nat['seed']}: ppl {nat['reference']['perplexity']:.3f}, "
                f"r against it {_fmt(nat['r'])} ({_secs(nat)})."
            )
    cmp = doc.get("comparison") or {}
    if cmp:
        extra.append(
            f"- {cmp['dtype']} minus float32 (seed mean): r {cmp['r_diff']:+.3f}, plug-in ppl {cmp['plug_in_ppl_diff']:+.3f}, "
            f"reference ppl {cmp['reference_ppl_diff']:+.3f}, zero-shot ppl {cmp['zero_shot_ppl_diff']:+.3f}; "
            f"float32's seed spread at 32 steps: ±{FP32_SPREAD['r']} in r, ±{FP32_SPREAD['ppl']} ppl -> r "
            f"{'within' if cmp['r_within_spread'] else 'OUTSIDE'} it, plug-in ppl "
            f"{'within' if cmp['ppl_within_spread'] else 'OUTSIDE'} it."
        )
        here = {n: v for n, v in (cmp.get("spread_here") or {}).items() if v["r"] is not None}
        if here:
            extra.append(
                "- Seed spread measured here (half the range over the seeds): "
                + "; ".join(f"{n}: ±{v['r']:.3f} in r, ±{v['plug_in_ppl']:.3f} plug-in ppl" for n, v in here.items())
                + "."
            )
    head = (
        f"{meta['model']}, ScaleOT α = 0.5, N_a = {b['n_adapter']}, β = 0, plan from {doc['stage1']}, "
        f"{b['calibration_steps']} calibration steps, data owner {b['ft_steps']} steps (whole layers, client "
        f"defaults), seeds {seeds}, Task A eval {b['text_eval_blocks']} blocks of {b['seq_len']} tokens; "
        f"{meta['torch_threads']} torch thread(s) on a shared CPU (load average {meta['load_average']:.1f} at the "
        f"start), {meta['seconds']:.0f} s in all."
    )
    extra.append(
        "- Where each figure runs: M, calibration (float32 stand-ins), fidelity, plug-in, reference scoring and "
        "zero-shot in the column's dtype; the emulator file is issued in it; the client upcasts a bf16 file to "
        "float32 on CPU (emulator zero-shot scored and the 32 steps trained in float32), casts it back, and scores "
        "the tuned emulator in bf16; the reference trains float32 weights of the column's M (the client's way) and "
        "is cast back and scored in the column's dtype."
    )
    return "\n".join([head, "", *table, "", *extra, ""])


def _spread(rows: list[dict], k: str) -> float | None:
    vals = [r[k] for r in rows if r[k] is not None]
    return (max(vals) - min(vals)) / 2 if len(vals) > 1 else None


def compare(recs: dict[str, dict]) -> dict | None:
    if "float32" not in recs or len(recs) < 2:
        return None
    other = next(n for n in recs if n != "float32")
    a, b = list(recs["float32"]["seeds"].values()), list(recs[other]["seeds"].values())
    d = {k: (_mean(b, k) or 0.0) - (_mean(a, k) or 0.0) for k in ("r", "plug_in_ppl", "reference_ppl")}
    return {
        "dtype": other,
        "r_diff": d["r"],
        "plug_in_ppl_diff": d["plug_in_ppl"],
        "reference_ppl_diff": d["reference_ppl"],
        "zero_shot_ppl_diff": recs[other]["zero_shot"]["perplexity"] - recs["float32"]["zero_shot"]["perplexity"],
        "fp32_seed_spread": FP32_SPREAD,
        # measured here when more than one seed ran: half the max-min range over seeds, per dtype
        "spread_here": {
            n: {k: _spread(list(rec["seeds"].values()), k) for k in ("r", "plug_in_ppl")} for n, rec in recs.items()
        },
        "r_within_spread": abs(d["r"]) <= FP32_SPREAD["r"],
        "ppl_within_spread": abs(d["plug_in_ppl"]) <= FP32_SPREAD["ppl"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, {"tiny": PROFILE_HELP["tiny"]})
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, in order (float32 first)")
    p.add_argument("--seeds", default="0", help="data-owner seeds, e.g. 0,1")
    p.add_argument("--eval-blocks", type=int, default=None, help="Task A eval blocks (default: the profile's)")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from the results JSON")
    args = p.parse_args(argv)
    profile = profile_of(args)
    if args.report:
        json_path = result_paths(Path(args.results_dir), RESULT_NAME, profile)[0]
        doc = json.loads(json_path.read_text())
        doc["comparison"] = compare(doc["dtypes"])
        publish(Path(args.results_dir), RESULT_NAME, profile, doc, markdown(doc))
        return doc
    budget = PROFILES[profile]
    if args.eval_blocks:
        budget = replace(budget, text_eval_blocks=args.eval_blocks)
    dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    if set(dtypes) - set(EMULATOR_DTYPES):
        p.error(f"unknown dtype(s) {sorted(set(dtypes) - set(EMULATOR_DTYPES))}; choose from {list(EMULATOR_DTYPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    run = start_run(args, budget)
    (task,) = make_tasks(run.files, budget, ["shakespeare"])
    if profile == "tiny":  # the committed scores are SmolLM2's; the tiny model gets its own (seconds)
        importance, info = stage1(run.model, run.tok, run.model_id, run.files, budget, 0, run.work)
        key, source = digest(info["scores"]), "stage 1 run here (tiny)"
    else:
        importance, key = committed_stage1(run.model)
        source = "the committed stage-1 scores (transfer.json, seed 0; identity harmonizers; stage 1 not re-run)"
    doc: dict[str, Any] = {
        "meta": {**environment(profile, run.model_id, budget, run.choice.device), "load_average": load},
        "stage1": source,
        "dtypes": {},
    }
    for name in dtypes:
        rd = model_in(run, args, EMULATOR_DTYPES[name])
        doc["dtypes"][name] = run_dtype(rd, task, budget, importance, key, seeds)
        doc["comparison"] = compare(doc["dtypes"])
        doc["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
        md = markdown(doc)
        publish(Path(args.results_dir), RESULT_NAME, profile, doc, md)  # after each dtype: partial results kept
        del rd
    print("\n" + md, flush=True)
    return doc


if __name__ == "__main__":
    main()
