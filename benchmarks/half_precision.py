#!/usr/bin/env python
"""Half-size emulators: what bf16 / fp16 storage costs in plug-in quality, and what it saves.

One ScaleOT emulator plan of SmolLM2-135M (alpha 0.5, beta 0.5, N_a 4: stage 1 and calibration on a
Wikipedia excerpt, both SHORT here, see Budget) is built once in float32 through the product's
make_emulator, then stored as float32, bfloat16 and float16 (make_emulator(dtype=...) casts after
calibration, so the three files are the same emulator rounded). For each dtype and data-owner seed the
product recipe runs: tune_emulator (trains in fp32 on CPU, exports in the issued dtype) on the Shakespeare
task, then the server's plug_in into the float32 full model, scored on held-out Shakespeare.

Measured per dtype: file size, load time (load_emulator, best of 3, page cache warm), download time at two
link speeds (size / rate), the emulator's own zero-shot loss, the plug-in loss per seed, and its difference
from float32 at the same seed against the seed spread (half the max-min range of the float32 plug-in loss over
seeds), plus the adapter upload sizes (whole layers and the issued LoRA, r=8) per dtype.

  .venv/bin/python benchmarks/half_precision.py           # SmolLM2-135M, ~16 min on 2 shared cores
  .venv/bin/python benchmarks/half_precision.py --tiny    # random tiny LLaMA, seconds (tests)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# benchmarks.harness first: it sets the thread and offline environment before torch loads
from benchmarks.harness import PROFILE_HELP, Budget, add_run_args, log, profile_of, start_run
from benchmarks.results import environment, markdown_table, publish
from data_owner_client.train import TrainConfig
from data_owner_client.tune import tune_emulator
from model_owner_server.scaleot.calibrate import CalibrationConfig
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.emulator import make_emulator
from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
from model_owner_server.scaleot.plugin import plug_in
from shared.adapter import adapter_spec
from shared.data import load_dataset
from shared.emulator_file import EMULATOR_DTYPES, load_emulator, save_emulator
from shared.evaluation import evaluate
from shared.lora import file_spec, issue_lora

RESULT_NAME = "half_precision"
LINKS_MBIT = (100, 1000)


# One emulator plan at a SHORT budget (the ranking is not what is measured here): a cheap stage 1 (8 local-
# regression warm-up steps, 2 Dynamic LayerReplace steps), 5 calibration steps, 16 data-owner steps; the data
# files are the other benchmarks' (harness.prepare_data, cached).
PROFILES = {
    "full": Budget("full", stage1_warmup=8, stage1_steps=2, calibration_steps=5, ft_steps=16, text_eval_blocks=12),
    "tiny": Budget(
        "tiny",
        seq_len=32,
        stage1_warmup=2,
        stage1_steps=2,
        calibration_steps=2,
        ft_steps=3,
        text_batch=2,
        text_eval_blocks=4,
        n_adapter=2,
        bottleneck=8,
        wiki_train_chars=0,
        wiki_val_chars=0,
        mc_train_questions=24,
    ),
}


def build_files(model, tok, files: dict[str, Path], budget: Budget, out: Path) -> dict[str, Path]:
    """The float32 emulator through make_emulator, then the same emulator stored in each dtype."""
    train_b, val_b = corpus_blocks(tok, files["wiki_train"], budget.seq_len, val_corpus=files["wiki_val"])
    cfg = ImportanceConfig(
        steps=budget.stage1_steps, warmup_steps=budget.stage1_warmup, bottleneck=budget.bottleneck, n_candidates=4
    )
    log(f"stage 1: {cfg.warmup_steps} warm-up + {cfg.steps} DL steps on {tuple(train_b.shape)} blocks")
    importance = estimate_importance(model, train_b, val_b, cfg)
    log(f"stage 1: {importance.seconds:.0f} s; building the emulator ({budget.calibration_steps} calibration steps)")
    paths = {name: out / f"emulator-{name}.safetensors" for name in EMULATOR_DTYPES}
    make_emulator(
        model,
        tok,
        importance,
        budget.n_adapter,
        0.5,
        0.5,
        paths["float32"],
        calibration=CalibrationConfig(steps=budget.calibration_steps),
        calibration_blocks=train_b,
    )
    base = load_emulator(paths["float32"])
    for name, dtype in EMULATOR_DTYPES.items():  # what make_emulator(dtype=...) does after calibration
        if name != "float32":
            save_emulator(
                base.model.to(dtype),
                base.plan,
                base.tokenizer,
                paths[name],
                {k: base.metadata[k] for k in ("full_model_params", "full_model_bytes")},
            )
    return paths


def load_seconds(path: Path, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        load_emulator(path)
        best = min(best, time.perf_counter() - t0)
    return best


def run_dtype(model, tok, name: str, path: Path, files: dict[str, Path], budget: Budget, choice, out: Path) -> dict:
    """Size, load time, the emulator's zero-shot loss and, per seed, the data owner's run and the plug-in."""
    train_ds, eval_ds = load_dataset(files["shakespeare_train"]), load_dataset(files["shakespeare_eval"])
    score = {
        "seq_len": budget.seq_len,
        "batch_size": budget.text_batch,
        "device": choice.device,
        "max_examples": budget.text_eval_blocks,
    }
    size = path.stat().st_size
    row: dict[str, Any] = {
        "dtype": name,
        "file_bytes": size,
        "load_seconds": round(load_seconds(path), 3),
        "download_seconds": {f"{m} Mbit/s": round(size * 8 / (m * 1e6), 2) for m in LINKS_MBIT},
    }
    emu = load_emulator(path)
    layers = emu.plan.adapter_layers
    row["emulator_zero_shot_loss"] = evaluate(emu.model.float(), tok, eval_ds, **score)["loss"]
    dtype = EMULATOR_DTYPES[name]
    spec = adapter_spec(model, layers, dtype)  # what the server issues for this emulator
    row["upload_bytes"] = {
        "whole_layers": sum(s.nbytes for s in spec.values()),
        "lora_r8": sum(s.nbytes for s in file_spec(issue_lora(model, layers, dtype=dtype)).values()),
    }
    row["plan"], row["adapter_layers"], row["seeds"] = emu.plan.summary(), layers, {}
    for seed in budget.seeds:
        emu = load_emulator(path)  # a fresh copy per run, in the stored dtype
        cfg = TrainConfig(
            method="full",
            max_steps=budget.ft_steps,
            batch_size=budget.text_batch,
            seq_len=budget.seq_len,
            seed=seed,
            save_every=10**9,
        )
        run_dir = out / f"run-{name}-{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        tr = tune_emulator(emu.model, emu.tokenizer, emu.plan, train_ds, cfg, choice, run_dir, progress=False)
        plugged = plug_in(model, tr.tensors, layers, spec)  # validates names, shapes and the issued dtype
        m = evaluate(plugged, tok, eval_ds, **score)
        row["seeds"][seed] = {
            "plug_in_loss": m["loss"],
            "plug_in_perplexity": m["perplexity"],
            "train_final_loss": tr.train.final_loss,
            "train_seconds": round(tr.train.seconds, 1),
            "adapter_file_bytes": tr.adapter_file.stat().st_size,
        }
        log(f"  {name} seed {seed}: plug-in loss {m['loss']:.4f} (train {tr.train.seconds:.0f} s)")
        shutil.rmtree(run_dir, ignore_errors=True)
        del plugged, emu, tr
    return row


def compare(rows: dict[str, dict], zero_shot: float, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Each dtype's plug-in loss minus float32's at the same seed, against the float32 seed spread."""
    ref = [rows["float32"]["seeds"][s]["plug_in_loss"] for s in seeds]
    spread = (max(ref) - min(ref)) / 2 if len(ref) > 1 else None
    gain = zero_shot - sum(ref) / len(ref)  # what tuning bought at float32: the scale a difference is read on
    out: dict[str, Any] = {
        "zero_shot_loss": zero_shot,
        "float32_seed_spread": spread,
        "float32_gain": gain,
        "dtypes": {},
    }
    for name, row in rows.items():
        diffs = [row["seeds"][s]["plug_in_loss"] - rows["float32"]["seeds"][s]["plug_in_loss"] for s in seeds]
        mean = sum(diffs) / len(diffs)
        out["dtypes"][name] = {
            "diff_per_seed": diffs,
            "diff_mean": mean,
            "diff_of_gain": mean / gain if gain else None,
            "within_seed_noise": None if spread is None else abs(mean) <= spread,
            "size_ratio": row["file_bytes"] / rows["float32"]["file_bytes"],
            "load_ratio": row["load_seconds"] / rows["float32"]["load_seconds"],
        }
    return out


def markdown(doc: dict) -> str:
    rows, cmp, env = doc["rows"], doc["comparison"], doc["meta"]
    b = env["budget"]
    spread = cmp["float32_seed_spread"]
    table = markdown_table(
        [
            "dtype",
            "file",
            "load",
            "download at 100 Mbit/s / 1 Gbit/s",
            "emulator zero-shot loss",
            "plug-in loss per seed",
            "vs float32 (mean)",
            "within seed noise",
            "upload: layers / LoRA r=8",
        ],
        [
            [
                name,
                f"{r['file_bytes'] / 1e6:.1f} MB ({cmp['dtypes'][name]['size_ratio']:.0%})",
                f"{r['load_seconds']:.2f} s",
                " / ".join(f"{v:.1f} s" for v in r["download_seconds"].values()),
                f"{r['emulator_zero_shot_loss']:.4f}",
                ", ".join(f"{v['plug_in_loss']:.4f}" for v in r["seeds"].values()),
                f"{cmp['dtypes'][name]['diff_mean']:+.4f}",
                cmp["dtypes"][name]["within_seed_noise"],
                f"{r['upload_bytes']['whole_layers'] / 1e6:.1f} MB / {r['upload_bytes']['lora_r8'] / 1e6:.2f} MB",
            ]
            for name, r in rows.items()
        ],
    )
    intro = (
        "`benchmarks/half_precision.py`: one ScaleOT emulator (alpha 0.5, beta 0.5, N_a "
        f"{b['n_adapter']}, plan `{next(iter(rows.values()))['plan']}`) built once through make_emulator and "
        "stored in each dtype (make_emulator casts after calibration, so the files are the same emulator "
        "rounded); per dtype and data-owner seed the product path: tune_emulator (fp32 training on CPU, export "
        "in the issued dtype), the server's plug_in into the float32 full model, Shakespeare held-out loss "
        "(nats)."
    )
    budget = (
        f"Budget (SHORT, minutes on 2 cores): stage 1 {b['stage1_warmup']} warm-up + "
        f"{b['stage1_steps']} DL steps, {b['calibration_steps']} calibration steps, {b['ft_steps']} data-owner "
        f"steps (whole layers), seeds {list(b['seeds'])}, {b.get('text_eval_blocks', b.get('eval_blocks'))} eval blocks of {b['seq_len']} "
        f"tokens; {env['torch_threads']} torch threads, {env['seconds']:.0f} s in all"
        + (f" (load average {env['load_average']:.1f} at the start: cores shared)" if "load_average" in env else "")
        + ". Full model zero-shot "
        f"loss {cmp['zero_shot_loss']:.4f}; float32 plug-in seed spread (half the range over seeds) "
        + (f"{spread:.4f}." if spread is not None else "n/a.")
    )
    title = f"## Half-size emulators: bf16 / fp16 storage against float32 ({env['model']})"
    again = (
        "Reproduce: `.venv/bin/python benchmarks/half_precision.py` (benchmarks/results/half_precision.json; "
        "`--tiny` runs the same path on a random tiny LLaMA in seconds)."
    )
    return "\n".join([title, "", intro, "", budget, "", *table, "", *_reading(rows, cmp), "", again, ""])


def _reading(rows: dict[str, dict], cmp: dict[str, Any]) -> list[str]:
    """One generated sentence per half dtype, so the text can never disagree with the table."""
    out = []
    for name in (n for n in rows if n != "float32"):
        c = cmp["dtypes"][name]
        noise = {
            True: "within the seed noise",
            False: "larger than the seed noise",
            None: "(one seed: no noise estimate)",
        }[c["within_seed_noise"]]
        per_seed = ", ".join(f"{d:+.4f}" for d in c["diff_per_seed"])
        gain = f"{-c['diff_of_gain']:+.0%}" if c["diff_of_gain"] is not None else "n/a"
        out.append(
            f"- {name}: the file is {c['size_ratio']:.0%} of float32's, loads in {c['load_ratio']:.2f}x the "
            f"time; the plug-in loss differs by {c['diff_mean']:+.4f} nats on average (per seed {per_seed}; "
            f"{noise}, seed spread {cmp['float32_seed_spread'] or 0:.4f}): the tuning gain changes by {gain} "
            f"against float32's {cmp['float32_gain']:.4f} nats."
        )
    fp32 = rows["float32"]
    out.append(
        f"- Caveat: at this budget the emulator is weak (zero-shot loss {fp32['emulator_zero_shot_loss']:.2f} "
        f"against the full model's {cmp['zero_shot_loss']:.2f}) and the tuning gain small, so the table "
        "measures what rounding the emulator costs the recipe, not ScaleOT's transfer (docs: the transfer "
        "section)."
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, {"tiny": PROFILE_HELP["tiny"]})
    args = p.parse_args(argv)
    budget = PROFILES[profile_of(args)]
    load = os.getloadavg()[0]  # the times are only comparable with the machine's load beside them
    t0 = time.perf_counter()
    run = start_run(args, budget)
    model, tok, model_id, files, choice = run.model, run.tok, run.model_id, run.files, run.choice
    out = run.work / f"half_precision-{budget.profile}"
    out.mkdir(parents=True, exist_ok=True)
    paths = build_files(model, tok, files, budget, out)
    zero = evaluate(
        model,
        tok,
        load_dataset(files["shakespeare_eval"]),
        seq_len=budget.seq_len,
        batch_size=budget.text_batch,
        device=choice.device,
        max_examples=budget.text_eval_blocks,
    )["loss"]
    rows = {name: run_dtype(model, tok, name, path, files, budget, choice, out) for name, path in paths.items()}
    doc = {
        "meta": {
            **environment(budget.profile, model_id, budget, choice.device),
            "load_average": load,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "rows": rows,
        "comparison": compare(rows, zero, budget.seeds),
    }
    md = markdown(doc)
    publish(
        Path(args.results_dir),
        RESULT_NAME,
        budget.profile,
        doc,
        md,
        "half-precision" if budget.profile == "full" else None,
    )
    print(md)
    return doc


if __name__ == "__main__":
    main()
