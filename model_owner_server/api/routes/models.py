from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from model_owner_server import crud, policy
from model_owner_server.api.deps import AdminDep, OrgDep, QueueDep, SessionDep, SettingsDep
from model_owner_server.api.errors import ApiError
from model_owner_server.api.serialize import job_out, model_out
from model_owner_server.models import ImportanceRun, RegisteredModel
from shared import schemas

router = APIRouter(prefix="/v1/models", tags=["models"])
ERR: dict[int | str, dict[str, Any]] = {s: {"model": schemas.ErrorBody} for s in (401, 403, 404, 409, 422)}


@router.post("", status_code=201, response_model=schemas.Model, responses=ERR)
def register_model(body: schemas.ModelCreate, session: SessionDep, admin: AdminDep) -> schemas.Model:
    """Register a server-side Hugging Face causal-LM folder (config.json + safetensors) as a base model."""
    try:
        model = crud.register_model(session, body.name, body.path, body.compute_dtype)
        crud.audit(
            session, admin, "register_model", "model", model.id, name=model.name, compute_dtype=model.compute_dtype
        )
        session.commit()
    except crud.Conflict:
        raise
    except IntegrityError:
        session.rollback()
        raise crud.Conflict(f"a model named {body.name!r} is already registered") from None
    except ValueError as exc:  # includes UnsupportedArchitectureError
        raise ApiError(422, "invalid_model", str(exc)) from None
    return _model_out(session, model)


def _model_out(session: Session, model: RegisteredModel) -> schemas.Model:
    """serialize.model_out with the model's compute dtype (until model_out sets it itself)."""
    return model_out(session, model)


@router.get("", response_model=schemas.ModelList, responses=ERR)
def list_models(session: SessionDep, org: OrgDep) -> schemas.ModelList:
    """Models your organization may use (admins: all)."""
    rows = session.execute(crud.visible_models(org)).scalars()
    return schemas.ModelList(models=[_model_out(session, m) for m in rows])


@router.get("/{model_id}", response_model=schemas.Model, responses=ERR)
def get_model(model_id: str, session: SessionDep, org: OrgDep) -> schemas.Model:
    return _model_out(session, crud.get_visible_model(session, org, model_id))


@router.get("/{model_id}/emulator-policy", response_model=schemas.EmulatorPolicyOut, responses=ERR)
def get_emulator_policy(
    model_id: str, session: SessionDep, org: OrgDep, settings: SettingsDep
) -> schemas.EmulatorPolicyOut:
    """The bounds on the emulators a data owner may get of this model (granted data owners may read them)."""
    model = crud.get_visible_model(session, org, model_id)
    current, source = policy.effective_policy(model, settings)
    return schemas.EmulatorPolicyOut(model_id=model.id, source=source, policy=current)


@router.put("/{model_id}/emulator-policy", response_model=schemas.EmulatorPolicyOut, responses=ERR)
def set_emulator_policy(
    model_id: str, body: schemas.EmulatorPolicyUpdate, session: SessionDep, admin: AdminDep, settings: SettingsDep
) -> schemas.EmulatorPolicyOut:
    """Change this model's policy (admins): the fields sent replace the current ones, the rest stay.
    It applies at once, to new requests and to every download, also of emulators built before."""
    model = crud.get_visible_model(session, admin, model_id)
    new = policy.updated_policy(policy.effective_policy(model, settings)[0], body)
    model.emulator_policy = new.model_dump()
    crud.audit(session, admin, "set_emulator_policy", "model", model.id, **new.model_dump())
    session.commit()
    return schemas.EmulatorPolicyOut(model_id=model.id, source="model", policy=new)


@router.delete("/{model_id}/emulator-policy", response_model=schemas.EmulatorPolicyOut, responses=ERR)
def reset_emulator_policy(
    model_id: str, session: SessionDep, admin: AdminDep, settings: SettingsDep
) -> schemas.EmulatorPolicyOut:
    """Drop this model's own policy (admins): the server default (SCALEOT_EMULATOR_POLICY) applies again."""
    model = crud.get_visible_model(session, admin, model_id)
    model.emulator_policy = None
    crud.audit(session, admin, "reset_emulator_policy", "model", model.id)
    session.commit()
    return schemas.EmulatorPolicyOut(model_id=model.id, source="server default", policy=settings.emulator_policy)


@router.post("/{model_id}/grants", status_code=201, response_model=schemas.Grant, responses=ERR)
def grant_model(model_id: str, body: schemas.GrantCreate, session: SessionDep, admin: AdminDep) -> schemas.Grant:
    """Let a data-owner organization (name or id) request emulators of this model. Idempotent."""
    model = crud.get_visible_model(session, admin, model_id)
    org = crud.find_org(session, body.org)
    grant = crud.grant(session, model, org)
    crud.audit(session, admin, "grant", "model", model.id, org_id=org.id)
    session.commit()
    return schemas.Grant(model_id=model.id, org_id=org.id, org_name=org.name, created_at=grant.created_at)


@router.delete("/{model_id}/grants/{org}", status_code=204, responses=ERR)
def revoke_grant(model_id: str, org: str, session: SessionDep, admin: AdminDep) -> Response:
    """Take the model away from an organization (name or id) at once: its emulators, uploads and adapters of
    this model answer 404 from the next request on, in the API and the console. Granting again restores them."""
    model = crud.get_visible_model(session, admin, model_id)
    target = crud.find_org(session, org)
    crud.revoke_grant(session, model, target)
    crud.audit(session, admin, "revoke_grant", "model", model.id, org_id=target.id)
    session.commit()
    return Response(status_code=204)


def server_text_file(path: Path) -> Path:
    """A corpus named in a request: an existing .txt/.jsonl file on the server, else 422 no_corpus."""
    if not crud.is_file(path):
        raise ApiError(422, "no_corpus", f"corpus file {str(path)[:300]!r} does not exist on the server")
    if path.suffix.lower() not in (".txt", ".jsonl", ".json"):
        raise ApiError(422, "no_corpus", f"corpus must be a .txt or .jsonl file, not {path.suffix or 'no suffix'}")
    return path


@router.post("/{model_id}/importance", status_code=202, response_model=schemas.Job, responses=ERR)
def start_importance(
    model_id: str,
    body: schemas.ImportanceRequest,
    session: SessionDep,
    admin: AdminDep,
    settings: SettingsDep,
    queue: QueueDep,
) -> schemas.Job:
    """Start stage 1 (Dynamic LayerReplace importance estimation) as a job; poll GET /v1/jobs/{id}."""
    model = crud.get_visible_model(session, admin, model_id)
    corpus = crud.expand_user(body.corpus) if body.corpus else settings.default_corpus
    if corpus is None:
        raise ApiError(
            422,
            "no_corpus",
            "give a server-side corpus file in 'corpus' or configure SCALEOT_DEFAULT_CORPUS on the server",
        )
    corpus = server_text_file(corpus)
    job = crud.create_job(
        session,
        "importance",
        admin,
        {
            "model_id": model.id,
            "steps": body.steps,
            "corpus": str(corpus.resolve()),
            "warmup_steps": body.warmup_steps,
            "rl_interval": body.rl_interval,
            "distill_weight": body.distill_weight,
            "hidden_weight": body.hidden_weight,
            "seed": body.seed,
        },
    )
    run = ImportanceRun(model_id=model.id, job_id=job.id, status="pending", steps=body.steps, corpus=str(corpus))
    session.add(run)
    session.flush()
    job.params = {**job.params, "run_id": run.id}
    session.commit()
    queue.enqueue(job.id)
    session.refresh(job)
    return job_out(job)
