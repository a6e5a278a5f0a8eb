"""Console pages: models and grants (admin: register, grant, start stage 1), importance runs."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from model_owner_server import crud
from model_owner_server.api.deps import QueueDep, SessionDep, SettingsDep, require_admin
from model_owner_server.api.routes import models as api_models
from model_owner_server.models import Organization, RegisteredModel
from shared import schemas

from .auth import ConsoleAuth, ConsoleDep, FormDep
from .charts import bar_chart, line_chart
from .views import ACTION_ERRORS, ConsoleRoute, action_error, page, validate

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)
IMPORTANCE_FIELDS = ("steps", "corpus", "warmup_steps", "rl_interval", "seed")


def redirect(path: str, notice: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?notice={quote(notice)}", status_code=303)


def _models_page(
    request: Request,
    session: SessionDep,
    auth: ConsoleAuth,
    *,
    form: str = "",
    errors: dict[str, str] | None = None,
    values: dict[str, str] | None = None,
    status: int = 200,
) -> HTMLResponse:
    models = api_models.list_models(session, auth.org).models
    grants = session.execute(crud.visible_grants(auth.org)).all()
    names = {m.id: m.name for m in models}
    data_owners = (
        list(
            session.execute(
                select(Organization.name).where(Organization.role == "data-owner").order_by(Organization.name)
            ).scalars()
        )
        if auth.org.is_admin
        else []
    )
    return page(
        request,
        auth,
        "models.html",
        status,
        models=models,
        names=names,
        data_owners=data_owners,
        grants=[
            {"model": names.get(g.model_id, g.model_id), "org": o.name, "created_at": g.created_at} for g, o in grants
        ],
        form=form,
        errors=errors or {},
        values=values or {},
        notice=request.query_params.get("notice"),
    )


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    return _models_page(request, session, auth)


@router.post("/models", response_class=HTMLResponse)
def register_model(request: Request, session: SessionDep, auth: ConsoleDep, form: FormDep) -> Response:
    admin = require_admin(auth.org)
    body, errors = validate(schemas.ModelCreate, form, ("name", "path"))
    if body is not None:
        try:
            model = api_models.register_model(body, session, admin)
            return redirect("/console/models", f"Registered {model.name} ({model.n_layers} layers).")
        except ACTION_ERRORS as exc:
            errors = {"form": action_error(exc)}
    return _models_page(request, session, auth, form="register", errors=errors, values=form, status=422)


@router.post("/models/{model_id}/grants", response_class=HTMLResponse)
def grant(model_id: str, request: Request, session: SessionDep, auth: ConsoleDep, form: FormDep) -> Response:
    admin = require_admin(auth.org)
    body, errors = validate(schemas.GrantCreate, form, ("org",))
    if body is not None:
        try:
            g = api_models.grant_model(model_id, body, session, admin)
            return redirect("/console/models", f"Granted the model to {g.org_name}.")
        except ACTION_ERRORS as exc:
            errors = {"form": action_error(exc)}
    return _models_page(request, session, auth, form=f"grant-{model_id}", errors=errors, values=form, status=422)


@router.post("/models/{model_id}/importance", response_class=HTMLResponse)
def start_importance(
    model_id: str,
    request: Request,
    session: SessionDep,
    auth: ConsoleDep,
    form: FormDep,
    settings: SettingsDep,
    queue: QueueDep,
) -> Response:
    admin = require_admin(auth.org)
    body, errors = validate(schemas.ImportanceRequest, form, IMPORTANCE_FIELDS)
    if body is not None:
        try:
            job = api_models.start_importance(model_id, body, session, admin, settings, queue)
            return redirect("/console/jobs", f"Stage 1 started as job {job.id}.")
        except ACTION_ERRORS as exc:
            errors = {"form": action_error(exc)}
    return _models_page(request, session, auth, form=f"importance-{model_id}", errors=errors, values=form, status=422)


@router.get("/importance", response_class=HTMLResponse)
def importance_list(request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    runs = list(session.execute(crud.visible_importance_runs(auth.org)).scalars())
    names = dict(session.execute(select(RegisteredModel.id, RegisteredModel.name)).all()) if runs else {}
    return page(request, auth, "importance_list.html", runs=runs, names=names)


def _history(job_result: dict[str, Any]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    history = job_result.get("history") or []
    loss = [(h["step"], h["loss"]) for h in history if h.get("phase") == "dl" and h.get("loss") is not None]
    reward = [(h["step"], h["reward_mean"]) for h in history if h.get("reward_mean") is not None]
    return loss, reward


@router.get("/importance/{run_id}", response_class=HTMLResponse)
def importance_page(run_id: str, request: Request, session: SessionDep, auth: ConsoleDep) -> HTMLResponse:
    run, job = crud.get_visible_importance_run(session, auth.org, run_id)
    model = session.get(RegisteredModel, run.model_id)
    scores = run.scores or (job.metrics or {}).get("scores") or []
    labels = [f"L{i}" for i in range(len(scores))]
    loss, reward = _history(job.result or {})
    settings = {k: v for k, v in (job.params or {}).items() if k not in ("run_id", "model_id")}
    ranking = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return page(
        request,
        auth,
        "importance.html",
        run=run,
        job=job,
        model=model,
        scores=scores,
        ranking=ranking,
        score_chart=bar_chart(labels, scores, "Importance score per layer (higher: keep)"),
        loss_chart=line_chart(loss, "Harmonizer training loss per DL step", "loss"),
        reward_chart=line_chart(reward, "Mean reward per RL step", "reward"),
        settings=settings,
        result=job.result or {},
    )
