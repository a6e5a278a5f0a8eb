"""Issue 22's scaling table: time per step and peak memory of every stage, as multiples of the model's bytes.

For each model (SmolLM2-135M, Gemma-3-270M from a converted folder, a random ~1.1B Llama-shaped config; or a
tiny random LLaMA with --tiny) and each stage, through the product's own functions:

- stage 1: model_owner_server.scaleot.importance.estimate_importance (one DL step + one RL step of 2 candidates
  per step: rl_interval=1, n_candidates=2)
- calibration: model_owner_server.scaleot.emulator.make_emulator with a CalibrationConfig (calibrate_emulator);
  the stage's memory covers the whole build (the emulator, which shares M's unchanged tensors, SRC, the
  stand-ins, calibration, the file written)
- client step: data_owner_client.train.train on the emulator file loaded as the data owner loads it
  (shared.emulator_file.load_emulator), full fine-tuning of the adapter layers
- evaluation: shared.evaluation.evaluate on M (one batch per step)
- serving: model_owner_server.serving.Generation (the product's token loop, greedy), seconds per new token

Time per step: wall seconds after one warm-up step (mean of the measured steps). Memory: the stage's peak
resident set size from the product's own sampler (model_owner_server.jobs.resources.MemoryMeter), as the jobs
record it: growth over what the process held before the stage, plus M's bytes for the stages that hold M (the
client holds only the emulator, so its figure is growth alone). Token data are real text through each model's
tokenizer (the random Llama uses the byte tokenizer: its ids fit any vocabulary).

    .venv/bin/python -m benchmarks.scaling --tiny
    .venv/bin/python -m benchmarks.scaling --models smollm2,gemma270m,llama1b --dtype float32 --steps 1
    .venv/bin/python -m benchmarks.scaling --models smollm2 --stages calibration --out benchmarks/results/x

--stages runs a subset; a stage also runs (unreported) where a reported one needs its output: calibration needs
stage 1's importance, the client step the emulator file that calibration writes.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO  # first: sets the thread and offline environment before torch loads

# isort: split
import torch

from benchmarks.harness import Budget, log, prepare_data, write_json

GEMMA_DIR = Path(os.environ.get("SCALEOT_GEMMA270M_DIR", "/tmp/bos22/gemma3-270m"))
MODELS = ("tiny", "smollm2", "gemma270m", "llama1b")
STAGES = ("stage1", "calibration", "client_step", "evaluation", "serving")
STAGE_TITLES = {
    "stage1": "stage 1 (estimate_importance)",
    "calibration": "calibration (make_emulator + calibrate)",
    "client_step": "client training step (train)",
    "evaluation": "evaluation (evaluate, 1 batch)",
    "serving": "serving (Generation, per token)",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load(name: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """M (frozen, eval mode, in `dtype`), its tokenizer and a display name."""
    from scaleot_samples.tiny import byte_tokenizer, tiny_model

    if name == "tiny":
        return tiny_model("llama", n_layers=8, hidden=64, seed=0).to(dtype), byte_tokenizer(), "tiny-llama-8L-h64"
    if name == "llama1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            intermediate_size=5632,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dtype)
        return (
            model.eval(),
            byte_tokenizer(),
            "random Llama-shaped 0.84B (h2048, 16L, ffn 5632, 32/4 heads, vocab 32000)",
        )
    from model_owner_server.scaleot.model_io import load_causal_lm, prepare_smollm2

    if name == "smollm2":
        folder = prepare_smollm2(REPO / ".cache" / "benchmarks" / "smollm2")
        model, tok = load_causal_lm(folder, dtype=dtype)
        return model, tok, "SmolLM2-135M-Instruct"
    if name == "gemma270m":
        if not (GEMMA_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"no converted Gemma-3-270M folder at {GEMMA_DIR}: make one with `modelowner-server import-gguf` "
                "and point SCALEOT_GEMMA270M_DIR at it, or leave gemma270m out of --models"
            )
        model, tok = load_causal_lm(GEMMA_DIR, dtype=dtype)
        return model, tok, "Gemma-3-270M (from GGUF Q4_K_M, dequantised)"
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def per_step(stamps: list[float], t0: float) -> float:
    """Mean seconds of the steps after the first (warm-up); `stamps` are the ends of the steps from t0."""
    if len(stamps) < 2:
        raise RuntimeError("a stage reported fewer than 2 steps: nothing to time after the warm-up step")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def needed_stages(stages: list[str]) -> list[str]:
    """`stages` plus the stages whose output they need, in STAGES order."""
    run = set(stages)
    if "client_step" in run:
        run.add("calibration")
    if "calibration" in run:
        run.add("stage1")
    return [s for s in STAGES if s in run]


def bench_model(
    name: str,
    dtype: torch.dtype,
    steps: int,
    seq_len: int,
    batch: int,
    new_tokens: int,
    stages: list[str] | None = None,
    checkpointing: bool = False,
) -> dict:
    from data_owner_client.train import TrainConfig, freeze_except_adapter, resolve_device, set_seed, train
    from model_owner_server.jobs.resources import MemoryMeter, dtype_name, param_bytes
    from model_owner_server.scaleot.calibrate import CalibrationConfig
    from model_owner_server.scaleot.corpus import corpus_blocks
    from model_owner_server.scaleot.emulator import make_emulator
    from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
    from model_owner_server.serving import Generation, Sampling
    from shared.architectures import decoder_layers
    from shared.data import load_dataset, pad_id_for, training_examples
    from shared.emulator_file import load_emulator
    from shared.evaluation import evaluate
    from shared.training import gradient_checkpointing

    n = steps + 1  # one warm-up step, then the measured ones
    report = list(stages or STAGES)
    run = needed_stages(report)
    files = prepare_data(REPO / ".cache" / "benchmarks", Budget("tiny"))  # synthetic text: shapes, not quality
    t_load = time.perf_counter()
    model, tok, title = load(name, dtype)
    model.requires_grad_(False)
    load_s = time.perf_counter() - t_load
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    m_bytes = param_bytes(model)
    log(f"{title}: {n_params / 1e6:.1f}M params, {m_bytes / 2**30:.2f} GiB in {dtype_name(dtype)} (load {load_s:.0f}s)")
    train_b, val_b = corpus_blocks(tok, files["wiki_train"], seq_len, max_blocks=max(8, 2 * batch * n))
    # A checkpoint in its own dtype is memory-mapped: fault its pages in now, so the meter's baseline holds M
    # and model_loaded counts it once (otherwise M's pages would count again in the stage that first reads them).
    with torch.no_grad():
        for prm in model.parameters():
            prm.sum()
    meter = MemoryMeter("cpu")  # the stages that hold M: growth + M's bytes
    meter.model_loaded(m_bytes, dtype, was_cached=True)
    secs: dict[str, float] = {}
    notes: dict[str, str] = {}

    n_layers = len(decoder_layers(model))
    emu_bytes = emu_file_bytes = None
    work: Path | None = None  # the emulator file's folder, removed at the end
    client_meter = MemoryMeter("cpu")  # started again before the client step (see there)
    if "stage1" in run:
        stamps: list[float] = []
        with meter.stage("stage1"), gradient_checkpointing(model, checkpointing):
            t0 = time.perf_counter()
            icfg = ImportanceConfig(
                steps=n, batch_size=batch, val_batch_size=batch, rl_interval=1, n_candidates=2, bottleneck=64
            )
            importance = estimate_importance(
                model,
                train_b,
                val_b,
                icfg,
                progress=lambda p: stamps.append(time.perf_counter()) if p.phase == "rl" else None,
            )
        secs["stage1"] = per_step(stamps, t0)
        notes["stage1"] = "one DL step + one RL step (2 candidates), harmonizer bottleneck 64"
        log(f"stage 1: {secs['stage1']:.2f} s/step")

    if "calibration" in run:
        work = Path(tempfile.mkdtemp(prefix="scaling-"))
        emu_path = work / "emulator.safetensors"
        n_adapter = 2 if n_layers >= 8 else 1
        stamps = []
        with meter.stage("calibration"):
            t0 = time.perf_counter()
            info = make_emulator(
                model,
                tok,
                importance,
                n_adapter,
                0.5,
                0.5,
                emu_path,
                calibration=CalibrationConfig(steps=n, batch_size=batch),
                calibration_blocks=train_b,
                calibration_progress=lambda p: stamps.append(time.perf_counter()),
                gradient_checkpointing=checkpointing,
            )
        secs["calibration"] = per_step(stamps, t0)
        notes["calibration"] = (
            f"n_adapter={n_adapter}, alpha=0.5, beta=0.5; memory: the whole build (emulator, calibration, file)"
        )
        emu_file_bytes = info.size_bytes
        log(f"calibration: {secs['calibration']:.2f} s/step; emulator {emu_file_bytes / 2**20:.0f} MiB")
        del importance
        gc.collect()

    if "client_step" in run:
        # The data owner's process holds the emulator only: a meter started now counts its growth, without M.
        client_meter = MemoryMeter("cpu")
        stamps = []
        with client_meter.stage("client_step"):
            loaded = load_emulator(emu_path)
            emu = loaded.model.to(dtype)
            freeze_except_adapter(emu, loaded.plan.adapter_layers)
            examples = training_examples(load_dataset(files["wiki_train"]), loaded.tokenizer, seq_len)
            cfg = TrainConfig(
                method="full",
                max_steps=n,
                batch_size=batch,
                seq_len=seq_len,
                seed=0,
                gradient_checkpointing=checkpointing,
            )
            set_seed(0)
            t0 = time.perf_counter()
            train(
                emu,
                examples,
                cfg,
                resolve_device("cpu"),
                pad_id=pad_id_for(loaded.tokenizer),
                checkpoint_dir=None,
                progress=False,
                on_step=lambda step, loss: stamps.append(time.perf_counter()),
            )
        secs["client_step"] = per_step(stamps, t0)
        notes["client_step"] = "full fine-tuning of the adapter layers (AdamW); holds the emulator, not M"
        log(f"client step: {secs['client_step']:.2f} s/step")
        emu_bytes = param_bytes(emu)
        del emu, loaded, examples
        gc.collect()

    if "evaluation" in run:
        stamps = []
        with meter.stage("evaluation"):
            t0 = time.perf_counter()
            evaluate(
                model,
                tok,
                load_dataset(files["wiki_val"]),
                seq_len=seq_len,
                batch_size=batch,
                max_examples=batch * n,
                progress=lambda done, total: stamps.append(time.perf_counter()),
            )
        secs["evaluation"] = per_step(stamps, t0)
        notes["evaluation"] = f"text perplexity, one batch of {batch} x {seq_len} tokens per step"
        log(f"evaluation: {secs['evaluation']:.2f} s/batch")

    if "serving" in run:
        prompt = tok("The history of the city begins", add_special_tokens=False)["input_ids"]
        with meter.stage("serving"):
            warm = Generation(model, tok, prompt, Sampling(max_tokens=2, temperature=0.0, seed=0))
            "".join(warm.deltas())
            gen = Generation(model, tok, prompt, Sampling(max_tokens=new_tokens, temperature=0.0, seed=0))
            t0 = time.perf_counter()
            "".join(gen.deltas())
            elapsed = time.perf_counter() - t0
        produced = max(1, gen.completion_tokens + (gen.finish_reason == "stop"))
        secs["serving"] = elapsed / produced
        notes["serving"] = (
            f"greedy, {produced} new tokens after a {len(prompt)}-token prompt (KV cache); s per token incl. prefill"
        )
        log(f"serving: {secs['serving']:.3f} s/token")

    rec_m, rec_c = meter.record(), client_meter.record()
    stages: dict[str, dict[str, Any]] = {}
    for s in report:
        m = (rec_c if s == "client_step" else rec_m)["stages"][s]
        stages[s] = {
            "seconds_per_step": round(secs[s], 4),
            "peak_bytes": int(m["peak_bytes"]),
            "over_model": round(m["peak_bytes"] / m_bytes, 2),
            "holds_model": s != "client_step",
            "note": notes[s],
        }
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    del model
    gc.collect()
    return {
        "model": name,
        "title": title,
        "params": n_params,
        "n_layers": n_layers,
        "dtype": dtype_name(dtype),
        "model_bytes": m_bytes,
        "emulator_param_bytes": emu_bytes,
        "emulator_file_bytes": emu_file_bytes,
        "load_seconds": round(load_s, 1),
        "memory_method": rec_m["method"],
        "stages": stages,
    }


def table(rows: list[dict]) -> str:
    shown = [s for s in STAGES if any(s in r["stages"] for r in rows)]
    head = "| model | params | dtype | M bytes | " + " | ".join(STAGE_TITLES[s] for s in shown) + " |"
    out = [head, "|" + "---|" * (4 + len(shown))]
    for r in rows:
        cells = []
        for s in shown:
            st = r["stages"].get(s)
            unit = "s/token" if s == "serving" else "s/step"
            cells.append("not run" if st is None else f"{st['seconds_per_step']:.3g} {unit}; {st['over_model']:.2f}x")
        out.append(
            f"| {r['title']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {r['model_bytes'] / 2**20:.0f} MiB | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(out)


def write_results(out: Path, args: argparse.Namespace, seq_len: int, rows: list[dict], skipped: dict) -> None:
    result = {
        "issue": 22,
        "settings": {
            "dtype": args.dtype,
            "steps_measured": args.steps,
            "warmup_steps": 1,
            "seq_len": seq_len,
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "stages": args.stages,
            "gradient_checkpointing": args.gradient_checkpointing,
            "threads": torch.get_num_threads(),
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_at_end": list(os.getloadavg()),
            "torch": torch.__version__,
        },
        "models": rows,
        "skipped": skipped,
    }
    write_json(out.with_suffix(".json"), result)
    notes = (
        f"\n\nSettings: {args.dtype}, seq {seq_len}, batch {args.batch}, {args.steps} measured step(s) after 1 "
        f"warm-up, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores, load average at the end "
        f"{os.getloadavg()[0]:.1f} (shared machine). Memory: peak RSS (MemoryMeter) / M's bytes; the client "
        "step holds the emulator only.\n"
    )
    if skipped:
        notes += "".join(f"\nSkipped {k}: {v}" for k, v in skipped.items()) + "\n"
    out.with_suffix(".md").write_text(table(rows) + notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke run on a tiny random LLaMA (seconds)")
    p.add_argument("--models", default="smollm2,gemma270m,llama1b", help=f"comma list from {', '.join(MODELS)}")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--steps", type=int, default=1, help="measured steps per stage (after one warm-up step)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated in the serving stage")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma list from {', '.join(STAGES)} (the stages a listed one needs run too, unreported)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="stage 1, calibration and the client step recompute activations in backward (the product's option)",
    )
    p.add_argument("--out", default=None, help="path stem of .json/.md (default benchmarks/results/scaling[_tiny])")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / ("scaling_tiny" if args.tiny else "scaling"))
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    if not stages or any(x not in STAGES for x in stages):
        p.error(f"--stages: choose from {', '.join(STAGES)}")
    args.stages = [x for x in STAGES if x in stages]
    names = ["tiny"] if args.tiny else [m.strip() for m in args.models.split(",") if m.strip()]
    for m in names:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    seq_len = min(args.seq_len, 32) if args.tiny else args.seq_len
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for m in names:
        try:
            rows.append(
                bench_model(
                    m,
                    _DTYPES[args.dtype],
                    args.steps,
                    seq_len,
                    args.batch,
                    args.new_tokens,
                    args.stages,
                    args.gradient_checkpointing,
                )
            )
        except FileNotFoundError as e:
            log(f"skipping {m}: {e}")
            skipped[m] = str(e)
        write_results(Path(args.out), args, seq_len, rows, skipped)  # after every model: a long run keeps its rows
    print((Path(args.out).with_suffix(".md")).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
