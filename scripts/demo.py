"""The two-party ScaleOT offsite-tuning demo: `make demo` (or `python scripts/demo.py`).

Two organizations, two working directories, one HTTP connection between them:

  model owner  prepares SmolLM2-135M and a Wikipedia excerpt, starts `modelowner-server serve` on
               loopback (its own SCALEOT_DATA_DIR, SQLite), creates an admin and a data-owner organization,
               registers and grants the model, runs stage 1 (importance) and stage 2 (an emulator) via the
               REST API, and hands the data owner three strings: the emulator URL, an API key, and the
               server's public signing key.
  data owner   in a separate directory, with only those three strings (SCALEOT_API_KEY,
               SCALEOT_SERVER_PUBKEY), runs `dataowner-client tune` on Shakespeare: download + verify the
               signed emulator, fine-tune the adapter layers locally, upload only the adapter, and wait
               for the server's plug-in evaluation on held-out text (a different work).

The demo ends with a report (zero-shot vs emulator fine-tuned vs plug-in, emulator size vs full model,
time taken) and always stops the server it started (also on error, Ctrl-C or SIGTERM).

Roles (docker-compose runs each party in its own container):
  --role both          (default) everything on this machine, server started and stopped here
  --role model-owner   against a running server (--server-url); writes the invitation file for the client
  --role data-owner    reads the invitation file and runs the client against the server it names

`--tiny` runs the same code path on a tiny random model and small data in seconds (used by the tests).
Longer and better: `--steps 200 --train-steps 300`, or `SCALEOT_DEMO_SCALE=4` (multiplies both budgets).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from a source checkout
    sys.path.insert(0, str(ROOT))

ADMIN_ORG, DATA_ORG = "model-owner", "acme-data"
TINY = False  # set by main() for --tiny


# ---------------------------------------------------------------- settings


@dataclass
class DemoConfig:
    tiny: bool = False
    steps: int = 48  # stage-1 DL steps (an RL step comes every 2)
    warmup_steps: int = 10  # local-regression warm start of the harmonizers (cheap; they start far less weak)
    train_steps: int = 60  # the data owner's optimizer steps on the emulator
    # alpha 0.5: half the non-adapter layers replaced, an emulator of about 2/3 of M's size (docs/benchmarks.md).
    n_adapter: int = 4
    alpha: float = 0.5
    beta: float = 0.0
    seq_len: int = 128  # training and evaluation sequence length (client and server alike)
    batch_size: int = 4
    eval_max_examples: int = 64  # held-out blocks scored on both sides
    lr: float | None = None
    wiki_train_chars: int = 300_000
    train_works: int = 3
    eval_works: int = 1
    max_chars_per_work: int | None = None
    model_name: str = "smollm2-135m"
    seed: int = 0

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> DemoConfig:
        if args.tiny:
            cfg = cls(tiny=True, steps=4, warmup_steps=1, train_steps=4, n_adapter=2, alpha=0.5, beta=0.5, seq_len=64, batch_size=2,
                      eval_max_examples=8, wiki_train_chars=40_000, train_works=2, eval_works=1,
                      max_chars_per_work=12_000, model_name="tiny-llama")
        else:
            cfg = cls()
        scale = args.scale if args.scale is not None else float(os.environ.get("SCALEOT_DEMO_SCALE") or 1.0)
        if scale <= 0:
            raise SystemExit("SCALEOT_DEMO_SCALE / --scale must be > 0")
        cfg.steps = max(1, round(cfg.steps * scale))
        cfg.train_steps = max(1, round(cfg.train_steps * scale))
        for name in ("steps", "warmup_steps", "train_steps", "n_adapter", "alpha", "beta", "seq_len", "batch_size",
                     "eval_max_examples", "lr", "seed"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(cfg, name, value)
        return cfg


@dataclass
class Invitation:
    """All the data owner receives from the model owner: no files, no database, no weights."""

    emulator_url: str
    api_key: str
    server_pubkey: str
    key_id: str = ""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, wait_s: float = 0.0) -> Invitation:
        deadline = time.monotonic() + wait_s
        while not path.is_file():
            if time.monotonic() > deadline:
                raise DemoError(f"no invitation at {path}: run the model-owner side first "
                                "(`python scripts/demo.py --role model-owner ...`)")
            time.sleep(2)
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in ("emulator_url", "api_key", "server_pubkey") if k in data},
                   key_id=data.get("key_id", ""))

    @property
    def server_url(self) -> str:
        return self.emulator_url.split("/v1/emulators/")[0]


class DemoError(RuntimeError):
    pass


# ---------------------------------------------------------------- output


T0 = time.monotonic()


def say(message: str = "") -> None:
    print(message, flush=True)


def step(title: str) -> None:
    say(f"\n[{_clock()}] == {title}")


def _clock() -> str:
    s = int(time.monotonic() - T0)
    return f"{s // 60:02d}:{s % 60:02d}"


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------- subprocesses


_children: list[subprocess.Popen] = []


def tool(name: str) -> list[str]:
    """A console script of this environment (the venv's bin/, else PATH)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return [str(here)]
    if name == "dataowner-client":
        return [sys.executable, "-m", "data_owner_client"]
    return [sys.executable, "-c", "from model_owner_server.cli import app; app()"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any SCALEOT_* setting, plus `extra`: each party gets only its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEOT_")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # OpenMP threads that spin while waiting collapse throughput when the CPU is shared (the server's job
    # and the client may run at once, or other work does): let idle threads sleep.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if TINY:
        env.setdefault("OMP_NUM_THREADS", "1")  # a tiny model gains nothing from threads; shared CPUs lose a lot
    env.update(extra)
    return env


def show_cmd(cmd: list[str], env_note: str = "") -> None:
    shown = " ".join(Path(c).name if i == 0 else (f"'{c}'" if " " in c else c) for i, c in enumerate(cmd))
    say(f"  $ {env_note}{shown}")


def run_cmd(cmd: list[str], *, env: dict[str, str], cwd: Path, capture: bool = False, env_note: str = "",
            secret_output: bool = False) -> str:
    """Run a command, streaming its output (with `capture`, stdout is returned and stderr streamed).

    In a terminal the child writes to it directly (live progress bars); otherwise (CI logs, pipes) its
    stderr is pumped through `_pump`, which keeps every message but only one progress-bar update per 10 s.
    """
    show_cmd(cmd, env_note)
    pump = not sys.stderr.isatty()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if pump else None)
    _children.append(proc)
    thread = None
    try:
        if pump:
            import threading

            thread = threading.Thread(target=_pump, args=(proc.stderr,), daemon=True)
            thread.start()
        out = proc.stdout.read().decode("utf-8", "replace") if capture else ""
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted while it ran: it must not outlive us
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if thread is not None:
            thread.join(timeout=10)
        _children.remove(proc)
    if proc.returncode != 0:
        raise DemoError(f"`{Path(cmd[0]).name} {' '.join(cmd[1:3])} ...` exited with {proc.returncode}")
    if capture and not secret_output and out.strip():
        for line in out.strip().splitlines():
            say(f"    {line}")
    return out


def _pump(stream, bar_interval_s: float = 10.0) -> None:
    """Copy a child's stderr to our stdout line by line; '\r' progress-bar updates are thinned out."""
    buf, last_bar = b"", 0.0
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            cut = min((i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0), default=-1)
            if cut < 0:
                break
            seg, end, buf = buf[:cut], buf[cut:cut + 1], buf[cut + 1:]
            text = seg.decode("utf-8", "replace").rstrip()
            if not text.strip():
                continue
            now = time.monotonic()
            if end == b"\n" or now - last_bar >= bar_interval_s or "100%" in text:
                if end == b"\r":
                    last_bar = now
                say(f"    | {text.strip()}")
    if buf.strip():
        say(f"    | {buf.decode('utf-8', 'replace').strip()}")


def stop_children() -> None:
    for server in list(_servers):
        server.stop()  # graceful, and says so
    for proc in _children:
        if proc.poll() is None:
            proc.terminate()
    for proc in _children:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


_servers: list[LocalServer] = []


class LocalServer:
    """`modelowner-server serve` on loopback with its own data directory; stopped on exit, whatever happens."""

    def __init__(self, data_dir: Path, cwd: Path, port: int, server_env: dict[str, str]):
        self.data_dir, self.cwd, self.port = data_dir, cwd, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / "server.log"
        self.env = clean_env(SCALEOT_DATA_DIR=str(data_dir), **server_env)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = tool("modelowner-server") + ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        show_cmd(cmd, f"SCALEOT_DATA_DIR={self.data_dir} ")
        say(f"    (server log: {self.log_path})")
        log = open(self.log_path, "w")
        # A session of its own: Ctrl-C in the terminal reaches the demo, which then stops the server cleanly.
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        _servers.append(self)  # main() stops it even if Ctrl-C lands before the with-block owns it
        try:
            wait_healthy(self.url, timeout_s=120, alive=self.check_alive)
            say(f"    server up at {self.url}")
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"the server exited with {self.proc.returncode}; last lines of {self.log_path}:\n"
                            + self.log_tail())

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        say(f"  server stopped (exit {self.proc.returncode})")

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float, alive=lambda: None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        alive()
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


# ---------------------------------------------------------------- REST


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
            except Exception:  # noqa: BLE001
                detail = r.text[:500]
            raise DemoError(f"{method} {path} -> {r.status_code} {detail}")
        return r.json()

    def wait_job(self, job_id: str, label: str, timeout_s: float = 4 * 3600) -> dict[str, Any]:
        """Poll GET /v1/jobs/{id}, printing progress as it moves."""
        say(f"  polling GET /v1/jobs/{job_id}")
        deadline, last, last_t = time.monotonic() + timeout_s, None, 0.0
        while True:
            self.alive()
            job = self.call("GET", f"/v1/jobs/{job_id}", show=False)
            line = f"{job['status']} {job.get('message') or ''}".strip()
            now = time.monotonic()
            if line != last and (now - last_t >= 3 or job["status"] in ("succeeded", "failed") or last is None):
                m = job.get("metrics") or {}
                extra = f"  loss {m['loss']:.3f}" if isinstance(m.get("loss"), (int, float)) else ""
                say(f"    [{_clock()}] {label} {round(100 * job['progress']):3d}%  {line}{extra}")
                last, last_t = line, now
            if job["status"] == "succeeded":
                return job
            if job["status"] == "failed":
                raise DemoError(f"{label} job {job_id} failed: {job.get('error') or job.get('message')}")
            if now > deadline:
                raise DemoError(f"{label} job {job_id} still {job['status']} after {timeout_s:.0f} s")
            time.sleep(1.0)

    def close(self) -> None:
        self.http.close()


# ---------------------------------------------------------------- data


def model_owner_files(cfg: DemoConfig, owner_dir: Path) -> tuple[Path, Path]:
    """The model owner's material: the base model folder and its task-agnostic corpus (Wikipedia)."""
    models = owner_dir / "models"
    corpus_dir = owner_dir / "corpus"
    if cfg.tiny:
        from scaleot_samples.tiny import save_tiny_model_dir

        model_dir = models / cfg.model_name
        if not (model_dir / "config.json").is_file():
            save_tiny_model_dir(model_dir, "llama", n_layers=6, hidden=32, seed=cfg.seed)
        say(f"  tiny random LLaMA (6 layers) in {model_dir}")
    else:
        model_dir = models / cfg.model_name
        if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
            say(f"  reusing {model_dir}")
        else:
            run_cmd(tool("modelowner-server") + ["prepare-smollm2", "--output", str(model_dir)],
                    env=clean_env(), cwd=owner_dir, capture=True)
    corpus = write_wiki(corpus_dir, cfg)
    say(f"  stage-1 corpus: {corpus} ({corpus.stat().st_size // 1000} kB of Wikipedia prose)")
    return model_dir, corpus


def write_wiki(corpus_dir: Path, cfg: DemoConfig) -> Path:
    from scaleot_samples.corpora import CorpusNotInstalledError, write_wiki_files

    try:
        return write_wiki_files(corpus_dir, train_chars=cfg.wiki_train_chars,
                                val_chars=max(5_000, cfg.wiki_train_chars // 10))["wiki_train"]
    except CorpusNotInstalledError as exc:
        if not cfg.tiny:
            raise DemoError(f"{exc} (or run `make demo`, which installs it)") from None
        return _stdlib_text(corpus_dir / "wiki_train.txt", cfg.wiki_train_chars, 0)  # tiny: any prose will do


def data_owner_files(cfg: DemoConfig, data_dir: Path) -> tuple[Path, Path, list[str], list[str]]:
    """The data owner's private task: Shakespeare, training works and a different held-out work."""
    from scaleot_samples.corpora import CorpusNotInstalledError, shakespeare_works

    data_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = data_dir / "shakespeare_train.txt", data_dir / "shakespeare_eval.txt"
    try:
        works = shakespeare_works()
    except CorpusNotInstalledError as exc:
        if not cfg.tiny:
            raise DemoError(f"{exc} (or run `make demo`, which installs it)") from None
        _stdlib_text(train_path, 3 * (cfg.max_chars_per_work or 10_000), 1)
        _stdlib_text(eval_path, cfg.max_chars_per_work or 10_000, 2)
        return train_path, eval_path, ["Python documentation (a)"], ["Python documentation (b)"]
    titles = random.Random(cfg.seed).sample(sorted(works), cfg.train_works + cfg.eval_works)
    train_titles, eval_titles = titles[:cfg.train_works], titles[cfg.train_works:]

    def cut(t: str) -> str:
        return t[:cfg.max_chars_per_work] if cfg.max_chars_per_work else t

    train_path.write_text("\n\n".join(cut(works[t]) for t in train_titles), encoding="utf-8")
    eval_path.write_text("\n\n".join(cut(works[t]) for t in eval_titles), encoding="utf-8")
    return train_path, eval_path, train_titles, eval_titles


def _stdlib_text(path: Path, chars: int, part: int) -> Path:
    """Fallback prose for --tiny when the corpus packages are missing: Python's own help topics."""
    from pydoc_data.topics import topics

    texts = [v for _, v in sorted(topics.items())]
    text = "\n\n".join(texts[part::3])[:chars]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- model owner


@dataclass
class OwnerResult:
    invitation: Invitation
    model: dict[str, Any]
    emulator: dict[str, Any]
    importance: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def server_cli(args: list[str], env: dict[str, str], cwd: Path, *, capture: bool = True, secret: bool = False,
               env_note: str = "") -> str:
    return run_cmd(tool("modelowner-server") + args, env=env, cwd=cwd, capture=capture, secret_output=secret,
                   env_note=env_note)


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


def model_owner_flow(cfg: DemoConfig, *, server_url: str, cli_env: dict[str, str], owner_dir: Path,
                     state_file: Path | None = None, alive=lambda: None) -> OwnerResult:
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
        model = admin.call("POST", "/v1/models", {"name": cfg.model_name, "path": str(model_dir.resolve())})
        say(f"    -> {model['id']}: {model.get('family')}, {model.get('n_layers')} layers, "
            f"{(model.get('n_params') or 0) / 1e6:.1f}M parameters")
    admin.call("POST", f"/v1/models/{model['id']}/grants", {"org": data_org})  # = `modelowner-server grant`

    keys = admin.call("GET", "/v1/signing-keys")["keys"]
    active = next(k for k in keys if k["status"] == "active")
    say(f"    server signing key {active['key_id']}: {active['public_key']}")

    step(f"model owner: stage 1, importance estimation ({cfg.warmup_steps} warm-up + {cfg.steps} DL steps, "
         "Dynamic LayerReplace)")
    t = time.monotonic()
    model = admin.call("GET", f"/v1/models/{model['id']}", show=False)
    importance: dict[str, Any] = {}
    budget = [cfg.steps, cfg.warmup_steps]
    if model.get("importance_ready") and state.get("importance_budget") == budget:
        say("  importance of this model is estimated already; reusing it")
    else:
        job = admin.call("POST", f"/v1/models/{model['id']}/importance",
                         {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "corpus": str(corpus.resolve())})
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
    created = admin.call("POST", "/v1/emulators", {"model_id": model["id"], "n_adapter": cfg.n_adapter,
                                                   "alpha": cfg.alpha, "beta": cfg.beta})
    emu = created["emulator"]
    if emu["status"] != "ready" and created.get("job"):
        admin.wait_job(created["job"]["id"], "emulator")
    emu = admin.call("GET", f"/v1/emulators/{emu['id']}")
    timings["emulator"] = time.monotonic() - t
    if emu["status"] != "ready":
        raise DemoError(f"emulator {emu['id']} is {emu['status']}: {emu.get('error')}")
    say(f"  emulator {emu['id']}: {_plan_summary(emu)}; {fmt_bytes(emu.get('size_bytes'))} "
        f"vs full model {fmt_bytes(emu.get('full_model_bytes'))}")
    model = admin.call("GET", f"/v1/models/{model['id']}", show=False)
    admin.close()
    invitation = Invitation(emulator_url=f"{server_url.rstrip('/')}/v1/emulators/{emu['id']}", api_key=data_key,
                            server_pubkey=active["public_key"], key_id=active["key_id"])
    return OwnerResult(invitation, model, emu, importance, timings)


def _key_works(server_url: str, key: str) -> bool:
    try:
        return httpx.get(f"{server_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
                         ).status_code == 200
    except httpx.HTTPError:
        return False


def _plan_summary(emu: dict[str, Any]) -> str:
    roles = (emu.get("plan") or {}).get("roles") or []
    counts = {r: roles.count(r) for r in ("adapter", "frozen", "harmonizer", "dropped") if roles.count(r)}
    summary = ", ".join(f"{n} {r}" for r, n in counts.items())
    return f"{len(roles)} positions ({summary}); adapter layers {emu.get('adapter_layers')}"


# ---------------------------------------------------------------- data owner


@dataclass
class ClientResult:
    doc: dict[str, Any]
    emulator: dict[str, Any]
    train_titles: list[str]
    eval_titles: list[str]
    seconds: float


def data_owner_flow(cfg: DemoConfig, invitation: Invitation, client_dir: Path, *,
                    device: str = "auto") -> ClientResult:
    """Everything the data owner does, in its own directory, knowing only the invitation's three strings."""
    step("data owner: private data (Shakespeare), in its own directory")
    client_dir.mkdir(parents=True, exist_ok=True)
    train, evalf, train_titles, eval_titles = data_owner_files(cfg, client_dir / "data")
    say(f"  training on {', '.join(train_titles)} ({train.stat().st_size // 1000} kB)")
    say(f"  held-out evaluation: {', '.join(eval_titles)} ({evalf.stat().st_size // 1000} kB, a different work)")

    step("data owner: dataowner-client tune (download + verify, fine-tune the adapter locally, upload only it)")
    import shutil

    shutil.rmtree(client_dir / "adapter", ignore_errors=True)  # a fresh adapter each run (no stale checkpoint)
    env = clean_env(SCALEOT_API_KEY=invitation.api_key, SCALEOT_SERVER_PUBKEY=invitation.server_pubkey,
                    SCALEOT_CLIENT_CACHE=str((client_dir / "cache").resolve()))
    if not sys.stderr.isatty():
        env.setdefault("TQDM_MININTERVAL", "10")  # progress bars in a log: a line every 10 s, not every step
    cmd = tool("dataowner-client") + [
        "tune", "--emulator-url", invitation.emulator_url, "--data", str(train.relative_to(client_dir)),
        "--eval-data", str(evalf.relative_to(client_dir)), "--max-steps", str(cfg.train_steps),
        "--batch-size", str(cfg.batch_size), "--seq-len", str(cfg.seq_len),
        "--eval-max-examples", str(cfg.eval_max_examples), "--seed", str(cfg.seed), "--device", device,
        "--out", "adapter", "--json", "--progress"]
    if cfg.lr is not None:
        cmd += ["--lr", str(cfg.lr)]
    t = time.monotonic()
    out = run_cmd(cmd, env=env, cwd=client_dir, capture=True, secret_output=True,
                  env_note="SCALEOT_API_KEY=sot_... SCALEOT_SERVER_PUBKEY=... ")
    seconds = time.monotonic() - t
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        raise DemoError(f"dataowner-client printed no JSON result:\n{out[-2000:]}") from None
    with httpx.Client(headers={"Authorization": f"Bearer {invitation.api_key}"}, timeout=60) as http:
        emu = http.get(invitation.emulator_url).json()  # sizes for the report, as the data owner sees them
    return ClientResult(doc, emu, train_titles, eval_titles, seconds)


# ---------------------------------------------------------------- report


def build_report(cfg: DemoConfig, client: ClientResult, owner: OwnerResult | None, total_s: float,
                 reference: dict[str, Any] | None = None) -> dict[str, Any]:
    m = client.doc.get("metrics") or {}
    emu = client.emulator
    rows = {
        "full model, zero-shot (server)": m.get("zero_shot"),
        "emulator, zero-shot (data owner)": m.get("emulator_zero_shot"),
        "emulator + fine-tuned adapter (data owner)": m.get("emulator_fine_tuned"),
        "plug-in: full model + adapter (server)": m.get("plug_in"),
    }
    if reference:
        rows["same layers tuned in M (demo diagnostic)"] = reference["metrics"]
    training = client.doc.get("training") or {}
    adapter = client.doc.get("adapter") or {}
    timings = dict(owner.timings) if owner else {}
    timings["data owner (tune + evaluation)"] = client.seconds
    return {
        "tiny": cfg.tiny, "config": asdict(cfg), "emulator_id": emu.get("id"), "plan": _plan_summary(emu),
        "emulator_bytes": emu.get("size_bytes"), "full_model_bytes": emu.get("full_model_bytes"),
        "fidelity": emu.get("fidelity"),
        "emulator_params": emu.get("n_params"), "full_model_params": emu.get("full_model_params"),
        "adapter_bytes": adapter.get("size_bytes"), "adapter_id": adapter.get("id"),
        "adapter_status": adapter.get("status"), "train_works": client.train_titles,
        "eval_works": client.eval_titles, "training": training, "metrics": rows,
        "timings_s": {k: round(v, 1) for k, v in timings.items()}, "total_s": round(total_s, 1),
    }


def print_report(r: dict[str, Any]) -> None:
    def ppl(row: dict | None) -> str:
        return f"{row['perplexity']:>12.1f}" if row and isinstance(row.get("perplexity"), (int, float)) else f"{'-':>12}"

    def loss(row: dict | None) -> str:
        key = "loss" if row and "loss" in row else "completion_loss"
        return f"{row[key]:>8.3f}" if row and isinstance(row.get(key), (int, float)) else f"{'-':>8}"

    say("\n" + "=" * 78)
    say("ScaleOT two-party demo: report" + ("  (--tiny: random model, numbers are meaningless)" if r["tiny"] else ""))
    say("=" * 78)
    cfg = r["config"]
    eb, fb = r["emulator_bytes"], r["full_model_bytes"]
    ep, fp = r["emulator_params"], r["full_model_params"]
    say(f"emulator {r['emulator_id']}  N_a={cfg['n_adapter']} alpha={cfg['alpha']} beta={cfg['beta']}")
    say(f"  {r['plan']}")
    if eb and fb:
        say(f"  size {fmt_bytes(eb)} vs full model {fmt_bytes(fb)} ({eb / fb:.0%})"
            + (f"; {ep / 1e6:.1f}M vs {fp / 1e6:.1f}M parameters" if ep and fp else ""))
    fid = r.get("fidelity") or {}
    if fid:
        say(f"  fidelity at build time: perplexity {fid.get('ppl_ratio')}x the full model's, adapter-gradient "
            f"cosine {fid.get('grad_cosine')}")
    say(f"  what came back: adapter {r['adapter_id']} ({fmt_bytes(r['adapter_bytes'])}, {r['adapter_status']})")
    tr = r["training"]
    if tr:
        say(f"data owner trained {tr.get('steps')} steps on {', '.join(r['train_works'])}: loss "
            f"{tr.get('first_loss', float('nan')):.3f} -> {tr.get('final_loss', float('nan')):.3f} "
            f"({fmt_seconds(tr.get('seconds') or 0)})")
    say(f"held-out text: {', '.join(r['eval_works'])} ({cfg['eval_max_examples']} blocks x {cfg['seq_len']} tokens,"
        " scored by the same shared.evaluation code on both sides)")
    say("")
    say(f"{'':44}{'perplexity':>12}{'loss':>8}")
    for name, row in r["metrics"].items():
        say(f"{name:44}{ppl(row)}{loss(row)}")
    rows = r["metrics"]
    zs, ft, pi = (rows["full model, zero-shot (server)"], rows["emulator + fine-tuned adapter (data owner)"],
                  rows["plug-in: full model + adapter (server)"])
    if zs and pi and ft and all(isinstance(x.get("perplexity"), (int, float)) for x in (zs, pi, ft)):
        gain = 1 - pi["perplexity"] / zs["perplexity"]
        gap = ft["perplexity"] / max(pi["perplexity"], 1e-9)
        say("")
        say(f"utility: plug-in vs zero-shot full model, perplexity {zs['perplexity']:.1f} -> {pi['perplexity']:.1f} "
            f"({gain:+.1%} {'better' if gain > 0 else 'worse'})")
        ref = rows.get("same layers tuned in M (demo diagnostic)")
        if ref and isinstance(ref.get("loss"), (int, float)) and ref["loss"] < zs["loss"]:
            r_ratio = (zs["loss"] - pi["loss"]) / (zs["loss"] - ref["loss"])
            say(f"transfer: the plug-in keeps {r_ratio:.0%} of the gain the same layers reach when tuned inside M "
                f"(loss {zs['loss']:.3f} -> {pi['loss']:.3f}, in M -> {ref['loss']:.3f})")
        say(f"privacy: what the data owner holds (emulator + adapter) scores {ft['perplexity']:.1f}, "
            f"{gap:.1f}x the plug-in's perplexity" + (" - it still needs the model owner's full model" if gap > 1.5
                                                       else ""))
    say("")
    say("time: " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in r["timings_s"].items())
        + f"; total {fmt_seconds(r['total_s'])}")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("both", "model-owner", "data-owner"), default="both")
    ap.add_argument("--tiny", action="store_true", help="tiny random model and small data: the same flow in seconds")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="default: demo-run/ (demo-run/tiny with --tiny); holds model-owner/ and data-owner/")
    ap.add_argument("--steps", type=int, help="stage-1 DL steps (default 48; tiny 4)")
    ap.add_argument("--warmup-steps", type=int, help="stage-1 harmonizer warm-start steps (default 10; tiny 1)")
    ap.add_argument("--train-steps", type=int, help="the data owner's training steps (default 60; tiny 4)")
    ap.add_argument("--scale", type=float, help="multiply both budgets (env SCALEOT_DEMO_SCALE)")
    ap.add_argument("--n-adapter", type=int, help="adapter layers N_a (default 4)")
    ap.add_argument("--alpha", type=float, help="share of the other layers replaced by harmonizers (default 0.5)")
    ap.add_argument("--beta", type=float, help="SRC: share of attention rank removed in frozen layers (default 0)")
    ap.add_argument("--seq-len", type=int, help="sequence length for training and evaluation (default 128)")
    ap.add_argument("--batch-size", type=int, help="training batch size (default 4)")
    ap.add_argument("--eval-max-examples", type=int, help="held-out blocks scored (default 64)")
    ap.add_argument("--lr", type=float, help="the data owner's learning rate (default: the client's)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="auto", help="the data owner's device: auto, cpu, cuda")
    ap.add_argument("--port", type=int, default=0, help="--role both: server port (default: a free one)")
    ap.add_argument("--server-url", help="--role model-owner: the running server (e.g. http://server:8000)")
    ap.add_argument("--invitation", type=Path, help="model-owner writes / data-owner reads this JSON file "
                    "(emulator URL, data-owner API key, server public key)")
    ap.add_argument("--report-json", type=Path, help="also write the report as JSON here")
    ap.add_argument("--no-reference", action="store_true", help="skip the demo-only diagnostic: the same adapter "
                    "layers tuned inside the full model (the ceiling the plug-in is measured against)")
    return ap.parse_args(argv)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    global T0, TINY
    T0 = time.monotonic()
    args = parse_args(argv)
    cfg = DemoConfig.for_args(args)
    TINY = cfg.tiny
    workdir = (args.workdir or (ROOT / "demo-run" / ("tiny" if cfg.tiny else ""))).resolve()
    if threading_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    say(f"ScaleOT two-party demo ({'tiny random model' if cfg.tiny else 'SmolLM2-135M'}, role {args.role}); "
        f"workdir {workdir}")
    say(f"budgets: stage 1 {cfg.steps} steps, data owner {cfg.train_steps} steps "
        "(more: DEMO_ARGS='--steps 200 --train-steps 300' or SCALEOT_DEMO_SCALE=4)")
    try:
        if args.role == "both":
            report = run_both(cfg, args, workdir)
        elif args.role == "model-owner":
            run_model_owner(cfg, args, workdir)
            return 0
        else:
            report = run_data_owner(cfg, args, workdir)
    except DemoError as exc:
        say(f"\ndemo failed: {exc}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        stop_children()
    print_report(report)
    path = args.report_json or workdir / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    say(f"\n(report saved to {path})")
    return 0


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_both(cfg: DemoConfig, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import shutil

    owner_dir, client_dir = workdir / "model-owner", workdir / "data-owner"
    server_data = owner_dir / "server-data"
    for fresh in (server_data, client_dir):  # a new story each run; models and corpora stay cached
        shutil.rmtree(fresh, ignore_errors=True)
    owner_dir.mkdir(parents=True, exist_ok=True)
    server_env = {"SCALEOT_EVAL_SEQ_LEN": str(cfg.seq_len), "SCALEOT_EVAL_MAX_EXAMPLES": str(cfg.eval_max_examples),
                  "SCALEOT_EVAL_BATCH_SIZE": str(cfg.batch_size)}
    if cfg.tiny:
        server_env["SCALEOT_EMULATOR_CALIBRATION_STEPS"] = "3"
    if cfg.tiny:
        server_env.update(SCALEOT_IMPORTANCE_SEQ_LEN="64", SCALEOT_IMPORTANCE_MAX_BLOCKS="64",
                          SCALEOT_HEARTBEAT_SECONDS="2")
    step("model owner: start the server (loopback, its own data directory, SQLite)")
    with LocalServer(server_data, owner_dir, args.port, server_env) as server:
        owner = model_owner_flow(cfg, server_url=server.url, cli_env=server.env, owner_dir=owner_dir,
                                 alive=server.check_alive)
        say("\n  the model owner hands the data owner: the emulator URL, an API key, the server's public key")
        say(f"    emulator URL: {owner.invitation.emulator_url}")
        client = data_owner_flow(cfg, owner.invitation, client_dir, device=args.device)
    reference = in_model_reference(cfg, owner_dir, client_dir, client) if not args.no_reference else None
    return build_report(cfg, client, owner, time.monotonic() - T0, reference)


def in_model_reference(cfg: DemoConfig, owner_dir: Path, client_dir: Path, client: ClientResult) -> dict[str, Any]:
    """Demo-only diagnostic (it needs M and the private data together, which neither party has alone): the same
    adapter layers tuned directly inside M with the data owner's recipe, scored like the plug-in. It is the
    ceiling the plug-in is measured against (the transfer ratio)."""
    import torch

    from data_owner_client.train import TrainConfig, train_layers_in_model
    from model_owner_server.scaleot.model_io import load_causal_lm
    from shared.data import load_dataset, pad_id_for, training_examples
    from shared.device import resolve_device
    from shared.evaluation import evaluate

    step("diagnostic (demo only): the same adapter layers tuned inside the full model, same recipe and data")
    t = time.monotonic()
    model_dir, _ = model_owner_files(cfg, owner_dir)
    model, tok = load_causal_lm(model_dir)
    layers = list(client.emulator.get("adapter_layers") or [])
    data = load_dataset(client_dir / "data" / "shakespeare_train.txt")
    held_out = load_dataset(client_dir / "data" / "shakespeare_eval.txt")
    tcfg = TrainConfig(max_steps=cfg.train_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                       lr=cfg.lr, save_every=10**9)
    m, _ = train_layers_in_model(model, layers, training_examples(data, tok, cfg.seq_len), tcfg,
                                 resolve_device("cpu"), pad_id=pad_id_for(tok))
    with torch.no_grad():
        metrics = evaluate(m, tok, held_out, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                           max_examples=cfg.eval_max_examples)
    say(f"  layers {layers} tuned in M: perplexity {metrics['perplexity']:.1f} ({fmt_seconds(time.monotonic() - t)})")
    return {"metrics": metrics, "seconds": round(time.monotonic() - t, 1)}


def run_model_owner(cfg: DemoConfig, args: argparse.Namespace, workdir: Path) -> None:
    if not args.server_url or not args.invitation:
        raise DemoError("--role model-owner needs --server-url and --invitation")
    wait_healthy(args.server_url, timeout_s=300)
    workdir.mkdir(parents=True, exist_ok=True)
    owner = model_owner_flow(cfg, server_url=args.server_url, cli_env=dict(os.environ), owner_dir=workdir,
                             state_file=workdir / "owner-state.json")
    owner.invitation.save(args.invitation)
    say(f"\ninvitation for the data owner written to {args.invitation} "
        f"(emulator URL, API key, server key {owner.invitation.key_id})")


def run_data_owner(cfg: DemoConfig, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if not args.invitation:
        raise DemoError("--role data-owner needs --invitation FILE (written by --role model-owner)")
    invitation = Invitation.load(args.invitation, wait_s=600)
    say(f"invitation: {invitation.emulator_url}, server key {invitation.key_id or invitation.server_pubkey[:12]}")
    wait_healthy(invitation.server_url, timeout_s=300)
    client = data_owner_flow(cfg, invitation, workdir, device=args.device)
    return build_report(cfg, client, None, time.monotonic() - T0)


if __name__ == "__main__":
    sys.exit(main())
