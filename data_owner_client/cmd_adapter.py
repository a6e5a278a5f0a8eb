"""`dataowner-client upload` and `status`: send an adapter you already have, and follow its evaluation or a job."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from shared import schemas

from .errors import BadInputError, ClientError, ServerError, error_object
from .options import Connection, EmulatorUrlOpt, WaitOpt, connection_options, server_client
from .output import await_evaluation, columns, emit_json, evaluation_failure, handled, measurement_caption, note, report
from .settings import ClientSettings
from .transfer import EmulatorRef, ServerClient, parse_emulator_url, split_resource_url, upload_adapter, wait_for_job


def upload_command(ref: EmulatorRef, adapter: Path) -> str:
    return (
        f"dataowner-client upload --emulator-url {shlex.quote(ref.url)} "
        f"--adapter {shlex.quote(str(adapter.resolve()))} --eval-data EVAL_FILE"
    )


def with_upload_hint(exc: ServerError, ref: EmulatorRef, adapter: Path) -> ServerError:
    """An upload refused for lack of evaluation data: say how to upload the adapter the user already has."""
    if exc.code != "no_eval_data":
        return exc
    command = upload_command(ref, adapter)
    return ServerError(
        f"{exc}\nthe adapter is saved in {adapter}; upload it with your evaluation data "
        f"(EVAL_FILE: a .txt or .jsonl file):\n  {command}",
        status_code=exc.status_code,
        code=exc.code,
        details={"adapter_dir": str(adapter.resolve()), "upload_command": command},
    )


@connection_options("api_key", "cache_dir", "as_json", "progress")
def upload(
    emulator_url: EmulatorUrlOpt,
    adapter: Annotated[
        Path,
        typer.Option(
            "--adapter",
            help="the folder `tune` wrote (PEFT LoRA or whole layers), "
            "or its adapter_model.safetensors / adapter_layers.safetensors.",
        ),
    ],
    eval_data: Annotated[
        Path | None,
        typer.Option("--eval-data", help="Evaluation file the server scores the plug-in on.", show_default=False),
    ] = None,
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics",
            help="JSON file of emulator-side metrics (default: the 'metrics' of scaleot_adapter.json).",
            show_default=False,
        ),
    ] = None,
    wait: WaitOpt = True,
    *,
    conn: Connection,
) -> None:
    """Validate an adapter against the emulator's adapter spec and upload only it; optionally wait for evaluation."""
    from shared.adapter import spec_from_json
    from shared.data import load_dataset
    from shared.lora import issued_lora, validate_upload

    from .export import read_adapter, read_json

    with handled(conn.as_json):
        settings = conn.settings()
        ref = parse_emulator_url(emulator_url)
        adapter_file, config = read_adapter(adapter)
        client_metrics = read_json(metrics) if metrics is not None else (config or {}).get("metrics") or None
        if eval_data is not None:
            load_dataset(eval_data)  # refuse a broken eval file here, with its line number
        with server_client(ref.server, settings) as client:
            info = client.emulator(ref.emulator_id)
            if info.adapter_spec:  # the server runs the same checks; failing here is faster and clearer
                spec = spec_from_json({k: v.model_dump() for k, v in info.adapter_spec.items()})
                validate_upload(adapter_file, spec, issued_lora(info.build_info), config, info.max_adapter_bytes)
            try:
                created = upload_adapter(
                    client, ref, adapter_file, eval_data=eval_data, metrics=client_metrics, adapter_config=config
                )
            except ServerError as exc:
                raise with_upload_hint(exc, ref, adapter) from None
            note(f"uploaded adapter {created.adapter.id}; evaluation job {created.job.id}")
            job, record = created.job, created.adapter
            if wait:
                job, record = await_evaluation(client, created, settings, conn.show_progress)
        failure = evaluation_failure(job if wait else None, record if wait else None)
        report(
            as_json=conn.as_json,
            doc={"adapter": record.model_dump(mode="json"), "job": job.model_dump(mode="json")},
            columns=columns(client_metrics, record),
            header=f"adapter {record.id}: {record.status}" + measurement_caption(client_metrics, record),
            failure=failure,
        )
        if failure:
            raise failure


@connection_options("api_key", "as_json", "progress")
def status(
    target: Annotated[str, typer.Argument(help="An adapter id or URL (SERVER/v1/adapters/ID), or a job id or URL.")],
    server: Annotated[
        str | None,
        typer.Option(
            "--server", help="Server base URL when TARGET is a bare id (env SCALEOT_SERVER_URL).", show_default=False
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job / evaluation finishes.")] = False,
    *,
    conn: Connection,
) -> None:
    """Show an adapter's evaluation (zero-shot / emulator / plug-in side by side) or a job's state."""
    with handled(conn.as_json):
        settings = conn.settings(server_url=server)
        kind, base, ident = None, settings.server_url, target
        for collection in ("adapters", "jobs"):
            if (found := split_resource_url(target, collection)) is not None:
                kind, (base, ident) = collection, found
        if not base:
            raise BadInputError(
                "TARGET is a bare id: pass --server URL (or set SCALEOT_SERVER_URL), or give the full URL"
            )
        if kind is None:  # the server's ids say what they are: adp_... adapters, job_... jobs
            kind = "adapters" if ident.startswith("adp_") else "jobs" if ident.startswith("job_") else None
        with server_client(base, settings) as client:
            record = _find_adapter(client, ident, base, sure=kind == "adapters") if kind != "jobs" else None
            if record is not None:
                failure = _adapter_status(client, settings, conn, record, wait)
            else:
                failure = _job_status(client, settings, conn, ident, base, wait, guessed=kind is None)
        if failure:
            raise failure


def _find_adapter(client: ServerClient, ident: str, base: str, *, sure: bool) -> schemas.Adapter | None:
    """Adapter `ident`, or None when there is none and the id may be a job's (`sure`: it must be an adapter)."""
    try:
        return client.adapter(ident)
    except ServerError as exc:
        if exc.status_code != 404:
            raise
        if sure:
            raise _not_found(exc, f"adapter {ident}", base) from None
        return None


def _adapter_status(
    client: ServerClient, settings: ClientSettings, conn: Connection, record: schemas.Adapter, wait: bool
) -> ClientError | None:
    job = None
    if wait and record.status == "evaluating" and record.job_id:
        job = wait_for_job(
            client,
            record.job_id,
            poll_s=settings.poll_interval_s,
            timeout_s=settings.wait_timeout_s,
            progress=conn.show_progress,
            desc="plug-in evaluation",
        )
        record = client.adapter(record.id)
    failure = evaluation_failure(job, record)
    report(
        as_json=conn.as_json,
        doc={"adapter": record.model_dump(mode="json")},
        columns=columns(None, record),
        header=f"adapter {record.id}: {record.status}" + measurement_caption(record.client_metrics, record),
        failure=failure,
    )
    return failure


def _job_status(
    client: ServerClient,
    settings: ClientSettings,
    conn: Connection,
    ident: str,
    base: str,
    wait: bool,
    *,
    guessed: bool,
) -> ClientError | None:
    try:
        job = client.job(ident)
    except ServerError as exc:
        if exc.status_code != 404:
            raise
        raise _not_found(exc, f"adapter or job {ident}" if guessed else f"job {ident}", base) from None
    if wait and not job.finished:
        job = wait_for_job(
            client,
            ident,
            poll_s=settings.poll_interval_s,
            timeout_s=settings.wait_timeout_s,
            progress=conn.show_progress,
        )
    failure: ClientError | None = None
    if job.status == "failed":
        failure = (
            evaluation_failure(job, None)
            if job.kind == "evaluation"
            else ServerError(f"job {job.id} ({job.kind}) failed: {job.error or 'no reason given'}")
        )
    if conn.as_json:
        doc: dict[str, Any] = {"job": job.model_dump(mode="json")}
        if failure is not None:
            doc.update(error_object(failure, failure.exit_code))
        emit_json(doc)
    else:
        typer.echo(f"job {job.id} ({job.kind}): {job.status} {job.progress:.0%} {job.message}".rstrip())
        if job.error:
            typer.echo(f"error: {job.error}")
    return failure


def _not_found(exc: ServerError, what: str, server: str) -> ServerError:
    return ServerError(
        f"{what} not found on {server} (or not visible to your organization: adapters and jobs "
        "are visible only with the API key of the organization that created them)",
        status_code=exc.status_code,
        code=exc.code or "not_found",
    )
