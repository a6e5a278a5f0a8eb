"""ORM rows -> wire schemas (shared/schemas.py). URLs are absolute, built from the public base URL."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from model_owner_server import crud
from model_owner_server.core.config import Settings
from model_owner_server.models import AdapterRow, EmulatorRow, ImportanceRun, JobRow, RegisteredModel
from shared import schemas


def base_url(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


def job_out(job: JobRow) -> schemas.Job:
    return schemas.Job(
        id=job.id,
        kind=job.kind,
        status=job.status,
        progress=job.progress,
        message=job.message or "",
        metrics=job.metrics or {},
        result=job.result or {},
        error=job.error,
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
        status=emu.status,
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


def adapter_out(session: Session, adapter: AdapterRow) -> schemas.Adapter:
    evals = crud.evaluations_for(session, adapter.id)
    source = next((e.eval_source for e in evals.values()), None)
    evaluation = schemas.AdapterEvaluation(
        zero_shot=evals["zero_shot"].metrics if "zero_shot" in evals else None,
        plug_in=evals["plug_in"].metrics if "plug_in" in evals else None,
        eval_source=source,
    )
    return schemas.Adapter(
        id=adapter.id,
        emulator_id=adapter.emulator_id,
        model_id=adapter.model_id,
        status=adapter.status,
        sha256=adapter.sha256,
        size_bytes=adapter.size_bytes,
        method=adapter.method,
        adapter_config=adapter.adapter_config,
        client_metrics=adapter.client_metrics,
        evaluation=evaluation,
        job_id=adapter.job_id,
        error=adapter.error,
        created_at=adapter.created_at,
    )
