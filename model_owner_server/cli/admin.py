"""The administration commands, run on the server's database and files: organizations and their keys, model
registration and grants, the privacy audit of an emulator, signing-key rotation and revocation."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from model_owner_server.cli.common import app, db_session, fail, load_settings


@app.command("create-org")
def create_org_cmd(
    name: str = typer.Argument(..., help="organization name"),
    role: str = typer.Option("data-owner", "--role", help="admin or data-owner"),
) -> None:
    """Create an organization and print its API key once (only a hash is stored)."""
    from model_owner_server import crud

    settings = load_settings()
    with db_session(settings) as session:
        try:
            org, key = crud.create_org(session, name, role, expires_in_days=settings.api_key_ttl_days)
            session.commit()
        except (ValueError, crud.Conflict) as exc:
            fail(str(exc))
        typer.secho(
            f"created {org.role} organization {org.name!r} ({org.id}); its API key (shown only once):", err=True
        )
        typer.echo(key)


@app.command("register-model")
def register_model_cmd(
    name: str = typer.Argument(..., help="name to register the model under"),
    path: Path = typer.Option(
        ...,
        "--path",
        help="local Hugging Face causal-LM folder: config.json, safetensors "
        "(one file, or shards with model.safetensors.index.json), tokenizer",
    ),
    compute_dtype: str = typer.Option(
        "auto",
        "--compute-dtype",
        help="dtype the server's jobs and serving compute the model in: float32, bfloat16, float16, or auto "
        "(the checkpoint's own on a GPU, float32 on CPU, where bf16 matmuls are slow)",
    ),
) -> None:
    """Register a local HF causal-LM folder of a supported family as a base model. Any checkpoint dtype
    (float32, bfloat16, float16) and tied or untied embeddings; the jobs compute it in --compute-dtype.
    A GGUF file: convert it first with import-gguf."""
    from model_owner_server import crud

    with db_session(load_settings()) as session:
        try:
            model = crud.register_model(session, name, path, compute_dtype)
            session.commit()
        except (ValueError, crud.Conflict) as exc:
            fail(str(exc))
        typer.echo(
            json.dumps(
                {
                    "id": model.id,
                    "name": model.name,
                    "family": model.family,
                    "n_layers": model.n_layers,
                    "n_params": model.n_params,
                    "compute_dtype": model.compute_dtype,
                },
                indent=2,
            )
        )


@app.command("grant")
def grant_cmd(
    org: str = typer.Argument(..., help="organization name or id"),
    model: str = typer.Argument(..., help="model name or id"),
) -> None:
    """Let a data-owner organization request emulators of a model."""
    from model_owner_server import crud

    with db_session(load_settings()) as session:
        try:
            m, o = crud.find_model(session, model), crud.find_org(session, org)
        except crud.NotFound as exc:
            fail(str(exc))
        crud.grant(session, m, o)
        crud.audit(session, None, "grant", "model", m.id, org_id=o.id, via="cli")
        session.commit()
        typer.echo(f"granted {o.name} ({o.id}) access to model {m.name} ({m.id})")


@app.command("set-policy")
def set_policy_cmd(
    model: str = typer.Argument(..., help="model name or id"),
    min_alpha: float | None = typer.Option(None, help="smallest share of the non-adapter layers replaced"),
    min_beta: float | None = typer.Option(None, help="smallest SRC ratio (share of attention rank removed)"),
    max_n_adapter: int | None = typer.Option(None, help="most adapter layers (sent uncompressed)"),
    max_kept_share: float | None = typer.Option(None, help="most share of M's layers kept as originals (0-1]"),
    dtypes: str | None = typer.Option(None, help="allowed storage dtypes, comma-separated (float32,bfloat16,float16)"),
    builders: str | None = typer.Option(None, help="'granted' (data owners may ask for builds) or 'admins'"),
    require_audit: bool | None = typer.Option(
        None, "--require-audit/--no-require-audit", help="data owners get only privacy-audited emulators"
    ),
    min_gap: float | None = typer.Option(None, help="smallest residual privacy gap (nats) of the audit's attacker"),
    any_gap: bool = typer.Option(False, "--any-gap", help="any measured gap will do (no minimum)"),
    reset: bool = typer.Option(False, "--reset", help="drop the model's own policy: the server default applies"),
) -> None:
    """Set what emulators of a model data owners may get (the model's emulator policy); prints the result.

    Without options it prints the current policy. It applies at once: to new requests and to every download.
    """
    from pydantic import ValidationError

    from model_owner_server import crud, policy
    from shared.schemas import EmulatorPolicyUpdate

    settings = load_settings()
    with db_session(settings) as session:
        try:
            m = crud.find_model(session, model)
        except crud.NotFound as exc:
            fail(str(exc))
        values = {
            "min_alpha": min_alpha,
            "min_beta": min_beta,
            "max_n_adapter": max_n_adapter,
            "max_kept_share": max_kept_share,
            "allowed_dtypes": [d.strip() for d in dtypes.split(",") if d.strip()] if dtypes is not None else None,
            "builders": builders,
            "require_audit": require_audit,
            "min_residual_gap_nats": min_gap,
            "no_min_residual_gap": any_gap,
        }
        try:
            update = EmulatorPolicyUpdate.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            fail(f"invalid policy: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
        if reset:
            m.emulator_policy = None
            crud.audit(session, None, "reset_emulator_policy", "model", m.id, via="cli")
        elif update.model_dump(exclude_unset=True):
            new = policy.updated_policy(policy.effective_policy(m, settings)[0], update)
            m.emulator_policy = new.model_dump()
            crud.audit(session, None, "set_emulator_policy", "model", m.id, via="cli", **new.model_dump())
        session.commit()
        current, source = policy.effective_policy(m, settings)
        typer.echo(json.dumps({"model_id": m.id, "source": source, "policy": current.model_dump()}, indent=2))


@app.command("audit-emulator")
def audit_emulator_cmd(
    emulator_id: str = typer.Argument(..., help="emulator id (emu_...), as listed by GET /v1/emulators"),
    attack: str | None = typer.Option(
        None, "--attack", help="heal-lora (cheapest), heal-all or densify; default SCALEOT_AUDIT_ATTACK"
    ),
    steps: int | None = typer.Option(None, "--steps", help="attack training steps; default SCALEOT_AUDIT_STEPS"),
    corpus: Path | None = typer.Option(
        None,
        "--corpus",
        help="the attacker's public text (.txt/.jsonl); default SCALEOT_AUDIT_CORPUS, else Python's pydoc topics",
    ),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Attack an emulator the way a data owner could (heal it on public text) and store the residual gap to
    the full model with the emulator, so it shows before a download is granted. Same code as the
    POST /v1/emulators/{id}/privacy-audit job; works on the server's database and files."""
    import sys

    from tqdm import tqdm

    from model_owner_server import crud
    from model_owner_server.jobs.resources import resolve_compute_dtype
    from model_owner_server.models import EmulatorRow, RegisteredModel
    from model_owner_server.privacy_audit import run_privacy_audit
    from model_owner_server.scaleot.attack import AttackConfig
    from model_owner_server.scaleot.model_io import load_causal_lm
    from model_owner_server.storage import Storage
    from shared.device import DeviceError

    settings = load_settings()
    with db_session(settings) as session:
        emu = session.get(EmulatorRow, emulator_id)
        if emu is None:
            fail(
                f"no emulator {emulator_id!r} in {settings.db_url.split('://')[0]} database of this server; "
                "list them with GET /v1/emulators (admin key)"
            )
        if emu.status != "ready" or not emu.path:
            fail(f"emulator {emu.id} is {emu.status}; audit it once its build job has finished")
        corpus = corpus or settings.audit_corpus
        if corpus is not None and not crud.is_file(corpus):
            fail(f"corpus file {corpus} does not exist; give an existing .txt/.jsonl file or leave --corpus out")
        try:
            cfg = AttackConfig(
                kind=attack or settings.audit_attack,
                steps=steps or settings.audit_steps,
                batch_size=settings.importance_batch_size,
                seed=seed,
            )
        except ValueError as exc:
            fail(str(exc))
        model_row = session.get(RegisteredModel, emu.model_id)
        try:
            device = settings.resolved_device()
        except DeviceError as exc:
            fail(str(exc))  # names SCALEOT_DEVICE and what to set instead
        dtype = resolve_compute_dtype(model_row.compute_dtype, model_row.path, device)  # as the audit job does
        model, tokenizer = load_causal_lm(model_row.path, device=device, dtype=dtype)
        bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")

        def progress(fraction: float, message: str, metrics: dict) -> None:
            bar.set_description(message + (f" loss {metrics['loss']:.3f}" if "loss" in metrics else ""))
            bar.update(round(100 * fraction) - bar.n)

        record = run_privacy_audit(
            model,
            tokenizer,
            Storage(settings.resolved_data_dir).abs(emu.path),
            cfg,
            corpus=corpus,
            seq_len=settings.importance_seq_len,
            max_blocks=settings.importance_max_blocks,
            val_blocks=settings.audit_val_blocks,
            device=device,
            progress=progress,
        )
        bar.update(100 - bar.n)
        bar.close()
        emu.privacy = record
        crud.audit(session, None, "privacy_audit", "emulator", emu.id, attack=cfg.kind, steps=cfg.steps, via="cli")
        session.commit()
    typer.echo(json.dumps(record, indent=2))


@app.command("rotate-signing-key")
def rotate_signing_key_cmd(
    revoke_old: bool = typer.Option(
        False,
        "--revoke-old",
        help="revoke the replaced key instead of retiring it (if it leaked): clients "
        "stop trusting it and its manifests are re-signed on request",
    ),
) -> None:
    """Replace the signing key: a new Ed25519 key file (0600) becomes active; the old key is retired (its
    manifests keep verifying through their key id) or revoked. Running servers pick the new file up on their
    next signature; data owners who pin a key must pin the new key id."""
    from model_owner_server.keyring import KeyRing

    settings = load_settings()
    with db_session(settings) as session:
        new_id, replaced = KeyRing.rotate(session, settings.signing_key_path, revoke_old=revoke_old)
    state = "revoked" if revoke_old else "retired"
    typer.secho(
        f"wrote {settings.signing_key_path} (mode 0600)" + (f"; {state}: {', '.join(replaced)}" if replaced else ""),
        err=True,
    )
    typer.echo(new_id)


@app.command("revoke-signing-key")
def revoke_signing_key_cmd(key_id: str = typer.Argument(..., help="key id from GET /v1/signing-keys")) -> None:
    """Mark a signing key revoked: clients stop trusting it; manifests it signed are re-signed on request.
    Revoking the active key requires pointing SCALEOT_SIGNING_KEY at a new file before the next start."""
    from model_owner_server.keyring import KeyRing

    with db_session(load_settings()) as session:
        try:
            KeyRing.revoke(session, key_id)
        except KeyError:
            fail(f"no signing key {key_id!r}")
        session.commit()
        typer.echo(f"revoked {key_id}")


# ---------------------------------------------------------------- API keys, grants, organizations, audit chain


def _key_line(k) -> str:
    from model_owner_server.core.security import key_state

    def when(t) -> str:
        return f"{t:%Y-%m-%d %H:%M}" if t else "-"

    return (
        f"{k.id}  {k.prefix}…  {key_state(k):8} created {when(k.created_at)}  expires {when(k.expires_at)}  "
        f"last used {when(k.last_used_at)}  revoked {when(k.revoked_at)}  {k.name or ''}"
    ).rstrip()


@app.command("list-keys")
def list_keys_cmd(org: str = typer.Argument(..., help="organization name or id")) -> None:
    """An organization's API keys: id, prefix, state, created, expires, last used, revoked, name (never the key)."""
    from model_owner_server import crud

    with db_session(load_settings()) as session:
        try:
            o = crud.find_org(session, org)
        except crud.NotFound as exc:
            fail(str(exc))
        for k in crud.list_keys(session, o):
            typer.echo(_key_line(k))


@app.command("create-key")
def create_key_cmd(
    org: str = typer.Argument(..., help="organization name or id"),
    name: str | None = typer.Option(None, "--name", help="a label, e.g. the machine that uses it"),
    expires_in_days: int | None = typer.Option(
        None, "--expires-in-days", help="default SCALEOT_API_KEY_TTL_DAYS (none: never); at most that"
    ),
) -> None:
    """Create an additional API key for an organization and print it once (only a hash is stored)."""
    from model_owner_server import crud

    settings = load_settings()
    with db_session(settings) as session:
        try:
            o = crud.find_org(session, org)
            row, key = crud.create_key(
                session, o, name=name, expires_in_days=expires_in_days, ttl_days=settings.api_key_ttl_days
            )
        except (ValueError, crud.NotFound, crud.Conflict) as exc:
            fail(str(exc))
        crud.audit(session, None, "create_api_key", "api_key", row.id, org_id=o.id, prefix=row.prefix, via="cli")
        session.commit()
        typer.secho(f"created key {row.id} for {o.name!r}; the key (shown only once):", err=True)
        typer.echo(key)


@app.command("revoke-key")
def revoke_key_cmd(
    key_id: str = typer.Argument(..., help="key id (key_...), from list-keys"),
    force: bool = typer.Option(False, "--force", help="revoke even the organization's last active key"),
) -> None:
    """Revoke an API key at once: its requests get 401 and its console sessions end."""
    from model_owner_server import crud
    from model_owner_server.models import ApiKey

    with db_session(load_settings()) as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            fail(f"no API key {key_id!r}; list an organization's keys with `modelowner-server list-keys ORG`")
        try:
            crud.revoke_key(session, key, allow_last=force)
        except crud.Conflict as exc:
            fail(str(exc))
        crud.audit(session, None, "revoke_api_key", "api_key", key.id, org_id=key.org_id, prefix=key.prefix, via="cli")
        session.commit()
        typer.echo(f"revoked {key.id} ({key.prefix}…)")


@app.command("rotate-key")
def rotate_key_cmd(
    key_id: str = typer.Argument(..., help="key id (key_...), from list-keys"),
    grace_minutes: int = typer.Option(
        0, "--grace-minutes", help="0: revoke the old key now; else it keeps working this long (at most a week)"
    ),
    name: str | None = typer.Option(None, "--name", help="the new key's label (default: the old one's)"),
) -> None:
    """Replace an API key: print the new key once; the old one is revoked now or after the grace period."""
    from model_owner_server import crud
    from model_owner_server.models import ApiKey

    settings = load_settings()
    with db_session(settings) as session:
        old = session.get(ApiKey, key_id)
        if old is None:
            fail(f"no API key {key_id!r}; list an organization's keys with `modelowner-server list-keys ORG`")
        try:
            new, key = crud.rotate_key(
                session,
                old,
                grace_minutes=grace_minutes,
                name=name,
                expires_in_days=None,
                ttl_days=settings.api_key_ttl_days,
            )
        except (ValueError, crud.Conflict) as exc:
            fail(str(exc))
        crud.audit(
            session,
            None,
            "rotate_api_key",
            "api_key",
            old.id,
            org_id=old.org_id,
            new_key_id=new.id,
            grace_minutes=grace_minutes,
            via="cli",
        )
        session.commit()
        until = f"expires {old.expires_at:%Y-%m-%d %H:%M} UTC" if grace_minutes else "revoked"
        typer.secho(f"new key {new.id}; the old key {old.id} is {until}. The new key (shown only once):", err=True)
        typer.echo(key)


@app.command("revoke-grant")
def revoke_grant_cmd(
    org: str = typer.Argument(..., help="organization name or id"),
    model: str = typer.Argument(..., help="model name or id"),
) -> None:
    """Take a model away from an organization at once (the reverse of `grant ORG MODEL`): its emulators,
    uploads and adapters of that model answer 404 from the next request on; granting again restores them."""
    from model_owner_server import crud

    with db_session(load_settings()) as session:
        try:
            m, o = crud.find_model(session, model), crud.find_org(session, org)
            crud.revoke_grant(session, m, o)
        except crud.NotFound as exc:
            fail(str(exc))
        crud.audit(session, None, "revoke_grant", "model", m.id, org_id=o.id, via="cli")
        session.commit()
        typer.echo(f"revoked {o.name}'s ({o.id}) access to model {m.name} ({m.id})")


@app.command("delete-org")
def delete_org_cmd(
    org: str = typer.Argument(..., help="organization name or id"),
    yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
) -> None:
    """Delete an organization with its keys, grants, jobs, adapters (and their files) and console sessions;
    the audit log keeps its rows. Refused for the last admin organization and while its jobs run."""
    from model_owner_server import crud
    from model_owner_server.storage import Storage

    settings = load_settings()
    with db_session(settings) as session:
        try:
            o = crud.find_org(session, org)
        except crud.NotFound as exc:
            fail(str(exc))
        name, org_id = o.name, o.id
        if not yes:
            typer.confirm(f"delete organization {name!r} ({org_id}), its keys, grants, jobs and adapters?", abort=True)
        try:
            adapter_ids = crud.delete_org(session, o)
        except crud.Conflict as exc:
            fail(str(exc))
        crud.audit(session, None, "delete_org", "organization", org_id, name=name, adapters=len(adapter_ids), via="cli")
        session.commit()
    storage = Storage(settings.resolved_data_dir)
    for adapter_id in adapter_ids:
        storage.remove(storage.adapters / adapter_id)
    typer.echo(f"deleted organization {name!r} ({org_id}) and {len(adapter_ids)} adapter(s)")


@app.command("verify-audit-log")
def verify_audit_log_cmd() -> None:
    """Walk the audit log's hash chain: exit 0 if every row is as written, else 1, naming the first edited,
    deleted or inserted row. Note the printed head hash elsewhere to detect a rewrite of the whole log later."""
    from model_owner_server.audit_log import verify_chain

    with db_session(load_settings()) as session:
        report = verify_chain(session)
    typer.echo(json.dumps(report.as_dict(), indent=2))
    if not report.ok:
        fail(f"the audit log was tampered with: {report.problem}", code=1)


@app.command("eval-adapter")
def eval_adapter_cmd(
    adapter_id: str = typer.Argument(..., help="adapter id (adp_...), as listed by GET /v1/adapters"),
    tasks: str = typer.Option(
        ...,
        "--tasks",
        help="comma-separated lm-eval tasks: the server's own (scaleot_shakespeare, scaleot_wikipedia, "
        "scaleot_analogy), those in SCALEOT_BENCHMARK_TASKS_DIR, or built-in ones whose data is on this machine",
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="examples per task (default: all)"),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", min=0, help="default: each task's own"),
    as_json: bool = typer.Option(False, "--json", help="print the stored table as JSON"),
) -> None:
    """Run lm-evaluation-harness tasks on M zero-shot and on the adapter's plug-in, here, as a job (the same
    `benchmark_eval` job as POST /v1/adapters/{id}/benchmarks, recorded under the first admin organization), and
    store the table beside the adapter's evaluation. No downloads: a task whose data is not here fails, named."""
    from pydantic import ValidationError

    from model_owner_server import crud
    from model_owner_server.api.routes.adapters import BenchmarkRequest
    from model_owner_server.core.db import make_engine, make_session_factory
    from model_owner_server.jobs.runner import JobRunner
    from model_owner_server.jobs.tasks.benchmark_eval import table_rows
    from model_owner_server.models import AdapterRow, JobRow, Organization
    from model_owner_server.storage import Storage

    settings = load_settings()
    try:
        body = BenchmarkRequest(
            tasks=[t.strip() for t in tasks.split(",") if t.strip()], limit=limit, num_fewshot=num_fewshot
        )
    except ValidationError as exc:
        fail("; ".join(e["msg"] for e in exc.errors()) + " (--tasks: comma-separated task names)")
    with db_session(settings) as session:
        adapter = session.get(AdapterRow, adapter_id)
        if adapter is None:
            fail(f"no adapter {adapter_id!r} in this server's database; list them with GET /v1/adapters (admin key)")
        if adapter.status != "evaluated":
            fail(f"adapter {adapter.id} is {adapter.status}; benchmark it once its evaluation succeeded")
        admin = session.query(Organization).filter_by(role="admin").order_by(Organization.created_at).first()
        if admin is None:
            fail(
                "this server has no admin organization to record the job under; create one with create-org --role admin"
            )
        params = {"adapter_id": adapter.id, "tasks": body.tasks, "limit": body.limit, "num_fewshot": body.num_fewshot}
        job = crud.create_job(session, "benchmark_eval", admin, params)
        crud.audit(session, admin, "benchmark_adapter", "adapter", adapter.id, tasks=body.tasks, via="cli")
        session.commit()
        job_id = job.id
    # Inline: this process claims exactly its own job (no queue), with the worker's progress, heartbeat and failure
    # records, so GET /v1/jobs/{id} shows it like any other.
    sessions = make_session_factory(make_engine(settings.db_url))
    inline = settings.model_copy(update={"queue_url": "immediate"})
    typer.secho(f"job {job_id}: lm-eval {', '.join(body.tasks)} on M and on adapter {adapter_id} ...", err=True)
    JobRunner(inline, sessions, Storage(settings.resolved_data_dir), None).run(job_id)
    with sessions() as session:
        job = session.get(JobRow, job_id)
        if job.status != "succeeded":
            fail(f"job {job_id} {job.status}: {job.error or job.message}")
        record = (job.result or {}).get("benchmarks") or {}
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(f"{record.get('harness')}; limit {record.get('limit') or 'none'}; {record.get('seconds')} s")
    typer.echo(f"{'task':<22}{'metric':<18}{'n':>6}{'M zero-shot':>20}{'plug-in':>20}")
    for r in table_rows(record):
        typer.echo(
            f"{r['task']:<22}{r['metric']:<18}{r['samples'] or '':>6}"
            f"{_with_err(r['zero_shot'], r['zero_shot_stderr']):>20}{_with_err(r['plug_in'], r['plug_in_stderr']):>20}"
        )


def _with_err(value: float | None, err: float | None) -> str:
    if value is None:
        return "-"

    def num(x: float) -> str:
        return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"

    return num(value) + (f" ± {num(err)}" if err is not None else "")
