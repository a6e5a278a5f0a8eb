from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from model_owner_server import crud, policy
from model_owner_server.api import quotas
from model_owner_server.api.deps import AdminDep, KeyRingDep, OrgDep, QueueDep, SessionDep, SettingsDep, StorageDep
from model_owner_server.api.errors import ApiError
from model_owner_server.api.routes.models import server_text_file
from model_owner_server.api.serialize import base_url, emulator_out, job_out
from model_owner_server.core.config import Settings
from model_owner_server.jobs.queue import QueueUnavailable
from model_owner_server.keyring import KeyRing, manifest_for
from model_owner_server.models import EmulatorRow, JobRow, Organization
from model_owner_server.scaleot.emulator import scaleot_roles
from shared import schemas

router = APIRouter(prefix="/v1/emulators", tags=["emulators"])
ERR: dict[int | str, dict[str, Any]] = {s: {"model": schemas.ErrorBody} for s in (401, 403, 404, 409, 416, 422)}
CHUNK = 1 << 20


def _ready(emu: EmulatorRow) -> None:
    if emu.status == "building":
        raise ApiError(409, "not_ready", f"emulator {emu.id} is still building; poll GET /v1/jobs/{emu.job_id}")
    if emu.status != "ready":
        raise ApiError(
            409,
            "not_ready",
            f"emulator {emu.id} failed to build ({emu.error}); "
            "POST /v1/emulators again with the same parameters to retry",
        )


@router.post("", status_code=202, response_model=schemas.EmulatorCreated, responses=ERR)
def create_emulator(
    body: schemas.EmulatorCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    org: OrgDep,
    settings: SettingsDep,
    queue: QueueDep,
) -> schemas.EmulatorCreated:
    """Create the emulator for (model, N_a, alpha, beta), or return the existing identical one.

    202 + job while it builds; 200 when it is already ready. A failed build is retried by posting again.
    """
    model = crud.get_visible_model(session, org, body.model_id)
    if model.n_layers and body.n_adapter >= model.n_layers:
        raise ApiError(
            422,
            "validation_error",
            f"n_adapter must be less than the model's {model.n_layers} layers (the emulator must compress something)",
        )
    run = crud.latest_importance_run(session, model.id)
    if run is None:
        raise ApiError(
            409,
            "importance_missing",
            f"model {model.id} has no finished importance run yet; an admin "
            f"must run POST /v1/models/{model.id}/importance first (or wait for the running one)",
        )
    alpha, beta = round(body.alpha, 6), round(body.beta, 6)
    # The model owner's policy, on the plan this request would build (before any row, job or file exists).
    roles = scaleot_roles(run.scores or [], body.n_adapter, alpha, settings.emulator_placement)
    refusal = policy.check_request(
        policy.effective_policy(model, settings)[0], model.id, org, roles, body.n_adapter, alpha, beta, body.dtype
    )
    if refusal is not None:
        crud.audit(
            session, org, "emulator_refused", "model", model.id, n_adapter=body.n_adapter, alpha=alpha, beta=beta
        )
        session.commit()
        raise ApiError(403, "policy_violation", refusal.message("this emulator request"))
    key = (
        EmulatorRow.model_id == model.id,
        EmulatorRow.importance_run_id == run.id,
        EmulatorRow.n_adapter == body.n_adapter,
        EmulatorRow.alpha == alpha,
        EmulatorRow.beta == beta,
    )
    emu = session.execute(select(EmulatorRow).where(*key)).scalar_one_or_none()
    if emu is not None and emu.status in ("ready", "building"):
        built = (emu.build_info or {}).get("dtype", "float32")
        if built != body.dtype:  # (model, run, N_a, alpha, beta) is the row's unique key; dtype is not in it
            raise ApiError(
                409,
                "dtype_conflict",
                f"emulator {emu.id} already has these parameters in {built} "
                f"(one emulator per parameter set): post dtype {built!r} to use it, or other "
                f"n_adapter/alpha/beta for a {body.dtype} one",
            )
        response.status_code = 200 if emu.status == "ready" else 202
        job = session.get(JobRow, emu.job_id) if emu.job_id else None
        return schemas.EmulatorCreated(
            emulator=with_policy_check(session, settings, emu, emulator_out(emu, base_url(request, settings))),
            job=job_out(job) if job else None,
        )
    quotas.check_emulator_build(session, org, settings)  # hourly build quota, active-job cap: 429 before a job
    params = {"model_id": model.id}
    try:
        if emu is None:
            emu = EmulatorRow(
                model_id=model.id,
                importance_run_id=run.id,
                n_adapter=body.n_adapter,
                alpha=alpha,
                beta=beta,
                status="building",
                created_by=org.id,
            )
            session.add(emu)
            session.flush()
        emu.build_info = {"dtype": body.dtype}  # read by the build job, which completes build_info
        job = crud.create_job(session, "emulator", org, {**params, "emulator_id": emu.id})
        emu.status, emu.error, emu.job_id = "building", None, job.id
        crud.audit(
            session,
            org,
            "create_emulator",
            "emulator",
            emu.id,
            n_adapter=body.n_adapter,
            alpha=alpha,
            beta=beta,
            dtype=body.dtype,
        )
        session.commit()
    except IntegrityError:  # a concurrent identical request won the race: answer with its emulator
        session.rollback()
        emu = session.execute(select(EmulatorRow).where(*key)).scalar_one()
        job = session.get(JobRow, emu.job_id) if emu.job_id else None
        return schemas.EmulatorCreated(
            emulator=with_policy_check(session, settings, emu, emulator_out(emu, base_url(request, settings))),
            job=job_out(job) if job else None,
        )
    try:
        queue.submit(request.app.state.sessions, job.id)
    except QueueUnavailable:
        raise ApiError(503, "unavailable", "the job queue is unreachable; try again later") from None
    session.refresh(emu)
    session.refresh(job)
    if emu.status == "ready":  # immediate mode finished inline
        response.status_code = 200
    return schemas.EmulatorCreated(
        emulator=with_policy_check(session, settings, emu, emulator_out(emu, base_url(request, settings))),
        job=job_out(job),
    )


@router.get("", response_model=schemas.EmulatorList, responses=ERR)
def list_emulators(
    request: Request,
    session: SessionDep,
    org: OrgDep,
    settings: SettingsDep,
    limit: quotas.PageLimit = quotas.DEFAULT_PAGE,
    cursor: quotas.PageCursor = None,
) -> schemas.EmulatorList:
    """The emulators of the models granted to you (admins: all), newest first, a page at a time."""
    base = base_url(request, settings)
    rows, next_cursor = quotas.paginate(session, crud.visible_emulators(org), EmulatorRow, limit, cursor)
    return schemas.EmulatorList(
        emulators=[with_policy_check(session, settings, e, emulator_out(e, base)) for e in rows],
        next_cursor=next_cursor,
        limit=limit,
    )


@router.get("/{emulator_id}", response_model=schemas.Emulator, responses=ERR)
def get_emulator(
    emulator_id: str, request: Request, session: SessionDep, org: OrgDep, settings: SettingsDep
) -> schemas.Emulator:
    """Layer plan, sizes, sha256, adapter spec (the exact tensors an upload must contain) and status."""
    emu = crud.get_visible_emulator(session, org, emulator_id)
    return with_policy_check(session, settings, emu, emulator_out(emu, base_url(request, settings)))


def with_policy_check(
    session: Session, settings: Settings, emu: EmulatorRow, out: schemas.Emulator
) -> schemas.Emulator:
    """`out` with the current policy's verdict on `emu` (what a data owner may download, and why not)."""
    out.policy_check = policy.policy_check(policy.policy_for_emulator(session, emu, settings), emu)
    return out


def _issuable(session: Session, settings: Settings, emu: EmulatorRow, org: Organization, what: str) -> None:
    """403 policy_violation when the current policy withholds `emu` from `org` (never for admins)."""
    refusal = policy.check_issue(policy.policy_for_emulator(session, emu, settings), emu, org)
    if refusal is not None:
        raise ApiError(403, "policy_violation", refusal.message(what))


# Linear: no two adjacent quantifiers can trade characters (each optional number must start with a digit),
# so a failed match backtracks O(1) per position; the old `\s*(\d*)\s*` took seconds on 16 KB of spaces.
_RANGE = re.compile(r"\s*bytes\s*=\s*(?:(\d+)\s*)?-\s*(?:(\d+)\s*)?", re.IGNORECASE)
MAX_RANGE_HEADER = 200  # one `bytes=first-last` range fits in 50 characters


def parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """One `bytes=` range -> (start, end inclusive); None = ignore the header (malformed, over-long or several
    ranges, which RFC 9110 lets a server answer with the full 200); "unsatisfiable" -> 416."""
    m = _RANGE.fullmatch(header) if len(header) <= MAX_RANGE_HEADER else None
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1) or "", m.group(2) or ""
    if not first:  # suffix range: the last N bytes
        n = int(last)
        return "unsatisfiable" if n == 0 else (max(0, size - n), size - 1)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None  # invalid range spec: ignore
    if start >= size:
        return "unsatisfiable"
    return start, end


def _iter_file(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


@router.head("/{emulator_id}/file", include_in_schema=False)
@router.get(
    "/{emulator_id}/file",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "partial"}, **ERR},
)
def download_emulator(
    emulator_id: str, request: Request, session: SessionDep, org: OrgDep, storage: StorageDep, settings: SettingsDep
) -> Response:
    """The emulator safetensors file, streamed from disk. `ETag` is its sha256; `Range: bytes=N-` resumes
    (206 with Content-Range; 416 when the range starts past the end); `If-Range` with the ETag is honoured.
    Data owners get it only within the model owner's emulator policy (403 policy_violation otherwise)."""
    emu = crud.get_visible_emulator(session, org, emulator_id)
    _ready(emu)
    _issuable(session, settings, emu, org, f"the download of emulator {emu.id}")
    assert emu.path is not None, "a ready emulator has its file (the build job sets both)"
    path = storage.abs(emu.path)
    size = path.stat().st_size
    etag = f'"{emu.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-transform",
        "Content-Disposition": f'attachment; filename="{emu.id}.safetensors"',
    }
    start, end, status = 0, size - 1, 200
    range_header, if_range = request.headers.get("range"), request.headers.get("if-range")
    if range_header and (if_range is None or if_range.strip() in (etag, emu.sha256)):
        parsed = parse_range(range_header, size)
        if parsed == "unsatisfiable":
            raise ApiError(
                416,
                "range_not_satisfiable",
                f"the file has {size} bytes; the requested range starts past "
                "the end (your copy may already be complete)",
                {"Content-Range": f"bytes */{size}"},
            )
        if parsed is not None:
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    crud.audit(session, org, "download_emulator", "emulator", emu.id, start=start, end=end)
    session.commit()
    return StreamingResponse(
        _iter_file(path, start, end), status_code=status, headers=headers, media_type="application/octet-stream"
    )


@router.get("/{emulator_id}/signature", responses={200: {"model": schemas.SignedManifest}, **ERR})
def emulator_signature(
    emulator_id: str, session: SessionDep, org: OrgDep, keyring: KeyRingDep, settings: SettingsDep
) -> JSONResponse:
    """The signed manifest `{manifest, signature, key_id}`: Ed25519 over the manifest's canonical JSON bytes
    (sorted keys, no spaces, UTF-8). Verify with the key from GET /v1/signing-keys you pinned."""
    emu = crud.get_visible_emulator(session, org, emulator_id)
    _ready(emu)
    _issuable(session, settings, emu, org, f"the signature of emulator {emu.id}")
    signed = emu.signed_manifest
    if signed is None or KeyRing.is_revoked(session, str(signed.get("key_id"))):
        signed = keyring.sign(manifest_for(emu))  # first request, or its key was revoked: sign with the current key
        emu.signed_manifest = signed
        session.commit()
    return JSONResponse(signed)


@router.post("/{emulator_id}/privacy-audit", status_code=202, response_model=schemas.Job, responses=ERR)
def start_privacy_audit(
    emulator_id: str,
    body: schemas.PrivacyAuditRequest,
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    settings: SettingsDep,
    queue: QueueDep,
) -> schemas.Job:
    """Run a recovery attack on the emulator as a job (admins); the figure lands in the emulator's `privacy`.

    The attacker heals the emulator on public text; `privacy.residual_gap_nats` is how far its held-out loss
    stays above the full model's. Poll GET /v1/jobs/{id}; then GET /v1/emulators/{id}.
    """
    emu = crud.get_visible_emulator(session, admin, emulator_id)
    _ready(emu)
    steps = body.steps or settings.audit_steps
    if steps > settings.audit_max_steps:
        raise ApiError(
            422,
            "validation_error",
            f"steps must be at most {settings.audit_max_steps} on this server "
            "(SCALEOT_AUDIT_MAX_STEPS); for a longer attack run `modelowner-server audit-emulator` there",
        )
    corpus = crud.expand_user(body.corpus) if body.corpus else settings.audit_corpus
    params = {
        "emulator_id": emu.id,
        "attack": body.attack or settings.audit_attack,
        "steps": steps,
        "seed": body.seed,
        "corpus": str(server_text_file(corpus).resolve()) if corpus is not None else None,
    }
    job = crud.create_job(session, "privacy_audit", admin, params)
    crud.audit(session, admin, "privacy_audit", "emulator", emu.id, attack=params["attack"], steps=params["steps"])
    session.commit()
    try:
        queue.submit(request.app.state.sessions, job.id)
    except QueueUnavailable:
        raise ApiError(503, "unavailable", "the job queue is unreachable; try again later") from None
    session.refresh(job)
    return job_out(job)
