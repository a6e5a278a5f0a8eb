"""Child processes and waiting, for the tooling around the product: a free loopback port, polling until a
condition holds or a job reaches a state, stopping a child this tool started, and `modelowner-server serve`
as a child process on loopback.

One copy for the tests, the reliability runs, the benchmarks, the demo and scripts/test_services.py (the data
owner's client polls its jobs with its own code, data_owner_client/poll.py: the product does not import this).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

LOOPBACK = "127.0.0.1"
T = TypeVar("T")

# `python -m` fallbacks for the console scripts, where the environment has no installed entry point
_SCRIPT_MODULES = {"modelowner-server": "model_owner_server.cli", "dataowner-client": "data_owner_client"}


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it; a child binds it moments later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    ready: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "the condition",
    alive: Callable[[], None] | None = None,
) -> T:
    """Call `ready` until it returns something truthy, and return that. `alive` runs before each try and
    raises when what is being waited for has died (a child process that exited), so a crash is reported at
    once instead of after `timeout` seconds. TimeoutError (naming `what`) when the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def job_finished(job: Mapping[str, Any]) -> bool:
    """A job that will not change any more (succeeded, failed or cancelled)."""
    return job["status"] not in ("queued", "running")


def wait_job(
    http: httpx.Client,
    job_id: str,
    until: Callable[[dict[str, Any]], bool] = job_finished,
    *,
    timeout: float = 120.0,
    interval: float = 0.1,
    succeeded: bool = False,
    alive: Callable[[], None] | None = None,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Poll GET /v1/jobs/{job_id} until `until(job)` holds; return that job. With `succeeded`, a job that
    ended otherwise raises RuntimeError with its error. `http` is any httpx client (a FastAPI TestClient too),
    `headers` go with each request (for clients without default ones)."""
    last: dict[str, Any] = {}

    def poll() -> dict[str, Any] | None:
        nonlocal last
        last = http.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return last if until(last) else None

    try:
        job = wait_until(poll, timeout=timeout, interval=interval, alive=alive, what=f"job {job_id}")
    except TimeoutError:
        raise TimeoutError(
            f"job {job_id} did not reach the expected state in {timeout:.0f} s; last seen: {last}"
        ) from None
    if succeeded and job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error') or job.get('message')}")
    return job


def wait_jobs_settled(http: httpx.Client, timeout: float = 300.0) -> None:
    """Wait until none of the jobs `http`'s key can see (the newest 500) is queued or running."""
    for job in http.get("/v1/jobs", params={"limit": 500}).json()["jobs"]:
        if not job_finished(job):
            wait_job(http, job["id"], timeout=timeout)


@contextmanager
def uvicorn_in_thread(app: Any, *, timeout: float = 30.0, log_level: str = "warning") -> Iterator[int]:
    """`app` behind a real uvicorn server on loopback, in a daemon thread of this process, with lifespan off
    (the caller has started the app, e.g. through its TestClient); yields the port the OS gave it."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=0, lifespan="off", log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def alive() -> None:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited while starting")

    try:
        wait_until(lambda: server.started, timeout=timeout, interval=0.01, alive=alive, what="uvicorn to start")
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
    """Send `sig` to one child this tool started (by its handle) and wait for it; SIGKILL when it is still
    running after `timeout` seconds. Returns its exit status (None for no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def console_script(name: str) -> list[str]:
    """The command that runs one of the project's console scripts: this interpreter's bin/, else PATH, else
    `python -m` on its module (an environment where the project is not installed)."""
    here = Path(sys.executable).with_name(name)
    if here.exists():
        return [str(here)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", _SCRIPT_MODULES[name]]


def small_server_env(data_dir: Path, db_url: str | None = None, **extra: str) -> dict[str, str]:
    """This environment plus the settings of a small CPU server for tests and reliability runs: its own data
    dir, the SqliteHuey queue with the embedded worker, tiny sequence lengths, 1 s heartbeats; `db_url` None
    leaves the server's default (SQLite in the data dir); `extra` (SCALEOT_* names) override."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SCALEOT_DATA_DIR": str(data_dir),
        "SCALEOT_DEVICE": "cpu",
        "SCALEOT_QUEUE_URL": "",
        "SCALEOT_EMBEDDED_WORKER": "true",
        "SCALEOT_IMPORTANCE_SEQ_LEN": "32",
        "SCALEOT_IMPORTANCE_BATCH_SIZE": "2",
        "SCALEOT_EVAL_SEQ_LEN": "32",
        "SCALEOT_EVAL_MAX_EXAMPLES": "4",
        "SCALEOT_HEARTBEAT_SECONDS": "1",
    }
    if db_url is not None:
        env["SCALEOT_DATABASE_URL"] = db_url
    env.update(extra)
    return env


def wait_healthy(
    url: str, *, timeout: float = 120.0, interval: float = 0.2, alive: Callable[[], None] | None = None
) -> float:
    """Wait until GET {url}/healthz answers 200; returns the seconds it took."""
    t0 = time.monotonic()

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=timeout, interval=interval, alive=alive, what=f"{url}/healthz to answer 200")
    return time.monotonic() - t0


class ServeProcess:
    """`modelowner-server serve` (or `command`, which takes the same arguments) on 127.0.0.1, its output
    appended to `log`; restartable on the same port. A context manager: stopped on exit, whatever happens."""

    def __init__(
        self,
        env: Mapping[str, str],
        log: Path,
        *,
        port: int | None = None,
        command: Sequence[str] | None = None,
        args: Sequence[str] = (),
        cwd: Path | None = None,
        new_session: bool = False,
    ):
        self.env, self.log, self.cwd, self.new_session = dict(env), Path(log), cwd, new_session
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.command = [*(command or console_script("modelowner-server")), "serve", "--host", LOOPBACK]
        self.command += ["--port", str(self.port), *args]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server is not running")
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start it and wait for /healthz; returns the seconds that took. RuntimeError (with the end of the
        log) when it exits or does not answer in time."""
        with open(self.log, "ab") as out:  # the child keeps its own copy of the descriptor
            out.write(f"\n===== start #{self.starts + 1}\n".encode())
            out.flush()
            # new_session: Ctrl-C in a terminal reaches only this tool, which then stops the server cleanly
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        self.starts += 1
        try:
            return wait_healthy(self.url, timeout=timeout, alive=self.check_alive)
        except TimeoutError as exc:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"{exc}; the end of {self.log}:\n{self.tail()}") from None

    def check_alive(self) -> None:
        """RuntimeError with the end of the log when the server has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {self.proc.returncode}; the end of {self.log}:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal it (SIGTERM: uvicorn's graceful shutdown; SIGKILL: a power cut) and wait; its exit status."""
        try:
            return stop_process(self.proc, sig, timeout)
        finally:
            self.proc = None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
