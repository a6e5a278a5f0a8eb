"""The demo's child processes: the product's console scripts (`modelowner-server`, `dataowner-client`) run
with only their own party's environment, and `LocalServer`, the model owner's server on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from tooling.procs import ServeProcess, console_script

from .config import DemoError
from .console import say

TINY = False  # set by the demo's main() for --tiny (threads: one per child process)


_children: list[subprocess.Popen] = []


def tool(name: str) -> list[str]:
    """A console script of this environment (the venv's bin/, else PATH, else `python -m`)."""
    return console_script(name)


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


def run_cmd(
    cmd: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    capture: bool = False,
    env_note: str = "",
    secret_output: bool = False,
) -> str:
    """Run a command, streaming its output (with `capture`, stdout is returned and stderr streamed).

    In a terminal the child writes to it directly (live progress bars); otherwise (CI logs, pipes) its
    stderr is pumped through `_pump`, which keeps every message but only one progress-bar update per 10 s.
    """
    show_cmd(cmd, env_note)
    pump = not sys.stderr.isatty()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if pump else None
    )
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
            seg, end, buf = buf[:cut], buf[cut : cut + 1], buf[cut + 1 :]
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


class LocalServer(ServeProcess):
    """`modelowner-server serve` on loopback with its own data directory; stopped on exit, whatever happens."""

    def __init__(self, data_dir: Path, cwd: Path, port: int, server_env: dict[str, str]):
        env = clean_env(SCALEOT_DATA_DIR=str(data_dir), **server_env)
        # A session of its own: Ctrl-C in the terminal reaches the demo, which then stops the server cleanly.
        super().__init__(env, cwd / "server.log", port=port or None, command=tool("modelowner-server"), cwd=cwd)
        self.new_session, self.data_dir = True, data_dir

    def __enter__(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log.unlink(missing_ok=True)  # this run's log only
        show_cmd(self.command, f"SCALEOT_DATA_DIR={self.data_dir} ")
        say(f"    (server log: {self.log})")
        _servers.append(self)  # main() stops it even if Ctrl-C lands before the with-block owns it
        try:
            self.start(timeout=120)
            say(f"    server up at {self.url}")
        except RuntimeError as exc:
            self.stop()
            raise DemoError(str(exc)) from None
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        try:
            super().check_alive()
        except RuntimeError as exc:
            raise DemoError(str(exc)) from None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int | None:
        """SIGINT: uvicorn's graceful shutdown; says so when it stopped a running server."""
        running = self.proc is not None and self.proc.poll() is None
        code = super().stop(sig, timeout)
        if running:
            say(f"  server stopped (exit {code})")
        return code
