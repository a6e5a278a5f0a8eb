"""Shared by the load / fault scripts and tests/reliability: a real server process on loopback, setup,
and the database + data-dir consistency check that every fault run ends with."""

from __future__ import annotations

import os
import random
import secrets
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from shared.signing import sha256_file
from tooling.procs import ServeProcess, small_server_env, wait_job

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "merry",
    "kings",
    "sing",
    "of",
    "ancient",
    "ships",
    "and",
    "silver",
    "rivers",
    "under",
    "the",
    "pale",
    "moon",
]


def server_env(
    data_dir: Path, db_url: str, *, corpus: Path, eval_file: Path, pause_dir: Path | None = None, **extra: str
) -> dict[str, str]:
    """Environment of a small CPU server (tooling.procs.small_server_env) with this run's corpus and eval file,
    one thread, and the fault hooks' pause folder."""
    env = small_server_env(
        data_dir,
        db_url,
        SCALEOT_DEFAULT_CORPUS=str(corpus),
        SCALEOT_DEFAULT_EVAL=str(eval_file),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    )
    if pause_dir is not None:
        env["SCALEOT_FAULT_PAUSE_DIR"] = str(pause_dir)
    env.update(extra)
    return env


class ServerProcess(ServeProcess):
    """`modelowner-server serve` (or, with `hooks`, the fault-hook wrapper) on 127.0.0.1; restartable on the
    same port."""

    def __init__(self, env: dict[str, str], log: Path, *, hooks: bool = False, port: int | None = None):
        command = [sys.executable, "-m", "reliability.fault_hooks"] if hooks else None
        super().__init__(env, log, port=port, command=command, args=("--log-level", "warning"), cwd=ROOT)

    def kill(self) -> None:
        """kill -9: no shutdown handlers, no flushing, exactly like a power cut for this process."""
        self.stop(signal.SIGKILL)

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (psutil)."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except (psutil.Error, RuntimeError):
            return 0


# ---------------------------------------------------------------- setup


def make_inputs(root: Path, *, n_layers: int = 4, hidden: int = 32) -> dict[str, Path]:
    """A tiny LLaMA folder, a corpus and an eval text (like the tests' `files` fixture)."""
    from scaleot_samples.tiny import save_tiny_model_dir

    root.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model_dir(root / f"tiny-llama-{n_layers}x{hidden}", "llama", n_layers=n_layers, hidden=hidden)
    rng = random.Random(1)
    corpus, eval_file = root / "corpus.txt", root / "eval.txt"
    corpus.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    eval_file.write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    return {"model": model, "corpus": corpus, "eval": eval_file, "root": root}


def bootstrap(db_url: str, model_dir: Path, data_owners: tuple[str, ...] = ("alice",)) -> dict[str, Any]:
    """What `create-org` / `register-model` / `grant` do, in-process (seconds faster than 4 CLI runs).
    Returns {"keys": {org: api key}, "model_id": ...}."""
    from model_owner_server import crud
    from model_owner_server.core.db import (
        make_engine,
        make_session_factory,
        run_migrations,
    )

    run_migrations(db_url)
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as s:
            keys = {}
            _, keys["admin"] = crud.create_org(s, "model-owner", "admin")
            orgs = {}
            for name in data_owners:
                orgs[name], keys[name] = crud.create_org(s, name, "data-owner")
            model = crud.register_model(s, "tiny", model_dir)
            for org in orgs.values():
                crud.grant(s, model, org)
            s.commit()
            return {"keys": keys, "model_id": model.id}
    finally:
        engine.dispose()


@contextmanager
def fresh_database(url: str, work: Path) -> Iterator[str]:
    """A database URL for one run: a SQLite file in `work` when `url` is empty; for PostgreSQL a new schema
    (`scaleot_run_<random>`, selected through search_path) in that database, dropped afterwards."""
    if not url:
        yield f"sqlite:///{work / 'scaleot.db'}"
        return
    if not url.startswith("postgresql"):
        yield url
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"scaleot_run_{secrets.token_hex(5)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield (
            make_url(url).update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


def client(url: str, key: str | None, timeout: float = 60.0) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout)


def importance_and_emulator(
    url: str,
    keys: dict[str, str],
    model_id: str,
    *,
    owner: str = "alice",
    n_adapter: int = 1,
    alpha: float = 0.5,
    beta: float = 0.3,
) -> dict:
    """Stage 1 (3 steps, default corpus) then an emulator; returns the ready emulator's description."""
    with client(url, keys["admin"]) as admin, client(url, keys[owner]) as alice:
        r = admin.post(f"/v1/models/{model_id}/importance", json={"steps": 3})
        r.raise_for_status()
        job = wait_job(admin, r.json()["id"])
        assert job["status"] == "succeeded", job
        r = alice.post(
            "/v1/emulators", json={"model_id": model_id, "n_adapter": n_adapter, "alpha": alpha, "beta": beta}
        )
        r.raise_for_status()
        emu = r.json()["emulator"]
        if r.json().get("job"):
            job = wait_job(alice, r.json()["job"]["id"])
            assert job["status"] == "succeeded", job
        return alice.get(f"/v1/emulators/{emu['id']}").json()


def adapter_bytes_for(emulator_file: Path) -> bytes:
    """A valid adapter upload: the emulator's own adapter-layer tensors."""
    from safetensors.torch import save

    from shared.adapter import extract_adapter
    from shared.emulator_file import load_emulator

    loaded = load_emulator(emulator_file)
    tensors = extract_adapter(loaded.model, loaded.plan.adapter_layers)
    return save({k: v.contiguous() for k, v in tensors.items()})


# ---------------------------------------------------------------- consistency


def consistency_problems(db_url: str, data_dir: Path, *, allow_active: bool = False) -> list[str]:
    """Everything that would be wrong after a crash: rows pointing at missing/different files, files no row
    owns, temp files left behind, jobs stuck or failed without a reason, half-recorded evaluations.
    `allow_active`: queued/running jobs (and their temp files) are fine (a live server)."""
    from sqlalchemy import select

    from model_owner_server.core.db import make_engine, make_session_factory
    from model_owner_server.models import (
        AdapterRow,
        EmulatorRow,
        Evaluation,
        ImportanceRun,
        JobRow,
    )

    data_dir = Path(data_dir).resolve()
    problems: list[str] = []
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as s:
            jobs = {j.id: j for j in s.execute(select(JobRow)).scalars()}
            emus = {e.id: e for e in s.execute(select(EmulatorRow)).scalars()}
            adapters = {a.id: a for a in s.execute(select(AdapterRow)).scalars()}
            evals: dict[str, set[str]] = {}
            for e in s.execute(select(Evaluation)).scalars():
                evals.setdefault(e.adapter_id, set()).add(e.kind)
            runs = list(s.execute(select(ImportanceRun)).scalars())
    finally:
        engine.dispose()
    active = {"queued", "running"}
    for j in jobs.values():
        if j.status in active and not allow_active:
            problems.append(f"job {j.id} ({j.kind}) still {j.status}")
        if j.status == "failed" and not (j.error or "").strip():
            problems.append(f"job {j.id} failed without a reason")
    for e in emus.values():
        path = data_dir / e.path if e.path else None
        if e.status == "ready":
            if path is None or not path.is_file():
                problems.append(f"emulator {e.id} is ready but its file {e.path} is missing")
            elif path.stat().st_size != e.size_bytes or sha256_file(path)[0] != e.sha256:
                problems.append(f"emulator {e.id}: file differs from its recorded size/sha256")
        elif e.status == "building":
            job = jobs.get(e.job_id or "")
            if job is None or job.status not in active:
                problems.append(f"emulator {e.id} stuck 'building' (its job is {job.status if job else 'gone'})")
        elif not (e.error or "").strip():
            problems.append(f"emulator {e.id} failed without a reason")
    for a in adapters.values():
        if not (data_dir / a.path).is_file():
            problems.append(f"adapter {a.id}: file {a.path} is missing")
        elif sha256_file(data_dir / a.path)[0] != a.sha256:
            problems.append(f"adapter {a.id}: file differs from its recorded sha256")
        if a.eval_path and not (data_dir / a.eval_path).is_file():
            problems.append(f"adapter {a.id}: eval file {a.eval_path} is missing")
        kinds = evals.get(a.id, set())
        if a.status == "evaluated" and kinds != {"zero_shot", "plug_in"}:
            problems.append(f"adapter {a.id} evaluated but has evaluations {sorted(kinds)}")
        if a.status != "evaluated" and kinds:
            problems.append(f"adapter {a.id} is {a.status} but has half-recorded evaluations {sorted(kinds)}")
        if a.status == "evaluating":
            job = jobs.get(a.job_id or "")
            if not allow_active or job is None or job.status not in active:
                problems.append(f"adapter {a.id} stuck 'evaluating' (job {job.status if job else 'gone'})")
        if a.status == "failed" and not (a.error or "").strip():
            problems.append(f"adapter {a.id} failed without a reason")
    for r in runs:
        if r.status == "succeeded" and (not r.path or not (data_dir / r.path).is_dir()):
            problems.append(f"importance run {r.id} succeeded but {r.path} is missing")
    # Files that no row owns, and temp files.
    tmp = data_dir / "tmp"
    if tmp.is_dir() and not allow_active:
        problems += [f"leftover temp file tmp/{p.name}" for p in tmp.iterdir()]
    emu_dir = data_dir / "emulators"
    for p in sorted(emu_dir.iterdir()) if emu_dir.is_dir() else []:
        emu_id = p.name[1:].split(".")[0] if p.name.startswith(".") else p.name.removesuffix(".safetensors")
        e = emus.get(emu_id)
        if p.name.startswith("."):
            if not (allow_active and e is not None and e.status == "building"):
                problems.append(f"unpromoted emulator temp file emulators/{p.name}")
        elif e is None or e.status == "failed" or (e.status == "ready" and e.path != f"emulators/{p.name}"):
            problems.append(f"emulator file emulators/{p.name} has no ready/building emulator")
    adp_dir = data_dir / "adapters"
    for p in sorted(adp_dir.iterdir()) if adp_dir.is_dir() else []:
        if p.name not in adapters:
            problems.append(f"adapter folder adapters/{p.name} has no adapter row")
    return problems
