"""The model owner's side of the demo: its material, its server's CLI (organizations) and REST API (model,
grant, stage 1 importance, stage 2 emulator), ending with the invitation for the data owner."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tooling.procs import job_finished, wait_until

from .config import ADMIN_ORG, DATA_ORG, DemoConfig, DemoError, Invitation
from .console import clock, fmt_bytes, say, step
from .data import model_owner_files
from .processes import run_cmd, tool


class Api:
    """A few REST calls with `Authorization: Bearer <key>`; errors come back as readable DemoErrors."""

    def __init__(self, url: str, key: str, alive=lambda: None):
        self.url, self.alive = url.rstrip("/"), alive
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def call(self, method: str, path: str, body: dict | None = None, show: bool = True) -> Any:
        if show:
            say(f"  > {method} {path}" + (f" {json.dumps(body)}" if body else ""))
        r = self.http.request(method, path, json=body)
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                detail = f"{err['code']}: {err['message']}"
            except Exception:
                detail = r.text[:500]
            raise DemoError(f"{method} {path} -> {r.status_code} {detail}")
        return r.json()

    def wait_job(self, job_id: str, label: str, timeout_s: float = 4 * 3600) -> dict[str, Any]:
        """Poll GET /v1/jobs/{id}, printing progress as it moves (a changed line at most every 3 s)."""
        say(f"  polling GET /v1/jobs/{job_id}")
        shown: dict[str, Any] = {"line": None, "at": 0.0}

        def succeeded() -> dict[str, Any] | None:
            job = self.call("GET", f"/v1/jobs/{job_id}", show=False)
            line = f"{job['status']} {job.get('message') or ''}".strip()
            now = time.monotonic()
            if line != shown["line"] and (now - shown["at"] >= 3 or job_finished(job) or shown["line"] is None):
                m = job.get("metrics") or {}
                extra = f"  loss {m['loss']:.3f}" if isinstance(m.get("loss"), (int, float)) else ""
                say(f"    [{clock()}] {label} {round(100 * job['progress']):3d}%  {line}{extra}")
                shown.update(line=line, at=now)
            if job_finished(job) and job["status"] != "succeeded":
                raise DemoError(f"{label} job {job_id} {job['status']}: {job.get('error') or job.get('message')}")
            return job if job["status"] == "succeeded" else None

        try:
            return wait_until(succeeded, timeout=timeout_s, interval=1.0, alive=self.alive, what=f"{label} job")
        except TimeoutError:
            raise DemoError(f"{label} job {job_id} not finished after {timeout_s:.0f} s") from None

    def close(self) -> None:
        self.http.close()


@dataclass
class OwnerResult:
    invitation: Invitation
    model: dict[str, Any]
    emulator: dict[str, Any]
    importance: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    admin_key: str = ""  # the admin organization's key (the demo's optional evaluation job uses it)
    benchmarks: dict[str, Any] = field(default_factory=dict)  # that job's table, when it ran


def server_cli(
    args: list[str], env: dict[str, str], cwd: Path, *, capture: bool = True, secret: bool = False, env_note: str = ""
) -> str:
    return run_cmd(
        tool("modelowner-server") + args, env=env, cwd=cwd, capture=capture, secret_output=secret, env_note=env_note
    )


def create_org(name: str, role: str, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """`modelowner-server create-org`; on a name clash (a reused database) a suffixed name is used."""
    for attempt in range(3):
        org = name if attempt == 0 else f"{name}-{os.urandom(3).hex()}"
        try:
            key = server_cli(["create-org", org, "--role", role], env, cwd, secret=True).strip().splitlines()[-1]
        except DemoError:
            if attempt == 2:
                raise
            say(f"    (organization {org!r} exists already in this database; trying another name)")
            continue
        say(f"    -> {role} organization {org!r}, API key {key[:8]}... (printed once; stored nowhere in clear)")
        return org, key
    raise AssertionError


def model_owner_flow(
    cfg: DemoConfig,
    *,
    server_url: str,
    cli_env: dict[str, str],
    owner_dir: Path,
    state_file: Path | None = None,
    alive=lambda: None,
) -> OwnerResult:
    """Everything the model owner does, via its CLI (database-side commands) and the REST API."""
    timings: dict[str, float] = {}
    state = json.loads(state_file.read_text()) if state_file and state_file.is_file() else {}
    admin = Api(server_url, state.get("admin_key", ""), alive)

    step("model owner: material (base model + task-agnostic corpus)")
    t = time.monotonic()
    model_dir, corpus = model_owner_files(cfg, owner_dir)
    timings["prepare"] = time.monotonic() - t

    step("model owner: organizations (modelowner-server create-org, on the server's database), model, grant")
    if state.get("admin_key") and _key_works(server_url, state["admin_key"]):
        say(f"  reusing the organizations recorded in {state_file}")
        data_org, data_key = state["data_org"], state["data_key"]
    else:
        _, admin_key = create_org(ADMIN_ORG, "admin", cli_env, owner_dir)
        data_org, data_key = create_org(DATA_ORG, "data-owner", cli_env, owner_dir)
        admin = Api(server_url, admin_key, alive)
        state.update(admin_key=admin_key, data_org=data_org, data_key=data_key)
        if state_file:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
    existing = [m for m in admin.call("GET", "/v1/models")["models"] if m["name"] == cfg.model_name]
    if existing:
        model = existing[0]
        say(f"    model {cfg.model_name!r} is registered already ({model['id']})")
    else:  # the same as `modelowner-server register-model NAME --path DIR`
        body = {"name": cfg.model_name, "path": str(model_dir.resolve())}
        if cfg.compute_dtype:  # = register-model --compute-dtype
            body["compute_dtype"] = cfg.compute_dtype
        model = admin.call("POST", "/v1/models", body)
        say(
            f"    -> {model['id']}: {model.get('family')}, {model.get('n_layers')} layers, "
            f"{(model.get('n_params') or 0) / 1e6:.1f}M parameters"
            + (f", compute dtype {model['compute_dtype']}" if model.get("compute_dtype") else "")
        )
    admin.call("POST", f"/v1/models/{model['id']}/grants", {"org": data_org})  # = `modelowner-server grant`

    keys = admin.call("GET", "/v1/signing-keys")["keys"]
    active = next(k for k in keys if k["status"] == "active")
    say(f"    server signing key {active['key_id']}: {active['public_key']}")

    step(
        f"model owner: stage 1, importance estimation ({cfg.warmup_steps} warm-up + {cfg.steps} DL steps, "
        "Dynamic LayerReplace)"
    )
    t = time.monotonic()
    model = admin.call("GET", f"/v1/models/{model['id']}", show=False)
    importance: dict[str, Any] = {}
    budget = [cfg.steps, cfg.warmup_steps]
    if model.get("importance_ready") and state.get("importance_budget") == budget:
        say("  importance of this model is estimated already; reusing it")
    else:
        job = admin.call(
            "POST",
            f"/v1/models/{model['id']}/importance",
            {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "corpus": str(corpus.resolve())},
        )
        job = admin.wait_job(job["id"], "importance")
        importance = job.get("result") or {}
        if importance.get("ranking"):
            say(f"  layers by importance (most important first): {importance['ranking']}")
        state["importance_budget"] = budget
        if state_file:
            state_file.write_text(json.dumps(state))
    timings["importance"] = time.monotonic() - t

    step(f"model owner: stage 2, emulator (N_a={cfg.n_adapter}, alpha={cfg.alpha}, beta={cfg.beta})")
    t = time.monotonic()
    if cfg.tiny:  # random weights have nothing to protect: keep the audit, drop the bounds made for real models
        policy = admin.call(
            "PUT",
            f"/v1/models/{model['id']}/emulator-policy",
            {"max_kept_share": 1.0, "min_alpha": 0.0, "no_min_residual_gap": True},
        )
    else:
        policy = admin.call("GET", f"/v1/models/{model['id']}/emulator-policy", show=False)
    say(f"  emulator policy ({policy['source']}): {policy_summary(policy['policy'])}")
    created = admin.call(
        "POST",
        "/v1/emulators",
        {"model_id": model["id"], "n_adapter": cfg.n_adapter, "alpha": cfg.alpha, "beta": cfg.beta},
    )
    emu = created["emulator"]
    if emu["status"] != "ready" and created.get("job"):
        admin.wait_job(created["job"]["id"], "emulator")
    emu = admin.call("GET", f"/v1/emulators/{emu['id']}")
    timings["emulator"] = time.monotonic() - t
    if emu["status"] != "ready":
        raise DemoError(f"emulator {emu['id']} is {emu['status']}: {emu.get('error')}")
    say(
        f"  emulator {emu['id']}: {plan_summary(emu)}; {fmt_bytes(emu.get('size_bytes'))} "
        f"vs full model {fmt_bytes(emu.get('full_model_bytes'))}"
    )
    privacy, verdict = emu.get("privacy") or {}, emu.get("policy_check") or {}
    if privacy:
        say(
            f"  privacy audit ({privacy.get('attack')}, {privacy.get('steps')} steps on public text): the attacker's "
            f"copy stays {privacy.get('residual_gap_nats')} nats/token above M"
        )
    if not verdict.get("issuable", True):
        raise DemoError(
            f"emulator {emu['id']} is outside the model's emulator policy, so the data owner could not download it: "
            + "; ".join(verdict.get("reasons") or [])
        )
    model = admin.call("GET", f"/v1/models/{model['id']}", show=False)
    admin.close()
    invitation = Invitation(
        emulator_url=f"{server_url.rstrip('/')}/v1/emulators/{emu['id']}",
        api_key=data_key,
        server_pubkey=active["public_key"],
        key_id=active["key_id"],
    )
    return OwnerResult(invitation, model, emu, importance, timings, admin_key=state.get("admin_key", ""))


def _key_works(server_url: str, key: str) -> bool:
    try:
        return (
            httpx.get(f"{server_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code
            == 200
        )
    except httpx.HTTPError:
        return False


def policy_summary(p: dict[str, Any]) -> str:
    gap = p.get("min_residual_gap_nats")
    audit = (
        ("audit required, residual gap >= " + (f"{gap} nats" if gap is not None else "any"))
        if p.get("require_audit")
        else "no audit required"
    )
    return (
        f"alpha >= {p.get('min_alpha')}, N_a <= {p.get('max_n_adapter')}, "
        f"at most {float(p.get('max_kept_share', 1)):.0%} of M's layers kept, {audit}"
    )


def plan_summary(emu: dict[str, Any]) -> str:
    roles = (emu.get("plan") or {}).get("roles") or []
    counts = {r: roles.count(r) for r in ("adapter", "frozen", "harmonizer", "dropped") if roles.count(r)}
    summary = ", ".join(f"{n} {r}" for r, n in counts.items())
    return f"{len(roles)} positions ({summary}); adapter layers {emu.get('adapter_layers')}"
