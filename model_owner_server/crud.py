"""Database operations shared by the API routes, the CLI commands and the job tasks.

Visibility rules live here, in one place:
- admins see everything;
- a data owner sees models it is granted (and their emulators), and only its own adapters and jobs.
Objects a caller may not see are reported exactly like missing ones (the routes answer 404), so
ids of other organizations' objects reveal nothing.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from model_owner_server.core.security import MAX_KEY_DAYS, ROLES, issue_api_key, issue_api_key_row, key_state
from model_owner_server.models import (
    AdapterRow,
    ApiKey,
    EmulatorRow,
    Evaluation,
    GrantRow,
    ImportanceRun,
    JobRow,
    Organization,
    RegisteredModel,
    utcnow,
)
from shared.schemas import ComputeDType


class NotFound(LookupError):
    pass


class Conflict(ValueError):
    pass


# ---------------------------------------------------------------- organizations


def create_org(
    session: Session, name: str, role: str, *, expires_in_days: int | None = None
) -> tuple[Organization, str]:
    """Create an organization and its first API key (returned in plaintext, once; expiring after
    `expires_in_days`, normally SCALEOT_API_KEY_TTL_DAYS)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    name = name.strip()
    if not name:
        raise ValueError("organization name must not be empty")
    if session.execute(select(Organization).where(Organization.name == name)).scalar_one_or_none():
        raise Conflict(f"organization {name!r} already exists")
    org = Organization(name=name, role=role)
    session.add(org)
    session.flush()
    return org, issue_api_key(session, org, name="first key", expires_in_days=expires_in_days)


def find_org(session: Session, name_or_id: str) -> Organization:
    org = (
        session.get(Organization, name_or_id)
        or session.execute(select(Organization).where(Organization.name == name_or_id)).scalar_one_or_none()
    )
    if org is None:
        raise NotFound(f"organization {name_or_id!r} not found; create it with `modelowner-server create-org`")
    return org


# ---------------------------------------------------------------- models and grants


def inspect_model_folder(path: str | Path) -> dict[str, Any]:
    """Check that `path` is a loadable local HF causal-LM folder of a supported family; return its facts.

    Cheap: reads config.json and the safetensors headers, never the weights.
    """
    from transformers import AutoConfig

    from model_owner_server.scaleot.model_io import check_model_folder
    from shared.architectures import family_for

    folder = expand_user(path)
    if not is_dir(folder):
        raise ValueError(f"model folder {str(folder)[:300]!r} does not exist on the server (give a server-side path)")
    shards = check_model_folder(folder)  # config.json, weights (one file or the index's shards), tokenizer
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {folder}/config.json: {exc}") from None
    family = family_for(config)  # raises UnsupportedArchitectureError (a ValueError-like message)
    n_params = n_bytes = 0
    for shard in shards:
        header = _safetensors_header(shard)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            n_params += numel
            start, end = info["data_offsets"]
            n_bytes += int(end) - int(start)
    n_layers = getattr(config, "num_hidden_layers", None)
    return {
        "path": str(folder.resolve()),
        "family": getattr(family, "name", str(family)),
        "n_layers": n_layers,
        "n_params": n_params,
        "n_bytes": n_bytes,
    }


def expand_user(path: str | Path) -> Path:
    """`~/x` expanded; an unknown `~user` (which makes pathlib raise RuntimeError) stays as written."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def is_file(path: Path) -> bool:
    """Path.is_file() that answers False instead of raising for names the OS refuses (too long, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size <= 0 or size > 100 * 1024 * 1024:
            raise ValueError(f"{path} is not a safetensors file")
        return json.loads(f.read(size))


COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDType)


def register_model(session: Session, name: str, path: str | Path, compute_dtype: str = "auto") -> RegisteredModel:
    """Register the HF folder `path` as `name`, computed in `compute_dtype` by every job (auto: the checkpoint's
    own dtype on a GPU, float32 on CPU)."""
    name = name.strip()
    if not name:
        raise ValueError("model name must not be empty")
    compute_dtype = (compute_dtype or "auto").strip().lower()
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if session.execute(select(RegisteredModel).where(RegisteredModel.name == name)).scalar_one_or_none():
        raise Conflict(f"a model named {name!r} is already registered; pick another name")
    facts = inspect_model_folder(path)
    model = RegisteredModel(name=name, compute_dtype=compute_dtype, **facts)
    session.add(model)
    session.flush()
    return model


def find_model(session: Session, name_or_id: str) -> RegisteredModel:
    model = (
        session.get(RegisteredModel, name_or_id)
        or session.execute(select(RegisteredModel).where(RegisteredModel.name == name_or_id)).scalar_one_or_none()
    )
    if model is None:
        raise NotFound(f"model {name_or_id!r} not found; register it with `modelowner-server register-model`")
    return model


def grant(session: Session, model: RegisteredModel, org: Organization) -> GrantRow:
    existing = session.execute(
        select(GrantRow).where(GrantRow.model_id == model.id, GrantRow.org_id == org.id)
    ).scalar_one_or_none()
    if existing:
        return existing
    g = GrantRow(model_id=model.id, org_id=org.id)
    session.add(g)
    session.flush()
    return g


def is_granted(session: Session, org: Organization, model_id: str) -> bool:
    if org.is_admin:
        return True
    return (
        session.execute(select(GrantRow.id).where(GrantRow.model_id == model_id, GrantRow.org_id == org.id)).first()
        is not None
    )


def visible_models(org: Organization) -> Select[RegisteredModel]:
    q = select(RegisteredModel).order_by(RegisteredModel.created_at)
    if not org.is_admin:
        q = q.join(GrantRow, GrantRow.model_id == RegisteredModel.id).where(GrantRow.org_id == org.id)
    return q


def get_visible_model(session: Session, org: Organization, model_id: str) -> RegisteredModel:
    model = session.get(RegisteredModel, model_id)
    if model is None or not is_granted(session, org, model_id):
        raise NotFound(f"model {model_id!r} not found (or not granted to your organization)")
    return model


def latest_importance_run(session: Session, model_id: str, status: str | None = "succeeded") -> ImportanceRun | None:
    q = select(ImportanceRun).where(ImportanceRun.model_id == model_id)
    if status:
        q = q.where(ImportanceRun.status == status)
    return session.execute(q.order_by(ImportanceRun.created_at.desc()).limit(1)).scalar_one_or_none()


# ---------------------------------------------------------------- jobs


def create_job(
    session: Session, kind: str, org: Organization, params: dict[str, Any], message: str = "queued"
) -> JobRow:
    job = JobRow(
        kind=kind, org_id=org.id, params=params, message=message, status="queued", progress=0.0, metrics={}, result={}
    )
    session.add(job)
    session.flush()
    return job


def get_visible_job(session: Session, org: Organization, job_id: str) -> JobRow:
    job = session.get(JobRow, job_id)
    if job is None or not (org.is_admin or job.org_id == org.id):
        raise NotFound(f"job {job_id!r} not found")
    return job


def visible_jobs(org: Organization) -> Select[JobRow]:
    q = select(JobRow).order_by(JobRow.created_at.desc())
    return q if org.is_admin else q.where(JobRow.org_id == org.id)


# ---------------------------------------------------------------- emulators and adapters


def get_visible_emulator(session: Session, org: Organization, emulator_id: str) -> EmulatorRow:
    emu = session.get(EmulatorRow, emulator_id)
    if emu is None or not is_granted(session, org, emu.model_id):
        raise NotFound(f"emulator {emulator_id!r} not found (or its model is not granted to your organization)")
    return emu


def visible_emulators(org: Organization) -> Select[EmulatorRow]:
    q = select(EmulatorRow).order_by(EmulatorRow.created_at.desc())
    if not org.is_admin:
        q = q.join(GrantRow, GrantRow.model_id == EmulatorRow.model_id).where(GrantRow.org_id == org.id)
    return q


def get_visible_adapter(session: Session, org: Organization, adapter_id: str) -> AdapterRow:
    """A data owner's own adapter, while its model is granted to it: a revoked grant ends generation with
    (and the listing of) its adapters of that model; granting the model again brings them back."""
    adapter = session.get(AdapterRow, adapter_id)
    if adapter is None or not (
        org.is_admin or (adapter.org_id == org.id and is_granted(session, org, adapter.model_id))
    ):
        raise NotFound(f"adapter {adapter_id!r} not found")
    return adapter


def visible_adapters(org: Organization) -> Select[AdapterRow]:
    q = select(AdapterRow).order_by(AdapterRow.created_at.desc())
    if org.is_admin:
        return q
    granted = select(GrantRow.model_id).where(GrantRow.org_id == org.id)
    return q.where(AdapterRow.org_id == org.id, AdapterRow.model_id.in_(granted))


def evaluations_for(session: Session, adapter_id: str) -> dict[str, Evaluation]:
    rows = session.execute(select(Evaluation).where(Evaluation.adapter_id == adapter_id)).scalars()
    return {e.kind: e for e in rows}


# ---------------------------------------------------------------- audit


def audit(
    session: Session, org: Organization | None, action: str, target_type: str, target_id: str, **detail: Any
) -> None:
    """Record an event; it joins the hash-chained audit log when `session` commits (audit_log.py)."""
    from model_owner_server.audit_log import queue_event

    queue_event(session, org.id if org else None, action, target_type, target_id, detail)


def row_counts(session: Session) -> dict[str, int]:
    """Rows per table (tests compare these before/after a rejected request)."""
    from model_owner_server.models import Base

    return {
        t.name: session.execute(select(func.count()).select_from(t)).scalar_one() for t in Base.metadata.sorted_tables
    }


# ---------------------------------------------------------------- API keys, grant revocation, org deletion

MAX_ACTIVE_KEYS = 20  # per organization: enough for rotation and a few machines, not a key per request


class LastKey(Conflict):
    """Revoking this key would leave its organization without an active key (locked out)."""


def list_keys(session: Session, org: Organization) -> list[ApiKey]:
    return list(session.execute(select(ApiKey).where(ApiKey.org_id == org.id).order_by(ApiKey.created_at)).scalars())


def active_keys(session: Session, org: Organization) -> list[ApiKey]:
    now = utcnow()
    return [k for k in list_keys(session, org) if key_state(k, now) == "active"]


def key_lifetime(expires_in_days: int | None, ttl_days: int | None) -> int | None:
    """Days a new key lives: as asked, else SCALEOT_API_KEY_TTL_DAYS (None: no expiry); never past the TTL."""
    if expires_in_days is None:
        return ttl_days
    if not 1 <= expires_in_days <= MAX_KEY_DAYS:
        raise ValueError(f"expires_in_days must be between 1 and {MAX_KEY_DAYS}, not {expires_in_days}")
    if ttl_days is not None and expires_in_days > ttl_days:
        raise ValueError(
            f"expires_in_days may be at most {ttl_days} on this server (SCALEOT_API_KEY_TTL_DAYS), not {expires_in_days}"
        )
    return expires_in_days


def create_key(
    session: Session, org: Organization, *, name: str | None, expires_in_days: int | None, ttl_days: int | None
) -> tuple[ApiKey, str]:
    """An additional key for `org` (plaintext returned once); at most MAX_ACTIVE_KEYS active at a time."""
    days = key_lifetime(expires_in_days, ttl_days)
    if len(active_keys(session, org)) >= MAX_ACTIVE_KEYS:
        raise Conflict(
            f"organization {org.name!r} already has {MAX_ACTIVE_KEYS} active keys; revoke one it no longer uses first"
        )
    return issue_api_key_row(session, org, name=(name or "").strip() or None, expires_in_days=days)


def get_key(session: Session, org: Organization, key_id: str) -> ApiKey:
    """`org`'s key `key_id` (another organization's key is reported as missing)."""
    key = session.get(ApiKey, key_id)
    if key is None or key.org_id != org.id:
        raise NotFound(
            f"API key {key_id!r} not found in organization {org.name!r}; list them with GET /v1/orgs/{org.name}/keys"
        )
    return key


def revoke_key(session: Session, key: ApiKey, *, allow_last: bool) -> None:
    """Revoke at once. Refused (LastKey) when it is its organization's last active key, unless `allow_last`."""
    if key.revoked_at is not None:
        raise Conflict(f"API key {key.id} was already revoked at {key.revoked_at:%Y-%m-%d %H:%M} UTC")
    org = session.get(Organization, key.org_id)
    others = [k for k in active_keys(session, org) if k.id != key.id] if org else []
    if not others and key_state(key) == "active" and not allow_last:
        raise LastKey(
            f"API key {key.id} is the last active key of organization {org.name if org else key.org_id!r}: revoking "
            "it locks the organization out. Create another key first (or rotate this one), or confirm that you "
            "mean it (API: ?confirm_last_key=true; CLI: --force)"
        )
    key.revoked_at = utcnow()


def rotate_key(
    session: Session,
    key: ApiKey,
    *,
    grace_minutes: int,
    name: str | None,
    expires_in_days: int | None,
    ttl_days: int | None,
) -> tuple[ApiKey, str]:
    """A new key replaces `key`: the old one is revoked now, or (grace_minutes > 0) expires after the grace
    period, so clients can switch over without an outage."""
    if key_state(key) != "active":
        raise Conflict(f"API key {key.id} is {key_state(key)}; create a new key instead of rotating it")
    if not 0 <= grace_minutes <= 7 * 24 * 60:
        raise ValueError(f"grace_minutes must be between 0 and {7 * 24 * 60} (a week), not {grace_minutes}")
    org = session.get(Organization, key.org_id)
    assert org is not None  # the key's row would have gone with its organization
    days = key_lifetime(expires_in_days, ttl_days)
    new, plaintext = issue_api_key_row(session, org, name=(name or "").strip() or key.name, expires_in_days=days)
    if grace_minutes:
        until = utcnow() + timedelta(minutes=grace_minutes)
        key.expires_at = min(key.expires_at, until) if key.expires_at else until
    else:
        key.revoked_at = utcnow()
    return new, plaintext


def revoke_grant(session: Session, model: RegisteredModel, org: Organization) -> None:
    """Take the model away from `org` at once: its emulators, uploads and adapters of that model (API and
    console) answer 404 from the next request on. Its rows stay: granting again restores them."""
    g = session.execute(
        select(GrantRow).where(GrantRow.model_id == model.id, GrantRow.org_id == org.id)
    ).scalar_one_or_none()
    if g is None:
        raise NotFound(f"organization {org.name!r} has no grant for model {model.name!r}")
    session.delete(g)


def delete_org(session: Session, org: Organization) -> list[str]:
    """Delete `org` with its keys, grants, jobs, adapters and console sessions (the database cascades); audit
    rows stay. Refused for the last admin organization and while its jobs run. Returns its adapter ids, whose
    files the caller removes after the commit."""
    if org.is_admin:
        admins = session.execute(select(func.count()).where(Organization.role == "admin")).scalar_one()
        if admins <= 1:
            raise Conflict(
                f"{org.name!r} is the last admin organization: deleting it would leave nobody to run the server; "
                "create another admin organization first (`modelowner-server create-org NAME --role admin`)"
            )
    running = session.execute(
        select(func.count()).where(JobRow.org_id == org.id, JobRow.status.in_(("queued", "running")))
    ).scalar_one()
    if running:
        raise Conflict(
            f"organization {org.name!r} has {running} queued or running job(s); cancel them (POST /v1/jobs/{{id}}/cancel) "
            "or wait for them to finish, then delete it. Revoke its keys now to end its access at once"
        )
    adapter_ids = list(session.execute(select(AdapterRow.id).where(AdapterRow.org_id == org.id)).scalars())
    session.execute(delete(Organization).where(Organization.id == org.id))
    return adapter_ids


# ---------------------------------------------------------------- what the web console lists


def visible_grants(org: Organization) -> Select[GrantRow, Organization]:
    """Grants with their organization: all for admins, a data owner's own otherwise."""
    q = (
        select(GrantRow, Organization)
        .join(Organization, Organization.id == GrantRow.org_id)
        .order_by(GrantRow.created_at)
    )
    return q if org.is_admin else q.where(GrantRow.org_id == org.id)


def visible_importance_runs(org: Organization) -> Select[ImportanceRun]:
    """Importance runs whose job the organization may see (so, like their scores over the API: admins)."""
    jobs = visible_jobs(org).order_by(None).with_only_columns(JobRow.id)
    return select(ImportanceRun).where(ImportanceRun.job_id.in_(jobs)).order_by(ImportanceRun.created_at.desc())


def get_visible_importance_run(session: Session, org: Organization, run_id: str) -> tuple[ImportanceRun, JobRow]:
    run = session.get(ImportanceRun, run_id)
    if run is None or run.job_id is None:
        raise NotFound(f"importance run {run_id!r} not found")
    try:
        return run, get_visible_job(session, org, run.job_id)
    except NotFound:
        raise NotFound(f"importance run {run_id!r} not found") from None
