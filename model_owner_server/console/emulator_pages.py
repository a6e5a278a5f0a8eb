"""Console pages: emulators (build form, plan strip, fidelity, privacy, downloads) and adapters
(evaluation side by side, a chart, and a form to try the plugged-in model)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from model_owner_server import crud
from model_owner_server.api.deps import QueueDep, SessionDep, SettingsDep, StorageDep
from model_owner_server.api.errors import ApiError
from model_owner_server.api.routes import adapters as api_adapters
from model_owner_server.api.routes import emulators as api_emulators
from model_owner_server.api.routes import models as api_models
from model_owner_server.api.serialize import base_url
from model_owner_server.jobs.tasks.benchmark_eval import table_rows
from model_owner_server.models import AuditEvent, RegisteredModel
from shared import schemas
from shared.eval_settings import counted, measurements

from .auth import ConsoleAuth, ConsoleDep, FormDep
from .charts import bar_chart, plan_cells
from .models_pages import redirect
from .views import ACTION_ERRORS, ConsoleRoute, action_error, page, validate

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)
EMULATOR_FIELDS = ("model_id", "n_adapter", "alpha", "beta")
# The four columns of an adapter's evaluation, in the paper's order (client-side ones come from the upload).
COLUMNS = (
    ("full model zero-shot", "zero_shot"),
    ("emulator zero-shot", "emulator_zero_shot"),
    ("emulator + adapter", "emulator_fine_tuned"),
    ("plug-in M' = [A', E]", "plug_in"),
)


def _emulators_page(
    request: Request,
    session: SessionDep,
    auth: ConsoleAuth,
    settings: SettingsDep,
    *,
    errors: dict[str, str] | None = None,
    values: dict[str, str] | None = None,
    status: int = 200,
) -> HTMLResponse:
    emulators = api_emulators.list_emulators(request, session, auth.org, settings).emulators
    models = api_models.list_models(session, auth.org).models
    return page(
        request,
        auth,
        "emulators.html",
        status,
        emulators=emulators,
        models=models,
        names={m.id: m.name for m in models},
        errors=errors or {},
        values=values or {},
        notice=request.query_params.get("notice"),
    )


@router.get("/emulators", response_class=HTMLResponse)
def emulators_page(request: Request, session: SessionDep, auth: ConsoleDep, settings: SettingsDep) -> HTMLResponse:
    return _emulators_page(request, session, auth, settings)


@router.post("/emulators", response_class=HTMLResponse)
def build_emulator(
    request: Request, session: SessionDep, auth: ConsoleDep, form: FormDep, settings: SettingsDep, queue: QueueDep
) -> Response:
    body, errors = validate(schemas.EmulatorCreate, form, EMULATOR_FIELDS)
    if body is not None:
        try:  # the API's own handler: same checks, idempotency, audit entry and job
            created = api_emulators.create_emulator(body, request, Response(), session, auth.org, settings, queue)
            emu = created.emulator
            note = (
                "ready" if emu.status == "ready" else f"building (job {created.job.id})" if created.job else emu.status
            )
            return redirect(f"/console/emulators/{emu.id}", f"Emulator {emu.id}: {note}.")
        except ACTION_ERRORS as exc:
            errors = {"form": action_error(exc)}
    return _emulators_page(request, session, auth, settings, errors=errors, values=form, status=422)


def _downloads(session: SessionDep, auth: ConsoleAuth, emulator_id: str) -> int:
    """Completed-from-the-start downloads (resumed ranges are the same download); admins count everyone's."""
    q = select(AuditEvent.detail).where(AuditEvent.action == "download_emulator", AuditEvent.target_id == emulator_id)
    if not auth.org.is_admin:
        q = q.where(AuditEvent.org_id == auth.org.id)
    return sum(1 for d in session.execute(q).scalars() if not (d or {}).get("start"))


@router.get("/emulators/{emulator_id}", response_class=HTMLResponse)
def emulator_page(
    emulator_id: str, request: Request, session: SessionDep, auth: ConsoleDep, settings: SettingsDep
) -> HTMLResponse:
    row = crud.get_visible_emulator(session, auth.org, emulator_id)
    emu = api_emulators.get_emulator(emulator_id, request, session, auth.org, settings)
    model = session.get(RegisteredModel, emu.model_id)
    url = f"{base_url(request, settings)}/v1/emulators/{emu.id}"
    cells = plan_cells(emu.plan)
    counts = {k: sum(1 for c in cells if c["kind"] == k) for k in ("adapter", "harmonizer", "src", "frozen", "dropped")}
    return page(
        request,
        auth,
        "emulator.html",
        emu=emu,
        model=model,
        cells=cells,
        counts=counts,
        privacy=row.privacy,
        downloads=_downloads(session, auth, emu.id),
        url=url,
        commands=[
            f"dataowner-client tune --emulator-url {url} --data train.jsonl --eval-data eval.jsonl",
            f"dataowner-client download --emulator-url {url}",
        ],
        notice=request.query_params.get("notice"),
    )


@router.get("/adapters", response_class=HTMLResponse)
def adapters_page(request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    adapters = api_adapters.list_adapters(session, auth.org).adapters
    return page(request, auth, "adapters.html", adapters=adapters)


def _columns(adapter: schemas.Adapter) -> list[tuple[str, dict[str, Any] | None]]:
    sources = {
        "zero_shot": adapter.evaluation.zero_shot,
        "plug_in": adapter.evaluation.plug_in,
        **{k: (adapter.client_metrics or {}).get(k) for k in ("emulator_zero_shot", "emulator_fine_tuned")},
    }
    return [(title, sources[key] if isinstance(sources[key], dict) else None) for title, key in COLUMNS]


def _adapter_page(
    request: Request,
    session: SessionDep,
    auth: ConsoleAuth,
    adapter_id: str,
    *,
    errors: dict[str, str] | None = None,
    values: dict[str, str] | None = None,
    generated: schemas.GenerateResponse | None = None,
    status: int = 200,
) -> HTMLResponse:
    adapter = api_adapters.get_adapter(adapter_id, session, auth.org)
    columns = _columns(adapter)
    metrics = sorted({k for _, m in columns if m for k, v in m.items() if isinstance(v, (int, float))})
    # One measurement per table: columns that counted different tokens go in separate tables, and get no chart.
    groups = measurements(dict(columns))
    tables = [[(t, m) for t, m in columns if t in g] for g in groups] if len(groups) > 1 else [columns]
    chart_metric = next((m for m in ("perplexity", "accuracy", "loss") if m in metrics), None)
    present = [(t, m[chart_metric]) for t, m in columns if m and chart_metric in m] if chart_metric else []
    present = present if len(groups) <= 1 else []
    chart = (
        bar_chart(
            [t for t, _ in present],
            [v for _, v in present],
            f"{chart_metric} by model",
            classes=[f"col{i}" for i in range(len(present))],
        )
        if present
        else ""
    )
    return page(
        request,
        auth,
        "adapter.html",
        status,
        adapter=adapter,
        columns=columns,
        tables=tables,
        counts={t: counted(m) for t, m in columns if m},
        benchmark_rows=table_rows(adapter.evaluation.benchmarks or {}),
        metrics=metrics,
        chart=chart,
        chart_metric=chart_metric,
        errors=errors or {},
        values=values or {},
        generated=generated,
    )


@router.get("/adapters/{adapter_id}", response_class=HTMLResponse)
def adapter_page(adapter_id: str, request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    return _adapter_page(request, session, auth, adapter_id)


@router.post("/adapters/{adapter_id}/generate", response_class=HTMLResponse)
async def generate(
    adapter_id: str,
    request: Request,
    session: SessionDep,
    auth: ConsoleDep,
    form: FormDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> HTMLResponse:
    """The API's /generate (the same bounded engine, the same checks); a refusal is shown on the page with the
    API's status: 409 for an adapter not evaluated, 429 with Retry-After when the server is busy."""
    body, errors = validate(schemas.GenerateRequest, form, ("prompt", "max_new_tokens"))
    generated, status, headers = None, 422, None
    if body is not None:
        try:
            generated = await api_adapters.generate(adapter_id, body, request, session, auth.org, settings, storage)
        except ACTION_ERRORS as exc:
            errors = {"form": action_error(exc)}
            if isinstance(exc, ApiError):
                status, headers = exc.status, exc.headers
    page_ = await run_in_threadpool(
        _adapter_page,
        request,
        session,
        auth,
        adapter_id,
        errors=errors,
        values=form,
        generated=generated,
        status=200 if generated else status,
    )
    page_.headers.update(headers or {})
    return page_
