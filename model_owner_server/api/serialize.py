"""ORM rows -> wire schemas (shared/schemas.py). URLs are absolute, built from the public base URL.

`viewer` is the organization asking: a failed job's full error text (exception, server paths; kept in its
result under ERROR_DETAIL by jobs/context.fail_job) goes to admins only; others see the job's generic error.
"""

from __future__ import annotations

from typing import cast

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from model_owner_server import crud
from model_owner_server.api.json_bounds import readable
from model_owner_server.core.config import Settings
from model_owner_server.jobs.context import ERROR_DETAIL
from model_owner_server.models import AdapterRow, EmulatorRow, ImportanceRun, JobRow, Organization, RegisteredModel
from shared import schemas


def base_url(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


def _is_admin(viewer: Organization | None) -> bool:
    return viewer is not None and viewer.is_admin


def error_detail(job: JobRow | None) -> str | None:
    """The full text of a job's failure (admins only), when it differs from the error everyone sees."""
    detail = (job.result or {}).get(ERROR_DETAIL) if job is not None else None
    return detail if isinstance(detail, str) else None


def job_out(job: JobRow, viewer: Organization | None = None) -> schemas.Job:
    result = {k: v for k, v in (job.result or {}).items() if k != ERROR_DETAIL}
    detail = error_detail(job) if _is_admin(viewer) else None
    return schemas.Job(
        id=job.id,
        kind=job.kind,
        status=cast(schemas.JobStatus, job.status),  # the column holds one of these (str in the ORM)
        progress=job.progress,
        message=job.message or "",
        metrics=job.metrics or {},
        result=result,
        error=detail or job.error,
        cancel_requested=job.cancel_requested_at is not None,
        created_at=job.created_at,
        updated_at=job.updated_at,
    )


def model_out(session: Session, model: RegisteredModel) -> schemas.Model:
    ready = crud.latest_importance_run(session, model.id) is not None
    latest = session.execute(
        select(ImportanceRun)
        .where(ImportanceRun.model_id == model.id)
        .order_by(ImportanceRun.created_at.desc())
        .limit(1)
    ).scalar_one_or_none()
    return schemas.Model(
        id=model.id,
        name=model.name,
        family=model.family,
        n_layers=model.n_layers,
        n_params=model.n_params,
        compute_dtype=cast(schemas.ComputeDType, model.compute_dtype),  # validated at registration
        importance_ready=ready,
        importance_job_id=latest.job_id if latest else None,
        created_at=model.created_at,
    )


def emulator_out(emu: EmulatorRow, base: str) -> schemas.Emulator:
    return schemas.Emulator(
        id=emu.id,
        model_id=emu.model_id,
        n_adapter=emu.n_adapter,
        alpha=emu.alpha,
        beta=emu.beta,
        status=cast(schemas.EmulatorStatus, emu.status),
        job_id=emu.job_id,
        sha256=emu.sha256,
        size_bytes=emu.size_bytes,
        n_params=emu.n_params,
        full_model_params=emu.full_model_params,
        full_model_bytes=emu.full_model_bytes,
        plan=emu.plan,
        adapter_layers=emu.adapter_layers or [],
        adapter_spec=emu.adapter_spec or {},
        max_adapter_bytes=emu.max_adapter_bytes,
        fidelity=emu.fidelity,
        build_info=emu.build_info,
        privacy=emu.privacy,
        file_url=f"{base}/v1/emulators/{emu.id}/file",
        signature_url=f"{base}/v1/emulators/{emu.id}/signature",
        error=emu.error,
        created_at=emu.created_at,
    )


def adapter_out(session: Session, adapter: AdapterRow, viewer: Organization | None = None) -> schemas.Adapter:
    evals = crud.evaluations_for(session, adapter.id)
    bench = evals.pop("benchmarks", None)  # lm-eval tasks (jobs/tasks/benchmark_eval.py): not a column
    source = next((e.eval_source for e in evals.values()), None)
    columns = {k: dict(evals[k].metrics or {}) if k in evals else None for k in ("zero_shot", "plug_in")}
    settings = [m.pop("settings", None) for m in columns.values() if m is not None]  # stored with each column
    evaluation = schemas.AdapterEvaluation(
        zero_shot=columns["zero_shot"],
        plug_in=columns["plug_in"],
        eval_source=source,
        settings=readable(next((x for x in settings if x), None)),
        benchmarks=readable(bench.metrics) if bench is not None else None,
    )
    return schemas.Adapter(
        id=adapter.id,
        emulator_id=adapter.emulator_id,
        model_id=adapter.model_id,
        status=cast(schemas.AdapterStatus, adapter.status),
        sha256=adapter.sha256,
        size_bytes=adapter.size_bytes,
        method=adapter.method,
        # The client's own JSON, as far as it can be rendered (rows stored before the upload bounds).
        adapter_config=readable(adapter.adapter_config),
        client_metrics=readable(adapter.client_metrics),
        evaluation=evaluation,
        job_id=adapter.job_id,
        error=_adapter_error(session, adapter, viewer),
        created_at=adapter.created_at,
    )


def _adapter_error(session: Session, adapter: AdapterRow, viewer: Organization | None) -> str | None:
    if adapter.error and adapter.job_id and _is_admin(viewer):
        return error_detail(session.get(JobRow, adapter.job_id)) or adapter.error
    return adapter.error
