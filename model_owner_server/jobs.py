"""Background jobs (importance estimation, emulator building, plug-in evaluation) on huey.

The queue message carries only the job id; everything a task needs is in the `jobs` row (`params`),
and everything it reports (status, progress, message, live metrics, result, error) goes back there,
so `GET /v1/jobs/{id}` works no matter which process or machine ran the task.

Queue backends (`SCALEOT_QUEUE_URL`): unset -> SqliteHuey file under the data dir; `redis://...` ->
RedisHuey; `immediate` -> tasks run inline at enqueue time (tests, debugging).

Dead workers: a running job records `worker_id` (host:pid:nonce) and refreshes `heartbeat_at` every
`heartbeat_seconds`. On start the server fails running jobs whose local worker process is gone, and a
reaper fails jobs whose heartbeat went stale (a remote worker that died), with a reason saying so.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from huey import Huey, MemoryHuey, RedisHuey, SqliteHuey
from huey.consumer import Consumer
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from model_owner_server.core.config import Settings
from model_owner_server.core.db import session_scope
from model_owner_server.keyring import KeyRing
from model_owner_server.models import (Adapter, BaseModel, Emulator, Evaluation, ImportanceRun, Job, utcnow)
from model_owner_server.storage import Storage, is_disk_full, pid_alive

log = logging.getLogger("scaleot.jobs")
TASK_NAME = "scaleot.run_job"
_wid: tuple[int, str] | None = None


def worker_id() -> str:
    """host:pid:nonce of this process (regenerated after fork)."""
    global _wid
    if _wid is None or _wid[0] != os.getpid():
        _wid = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}")
    return _wid[1]


class QueueUnavailable(RuntimeError):
    pass


class JobFailure(Exception):
    """A failure whose message is meant for the user as-is (no traceback needed)."""


class JobCancelled(Exception):
    """Raised inside a task at its next progress update once POST /v1/jobs/{id}/cancel asked it to stop."""


# ---------------------------------------------------------------- job state updates

class JobContext:
    """Handed to a task: throttled progress/metrics writes into the job row, plus a heartbeat thread."""

    def __init__(self, job_id: str, sessions: sessionmaker[Session], heartbeat_seconds: float):
        self.job_id = job_id
        self.sessions = sessions
        self.worker = worker_id()
        self._pending: dict[str, Any] = {}
        self._metrics: dict[str, Any] = {}
        self._last_write = 0.0
        self._halt: Exception | None = None  # set by a flush that finds the task must stop (_why_stop)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_seconds,), daemon=True,
                                        name=f"heartbeat-{job_id}")

    def __enter__(self) -> JobContext:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def update(self, progress: float | None = None, message: str | None = None,
               metrics: dict[str, Any] | None = None, force: bool = False) -> None:
        with self._lock:
            if progress is not None:
                self._pending["progress"] = round(min(1.0, max(0.0, float(progress))), 4)
            if message is not None:
                self._pending["message"] = message
            if metrics:
                self._metrics.update(metrics)
                self._pending["metrics"] = dict(self._metrics)
            # Throttle: a fast loop must not turn into hundreds of DB writes per second.
            if force or time.monotonic() - self._last_write >= 0.5:
                self._flush_locked()
            if self._halt is not None:
                raise self._halt

    def _flush_locked(self) -> None:
        values = {**self._pending, "heartbeat_at": utcnow(), "updated_at": utcnow()}
        self._pending = {}
        self._last_write = time.monotonic()
        try:
            with session_scope(self.sessions) as s:
                mine = (Job.id == self.job_id, Job.status == "running", Job.worker_id == self.worker)
                written = s.execute(update(Job).where(*mine, Job.cancel_requested_at.is_(None)).values(**values))
                if not written.rowcount:  # rare path: only then look at why
                    self._halt = _why_stop(s.get(Job, self.job_id), self.worker)
        except Exception:  # noqa: BLE001 - progress is best effort; the task itself must go on
            log.exception("could not record progress of job %s", self.job_id)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                self._flush_locked()


def fail_job(session: Session, job: Job, error: str, status: str = "failed") -> None:
    """Mark a job failed (or cancelled) and propagate the failure to the object it was producing."""
    job.status, job.error, job.message = status, error, status
    job.finished_at = job.updated_at = utcnow()
    kind, params = job.kind, job.params or {}
    target = {"importance": (ImportanceRun, "run_id"), "emulator": (Emulator, "emulator_id"),
              "evaluation": (Adapter, "adapter_id")}.get(kind)
    row = session.get(target[0], params[target[1]]) if target and params.get(target[1]) else None
    if isinstance(row, ImportanceRun):
        row.status, row.finished_at = "failed", utcnow()
    elif isinstance(row, Emulator) and row.job_id == job.id:  # a retry may own the emulator by now
        row.status, row.error = "failed", error
    elif isinstance(row, Adapter):
        row.status, row.error = "failed", error


CANCELLED_ERRORS = {"importance": "the importance run was cancelled; start a new one",
                    "emulator": "the build was cancelled; POST /v1/emulators again with the same parameters to rebuild",
                    "evaluation": "the evaluation was cancelled; upload the adapter again to evaluate it"}


def request_cancel(session: Session, job: Job) -> bool:
    """Cancel `job`: a queued job ends `cancelled` now (True); a running one gets a cancel request that its
    worker honours at its next progress update (False). Raises crud.Conflict when it has already finished.

    Conditional UPDATEs, not read-then-write: a worker claiming the job at the same moment either wins (the
    job is running and gets the request) or loses (the claim finds it cancelled and skips it).
    """
    from model_owner_server.crud import Conflict

    error = CANCELLED_ERRORS.get(job.kind, "cancelled on request")
    if session.execute(update(Job).where(Job.id == job.id, Job.status == "queued").values(status="cancelled")
                       ).rowcount:
        session.refresh(job)
        fail_job(session, job, error, status="cancelled")
        return True
    if session.execute(update(Job).where(Job.id == job.id, Job.status == "running").values(
            cancel_requested_at=utcnow(), updated_at=utcnow())).rowcount:
        session.refresh(job)
        return False
    session.refresh(job)
    raise Conflict(f"job {job.id} has already finished ({job.status}); there is nothing to cancel")


def recover_interrupted_jobs(sessions: sessionmaker[Session], settings: Settings, *, startup: bool) -> list[str]:
    """Fail running jobs whose worker is gone; return their ids.

    Local workers (same host) are checked by pid; at startup a job recorded under our own pid belongs to
    a previous incarnation (containers reuse pid 1). Any worker is presumed dead once its heartbeat is
    `stale_after_heartbeats` intervals old.
    """
    me_host, me_pid = socket.gethostname(), os.getpid()
    stale = timedelta(seconds=settings.heartbeat_seconds * settings.stale_after_heartbeats)
    now = utcnow()
    failed: list[str] = []
    with session_scope(sessions) as s:
        for job in s.execute(select(Job).where(Job.status == "running").with_for_update()).scalars():
            host, _, rest = (job.worker_id or "").partition(":")
            pid_text = rest.partition(":")[0]
            reason = None
            if host == me_host and pid_text.isdigit():
                pid = int(pid_text)
                if (startup and pid == me_pid and job.worker_id != worker_id()) or not pid_alive(pid):
                    reason = (f"interrupted by server restart: the worker process that ran this job ({job.worker_id}) "
                              "is gone; submit the request again")
            if reason is None and (job.heartbeat_at is None or now - job.heartbeat_at > stale):
                reason = (f"interrupted: the worker running this job ({job.worker_id}) stopped sending heartbeats "
                          f"(none for over {int(stale.total_seconds())} s); submit the request again")
            if reason:
                fail_job(s, job, reason)
                failed.append(job.id)
    if failed:
        log.warning("marked %d interrupted job(s) failed: %s", len(failed), ", ".join(failed))
    return failed


def requeue_queued_jobs(sessions: sessionmaker[Session], queue: "JobQueue") -> list[str]:
    """Enqueue every job still `queued` (its message may have been lost, e.g. a crash between commit and
    enqueue). Duplicates are harmless: the atomic claim in JobRunner.run skips a job already taken."""
    with session_scope(sessions) as s:
        ids = list(s.execute(select(Job.id).where(Job.status == "queued").order_by(Job.created_at)).scalars())
    for job_id in ids:
        queue.submit(sessions, job_id)
    return ids


def fail_jobs_of_this_process(sessions: sessionmaker[Session], reason: str) -> list[str]:
    me = worker_id()
    with session_scope(sessions) as s:
        jobs = list(s.execute(select(Job).where(Job.status == "running", Job.worker_id == me)).scalars())
        for job in jobs:
            fail_job(s, job, reason)
        return [j.id for j in jobs]


# ---------------------------------------------------------------- the runner

Handler = Callable[["JobRunner", JobContext, dict[str, Any]], dict[str, Any]]


class JobRunner:
    """Executes one job by id: claim it, run its handler, record success or failure."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: Storage,
                 keyring: KeyRing | None):
        self.settings, self.sessions, self.storage, self.keyring = settings, sessions, storage, keyring

    def run(self, job_id: str) -> None:
        me = worker_id()
        with session_scope(self.sessions) as s:
            # Atomic claim: a duplicate delivery (or a job already failed by the reaper) is skipped.
            claimed = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
                status="running", worker_id=me, started_at=utcnow(), heartbeat_at=utcnow(), updated_at=utcnow(),
                message="started")).rowcount
            job = s.get(Job, job_id) if claimed else None
            kind, params = (job.kind, dict(job.params or {})) if job else (None, {})
        if not claimed:
            log.info("job %s is not queued any more; skipping", job_id)
            return
        handler = HANDLERS.get(kind)
        outputs: list[Path] = []
        try:
            with JobContext(job_id, self.sessions, self.settings.heartbeat_seconds) as ctx:
                if handler is None:
                    raise JobFailure(f"unknown job kind {kind!r}")
                result = handler(self, ctx, params)
            with session_scope(self.sessions) as s:
                s.execute(update(Job).where(Job.id == job_id, Job.worker_id == me, Job.status == "running").values(
                    status="succeeded", progress=1.0, message="done", result=result, finished_at=utcnow(),
                    updated_at=utcnow(), heartbeat_at=utcnow()))
        except JobCancelled:
            log.info("job %s (%s) cancelled on request", job_id, kind)
            with session_scope(self.sessions) as s:
                job = s.get(Job, job_id)
                if job is not None and job.status == "running" and job.worker_id == me:
                    fail_job(s, job, CANCELLED_ERRORS.get(kind or "", "cancelled on request"), status="cancelled")
                    outputs = self._unfinished_outputs(s, kind or "", params)
            for path in outputs:  # nothing half-written stays (the janitor would get there later)
                self.storage.remove(path)
        except Exception as exc:  # noqa: BLE001 - every failure must end visibly in the job row
            message = str(exc) if isinstance(exc, (JobFailure, ValueError, FileNotFoundError)) else \
                f"{type(exc).__name__}: {exc}"
            if is_disk_full(exc):  # the path and errno go to the log only
                message = ("the server ran out of disk space while writing the job's result; nothing was kept. "
                           "The model owner must free space in the data directory; then submit the request again")
            log.error("job %s (%s) failed: %s\n%s", job_id, kind, message, traceback.format_exc())
            with session_scope(self.sessions) as s:
                job = s.get(Job, job_id)
                if job is not None and job.status == "running" and job.worker_id == me:
                    fail_job(s, job, message or type(exc).__name__)

    def _unfinished_outputs(self, s: Session, kind: str, params: dict[str, Any]) -> list[Path]:
        """Files a cancelled job may already have moved into place (its row was never marked done)."""
        if kind == "importance" and params.get("run_id"):
            return [self.storage.importance / params["run_id"]]
        if kind == "emulator" and params.get("emulator_id"):
            emu = s.get(Emulator, params["emulator_id"])
            if emu is not None and emu.status != "ready":
                return [self.storage.emulators / f"{emu.id}.safetensors"]
        return []

    # helpers shared by handlers
    @property
    def device(self) -> str:
        return self.settings.resolved_device()

    def full_model(self, model_row: BaseModel) -> tuple[Any, Any]:
        from model_owner_server.model_cache import load_full_model

        return load_full_model(model_row.path, self.device, self.settings.model_cache_size)


def _why_stop(job: Job | None, worker: str) -> Exception | None:
    """Why a task must stop now, if it must: a cancel request, or the job is no longer its own (the reaper or
    a shutdown failed it meanwhile), so whatever it computed further would be discarded anyway."""
    if job is not None and job.status == "running" and job.worker_id == worker:
        return JobCancelled("cancelled on request") if job.cancel_requested_at is not None else None
    return JobFailure("this job was marked failed while it was still running (its worker looked dead); "
                      "nothing was recorded; submit the request again")


# ---------------------------------------------------------------- handlers

def _still_ours(s: Session, ctx: JobContext) -> None:
    """Before a handler records its result: the job must still be running under this worker and not cancelled.
    Otherwise nothing is recorded (the runner or the janitor removes its files)."""
    halt = _why_stop(s.get(Job, ctx.job_id, with_for_update=True), ctx.worker)
    if halt is not None:
        raise halt


def _importance(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from model_owner_server.scaleot.importance import (ImportanceConfig, corpus_blocks, estimate_importance,
                                                       save_importance)
    from model_owner_server.scaleot.model_io import load_causal_lm

    settings, storage = runner.settings, runner.storage
    with session_scope(runner.sessions) as s:
        model_row = s.get(BaseModel, params["model_id"])
        if model_row is None:
            raise JobFailure("the model was deleted")
        model_path, run_id = model_row.path, params["run_id"]
    ctx.update(0.01, "loading model", force=True)
    # A fresh copy, not the shared cache: stage 1 swaps layers in and out while it trains.
    model, tokenizer = load_causal_lm(model_path, device=runner.device)
    ctx.update(0.03, "tokenising corpus")
    # Same data path as `modelowner-server estimate-importance` (DataError/ValueError name the file).
    train, val = corpus_blocks(tokenizer, params["corpus"], settings.importance_seq_len,
                               max_blocks=settings.importance_max_blocks)
    # Jobs queued before these knobs existed carry only steps: fall back to ImportanceConfig's defaults.
    knobs = {k: params[k] for k in ("warmup_steps", "rl_interval", "distill_weight", "hidden_weight", "seed")
             if k in params}
    cfg = ImportanceConfig(steps=int(params["steps"]), batch_size=settings.importance_batch_size,
                           device=str(runner.device), **knobs)

    def progress(p: Any) -> None:
        ctx.update(0.05 + 0.9 * p.fraction, p.label,
                   {"step": p.step, "total_steps": p.total_steps, "phase": p.phase, "loss": p.loss,
                    "reward_mean": p.reward_mean, "scores": [round(x, 5) for x in p.scores]})

    ctx.update(0.05, f"estimating importance on {len(train)} train / {len(val)} val blocks",
               {"train_blocks": len(train), "val_blocks": len(val)}, force=True)
    result = estimate_importance(model, train, val, cfg, progress=progress)
    ctx.update(0.96, "saving", force=True)
    tmp = storage.temp_path()
    try:
        save_importance(result, tmp, extra={"model_id": params["model_id"], "corpus": params["corpus"]})
        final = storage.commit_dir(tmp, storage.importance / run_id)
    finally:
        storage.remove(tmp if tmp.exists() else None)
    scores = [float(x) for x in result.scores.tolist()]
    with session_scope(runner.sessions) as s:
        _still_ours(s, ctx)
        run = s.get(ImportanceRun, run_id)
        run.status, run.path, run.scores, run.finished_at = "succeeded", storage.rel(final), scores, utcnow()
    final_loss = next((h["loss"] for h in reversed(result.history) if h["phase"] == "dl"), None)
    return {"model_id": params["model_id"], "importance_run_id": run_id, "scores": scores,
            "ranking": result.ranking(), "final_loss": final_loss, "seconds": round(result.seconds, 2),
            "n_harmonizer_params": result.n_harmonizer_params,
            # The loss / reward curve for the console; a long run keeps every k-th record (at most 400).
            "history": result.history[::max(1, -(-len(result.history) // 400))]}


def _emulator(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from model_owner_server.scaleot.calibrate import CalibrationConfig
    from model_owner_server.scaleot.emulator import build_blocks, make_emulator
    from model_owner_server.scaleot.importance import load_importance
    from shared.adapter import adapter_spec, max_adapter_bytes, spec_to_json
    from shared.emulator_file import emulator_dtype
    from shared.lora import issue_lora

    settings, storage = runner.settings, runner.storage
    with session_scope(runner.sessions) as s:
        emu = s.get(Emulator, params["emulator_id"])
        model_row = s.get(BaseModel, emu.model_id)
        run = s.get(ImportanceRun, emu.importance_run_id)
        emu_id, model_id, n_adapter, alpha, beta = emu.id, emu.model_id, emu.n_adapter, emu.alpha, emu.beta
        run_path, corpus = storage.abs(run.path), run.corpus
        dtype_name = (emu.build_info or {}).get("dtype", "float32")  # set by POST /v1/emulators
    dtype = emulator_dtype(dtype_name)
    ctx.update(0.05, "loading model", force=True)
    model, tokenizer = runner.full_model(model_row)
    importance = load_importance(run_path)
    calibration = CalibrationConfig(steps=settings.emulator_calibration_steps,
                                    batch_size=settings.importance_batch_size,
                                    kept_lr=settings.emulator_calibration_kept_lr)
    # Calibration and the fidelity figure use the stage-1 corpus (task-agnostic, the model owner's own).
    blocks = build_blocks(tokenizer, corpus, settings.importance_seq_len, settings.importance_max_blocks,
                          need=calibration.steps > 0 or settings.emulator_fidelity_blocks > 0)
    train_blocks, val_blocks = blocks if blocks is not None else (None, None)

    def progress(p: Any) -> None:
        ctx.update(0.1 + 0.75 * p.fraction, f"calibrating step {p.step}/{p.total_steps}",
                   {"step": p.step, "total_steps": p.total_steps, "kl": p.kl, "nmse": p.nmse})

    ctx.update(0.1, "building emulator", force=True)
    out = storage.emulators / f"{emu_id}.safetensors"  # save_emulator writes a temp name and renames
    info = make_emulator(model, tokenizer, importance, n_adapter, alpha, beta, out,
                         placement=settings.emulator_placement,
                         calibration=calibration if train_blocks is not None else None,
                         calibration_blocks=train_blocks,
                         fidelity_blocks=(val_blocks[:settings.emulator_fidelity_blocks]
                                          if val_blocks is not None and settings.emulator_fidelity_blocks else None),
                         calibration_progress=progress, dtype=dtype,
                         extra_metadata={"model_id": model_id, "emulator_id": emu_id})
    ctx.update(0.9, "describing adapter layers", force=True)
    layers = list(info.plan.adapter_layers)
    spec = adapter_spec(model, layers, dtype)  # uploads come back in the emulator's dtype
    fields = dict(path=storage.rel(out), sha256=info.sha256, size_bytes=info.size_bytes, n_params=info.n_params,
                  full_model_params=int(info.extra.get("full_model_params", 0)) or None,
                  full_model_bytes=int(info.extra.get("full_model_bytes", 0)) or None,
                  plan=info.plan.to_dict(), adapter_layers=layers, adapter_spec=spec_to_json(spec),
                  max_adapter_bytes=max_adapter_bytes(spec), fidelity=info.extra.get("fidelity"),
                  build_info={"placement": info.extra.get("placement"),
                              "calibration": info.extra.get("calibration"), "dtype": dtype_name,
                              "lora": issue_lora(model, layers, dtype=dtype).to_json()})
    with session_scope(runner.sessions) as s:
        _still_ours(s, ctx)
        emu = s.get(Emulator, emu_id)
        for k, v in fields.items():
            setattr(emu, k, v)
        if runner.keyring is not None:  # a worker without the key leaves signing to the API (lazy)
            emu.signed_manifest = runner.keyring.sign(manifest_for(emu))
        emu.status, emu.error = "ready", None
    return {"emulator_id": emu_id, "sha256": info.sha256, "size_bytes": info.size_bytes,
            "plan_summary": info.plan.summary(), "fidelity": info.extra.get("fidelity")}


def manifest_for(emu: Emulator) -> dict[str, Any]:
    from shared.signing import emulator_manifest

    manifest = emulator_manifest(emulator_id=emu.id, model_id=emu.model_id, sha256=emu.sha256,
                                 size_bytes=emu.size_bytes, layer_plan=emu.plan, key_id="")
    # Signed too: the storage dtype and the LoRA the server accepts (absent on emulators built before them).
    issued = {k: (emu.build_info or {}).get(k) for k in ("dtype", "lora")}
    return {**manifest, **{k: v for k, v in issued.items() if v is not None}}


def _evaluation(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from model_owner_server.model_cache import plugged_models
    from model_owner_server.scaleot.plugin import plug_in
    from shared.adapter import spec_from_json
    from shared.data import load_dataset
    from shared.lora import issued_lora, load_adapter
    from shared.evaluation import evaluate

    settings, storage = runner.settings, runner.storage
    with session_scope(runner.sessions) as s:
        adapter = s.get(Adapter, params["adapter_id"])
        emu = s.get(Emulator, adapter.emulator_id)
        model_row = s.get(BaseModel, adapter.model_id)
        spec, layers = spec_from_json(emu.adapter_spec), list(emu.adapter_layers)
        lora = issued_lora(emu.build_info)
        adapter_path = storage.abs(adapter.path)
        eval_path = storage.abs(adapter.eval_path) if adapter.eval_path else settings.default_eval
        eval_source = "upload" if adapter.eval_path else f"server default ({Path(str(eval_path)).name})"
        adapter_id = adapter.id
    if eval_path is None:
        raise JobFailure("no evaluation data: upload eval_data with the adapter or set SCALEOT_DEFAULT_EVAL")
    ctx.update(0.02, "validating adapter", force=True)
    tensors = load_adapter(adapter_path, spec, lora)  # whole layers or a PEFT LoRA, as issued
    dataset = load_dataset(eval_path)
    ctx.update(0.05, "loading full model", force=True)
    model, tokenizer = runner.full_model(model_row)
    kw = dict(seq_len=settings.eval_seq_len, batch_size=settings.eval_batch_size,
              device=next(model.parameters()).device, max_examples=settings.eval_max_examples)

    def prog(lo: float, hi: float, label: str) -> Callable[[int, int], None]:
        return lambda done, total: ctx.update(lo + (hi - lo) * done / max(1, total), f"{label} {done}/{total}")

    ctx.update(0.1, "evaluating the full model zero-shot", force=True)
    zero = evaluate(model, tokenizer, dataset, progress=prog(0.1, 0.5, "zero-shot"), **kw)
    ctx.update(0.5, "plugging the adapter into the full model", {"zero_shot": zero}, force=True)
    plugged = plug_in(model, tensors, layers, spec, lora)
    plug = evaluate(plugged, tokenizer, dataset, progress=prog(0.55, 0.98, "plug-in"), **kw)
    plugged_models().get_or_load(adapter_id, lambda: plugged)  # /generate in this process starts warm
    with session_scope(runner.sessions) as s:
        _still_ours(s, ctx)
        for kind, metrics in (("zero_shot", zero), ("plug_in", plug)):
            s.add(Evaluation(adapter_id=adapter_id, kind=kind, eval_source=eval_source, metrics=metrics))
        adapter = s.get(Adapter, adapter_id)
        adapter.status, adapter.error = "evaluated", None
    return {"adapter_id": adapter_id, "zero_shot": zero, "plug_in": plug, "eval_source": eval_source}


def _privacy_audit(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    from model_owner_server.privacy_audit import audit_job

    return audit_job(runner, ctx, params)


HANDLERS: dict[str, Handler] = {"importance": _importance, "emulator": _emulator, "evaluation": _evaluation,
                                "privacy_audit": _privacy_audit}


# ---------------------------------------------------------------- the queue

def make_huey(settings: Settings) -> Huey:
    url = settings.queue_url
    if url == "immediate":
        return MemoryHuey(settings.queue_name, immediate=True, results=False)
    if url and url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHuey(settings.queue_name, url=url, results=False)
    if url and url.startswith("sqlite:///"):
        filename = Path(url.removeprefix("sqlite:///"))
    elif url:
        raise ValueError(f"unsupported SCALEOT_QUEUE_URL {url!r}: use redis://..., sqlite:///FILE or 'immediate'")
    else:
        filename = settings.queue_file
    filename.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(settings.queue_name, filename=str(filename), results=False)


class _QuietConsumer(Consumer):
    """A huey consumer that leaves signal handling to its host (uvicorn, or our worker command)."""

    def _set_signal_handlers(self) -> None:
        pass


class JobQueue:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], storage: Storage,
                 keyring: KeyRing | None):
        self.settings = settings
        self.huey = make_huey(settings)
        self.runner = JobRunner(settings, sessions, storage, keyring)
        self._task = self.huey.task(name=TASK_NAME)(self.runner.run)
        self.consumer: Consumer | None = None

    @property
    def immediate(self) -> bool:
        return bool(self.huey.immediate)

    def enqueue(self, job_id: str) -> None:
        self._task(job_id)

    def submit(self, sessions: sessionmaker[Session], job_id: str) -> None:
        """Enqueue a committed job; if the queue is unreachable, the job fails visibly instead of hanging."""
        try:
            self.enqueue(job_id)
        except Exception as exc:  # noqa: BLE001 - e.g. Redis down
            log.exception("could not enqueue job %s", job_id)
            with session_scope(sessions) as s:
                job = s.get(Job, job_id)
                if job is not None and job.status == "queued":
                    fail_job(s, job, f"could not queue the job ({type(exc).__name__}: {exc}); try again later")
            raise QueueUnavailable(str(exc)) from exc

    def start_consumer(self, workers: int | None = None) -> None:
        """Run huey workers as threads of this process (the embedded worker of `serve`)."""
        if self.immediate or self.consumer is not None:
            return
        self.consumer = _QuietConsumer(self.huey, workers=workers or self.settings.worker_threads,
                                       worker_type="thread", periodic=False, check_worker_health=False,
                                       initial_delay=0.1, max_delay=1.0)
        self.consumer.start()

    def stop_consumer(self) -> None:
        if self.consumer is not None:
            self.consumer.stop(graceful=False)
            self.consumer = None


class Reaper:
    """Periodically fails jobs whose worker stopped heartbeating (e.g. a remote worker that crashed), then
    removes what interrupted work left behind (janitor.sweep)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, storage: Storage | None = None):
        self.sessions, self.settings, self.storage = sessions, settings, storage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-reaper")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                recover_interrupted_jobs(self.sessions, self.settings, startup=False)
                if self.storage is not None:
                    from model_owner_server.janitor import sweep

                    sweep(self.sessions, self.storage, startup=False,
                          min_age_s=self.settings.heartbeat_seconds * self.settings.stale_after_heartbeats)
            except Exception:  # noqa: BLE001 - a DB hiccup must not kill the reaper
                log.exception("job reaper pass failed")
