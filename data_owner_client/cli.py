"""`dataowner-client`: verify the model owner's emulator, fine-tune its adapter locally, upload only the adapter.

Human output goes to stdout (results) and stderr (progress, notes); `--json` prints one JSON
document on stdout for scripts, also on failure (`{"error": {"code", "message", "exit_code", ...}}`, with the
human message on stderr as usual). Every failure exits with a code from `errors.ExitCode`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from shared import schemas
from shared.signing import verify_file

from .errors import EXIT_CODES_HELP, BadInputError, EvaluationFailedError, ServerError, error_object, exit_code_for
from .settings import ClientSettings
from .transfer import (
    EmulatorRef,
    KnownServers,
    ServerClient,
    VerifiedEmulator,
    cache_path,
    check_plan_matches,
    fetch_verified_emulator,
    parse_emulator_url,
    resolve_trust,
    split_resource_url,
    upload_adapter,
    verify_manifest,
    wait_for_job,
)

app = typer.Typer(
    name="dataowner-client",
    help="ScaleOT data-owner client: download and verify a signed emulator, fine-tune its adapter layers "
         "locally, upload only the adapter, and report the model owner's plug-in evaluation.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # rich tracebacks print locals, which may include the API key
    # Plain click help: rich's option table cuts long option names (--trust-on-first-use) at 80 columns;
    # click's layout never does, and uses up to 120 columns where the terminal has them.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


class Method(StrEnum):
    full = "full"
    lora = "lora"


# ---------------------------------------------------------------- shared options

EmulatorUrlOpt = Annotated[str, typer.Option("--emulator-url", help="The emulator resource: SERVER/v1/emulators/ID.")]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key (prefer env SCALEOT_API_KEY).",
                                                  show_default=False)]
PubkeyOpt = Annotated[str | None, typer.Option(
    "--server-pubkey", help="Pinned server signing key: base64 Ed25519 public key or its 16-hex key id "
                            "(env SCALEOT_SERVER_PUBKEY).", show_default=False)]
TofuOpt = Annotated[bool, typer.Option(
    "--trust-on-first-use", help="No pinned key: trust and record the key the server presents now (loud warning).")]
CacheOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Download cache and trust records (env SCALEOT_CLIENT_CACHE, default ~/.cache/scaleot).",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (for scripts).")]
ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", help="Progress bars on stderr (default: when stderr is a terminal).",
    show_default=False)]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the server's plug-in evaluation.")]


def _settings(**overrides: Any) -> ClientSettings:
    try:
        return ClientSettings().with_overrides(**overrides)
    except ValidationError as exc:
        raise BadInputError(f"invalid SCALEOT_* environment setting: {exc}") from None


def _api_key(settings: ClientSettings) -> str | None:
    return settings.api_key.get_secret_value() if settings.api_key else None


def _client(server: str, settings: ClientSettings) -> ServerClient:
    return ServerClient(server, _api_key(settings), timeout=settings.http_timeout_s)


def _note(message: str) -> None:
    typer.echo(message, err=True)


def _show_progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


_json_emitted: ContextVar[bool] = ContextVar("_json_emitted", default=False)


@contextmanager
def _handled(as_json: bool = False) -> Iterator[None]:
    """One place that turns expected failures into `error: ...` on stderr + the documented exit code, and
    with `--json` also into an `{"error": {...}}` document on stdout (unless the command already printed its
    document, which then carries the error itself)."""
    token = _json_emitted.set(False)
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _note("interrupted (a training checkpoint was saved if any step finished; rerun with --resume)")
        if as_json and not _json_emitted.get():
            _emit_json({"error": {"code": "interrupted", "message": "interrupted", "exit_code": 130}})
        raise typer.Exit(130) from None
    except Exception as exc:
        code = exit_code_for(exc)
        if code is None:
            raise  # a bug: keep the traceback
        _note(f"error: {exc}")
        if as_json and not _json_emitted.get():
            _emit_json(error_object(exc, code))
        raise typer.Exit(int(code)) from None
    finally:
        _json_emitted.reset(token)


def _emit_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, default=str))
    _json_emitted.set(True)


# ---------------------------------------------------------------- result table

_ROW_ORDER = ("perplexity", "loss", "completion_loss", "accuracy", "accuracy_norm", "tokens", "n")


def comparison_table(columns: dict[str, dict[str, Any] | None]) -> str:
    """Metrics side by side: one column per stage (emulator zero-shot, fine-tuned, full zero-shot, plug-in)."""
    present = {name: m for name, m in columns.items() if m}
    if not present:
        return "(no evaluation metrics)"
    keys = {k for m in present.values() for k, v in m.items() if isinstance(v, (int, float))}
    rows = [k for k in _ROW_ORDER if k in keys] + sorted(keys - set(_ROW_ORDER))

    def cell(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "-"
        return f"{v:d}" if isinstance(v, int) else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"

    width = max(12, *(len(n) for n in columns))
    lines = ["metric".ljust(16) + "".join(n.rjust(width + 2) for n in columns)]
    for k in rows:
        lines.append(k.ljust(16) + "".join(cell((columns[n] or {}).get(k)).rjust(width + 2) for n in columns))
    return "\n".join(lines)


def _columns(client_metrics: dict[str, Any] | None, adapter: schemas.Adapter | None) -> dict[str, dict | None]:
    cm = client_metrics or (adapter.client_metrics if adapter else None) or {}
    ev = adapter.evaluation if adapter else None
    return {"emulator zero-shot": cm.get("emulator_zero_shot"), "emulator fine-tuned": cm.get("emulator_fine_tuned"),
            "full zero-shot": ev.zero_shot if ev else None, "plug-in": ev.plug_in if ev else None}


def _await_evaluation(client: ServerClient, created: schemas.AdapterCreated, settings: ClientSettings,
                      progress: bool) -> tuple[schemas.Job, schemas.Adapter]:
    job = wait_for_job(client, created.job.id, poll_s=settings.poll_interval_s, timeout_s=settings.wait_timeout_s,
                       progress=progress, desc="plug-in evaluation")
    return job, client.adapter(created.adapter.id)


def _evaluation_failure(job: schemas.Job | None, adapter: schemas.Adapter | None) -> EvaluationFailedError | None:
    if job is not None and job.status == "failed":
        return EvaluationFailedError(f"the server's evaluation job {job.id} failed: "
                                     f"{job.error or job.message or 'no reason given'}")
    if adapter is not None and adapter.status == "failed":
        return EvaluationFailedError(f"the server's evaluation of adapter {adapter.id} failed: "
                                     f"{adapter.error or 'no reason given'}")
    return None


def _report(*, as_json: bool, doc: dict[str, Any], columns: dict[str, dict | None], header: str,
            failure: EvaluationFailedError | None = None) -> None:
    if as_json:
        if failure is not None:
            doc = {**doc, **error_object(failure, failure.exit_code)}
        _emit_json(doc)
    else:
        typer.echo(header)
        typer.echo(comparison_table(columns))


# ---------------------------------------------------------------- commands


def _fetch(ref: EmulatorRef, settings: ClientSettings, client: ServerClient, tofu: bool,
           progress: bool) -> VerifiedEmulator:
    ver = fetch_verified_emulator(client, ref, cache_dir=settings.cache_dir, pinned=settings.server_pubkey,
                                  trust_on_first_use=tofu, progress=progress, poll_s=settings.poll_interval_s,
                                  timeout_s=settings.wait_timeout_s)
    _note(f"verified emulator {ref.emulator_id} (model {ver.manifest['model_id']}, {ver.manifest['size_bytes']} bytes, "
          f"sha256 {ver.manifest['sha256'][:16]}..., key {ver.manifest['key_id']}); "
          f"{'reused cached file' if ver.reused else 'downloaded'} {ver.path}")
    return ver


@app.command(epilog=EXIT_CODES_HELP)
def tune(
    emulator_url: EmulatorUrlOpt,
    data: Annotated[Path, typer.Option("--data", help="Training data: .txt, or .jsonl with {text} / "
                                       "{prompt, completion} / {question, choices, answer}.")],
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", help="Evaluation data (same formats); scored locally on the emulator and uploaded so the "
                            "server scores the plug-in on the same data.", show_default=False)] = None,
    method: Annotated[Method, typer.Option("--method", help="full: train the adapter layers' weights; lora: LoRA on "
                                           "their linear modules, merged before export.")] = Method.full,
    epochs: Annotated[float, typer.Option(help="Passes over the training data (ignored with --max-steps).")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).",
                                                  show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-4 full, 1e-3 lora).",
                                             show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order (runs are reproducible).")] = 0,
    device: Annotated[str, typer.Option(
        help="auto (CUDA with bf16 autocast when present, else CPU), cpu, cuda[:N].")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", help="Adapter output folder (default ./adapter-EMULATOR_ID).",
                                                show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")] = False,
    scheduler: Annotated[str, typer.Option(
        help="LR schedule (transformers get_scheduler name): cosine, linear, ...")] = "cosine",
    warmup_ratio: Annotated[float, typer.Option(help="Fraction of steps spent warming up the LR.")] = 0.05,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (--method lora; default: the emulator's issued "
                                                  "rank, else 8).", show_default=False)] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha (--method lora; default: the emulator's "
                                                      "issued alpha, else 16).", show_default=False)] = None,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout (--method lora).")] = 0.0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (also on Ctrl-C).")] = 50,
    eval_max_examples: Annotated[int | None, typer.Option(help="Cap local evaluation examples.",
                                                          show_default=False)] = None,
    upload: Annotated[bool, typer.Option("--upload/--no-upload",
                                         help="Upload the adapter when training is done.")] = True,
    wait: WaitOpt = True,
    api_key: ApiKeyOpt = None,
    server_pubkey: PubkeyOpt = None,
    trust_on_first_use: TofuOpt = False,
    cache_dir: CacheOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Download + verify the emulator, fine-tune its adapter layers locally, upload only the adapter,
    wait for the server's plug-in evaluation, and print zero-shot / emulator fine-tuned / plug-in side by side."""
    # torch-heavy imports stay inside the commands that train, so `--help` and `status` start fast.
    from shared.adapter import spec_from_json
    from shared.data import load_dataset
    from shared.emulator_file import load_emulator
    from shared.lora import LoraSpec

    from .export import read_adapter
    from .train import TrainConfig, resolve_device, tune_emulator

    with _handled(as_json):
        settings = _settings(api_key=api_key, server_pubkey=server_pubkey, client_cache=cache_dir)
        show = _show_progress(progress)
        ref = parse_emulator_url(emulator_url)
        lora_opts = {k: v for k, v in (("lora_r", lora_r), ("lora_alpha", lora_alpha)) if v is not None}
        cfg = TrainConfig(method=method.value, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
                          grad_accum=grad_accum, seq_len=seq_len, seed=seed, scheduler=scheduler,
                          warmup_ratio=warmup_ratio, lora_dropout=lora_dropout, save_every=save_every, **lora_opts)
        choice = resolve_device(device)
        # Read the data first: a broken file should fail in a second, not after a long download.
        train_ds = load_dataset(data)
        eval_ds = load_dataset(eval_data) if eval_data is not None else None
        out_dir = out or Path(f"adapter-{ref.emulator_id}")
        with _client(ref.server, settings) as client:
            if upload and eval_data is None:
                _check_eval_data_not_required(client, ref)  # before the download and the training, not after
            ver = _fetch(ref, settings, client, trust_on_first_use, show)
            try:
                emu = load_emulator(ver.path, device="cpu")
            except Exception as exc:  # verified bytes the shared loader cannot read: the server's problem
                raise ServerError(f"the verified emulator file could not be loaded: {exc}") from exc
            check_plan_matches(ver.manifest, emu.plan.to_dict())
            expected = spec_from_json({k: v.model_dump() for k, v in ver.info.adapter_spec.items()}) \
                if ver.info.adapter_spec else None
            lora = LoraSpec.from_json(ver.manifest["lora"]) if ver.manifest.get("lora") else None  # signed
            if lora is not None and cfg.method == "lora":  # train the issued LoRA unless told otherwise
                cfg = dataclasses.replace(cfg, **{"lora_r": lora.r, "lora_alpha": lora.alpha, **lora_opts})
            _note(f"layer plan {emu.plan.summary()} (A = adapter layers {emu.plan.adapter_layers}); "
                  f"training on {choice.device}"
                  + (f" with {choice.autocast_dtype} autocast" if choice.autocast_dtype else ""))
            identity = {"emulator_id": ref.emulator_id, "model_id": ver.manifest["model_id"],
                        "emulator_sha256": ver.manifest["sha256"], "server": ref.server}
            result = tune_emulator(emu.model, emu.tokenizer, emu.plan, train_ds, cfg, choice, out_dir,
                                   eval_data=eval_ds, eval_max_examples=eval_max_examples, resume=resume,
                                   identity=identity, expected_spec=expected, lora=lora, progress=show, log=_note)
            _note(f"adapter written to {result.adapter_file} ({result.n_adapter_params} parameters, "
                  f"{result.adapter_file.stat().st_size} bytes)")
            doc: dict[str, Any] = {
                "emulator": {"id": ref.emulator_id, "model_id": ver.manifest["model_id"],
                             "sha256": ver.manifest["sha256"], "path": str(ver.path), "reused": ver.reused},
                "adapter_dir": str(result.out_dir), "adapter_file": str(result.adapter_file),
                "training": result.adapter_config["training"], "metrics": dict(result.metrics),
                "adapter": None, "job": None,
            }
            job = adapter = None
            if upload:
                try:
                    adapter_file, upload_config = read_adapter(result.adapter_file)  # as `upload` would send it
                    created = upload_adapter(client, ref, adapter_file, eval_data=eval_data,
                                             metrics=result.metrics or None, adapter_config=upload_config)
                except ServerError as exc:
                    raise _with_upload_hint(exc, ref, result.out_dir) from None
                (out_dir / "upload.json").write_text(created.model_dump_json(indent=2) + "\n")
                _note(f"uploaded adapter {created.adapter.id}; evaluation job {created.job.id}")
                doc["adapter"] = created.adapter.model_dump(mode="json")
                doc["job"] = created.job.model_dump(mode="json")
                if wait:
                    job, adapter = _await_evaluation(client, created, settings, show)
                    doc["adapter"], doc["job"] = adapter.model_dump(mode="json"), job.model_dump(mode="json")
                    doc["metrics"].update(zero_shot=adapter.evaluation.zero_shot, plug_in=adapter.evaluation.plug_in)
        failure = _evaluation_failure(job, adapter)
        _report(as_json=as_json, doc=doc, columns=_columns(result.metrics, adapter),
                header=f"adapter {doc['adapter']['id'] if doc['adapter'] else '(not uploaded)'}: "
                       f"{adapter.status if adapter else 'evaluation not awaited'}", failure=failure)
        if failure:
            raise failure


def _upload_command(ref: EmulatorRef, adapter: Path) -> str:
    return (f"dataowner-client upload --emulator-url {shlex.quote(ref.url)} "
            f"--adapter {shlex.quote(str(adapter.resolve()))} --eval-data EVAL_FILE")


def _check_eval_data_not_required(client: ServerClient, ref: EmulatorRef) -> None:
    """Ask the server whether an upload without --eval-data would be refused; a server that does not say
    (an older one) is not held to it: the upload itself then reports it, with the command to retry."""
    info = client.upload_info(ref.emulator_id)
    if info is not None and info.get("eval_data_required") is True:
        kinds = [str(k) for k in info.get("eval_data_suffixes") or []] or [".txt", ".jsonl"]
        suffixes = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
        raise BadInputError("this server has no default evaluation file, so it would refuse the adapter after "
                            f"training (422 no_eval_data): pass --eval-data FILE ({suffixes}: the data the server "
                            "scores the plug-in on), or --no-upload to train only",
                            details={"eval_data_required": True})


def _with_upload_hint(exc: ServerError, ref: EmulatorRef, adapter: Path) -> ServerError:
    """An upload refused for lack of evaluation data: say how to upload the adapter the user already has."""
    if exc.code != "no_eval_data":
        return exc
    command = _upload_command(ref, adapter)
    return ServerError(f"{exc}\nthe adapter is saved in {adapter}; upload it with your evaluation data "
                       f"(EVAL_FILE: a .txt or .jsonl file):\n  {command}",
                       status_code=exc.status_code, code=exc.code,
                       details={"adapter_dir": str(adapter.resolve()), "upload_command": command})


@app.command(epilog=EXIT_CODES_HELP)
def download(
    emulator_url: EmulatorUrlOpt,
    out: Annotated[Path | None, typer.Option("--out", help="Also copy the verified file here.",
                                             show_default=False)] = None,
    api_key: ApiKeyOpt = None,
    server_pubkey: PubkeyOpt = None,
    trust_on_first_use: TofuOpt = False,
    cache_dir: CacheOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Download the emulator into the cache (resumable), verify signature, sha256 and size; print its path."""
    with _handled(as_json):
        settings = _settings(api_key=api_key, server_pubkey=server_pubkey, client_cache=cache_dir)
        ref = parse_emulator_url(emulator_url)
        with _client(ref.server, settings) as client:
            ver = _fetch(ref, settings, client, trust_on_first_use, _show_progress(progress))
        path = ver.path
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ver.path, out)
            path = out
        if as_json:
            _emit_json({"path": str(path), "cache_path": str(ver.path), "reused": ver.reused, "manifest": ver.manifest})
        else:
            typer.echo(str(path))


@app.command(epilog=EXIT_CODES_HELP)
def verify(
    emulator_url: EmulatorUrlOpt,
    file: Annotated[Path | None, typer.Option("--file", help="The file to check (default: the cached download).",
                                                 show_default=False)] = None,
    api_key: ApiKeyOpt = None,
    server_pubkey: PubkeyOpt = None,
    trust_on_first_use: TofuOpt = False,
    cache_dir: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a local emulator file against the server's signed manifest (signature, key, emulator id, sha256, size)."""
    with _handled(as_json):
        settings = _settings(api_key=api_key, server_pubkey=server_pubkey, client_cache=cache_dir)
        ref = parse_emulator_url(emulator_url)
        with _client(ref.server, settings) as client:
            signed = client.signed_manifest(ref.emulator_id)
            trust = resolve_trust(client, pinned=settings.server_pubkey, trust_on_first_use=trust_on_first_use,
                                  signed=signed, known=KnownServers(settings.cache_dir / "known_servers.json"))
            manifest = verify_manifest(ref, signed, trust)
        path = file or cache_path(settings.cache_dir, manifest["sha256"])
        if not path.is_file():
            raise BadInputError(f"{path}: no such file; run `dataowner-client download --emulator-url {emulator_url}` "
                                "or pass --file")
        verify_file(path, manifest)
        if as_json:
            _emit_json({"verified": True, "path": str(path), "trust": trust.source, "manifest": manifest})
        else:
            typer.echo(f"OK {path}: signed by {manifest['key_id']} ({trust.source}), "
                       f"emulator {manifest['emulator_id']}, "
                       f"model {manifest['model_id']}, sha256 {manifest['sha256']}, {manifest['size_bytes']} bytes")


@app.command("upload", epilog=EXIT_CODES_HELP)
def upload_cmd(
    emulator_url: EmulatorUrlOpt,
    adapter: Annotated[Path, typer.Option("--adapter", help="the folder `tune` wrote (PEFT LoRA or whole layers), "
                                          "or its adapter_model.safetensors / adapter_layers.safetensors.")],
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Evaluation file the server scores the "
                                                      "plug-in on.", show_default=False)] = None,
    metrics: Annotated[Path | None, typer.Option(
        "--metrics", help="JSON file of emulator-side metrics (default: the 'metrics' of scaleot_adapter.json).",
        show_default=False)] = None,
    wait: WaitOpt = True,
    api_key: ApiKeyOpt = None,
    cache_dir: CacheOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Validate an adapter against the emulator's adapter spec and upload only it; optionally wait for evaluation."""
    from shared.adapter import spec_from_json
    from shared.data import load_dataset
    from shared.lora import issued_lora, validate_upload

    from .export import read_adapter, read_json

    with _handled(as_json):
        settings = _settings(api_key=api_key, client_cache=cache_dir)
        ref = parse_emulator_url(emulator_url)
        adapter_file, config = read_adapter(adapter)
        client_metrics = read_json(metrics) if metrics is not None else (config or {}).get("metrics") or None
        if eval_data is not None:
            load_dataset(eval_data)  # refuse a broken eval file here, with its line number
        show = _show_progress(progress)
        with _client(ref.server, settings) as client:
            info = client.emulator(ref.emulator_id)
            if info.adapter_spec:  # the server runs the same checks; failing here is faster and clearer
                spec = spec_from_json({k: v.model_dump() for k, v in info.adapter_spec.items()})
                validate_upload(adapter_file, spec, issued_lora(info.build_info), config, info.max_adapter_bytes)
            try:
                created = upload_adapter(client, ref, adapter_file, eval_data=eval_data, metrics=client_metrics,
                                         adapter_config=config)
            except ServerError as exc:
                raise _with_upload_hint(exc, ref, adapter) from None
            _note(f"uploaded adapter {created.adapter.id}; evaluation job {created.job.id}")
            job, record = created.job, created.adapter
            if wait:
                job, record = _await_evaluation(client, created, settings, show)
        failure = _evaluation_failure(job if wait else None, record if wait else None)
        _report(as_json=as_json, doc={"adapter": record.model_dump(mode="json"), "job": job.model_dump(mode="json")},
                columns=_columns(client_metrics, record), header=f"adapter {record.id}: {record.status}",
                failure=failure)
        if failure:
            raise failure


@app.command(epilog=EXIT_CODES_HELP)
def status(
    target: Annotated[str, typer.Argument(help="An adapter id or URL (SERVER/v1/adapters/ID), or a job id or URL.")],
    server: Annotated[str | None, typer.Option("--server", help="Server base URL when TARGET is a bare id "
                                                  "(env SCALEOT_SERVER_URL).", show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job / evaluation finishes.")] = False,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Show an adapter's evaluation (zero-shot / emulator / plug-in side by side) or a job's state."""
    with _handled(as_json):
        settings = _settings(api_key=api_key, server_url=server)
        kind, base, ident = None, settings.server_url, target
        for collection in ("adapters", "jobs"):
            if (found := split_resource_url(target, collection)) is not None:
                kind, (base, ident) = collection, found
        if not base:
            raise BadInputError("TARGET is a bare id: pass --server URL (or set SCALEOT_SERVER_URL), "
                                "or give the full URL")
        if kind is None:  # the server's ids say what they are: adp_... adapters, job_... jobs
            kind = "adapters" if ident.startswith("adp_") else "jobs" if ident.startswith("job_") else None
        show = _show_progress(progress)
        with _client(base, settings) as client:
            record, guessed = None, kind is None
            if kind in (None, "adapters"):
                try:
                    record = client.adapter(ident)
                    kind = "adapters"
                except ServerError as exc:
                    if exc.status_code != 404:
                        raise
                    if kind == "adapters":
                        raise _not_found(exc, f"adapter {ident}", base) from None
                    kind = "jobs"
            if kind == "adapters":
                job = None
                if wait and record.status == "evaluating" and record.job_id:
                    job = wait_for_job(client, record.job_id, poll_s=settings.poll_interval_s,
                                       timeout_s=settings.wait_timeout_s, progress=show, desc="plug-in evaluation")
                    record = client.adapter(ident)
                failure = _evaluation_failure(job, record)
                _report(as_json=as_json, doc={"adapter": record.model_dump(mode="json")},
                        columns=_columns(None, record), header=f"adapter {record.id}: {record.status}",
                        failure=failure)
            else:
                try:
                    job = client.job(ident)
                except ServerError as exc:
                    if exc.status_code != 404:
                        raise
                    raise _not_found(exc, f"adapter or job {ident}" if guessed else f"job {ident}", base) from None
                if wait and not job.finished:
                    job = wait_for_job(client, ident, poll_s=settings.poll_interval_s,
                                       timeout_s=settings.wait_timeout_s, progress=show)
                failure = None
                if job.status == "failed":
                    failure = _evaluation_failure(job, None) if job.kind == "evaluation" else \
                        ServerError(f"job {job.id} ({job.kind}) failed: {job.error or 'no reason given'}")
                if as_json:
                    doc: dict[str, Any] = {"job": job.model_dump(mode="json")}
                    if failure is not None:
                        doc.update(error_object(failure, failure.exit_code))
                    _emit_json(doc)
                else:
                    typer.echo(f"job {job.id} ({job.kind}): {job.status} {job.progress:.0%} {job.message}".rstrip())
                    if job.error:
                        typer.echo(f"error: {job.error}")
        if failure:
            raise failure


def _not_found(exc: ServerError, what: str, server: str) -> ServerError:
    return ServerError(f"{what} not found on {server} (or not visible to your organization: adapters and jobs "
                       "are visible only with the API key of the organization that created them)",
                       status_code=exc.status_code, code=exc.code or "not_found")


def main() -> None:  # `python -m data_owner_client`
    app()
